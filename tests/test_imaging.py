"""Decoding and preprocessing (no Ray): bytes -> 8-bit gray -> cached square -> presets -> model input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mura_ray.imaging.decode import DecodeError, decode_gray
from mura_ray.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreset, load_square
from mura_ray.imaging.tensors import TrainPreset, to_input


def _png(array, mode=None, fmt="PNG"):
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, format=fmt)
    return buf.getvalue()


GRAY = (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300) % 251).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_decode_modes_to_gray(mode):
    out = decode_gray(_png(GRAY, mode))
    assert out.dtype == np.uint8 and out.shape == (200, 300)


def test_decode_16bit_and_cmyk_jpeg():
    deep = decode_gray(_png(GRAY.astype(np.uint16) * 200))
    assert deep.dtype == np.uint8 and deep.max() == 255
    buf = io.BytesIO()
    Image.fromarray(GRAY).convert("CMYK").save(buf, format="JPEG")
    assert decode_gray(buf.getvalue()).shape == (200, 300)


@pytest.mark.parametrize("data", [b"", b"hello, not a png", _png(GRAY)[:100]])
def test_bad_bytes_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_gray(data)


def test_load_square_keeps_the_centre():
    arr = np.zeros((200, 400), np.uint8)
    arr[:, 150:250] = 255
    sq = load_square(_png(arr), 100)
    assert sq.shape == (100, 100)
    assert sq[:, 40:60].mean() > 250 and sq[:, :10].mean() < 5


def test_presets_shapes_and_eval_is_fixed():
    batch = {"pixels": np.random.default_rng(0).integers(0, 255, (4, 73, 73), dtype=np.uint8), "label": np.arange(4)}
    ev = EvalPreset(size=64)
    assert np.array_equal(ev(batch)["pixels"], ev(batch)["pixels"])
    assert np.array_equal(ev(batch)["pixels"], batch["pixels"][:, 4:68, 4:68])
    tr = TrainPreset(size=64, seed=1)(batch)
    assert tr["pixels"].shape == (4, 64, 64) and tr["pixels"].dtype == np.uint8
    assert not np.array_equal(tr["pixels"], ev(batch)["pixels"])
    assert np.array_equal(tr["label"], batch["label"])


def test_to_input_repeats_gray_and_normalises():
    x = to_input(torch.full((2, 8, 8), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 8, 8)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))
