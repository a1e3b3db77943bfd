"""The model and its steps (no Ray): folding for inference, class weights, partial unfreezing, one epoch."""

import numpy as np
import pytest
import torch

from mura_ray.model.resnet import build_model, for_inference, parse_trainable, set_trainable
from mura_ray.model.steps import class_weights, score_step, train_one_epoch
from mura_ray.training.stopping import EarlyStopping


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
        plain, folded = score_step(model, pixels, "fp32"), score_step(fast, pixels, "fp32")
    assert torch.allclose(plain, folded, atol=1e-5), (plain, folded)
    assert not model.training and any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    )  # original untouched


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


def test_frozen_blocks_keep_their_batch_norm_statistics_through_an_epoch():
    model = build_model()
    set_trainable(model, parse_trainable("layer3,layer4,fc"))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [{"pixels": torch.randint(0, 255, (4, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 0, 1])}]
    train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), opt, torch.device("cpu"))
    after = model.state_dict()
    frozen = [k for k in stats if k.split(".")[0] in ("bn1", "layer1", "layer2")]
    trained = [k for k in stats if k.split(".")[0] in ("layer3", "layer4")]
    assert frozen and trained
    assert all(torch.equal(stats[k], after[k]) for k in frozen)  # ImageNet's statistics stay
    assert not all(torch.equal(stats[k], after[k]) for k in trained)  # the trained blocks' follow the data
    assert model.layer3.training and not model.layer1[0].bn1.training
