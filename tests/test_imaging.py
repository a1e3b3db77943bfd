"""Decoding and preprocessing (no Ray): bytes -> 8-bit gray -> cached square -> presets -> model input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mura_ray.imaging.decode import DecodeError, decode_gray
from mura_ray.imaging.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalPreset,
    cache_side,
    fit_of,
    fit_square,
    load_square,
)
from mura_ray.imaging.tensors import TrainPreset, to_input
from tests.helpers import box_in_input


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


def _tall_bone_with_findings_at_both_ends():
    """A 512x128 radiograph (a forearm's proportions) with a bright mark near each end of the long axis."""
    arr = np.full((512, 128), 40, np.uint8)
    arr[10:40, 50:80] = 255  # near the top
    arr[470:500, 50:80] = 255  # near the bottom
    return arr


@pytest.mark.parametrize(("fit", "sees_the_ends"), [("pad", True), ("stretch", True), ("crop", False)])
def test_pad_and_stretch_keep_the_ends_of_a_long_bone_that_crop_cuts_away(fit, sees_the_ends):
    size = 64
    side = cache_side(size, fit)
    square = EvalPreset(size=size)(
        {"pixels": load_square(_png(_tall_bone_with_findings_at_both_ends()), side, fit=fit)[None]}
    )["pixels"][0]
    assert square.shape == (size, size)
    top, bottom = square[: size // 2], square[size // 2 :]
    assert bool(top.max() > 200 and bottom.max() > 200) == sees_the_ends
    if fit == "pad":  # letterboxed: black bars left and right, the aspect ratio kept
        assert square[:, :20].max() == 0 and square[:, -20:].max() == 0


@pytest.mark.parametrize("fit", ["pad", "stretch", "crop"])
def test_a_box_maps_to_where_its_pixels_land_in_the_model_input(fit):
    arr = np.zeros((300, 180), np.uint8)
    x0, y0, x1, y1 = 60, 120, 99, 179  # inclusive pixel box
    arr[y0 : y1 + 1, x0 : x1 + 1] = 255
    size = 96
    square = load_square(_png(arr), cache_side(size, fit), fit=fit)
    model_input = EvalPreset(size=size)({"pixels": square[None]})["pixels"][0]
    ys, xs = np.nonzero(model_input > 127)
    box = box_in_input((x0, y0, x1, y1), 300, 180, size, fit)
    assert box[0] == pytest.approx(xs.min(), abs=1.5) and box[2] == pytest.approx(xs.max() + 1, abs=1.5)
    assert box[1] == pytest.approx(ys.min(), abs=1.5) and box[3] == pytest.approx(ys.max() + 1, abs=1.5)


def test_the_model_records_its_fit_and_older_models_read_as_crop():
    from mura_ray.model.checkpoint import model_metadata

    meta = model_metadata(64, "pad")
    assert (meta["fit"], meta["cache_side"], fit_of(meta)) == ("pad", 64, "pad")
    assert model_metadata(64, "crop")["cache_side"] == cache_side(64) == 73
    before = {k: v for k, v in model_metadata(64).items() if k != "fit"}
    assert fit_of(before) == "crop"
    # An image 100,000 pixels long fits in the square without a 100,000-pixel intermediate.
    assert fit_square(np.zeros((1, 100_000), np.uint8), 64, "pad").shape == (64, 64)
