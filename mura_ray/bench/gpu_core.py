"""The GPU check: mura-ray's own training and scoring code on one GPU, with no Ray. Run from the repository root:

    python3 -m mura_ray.bench.gpu_core [--image-size 224] [--train-batch 128] [--score-batch 256]

It imports only the compute core (imaging, model, the epoch code and the
distributed helpers), so it runs where Ray is not installed, with torch 2.11
or newer, in a few minutes. What it runs, and prints:

1. DDP: a one-rank process group with the backend the trainer uses on GPUs
   (``cpu:gloo,cuda:nccl``), the model wrapped in DDP on the GPU, and the
   worker's own epoch code (``training.epoch``: train steps with the
   class-weighted loss, the loss averaged over workers, the tuning split's
   predictions gathered) for a few batches; a one-rank group runs the same
   collectives as a larger one. Then bf16-autocast training in images/s.
2. Scoring: the scoring actor's own code (``model.scorer.BatchScorer``:
   engine selection with its accuracy guard, host-to-device copies,
   calibration) for each engine the GPU runs, images/s and max |dP| against
   IEEE fp32.
3. Decoding (PNG -> cached square) on all the node's CPUs, images/s, and how
   many cores keep the GPU's scoring busy.

The cuDNN settings are the product's: no ``cudnn.benchmark``, fp32 as IEEE.
``--device cpu`` runs the same steps on a CPU (gloo), as the test suite does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from mura_ray.archive.sample import encode_png, render_radiograph
from mura_ray.hardware import bf16_native, cpu_line, cuda_report, ieee_fp32
from mura_ray.imaging.preprocess import cache_side, load_square
from mura_ray.model import backends
from mura_ray.model.checkpoint import model_id_of, state_dict_bytes
from mura_ray.model.resnet import build_model
from mura_ray.model.scorer import BatchScorer
from mura_ray.training.distributed import backend_for, gather_arrays, world
from mura_ray.training.epoch import train_epoch, tune_predictions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _radiographs(n: int, side: int, seed: int) -> np.ndarray:
    """``n`` cached squares of the synthetic archive's radiographs (as decoding leaves them)."""
    return np.stack(
        [load_square(encode_png(render_radiograph(seed + i, i % 3 == 0), rgb=False), side) for i in range(n)]
    )


def _batches(squares: np.ndarray, labels: np.ndarray, batch: int, device: torch.device, steps: int):
    """Training batches as Ray Data hands them to a worker: tensors already on the worker's device."""
    for i in range(steps):
        idx = np.arange(i * batch, (i + 1) * batch) % len(squares)
        yield {
            "pixels": torch.from_numpy(squares[idx]).to(device, non_blocking=True),
            "label": torch.from_numpy(labels[idx]).to(device, non_blocking=True),
        }


def check_ddp(device: torch.device, size: int, batch: int, steps: int) -> None:
    """The worker's epoch code under DDP in a one-rank group of the trainer's backend; then bf16 training speed."""
    backend = backend_for(device.type == "cuda")
    init = f"file://{tempfile.mkdtemp()}/pg"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    try:
        print(f"process group: backend {dist.get_backend()!r} (asked {backend!r}), rank/world {world()}")
        side = cache_side(size)
        squares = _radiographs(64, side, seed=0)
        labels = (np.arange(64) % 3 == 0).astype(np.int64)
        crop = (side - size) // 2
        squares = np.ascontiguousarray(squares[:, crop : crop + size, crop : crop + size])
        torch.manual_seed(0)
        model = build_model().to(device, memory_format=torch.channels_last)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.66, 2.0], device=device))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss, images = train_epoch(
            ddp, _batches(squares, labels, batch, device, 3), loss_fn, optimizer, device, None, "auto"
        )
        tune = [
            {
                "pixels": squares[i : i + 16],
                "label": labels[i : i + 16],
                "image_uri": np.array([f"t/{j}" for j in range(i, i + 16)], dtype=object),
            }
            for i in range(0, 64, 16)
        ]
        catalog = pa.table(
            {"image_uri": [f"t/{j}" for j in range(64)], "study_uri": [f"s/{j // 2}" for j in range(64)]}
        )
        predictions, tune_loss = tune_predictions(model, tune, device, loss_fn, catalog)
        gathered = gather_arrays({"n": np.array([predictions.num_rows])})
        ok = np.isfinite(loss) and np.isfinite(tune_loss) and predictions.num_rows == 64 and int(gathered["n"][0]) == 64
        print(
            f"DDP epoch code: {images} images trained, loss {loss:.4f}, tuning loss {tune_loss:.4f} on "
            f"{predictions.num_rows} gathered predictions: {'ok' if ok else 'FAILED'}"
        )
        precision = "bf16" if bf16_native(device) else "fp32"
        train_epoch(ddp, _batches(squares, labels, batch, device, 2), loss_fn, optimizer, device, None, precision)
        _sync(device)
        t0 = time.perf_counter()
        _, images = train_epoch(
            ddp, _batches(squares, labels, batch, device, steps), loss_fn, optimizer, device, None, precision
        )
        _sync(device)
        rate = images / (time.perf_counter() - t0)
        print(f"training ({precision} autocast, all blocks, batch {batch}, DDP): {rate:.0f} images/s")
    finally:
        dist.destroy_process_group()


