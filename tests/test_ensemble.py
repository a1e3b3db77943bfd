"""Ensembles: the module is the mean of its members' probabilities through every engine, and
`mura-ray ensemble` builds a model folder that scores end to end like any other."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

from mura_ray import cli
from mura_ray.model import backends
from mura_ray.model.calibration import Calibration, logit
from mura_ray.model.checkpoint import model_id_of, read_checkpoint, state_dict_bytes
from mura_ray.model.ensemble import Ensemble, module_from
from mura_ray.model.heatmaps import grad_cam
from mura_ray.model.resnet import build_model, for_inference
from mura_ray.training.ensemble import ensemble_weights
from tests import readers


def _members(sizes):
    members = []
    for seed in range(len(sizes)):
        torch.manual_seed(seed)
        members.append(build_model().eval())
    return members


def test_the_module_gives_the_mean_of_its_members_probabilities_at_their_own_sides():
    members = _members([48, 48, 32])
    model = Ensemble([48, 48, 32])
    for mine, theirs in zip(model.members, members):
        mine.load_state_dict(theirs.state_dict())
    model.eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        inputs = [x, x, small]
        expected = torch.stack([torch.softmax(m(i), dim=1) for m, i in zip(members, inputs)]).mean(dim=0)
        got = torch.softmax(model(x), dim=1)
        folded = torch.softmax(for_inference(model)(x.contiguous(memory_format=torch.channels_last)), dim=1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(folded, expected, atol=1e-4)


def test_the_weights_file_round_trips_into_the_module_and_every_engine_agrees_with_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path / "cache"))
    members = _members([40, 32])
    weights = ensemble_weights([state_dict_bytes(m) for m in members])
    meta = {"architecture": "ensemble", "members": [{"image_size": 40}, {"image_size": 32}]}
    model = module_from(weights, meta)
    assert isinstance(model, Ensemble) and model.side == 40
    for k, m in enumerate(members):
        for name, t in m.state_dict().items():
            assert torch.equal(model.members[k].state_dict()[name], t)
    pixels = np.random.default_rng(0).integers(0, 255, (8, 40, 40), dtype=np.uint8)
    graph = backends.ProbabilityOf(for_inference(model)).eval()
    reference = backends.build_torch(graph, "fp32", torch.device("cpu"), 40, model_id_of(weights))(pixels)
    for name, precision in backends.all_engines(torch.device("cpu")):
        engine = backends.BUILDERS[name](graph, precision, torch.device("cpu"), 40, model_id_of(weights))
        assert backends.guard_failure(engine, engine, pixels) is None
        diff = float(np.max(np.abs(engine(pixels) - reference)))
        print(f"{engine.name}: max |P - P_torch_fp32| = {diff:.1e}")
        assert diff < 0.01, engine.name
    maps, probs = grad_cam(model, pixels[:2], calibration=Calibration())
    assert maps.shape == (2, 40, 40) and np.allclose(probs, reference[:2], atol=1e-4)


@pytest.fixture(scope="module")
def search(learn_archive, tmp_path_factory):
    """`mura-ray tune` with two one-epoch trials, both kept: (argv, folder, what it printed). Its trials are
    also the members of the two-run ensemble below, so the module trains two models, not three."""
    import contextlib
    import io

    root, _ = learn_archive
    out = str(tmp_path_factory.mktemp("tune") / "search")
    argv = [
        "tune", "--data", root, "--out", out, "--trials", "2", "--keep", "2", "--workers", "1", "--epochs", "1",
        "--image-sizes", "32,40", "--weights", "none", "--batch-size", "16", "--guard-images", "0",
        "--lr-range", "1e-4,3e-3",
    ]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return argv, out, printed.getvalue()


def _trial(out, k):
    """(run folder, model folder, metadata) of trial ``k`` of a search."""
    run = os.path.join(out, "trials", f"trial-{k}")
    model = os.path.join(run, "model")
    return run, model, json.load(open(os.path.join(model, "metadata.json")))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_ensemble_of_two_runs_is_built_scored_and_read_back(search, learn_archive, tmp_path, capsys):
    root, _ = learn_archive
    (first_run, first_dir, first_meta), (_, second_dir, second_meta) = (_trial(search[1], k) for k in (0, 1))
    first = {"model_dir": first_dir, "model_id": first_meta["model_id"]}
    second = {"model_dir": second_dir, "model_id": second_meta["model_id"]}
    out = str(tmp_path / "ens")
    capsys.readouterr()
    assert cli.main(["ensemble", "--models", first["model_dir"], second["model_dir"], "--out", out]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "member 0" in printed and "member 1" in printed and "ensemble" in printed
    weights, meta = read_checkpoint(os.path.join(out, "model"))
    assert meta["architecture"] == "ensemble"
    assert meta["image_size"] == max(first_meta["image_size"], second_meta["image_size"])
    assert [m["model_id"] for m in meta["members"]] == [first["model_id"], second["model_id"]]
    assert meta["calibration_method"] == "platt" and meta["protocol"]["chosen_on"]["threshold"] == "tune"
    # The tuning split chose: the ensemble's tuning predictions are the members' mean.
    members = [
        pq.read_table(os.path.join(d, "tune_predictions.parquet")) for d in (first["model_dir"], second["model_dir"])
    ]
    mine = pq.read_table(os.path.join(out, "model", "tune_predictions.parquet"))
    mean = np.mean([t.sort_by("image")["prob_uncalibrated"].to_numpy() for t in members], axis=0)
    assert np.allclose(mine.sort_by("image")["prob_uncalibrated"].to_numpy(), mean, atol=1e-6)
    card = open(os.path.join(out, "model", "model_card.md")).read()
    assert "ensemble of 2" in card and first["model_id"][:12] in card

    scores = str(tmp_path / "scores")
    rc = cli.main(["-q", "score", "--model", out, "--data", root, "--out", scores, "--split", "valid"])
    assert rc == 0
    images = readers.scores(scores, "image")  # deltalake and DuckDB read it
    assert set(images["model_id"].to_pylist()) == {meta["model_id"]} and images.num_rows > 0
    assert images.filter(images["error"].is_null()).num_rows == images.num_rows
    # The model folder keys images by their rank among the sorted paths, which a member's run directory keeps.
    valid = pq.read_table(os.path.join(out, "model", "valid_predictions.parquet")).sort_by("image").to_pandas()
    paths = pq.read_table(os.path.join(first_run, "valid_predictions.parquet"))["image_uri"].to_pylist()
    valid["image_uri"] = sorted(paths)
    rows = images.to_pandas().merge(valid, on="image_uri", suffixes=("", "_valid"))
    assert len(rows) == images.num_rows
    # Scored through the model's engine from the archive, against the mean of the members' own predictions:
    # the rows' calibrated P taken back to the model's own output.
    cal = Calibration.of(meta)
    raw = 1 / (1 + np.exp(-(logit(rows["prob_abnormal"].to_numpy()) - cal.offset) * cal.temperature))
    gap = np.abs(raw - rows["prob_uncalibrated"])
    rho = spearmanr(raw, rows["prob_uncalibrated"]).statistic
    print(f"scored vs the members' mean: max {gap.max():.3f}, median {np.median(gap):.4f}, Spearman {rho:.3f}")
    assert np.median(gap) < 0.01 and rho > 0.95
    studies = readers.scores(scores, "study")
    assert studies.num_rows == len(set(images["study_uri"].to_pylist()))

    # Refusals are one line and exit 2.
    assert cli.main(["ensemble", "--models", first["model_dir"], "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["ensemble", "--models", out, first["model_dir"], "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 members" in err and "is an ensemble" in err and "Traceback" not in err
    assert json.load(open(os.path.join(out, "model", "metadata.json")))["model_id"] == model_id_of(weights)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_searches_on_ray_tune_keeps_one_tuning_split_ensembles_the_best_and_resumes(search):
    argv, out, printed = search
    print(printed)
    result = json.load(open(os.path.join(out, "tune.json")))
    trials = {t["member"]: t for t in result["trials"]}
    assert sorted(trials) == [0, 1] and sorted(result["kept"]) == [0, 1]
    assert all(1e-4 <= t["lr"] <= 3e-3 and t["image_size"] in (32, 40) for t in trials.values())
    configs = [json.load(open(os.path.join(out, "trials", f"trial-{k}", "train_config.json"))) for k in (0, 1)]
    assert [c["seed"] for c in configs] == [0, 1] and [c["lr"] for c in configs] == [trials[k]["lr"] for k in (0, 1)]
    tuned = [open(os.path.join(out, "trials", f"trial-{k}", "tune_patients.txt")).read() for k in (0, 1)]
    assert tuned[0] == tuned[1] and tuned[0].strip()
    # One trial at a time on CPUs: from its first event to its model, no trial overlaps the other.
    spans = sorted(
        (
            json.loads(open(os.path.join(out, "trials", f"trial-{k}", "events.jsonl")).readline())["time"],
            json.load(open(os.path.join(out, "trials", f"trial-{k}", "model", "metadata.json")))["created_at"],
        )
        for k in (0, 1)
    )
    assert spans[0][1] <= spans[1][0], spans
    # Ranked by the tuning split's metric, best first.
    scores = [t["score"] for t in result["trials"]]
    assert scores == sorted(scores, reverse=True)
    _, meta = read_checkpoint(os.path.join(out, "ensemble", "model"))
    assert {m["model_id"] for m in meta["members"]} == {t["model_id"] for t in trials.values()}
    assert "| 0 |" in open(os.path.join(out, "tune.md")).read() and "ensemble" in printed

    # The same command again: Tune restores the finished experiment, and nothing is trained again.
    assert cli.main(argv) == 0
    again = json.load(open(os.path.join(out, "tune.json")))
    assert {t["model_id"] for t in again["trials"]} == {t["model_id"] for t in trials.values()}
