"""DDP training on a real local Ray cluster with 2 CPU workers."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from sklearn.metrics import cohen_kappa_score
from torchvision.models import resnet18

from mura_ray.config import DemoConfig
from mura_ray.demo import demo_train_config
from mura_ray.model.steps import class_weights
from mura_ray.reporting.metrics import choose_threshold, study_scores
from mura_ray.training.driver import run_training
from tests.helpers import read_events


@pytest.mark.timeout(600)
def test_two_worker_ddp_trains_and_keeps_a_loadable_checkpoint(trained_run, learn_archive):
    cfg, result = trained_run
    _, plan = learn_archive
    history = json.load(open(os.path.join(cfg.out, "metrics.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    # The tuning split (training patients set aside) is covered exactly once across the two workers.
    tune = set(open(os.path.join(cfg.out, "tune_patients.txt")).read().split())
    assert 0 < len(tune) < len({i.patient_id for i in plan if i.split == "train"})
    assert all(h["tune_images"] == sum(i.split == "train" and i.patient_id in tune for i in plan) for h in history)

    model_dir = result["model_dir"]
    model = resnet18(num_classes=2)
    model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")), strict=True)
    meta = json.load(open(os.path.join(model_dir, "metadata.json")))
    expected = class_weights(np.array([i.label for i in plan if i.split == "train" and i.patient_id not in tune]))
    assert meta["class_weights"] == pytest.approx(expected)
    assert meta["architecture"] == "resnet18" and meta["image_size"] == 48
    assert meta["train_config"]["trainable"] == "layer3,layer4,fc"
    assert meta["model_id"] == result["model_id"]
    assert meta["metrics"]["epoch"] in (1, 2)


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(trained_run):
    cfg, _ = trained_run
    events = read_events(cfg.out)
    done = [e["epoch"] for e in events if e["event"] == "epoch_done"]
    assert done == [1, 2]  # the planned epochs, none trained twice past the restored one
    assert [e["after_epoch"] for e in events if e["event"] == "resumed"] == [1]
    history = json.load(open(os.path.join(cfg.out, "metrics.json")))
    assert [h["resumed_from"] for h in history] == [0, 1]


@pytest.mark.timeout(600)
def test_threshold_model_card_and_curves_are_kept_with_the_model(trained_run):
    cfg, result = trained_run
    model_dir = result["model_dir"]
    meta = json.load(open(os.path.join(model_dir, "metadata.json")))
    assert meta["protocol"]["chosen_on"] == {"epoch": "tune", "temperature": "tune", "threshold": "tune"}

    def study_level(name):  # the run directory's copy, which names images and patients (the model's does not)
        preds = pq.read_table(os.path.join(cfg.out, name))
        studies = np.asarray(preds["study_uri"].to_pylist(), dtype=object)
        _, s_probs, s_labels = study_scores(studies, preds["prob_abnormal"].to_numpy(), preds["label"].to_numpy())
        return preds, s_probs, s_labels

    # The threshold maximises study kappa on the tuning split's calibrated scores ...
    tune, s_probs, s_labels = study_level("tune_predictions.parquet")
    patients = set(open(os.path.join(cfg.out, "tune_patients.txt")).read().split())
    assert set(tune["patient_id"].to_pylist()) <= patients
    assert meta["threshold"] == pytest.approx(choose_threshold(s_labels, s_probs))
    best = cohen_kappa_score(s_labels, (s_probs >= meta["threshold"]).astype(int))
    for t in np.unique(s_probs):
        assert cohen_kappa_score(s_labels, (s_probs >= t).astype(int)) <= best + 1e-9
    # ... and the validation split, which chose nothing, reports at it.
    valid, v_probs, v_labels = study_level("valid_predictions.parquet")
    assert not patients & set(valid["patient_id"].to_pylist())
    kappa = cohen_kappa_score(v_labels, (v_probs >= meta["threshold"]).astype(int))
    assert meta["validation"]["study"]["kappa"] == pytest.approx(kappa)
    lo, hi = meta["validation"]["study"]["kappa_ci"]
    assert lo <= hi
    assert meta["validation"]["interval_unit"] == "patient"
    card = open(os.path.join(model_dir, "model_card.md")).read()
    for needle in (
        meta["model_id"],
        meta["data_fingerprint"],
        f"{meta['threshold']:.3f}",
        "Not for clinical diagnosis",
        "torch",
        "## Intended use",
        "## Limitations",
        "## Protocol",
        "## Calibration (validation split)",
    ):
        assert needle in card, needle
    with open(os.path.join(cfg.out, "training_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_true_labels_are_learnt_and_shuffled_labels_are_not(demo_model, tmp_path):
    """The demo model (true labels) against the same training on randomly permuted labels: validation kappa
    (a split that chose nothing) is high for the first and at chance for the second."""
    root, model_dir = demo_model
    kappas = {False: json.load(open(os.path.join(model_dir, "metadata.json")))["validation"]["study"]["kappa"]}
    cfg = demo_train_config(DemoConfig(), root, str(tmp_path / "shuffled"))
    cfg.shuffle_labels = True
    kappas[True] = run_training(cfg)["validation"]["study"]["kappa"]
    print("validation study kappas (shuffled labels?)", kappas)
    assert kappas[False] >= 0.8, kappas
    assert kappas[True] < 0.3, kappas