def check_scoring(device: torch.device, size: int, batch: int, steps: int) -> float:
    """The scoring actor's code for each engine this device runs: images/s and max |dP| against IEEE fp32."""
    torch.manual_seed(1)
    weights = state_dict_bytes(build_model())
    model_id, side = model_id_of(weights), cache_side(size)
    squares = _radiographs(batch, side, seed=100)
    rows = {
        "image_uri": np.array([f"i/{j}" for j in range(batch)], dtype=object),
        "pixels": squares,
        "error": np.full(batch, "", dtype=object),
        "modality": np.full(batch, "", dtype=object),
    }
    threads = max(1, (os.cpu_count() or 1) // 2)
    reference = BatchScorer(weights, model_id, size, threads, device, "torch", "fp32")(rows)["prob_abnormal"]
    best = 0.0
    for name, precision in backends.all_engines(device):
        scorer = BatchScorer(weights, model_id, size, threads, device, name, precision)
        out = scorer(rows)  # builds the engine and runs the guard on this batch
        dp = float(np.max(np.abs(out["prob_abnormal"] - reference)))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            scorer(rows)
        _sync(device)
        ips = batch * steps / (time.perf_counter() - t0)
        best = max(best, ips)
        print(f"scoring {scorer.engine.label:22s} batch {batch}: {ips:8.0f} images/s, max |dP| vs IEEE fp32 {dp:.2e}")
    return best


def check_decode(size: int, cores: int, n: int) -> float:
    images = [encode_png(render_radiograph(i, i % 3 == 0), rgb=i % 5 == 0) for i in range(32)]
    side = cache_side(size)
    work = [(images[i % len(images)], side) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.starmap(load_square, work[:cores])  # start-up
        t0 = time.perf_counter()
        pool.starmap(load_square, work, chunksize=8)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--score-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--decode-images", type=int, default=2000)
    args = parser.parse_args()

    if args.device == "cuda":
        report = cuda_report("this node")
        if not report["cuda"]:
            raise SystemExit(f"gpu_core: {report['message']}")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        print(
            f"device: {report['name']}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; bf16 native: {bf16_native(device)}"
        )
    else:
        device = torch.device("cpu")
        print(f"device: CPU; torch {torch.__version__}; bf16 native: {bf16_native(device)}")
    ieee_fp32()  # as the training workers and the scoring actors set it
    print(f"cudnn.benchmark: {torch.backends.cudnn.benchmark}; image size {args.image_size}")
    print(cpu_line())

    check_ddp(device, args.image_size, args.train_batch, args.steps)
    best = check_scoring(device, args.image_size, args.score_batch, args.steps)
    rate = check_decode(args.image_size, args.cores, args.decode_images)
    print(f"decode (PNG -> cached square) on {args.cores} cores: {rate:.0f} images/s, {rate / args.cores:.0f} per core")
    print(f"cores of decoding that keep the fastest scoring engine busy: {best / max(rate / args.cores, 1e-9):.0f}")


if __name__ == "__main__":
    main()
