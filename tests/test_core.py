"""The Ray-free core: decoding, transforms, model input, metrics, one train step."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from mura_ray.decode import DecodeError, decode_gray, load_square
from mura_ray.engine import score_step, train_one_epoch
from mura_ray.metrics import binary_metrics, study_scores
from mura_ray.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    for_inference,
    parse_trainable,
    set_trainable,
    to_input,
)
from mura_ray.train import EarlyStopping, class_weights
from mura_ray.transforms import EvalPreset, TrainPreset


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


def test_inference_model_folds_batch_norm_without_changing_scores():
    torch.manual_seed(3)
    model = build_model()
    for m in model.modules():  # batch-norm statistics far from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    fast = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    pixels = torch.randint(0, 256, (6, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        plain, folded = score_step(model, pixels), score_step(fast, pixels)
    assert torch.allclose(plain, folded, atol=1e-5), (plain, folded)
    assert not model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    m = binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["sensitivity"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    ids, sp, sl = study_scores(np.array(["b", "a", "b"]), np.array([0.2, 0.9, 0.4]), np.array([1, 0, 1]))
    assert list(ids) == ["a", "b"] and np.allclose(sp, [0.9, 0.3]) and list(sl) == [0, 1]


def test_class_weights_and_early_stopping():
    assert class_weights(np.array([0, 0, 0, 1])) == pytest.approx([4 / 6, 2.0])
    stop = EarlyStopping(patience=2)
    assert [stop.step(s) for s in (0.5, 0.6, 0.6, 0.55)] == [True, True, False, False]
    assert stop.should_stop


def test_partial_unfreeze_trains_only_named_blocks():
    model = build_model()
    set_trainable(model, parse_trainable("layer3,layer4,fc"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "weight" in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [{"pixels": torch.randint(0, 255, (4, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 0, 1])}]
    out = train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), opt, torch.device("cpu"))
    assert out["images"] == 4 and np.isfinite(out["loss"])
    after = model.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    probs = score_step(model, torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8))
    assert probs.shape == (3,) and bool(((probs >= 0) & (probs <= 1)).all())
