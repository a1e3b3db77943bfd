"""Inference engines: each one installed here against torch fp32, what ``auto`` picks, and the accuracy guard."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mura_ray import hardware
from mura_ray.errors import UsageError
from mura_ray.hardware import cpu_line
from mura_ray.model import backends
from mura_ray.model.resnet import build_model, for_inference

CPU = torch.device("cpu")
SIDE = 48


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(3)
    return for_inference(build_model())


@pytest.fixture(scope="module")
def squares():
    return np.random.default_rng(0).integers(0, 256, size=(24, SIDE, SIDE), dtype=np.uint8)


@pytest.mark.parametrize("pair", backends.all_engines(CPU), ids=" ".join)
def test_every_engine_installed_here_scores_as_torch_fp32_does(pair, folded, squares):
    graph = backends.ProbabilityOf(folded).eval()
    reference = backends.build_torch(graph, "fp32", CPU, SIDE, "test-model-a")(squares)
    engine = backends.BUILDERS[pair[0]](graph, pair[1], CPU, SIDE, "test-model-a")
    probs = engine(squares)
    assert (engine.backend, engine.precision) == pair
    assert probs.dtype == np.float32 and probs.shape == (len(squares),)
    assert np.abs(probs - reference).max() <= backends.GUARD_MAX_ABS
    # One image at a time gives the same answer as in a batch: the batch axis is dynamic in every export.
    assert np.allclose(engine(squares[:1]), probs[:1], atol=2e-3)


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_runs_bf16_only_on_a_cpu_that_computes_it(bf16, folded, squares, monkeypatch):
    if bf16 and not hardware.cpu_has_bf16():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: OpenVINO would run fp32 whatever it is told")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: bf16)
    engine = backends.select(folded, "auto", "auto", CPU, SIDE, "test-model-a", squares[:8])
    first = backends.candidates("auto", "auto", CPU)[0]
    assert (engine.backend, engine.precision) == first
    assert (engine.precision == "bf16") == bf16


def test_auto_never_keeps_an_engine_that_fails_the_guard(folded, squares, monkeypatch):
    first = backends.candidates("auto", "auto", CPU)[0]
    if first == ("torch", "fp32"):
        pytest.skip("only torch fp32 is available here")
    build = backends.BUILDERS[first[0]]

    def off_by_two_percent(*args):
        engine = build(*args)
        return backends.Engine(engine.backend, engine.precision, lambda p: engine.run(p) + 0.02)

    monkeypatch.setitem(backends.BUILDERS, first[0], off_by_two_percent)
    picked = backends.select(folded, "auto", "auto", CPU, SIDE, "test-model-a", squares[:8])
    assert (picked.backend, picked.precision) != first
    with pytest.raises(RuntimeError, match="fails the accuracy guard"):
        backends.select(folded, first[0], first[1], CPU, SIDE, "test-model-a", squares[:8])


def test_exports_are_cached_per_model(folded, squares, tmp_path, monkeypatch):
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path))
    if not backends.installed("openvino"):
        pytest.skip("OpenVINO is not installed")
    graph = backends.ProbabilityOf(folded).eval()
    backends.build_openvino(graph, "fp32", CPU, SIDE, "model-one")
    torch.manual_seed(4)
    other = backends.ProbabilityOf(for_inference(build_model())).eval()
    engine = backends.build_openvino(other, "fp32", CPU, SIDE, "model-two")
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["model-one", "model-two"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "engines" / "model-two").iterdir())
    want = backends.build_torch(other, "fp32", CPU, SIDE, "model-two")(squares)
    assert np.abs(engine(squares) - want).max() < 1e-4


def test_an_engine_that_cannot_run_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with pytest.raises(UsageError, match=r"pip install 'mura-ray\[onnxruntime\]'"):
        backends.check_choice("onnxruntime", "auto")
    with pytest.raises(UsageError, match="fp32 only"):
        backends.check_choice("onnxruntime", "bf16")
    assert backends.candidates("auto", "auto", CPU)[-1] == ("torch", "fp32")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_training_records_the_accuracy_guard_and_auto_obeys_it(trained_run, learn_archive):
    from safetensors.torch import load as st_load

    from mura_ray.model.checkpoint import read_checkpoint
    from mura_ray.reporting import guard

    _, trained = trained_run
    weights, meta = read_checkpoint(trained["model_dir"])
    record = meta["engine_guard"]
    print(cpu_line())
    print(json.dumps(record, indent=1))
    assert set(record["engines"]) == {f"{b} {p}" for b, p in backends.all_engines(CPU)}
    assert record["images"] > 50 and record["split"] == "valid"
    # fp32 engines run the same arithmetic as torch; bf16 may fail on a model whose scores crowd the threshold.
    for name, figures in record["engines"].items():
        assert figures["passes"] == (
            figures["max_abs_diff"] <= 0.01
            and figures["decision_agreement"] >= 0.995
            and figures["study_kappa_diff"] <= 0.01
        )
        if name.endswith("fp32"):
            assert figures["passes"] and figures["max_abs_diff"] < 1e-4, name
    # The same figures from the command a user runs on a model folder (the whole split, decoded again).
    again = guard.check_model(trained["model_dir"], learn_archive[0])
    assert again["images"] >= record["images"]
    assert again["engines"]["torch fp32"]["max_abs_diff"] == 0.0

    model = build_model()
    model.load_state_dict(st_load(weights))
    squares = np.random.default_rng(1).integers(0, 256, size=(8, 48, 48), dtype=np.uint8)
    refused = tuple(backends.failed_guard(meta))
    picked = backends.select(for_inference(model), "auto", "auto", CPU, 48, meta["model_id"], squares, refused)
    assert picked.name not in refused
    wanted = next(f"{b} {p}" for b, p in backends.candidates("auto", "auto", CPU) if f"{b} {p}" not in refused)
    assert picked.name == wanted


# ---- the export cache: nothing found in it is loaded unless this user wrote it for this model and versions ----

EXPORTS = {"openvino": "openvino-48", "onnxruntime": "onnx-48"}


@pytest.fixture(scope="module")
def other_folded():
    torch.manual_seed(4)
    return for_inference(build_model())


def _scores(model, squares, backend="openvino", model_id="model-a" * 8):
    graph = backends.ProbabilityOf(model).eval()
    return backends.BUILDERS[backend](graph, "fp32", CPU, SIDE, model_id)(squares)


def _torch_scores(model, squares):
    return backends.build_torch(backends.ProbabilityOf(model).eval(), "fp32", CPU, SIDE, "any")(squares)


def _export_of(model, backend, cache):
    """The export folder another model's scorer leaves in ``cache``: what a planter copies."""
    _scores(model, SQUARES_8, backend, model_id="model-b" * 8)
    return cache / "engines" / ("model-b" * 8)[:32] / EXPORTS[backend]


