"""Where the model looked: Grad-CAM maps and overlay images. No Ray here.

Grad-CAM (through the ``grad-cam`` library) needs gradients, so it runs on
the plain model (batch norms not folded) and never on the scoring engines.
``HEATMAP_LAYER`` is the block whose activations are weighted: ResNet18's
``layer3`` gives a map of (S/16)^2 cells (4x4 at the demo's 64 px, 14x14 at
224 px); the last block, ``layer4``, gives 2x2 at 64 px, too coarse to point
at a finding (the pointing-game test in tests/test_heatmaps.py measures
both).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import nn

from mura_ray.imaging.tensors import to_input
from mura_ray.model.calibration import IDENTITY, Calibration
from mura_ray.model.ensemble import members_of

HEATMAP_LAYER = "layer3"
OVERLAY_ALPHA = 0.45


def grad_cam(
    model: nn.Module, pixels: np.ndarray, *, layer: str = HEATMAP_LAYER, calibration: Calibration = IDENTITY
) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, S) uint8 model inputs -> ((B, S, S) float32 maps in [0, 1], (B,) calibrated P(abnormal)).

    The map is Grad-CAM for the "abnormal" class at ``layer`` (a block name of
    torchvision's ResNet), upsampled to the input and scaled to [0, 1] per image.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    device = next(model.parameters()).device
    x = to_input(torch.from_numpy(np.ascontiguousarray(pixels)).to(device), channels_last=False)
    targets = [getattr(m, layer)[-1] for m in members_of(model)]  # an ensemble's maps are its members' mean
    with GradCAM(model=model, target_layers=targets) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * len(x))
        logits = cam.outputs.detach().float()
    probs = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
    return np.asarray(maps, dtype=np.float32), calibration.apply(probs)


def peak(cam: np.ndarray) -> tuple[int, int]:
    """(x, y) of the map's largest value."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(x), int(y)


def overlay(display: np.ndarray, cam: np.ndarray, prob: float, caption: str = "") -> np.ndarray:
    """An (H, 2W + gap, 3) uint8 picture: the radiograph, then the radiograph under the heatmap, with the score.

    ``display`` is the model's input region at any resolution ((W, W) uint8);
    ``cam`` the (S, S) map, resized to it.
    """
    side = display.shape[0]
    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)) / 255.0
    colours = colormaps["jet"](heat)[..., :3]  # (W, W, 3) in [0, 1]
    gray = np.repeat(display[..., None] / 255.0, 3, axis=2)
    blended = (1 - OVERLAY_ALPHA) * gray + OVERLAY_ALPHA * colours
    banner = 18
    canvas = np.zeros((side + banner, 2 * side + 4, 3), dtype=np.uint8)
    canvas[banner:, :side] = (gray * 255).astype(np.uint8)
    canvas[banner:, side + 4 :] = (blended * 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    text = f"P(abnormal) {prob:.3f}" + (f"  {caption}" if caption else "")
    ImageDraw.Draw(image).text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(image)


def png_bytes(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def display_square(gray_square: Any, image_size: int, cache_side: int, side: int = 256) -> np.ndarray:
    """The model's input region of a cached square, at ``side`` pixels: the centre ``image_size / cache_side``
    of it, resized (for display only; the map is computed on the model's own input)."""
    square = np.asarray(gray_square)
    keep = round(square.shape[0] * image_size / cache_side)
    off = (square.shape[0] - keep) // 2
    crop = square[off : off + keep, off : off + keep]
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.BILINEAR))
