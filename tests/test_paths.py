"""Every path argument is resolved once, in the driver, from where the user runs the command.

Ray Train's workers and Ray Data's actors run in other working directories,
so a relative path that reached them would land somewhere else. The Ray
test runs the verbs with relative paths from a directory that is neither
the checkout nor Ray's, and checks that each output is where it was asked.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mura_ray import cli
from mura_ray.archive import storage
from mura_ray.config import EvalConfig, ScoreConfig, TrainConfig
from mura_ray.errors import UsageError
from tests.readers import connect


@pytest.mark.parametrize(
    "given, expected",
    [
        ("runs/r1", "{cwd}/runs/r1"),
        ("./a/../b", "{cwd}/b"),
        ("~/scores", "{home}/scores"),
        ("file:///data/archive", "/data/archive"),
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("/abs/path", "/abs/path"),
    ],
)
def test_resolve_gives_absolute_paths_and_uris(tmp_path, monkeypatch, given, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.resolve(given) == expected.format(cwd=os.getcwd(), home=str(tmp_path / "home"))


@pytest.mark.parametrize(
    "bad, needle", [("ftp://host/x", "unsupported storage scheme"), ("s3://", "no bucket"), ("", "empty path")]
)
def test_resolve_refuses_what_it_cannot_reach(bad, needle):
    with pytest.raises(UsageError, match=needle):
        storage.resolve(bad)


def test_configs_resolve_every_path_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = TrainConfig(data="archive", out="~/run")
    s = ScoreConfig(model="run/model", data="file://archive", out="s3://b/scores")
    e = EvalConfig(model="m", data="d", out="o")
    assert (t.data, t.out) == (str(tmp_path / "archive"), os.path.expanduser("~/run"))
    assert (s.model, s.data, s.out) == (str(tmp_path / "run/model"), str(tmp_path / "archive"), "s3://b/scores")
    assert all(os.path.isabs(p) for p in (e.model, e.data, e.out))
    # Resolving again (as a worker rebuilding the config from its dict does) changes nothing.
    assert TrainConfig(**t.to_dict()).to_dict() == t.to_dict()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_training_given_relative_paths_writes_where_the_user_asked(trained_run):
    # trained_run's paths were relative to another working directory; Ray Train's workers ran in Ray's.
    cfg, result = trained_run
    assert cfg.out.endswith("/runs/r1") and "elsewhere" in cfg.out and result["model_dir"] == cfg.out + "/model"
    assert {"model.safetensors", "metadata.json", "model_card.md"} <= set(os.listdir(result["model_dir"]))
    for name in ("metrics.csv", "training_curves.png", "events.jsonl", "ray_train"):
        assert os.path.exists(os.path.join(cfg.out, name)), name


@pytest.mark.timeout(600)
def test_evaluate_and_score_with_relative_paths_from_another_directory(
    trained_run, small_archive, tmp_path, monkeypatch, capsys
):
    root, plan = small_archive
    work = tmp_path / "elsewhere"
    shutil.copytree(root, work / "archive")
    shutil.copytree(trained_run[1]["model_dir"], work / "runs" / "r1" / "model")
    monkeypatch.chdir(work)
    n_valid = sum(i.split == "valid" for i in plan)

    assert (
        cli.main(["evaluate", "--model", "runs/r1/model", "--data", "archive", "--out", "eval", "--resamples", "50"])
        == 0
    )
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report["image"]["n"] == n_valid and (work / "eval" / "roc.png").exists()
    # The console has mura-ray's lines; Ray's output went to the report folder's log file.
    printed = capsys.readouterr().out
    assert "scored " in printed and "MapBatches" not in printed and (work / "eval" / "ray.log").stat().st_size > 0

    assert cli.main(["score", "--model", "runs/r1", "--data", "archive", "--out", "scores", "--split", "valid"]) == 0
    query = "SELECT count(*), count(DISTINCT image_uri) FROM images"
    assert connect(str(work / "scores")).execute(query).fetchone() == (n_valid, n_valid)
    assert f"scored {n_valid}" in capsys.readouterr().out


def test_names_from_keys_stay_where_they_are_joined_and_stay_apart():
    keys = ["a/b.png", "a/../b.png", "a/./b.png", "a//b.png", "/a/b.png", "%2E%2E/b.png", "a/%/b.png", "../../x"]
    names = [storage.safe_relative(k) for k in keys]
    assert len(set(names)) == len(set(keys) - {"/a/b.png"})  # a leading "/" is the only thing dropped
    for name in names:
        assert not {"", ".", ".."} & set(name.split("/"))
        assert os.path.normpath(os.path.join("/out", name)).startswith("/out/")


def test_a_heatmap_path_that_leaves_the_output_is_refused(tmp_path):
    # What run._heatmaps_of places each overlay's PNG with: the output's base, then names from the archive.
    _, base = storage.filesystem(str(tmp_path / "scores"))
    assert storage.inside(base, "heatmaps", "a/b.png") == str(tmp_path / "scores" / "heatmaps" / "a" / "b.png")
    for bad in ("../x", "heatmaps/../../x", "a/./b"):
        with pytest.raises(UsageError, match="does not stay under"):
            storage.inside(base, "heatmaps", bad)
