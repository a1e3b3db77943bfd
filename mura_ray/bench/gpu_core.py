"""Measure mura-ray's compute core on one GPU, with no Ray: run from the repository root.

    python3 -m mura_ray.bench.gpu_core [--image-size 224] [--batches 256 512 1024] [--cores K]

It imports only the compute core (imaging, model), so it runs where Ray is
not installed.

Prints, in images/s: the ResNet18 forward pass (bf16 autocast where the
GPU has it, channels_last) per batch size, the train step (all blocks and
layer3/layer4/fc), CPU decode per core, and the decode-bound limit of a node
with K cores, next to the GPU's forward rate.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mura_ray.archive.sample import encode_png, render_radiograph
from mura_ray.hardware import cpu_line
from mura_ray.imaging.preprocess import cache_side, load_square
from mura_ray.model.resnet import BLOCKS, DEFAULT_TRAINABLE, build_model, for_inference, set_trainable
from mura_ray.model.steps import score_step, train_step


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def forward_ips(device: torch.device, size: int, batch: int, steps: int) -> float:
    model = for_inference(build_model(), device)
    x = torch.randint(0, 255, (batch, size, size), dtype=torch.uint8, device=device)
    return batch * steps / _timed(lambda: score_step(model, x), steps, device)


def train_ips(device: torch.device, size: int, batch: int, steps: int, blocks: tuple[str, ...]) -> float:
    model = build_model().to(device, memory_format=torch.channels_last).train()
    set_trainable(model, blocks)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randint(0, 255, (batch, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    return batch * steps / _timed(lambda: train_step(model, x, y, loss_fn, opt), steps, device)


def decode_ips_per_core(size: int, n: int = 400) -> float:
    images = [encode_png(render_radiograph(i, i % 3 == 0), rgb=i % 5 == 0) for i in range(64)]
    side = cache_side(size)
    t0 = time.perf_counter()
    for i in range(n):
        load_square(images[i % len(images)], side)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.backends.cudnn.benchmark = True
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {bf16}; image size {args.image_size}")
    print(cpu_line())

    best_forward = 0.0
    for b in args.batches:
        ips = forward_ips(device, args.image_size, b, args.steps)
        best_forward = max(best_forward, ips)
        print(f"forward (score_step), batch {b:5d}: {ips:10.0f} images/s")
    for label, blocks in (("all blocks", BLOCKS), ("layer3,layer4,fc", DEFAULT_TRAINABLE)):
        ips = train_ips(device, args.image_size, args.train_batch, max(5, args.steps // 2), blocks)
        print(f"train step ({label}), batch {args.train_batch}: {ips:10.0f} images/s")
    per_core = decode_ips_per_core(args.image_size)
    print(f"CPU decode + resize (PNG, MURA-like sizes): {per_core:.0f} images/s per core")
    limit = per_core * args.cores
    print(
        f"decode-bound limit of a node with {args.cores} cores: {limit:.0f} images/s; "
        f"the GPU forward pass needs {best_forward / per_core:.0f} cores of decoding to stay busy"
    )


if __name__ == "__main__":
    main()
