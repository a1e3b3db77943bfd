"""``mura-ray scores history|retract|vacuum`` on a table written through the store (no Ray)."""

from __future__ import annotations

import os
import time

import pytest

from mura_ray.cli import main
from mura_ray.scoring.delta import ScoreStore
from tests.readers import scores
from tests.test_delta import SID, heatmaps, images, studies


@pytest.fixture
def out(tmp_path):
    out = str(tmp_path / "out")
    store = ScoreStore(out)
    store.commit_chunk(run_id="night-1", scoring_id=SID, chunk=0, images=images(["a", "b"], "night-1", 0.2))
    store.commit_chunk(
        run_id="night-2",
        scoring_id=SID,
        chunk=0,
        images=images(["b", "c"], "night-2", 0.9),
        studies=studies(["study-1"], "night-2", 0.9),
        heatmaps=heatmaps(["c"], "study-1"),
    )
    return out


def test_history_lists_each_commit_and_retract_takes_a_night_out_in_one_commit(out, capsys):
    assert main(["scores", "history", "--out", out]) == 0
    shown = capsys.readouterr().out
    assert "run night-1 chunk 0" in shown and "run night-2 chunk 0" in shown
    before = ScoreStore(out).table().version()

    assert main(["scores", "retract", "--out", out, "--run", "night-2"]) == 0
    assert "retracted run night-2: 4 rows (2 images)" in capsys.readouterr().out
    assert ScoreStore(out).table().version() == before + 1
    assert sorted(scores(out, "image")["image_uri"].to_pylist()) == ["a"]  # b's night-1 row was replaced
    assert scores(out, "heatmap").num_rows == 0 and scores(out, "study").num_rows == 0
    assert sorted(scores(out, "image", version=before)["image_uri"].to_pylist()) == ["a", "b", "c"]


def test_vacuum_deletes_orphan_heatmaps_past_the_retention_and_keeps_named_ones(out, capsys):
    named = os.path.join(out, heatmaps(["c"], "s")["heatmap"][0].as_py())  # the PNG night-2's row names
    orphan, fresh = (os.path.join(out, "heatmaps", "run_id=killed", n) for n in ("x.png", "y.png"))
    for path in (named, orphan):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    for path in (named, orphan, fresh):
        with open(path, "wb") as f:
            f.write(b"png")
    old = time.time() - 8 * 24 * 3600
    for path in (named, orphan):
        os.utime(path, (old, old))

    assert main(["scores", "vacuum", "--out", out, "--dry-run"]) == 0
    assert "would delete 0 data files of the table and 1 orphan heatmaps" in capsys.readouterr().out
    assert os.path.exists(orphan)
    assert main(["scores", "vacuum", "--out", out]) == 0
    assert "deleted 0 data files of the table and 1 orphan heatmaps" in capsys.readouterr().out
    assert not os.path.exists(orphan) and os.path.exists(named) and os.path.exists(fresh)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["scores", "retract", "--run", "no-such-run"], "has no rows in"),
        (["scores", "vacuum", "--retention-hours", "1"], "is under 168"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(out, capsys, argv, says):
    assert main([*argv[:2], "--out", out, *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_output_with_no_table_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["scores", "history", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no scores table" in capsys.readouterr().err
