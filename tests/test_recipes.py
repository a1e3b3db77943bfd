"""Training recipes: what --recipe gives the options left unset, and what the user sets stays."""

from __future__ import annotations

import math

import pytest

from mura_ray import cli
from mura_ray.config import TrainConfig
from mura_ray.recipes import recipe_lr, resolve
from mura_ray.training.stopping import EarlyStopping


def _cfg(**kw):
    return TrainConfig(data="/archive", out="/run", **kw)


def test_the_default_recipe_is_the_first_run_anywhere():
    cfg = _cfg()
    resolve(cfg)
    assert (cfg.image_size, cfg.fit, cfg.batch_size, cfg.lr, cfg.epochs) == (224, "pad", 32, 1e-3, 10)
    assert (cfg.rotation, cfg.select_on, cfg.trainable) == (15.0, "f1", "layer3,layer4,fc")


def test_the_mura_recipe_follows_the_paper_and_scales_the_learning_rate_with_the_global_batch():
    cfg = _cfg(recipe="mura", workers=4)
    filled = resolve(cfg)
    assert (cfg.image_size, cfg.fit, cfg.batch_size, cfg.epochs) == (320, "stretch", 8, 30)
    assert (cfg.rotation, cfg.select_on, cfg.trainable) == (30.0, "study_kappa", "all")
    assert cfg.lr == pytest.approx(1e-4 * math.sqrt(4 * 8 / 8)) and "lr=0.0002" in filled
    assert recipe_lr("mura", 1, 8) == pytest.approx(1e-4)  # the paper's one GPU at batch 8


def test_what_the_user_sets_beats_the_recipe():
    cfg = _cfg(recipe="mura", image_size=224, lr=3e-4, fit="pad", trainable="layer4,fc", select_on="auroc")
    filled = resolve(cfg)
    assert (cfg.image_size, cfg.lr, cfg.fit, cfg.trainable, cfg.select_on) == (224, 3e-4, "pad", "layer4,fc", "auroc")
    assert not any(f.startswith(("image_size", "lr", "fit", "trainable", "select_on")) for f in filled)


def test_help_says_what_each_recipe_sets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe {default,mura}" in text and "mura = the MURA paper's: 320 px, stretch" in text
    assert "--select-on {f1,study_kappa,auroc}" in text and "--fit {pad,stretch,crop}" in text


def test_an_undefined_score_never_beats_a_defined_one_but_the_first_epoch_is_kept():
    stop = EarlyStopping(patience=2)
    assert stop.step(float("nan"))  # nothing better yet: kept
    assert stop.step(0.4) and not stop.step(float("nan")) and not stop.step(0.3)
    assert stop.should_stop and stop.best == 0.4