SQUARES_8 = np.random.default_rng(5).integers(0, 256, size=(8, SIDE, SIDE), dtype=np.uint8)


@pytest.mark.parametrize("backend", [b for b in EXPORTS if backends.installed(b)])
@pytest.mark.parametrize("plant", ["another model's export", "with its manifest", "weights swapped"])
def test_a_planted_export_is_not_loaded_the_scorer_exports_again(
    backend, plant, folded, other_folded, squares, tmp_path, monkeypatch
):
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path))
    want, theirs = _torch_scores(folded, squares), _torch_scores(other_folded, squares)
    assert np.abs(want - theirs).max() > 0.05  # the plant would show in the scores
    planted = _export_of(other_folded, backend, tmp_path)
    ours = tmp_path / "engines" / ("model-a" * 8)[:32] / EXPORTS[backend]
    if plant == "weights swapped":  # our own export, manifest and all, with the other model's weights file
        _scores(folded, squares, backend)
        weights = "model.bin" if backend == "openvino" else "model.onnx"
        (ours / weights).write_bytes((planted / weights).read_bytes())
    else:
        ours.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copytree(planted, ours, dirs_exist_ok=True)
        if plant == "another model's export":
            (ours / "manifest.json").unlink(missing_ok=True)
    assert np.abs(_scores(folded, squares, backend) - want).max() < 1e-4


@pytest.mark.parametrize("unsafe", ["model folder world-writable", "export world-writable", "export of another uid"])
def test_an_export_folder_others_can_write_is_not_trusted(unsafe, folded, other_folded, squares, tmp_path, monkeypatch):
    """Anyone who can write the folder can also write a manifest that matches what they planted."""
    if unsafe.endswith("uid") and os.getuid() != 0:
        pytest.skip("giving a folder to another uid needs root")
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path))
    want = _torch_scores(folded, squares)
    planted = _export_of(other_folded, "openvino", tmp_path)
    _scores(folded, squares)
    ours = tmp_path / "engines" / ("model-a" * 8)[:32] / "openvino-48"
    shutil.rmtree(ours)
    shutil.copytree(planted, ours)
    if (ours / "manifest.json").exists():
        manifest = json.loads((ours / "manifest.json").read_text())
        manifest["key"]["model_id"] = "model-a" * 8
        (ours / "manifest.json").write_text(json.dumps(manifest))
    if unsafe == "model folder world-writable":
        ours.parent.chmod(0o777)
    elif unsafe == "export world-writable":
        ours.chmod(0o777)
    else:
        os.chown(ours, 12345, 12345)
    assert np.abs(_scores(folded, squares) - want).max() < 1e-4
    for folder in (ours.parent, ours):
        assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()


def test_an_engine_cache_others_can_write_is_refused(folded, squares, tmp_path, monkeypatch):
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir(mode=0o777)
    (tmp_path / "cache").chmod(0o777)
    with pytest.raises(RuntimeError, match="writable by others"):
        _scores(folded, squares)
    # Under auto the scorer goes on with torch, which reads no cache.
    engine = backends.select(folded, "auto", "auto", CPU, SIDE, "model-a" * 8, squares[:8])
    assert engine.backend == "torch"


@pytest.mark.parametrize("package", ["mura_ray", "torch", "openvino"])
def test_another_version_of_mura_ray_torch_or_the_engine_exports_again(package, folded, squares, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path))
    want = _torch_scores(folded, squares)
    _scores(folded, squares)
    model_xml = tmp_path / "engines" / ("model-a" * 8)[:32] / "openvino-48" / "model.xml"
    first = model_xml.stat().st_ino
    _scores(folded, squares)
    assert model_xml.stat().st_ino == first  # the same versions: the export is reused
    monkeypatch.setattr(importlib.import_module(package), "__version__", "99.0-test")
    assert np.abs(_scores(folded, squares) - want).max() < 1e-4
    assert model_xml.stat().st_ino != first
    manifest = json.loads((model_xml.parent / "manifest.json").read_text())
    assert "99.0-test" in manifest["key"]["versions"].values()
