"""Heatmaps that can be checked: the demo model, the fractures `mura-ray sample` drew, the pointing game;
`explain` and `score --heatmaps flagged` on a real Ray cluster, read back with pyarrow, deltalake and PIL."""

import csv
import io
import json
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load as st_load

from mura_ray.archive.sample import FINDINGS_CSV
from mura_ray.config import DemoConfig, ExplainConfig, ScoreConfig
from mura_ray.imaging.preprocess import EvalPreset, load_square
from mura_ray.model.calibration import Calibration
from mura_ray.model.checkpoint import read_checkpoint
from mura_ray.model.heatmaps import HEATMAP_LAYER, grad_cam, peak
from mura_ray.model.resnet import build_model
from mura_ray.scoring.heatmaps import DISPLAY, SUFFIX
from tests.helpers import box_in_input
from tests.readers import scores

MARGIN = 0.05  # of the input's side, around the drawn box


def _findings(root):
    """{image path under root: (box in the model's input, box's share of the input with the margin)}."""
    size = DemoConfig().image_size
    out = {}
    with open(os.path.join(root, FINDINGS_CSV)) as f:
        for row in csv.DictReader(f):
            box = box_in_input(
                tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")), int(row["height"]), int(row["width"]), size
            )
            m = MARGIN * size
            lo, hi = np.clip(box[:2] - m, 0, size), np.clip(box[2:] + m, 0, size)
            out[row["image"]] = (box, float(np.prod(hi - lo)) / size**2)
    return out


def _hit(box, xy, size):
    m = MARGIN * size
    x, y = xy[0] + 0.5, xy[1] + 0.5  # centre of the peak's pixel
    return box[0] - m <= x <= box[2] + m and box[1] - m <= y <= box[3] + m


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pointing_game_on_the_demo_model(demo_model):
    """The heatmap's peak falls in the drawn fracture's box on true-positive validation images at least twice
    as often as a random map's peak, by the 95% lower bound of its rate."""
    root, model_dir = demo_model
    weights, meta = read_checkpoint(model_dir)
    model = build_model()
    model.load_state_dict(st_load(weights))
    size, side = meta["image_size"], meta["cache_side"]
    findings = {k: v for k, v in _findings(root).items() if "/valid/" in k}
    names = sorted(findings)
    squares = np.stack([load_square(open(os.path.join(root, n), "rb").read(), side) for n in names])
    pixels = EvalPreset(size=size)({"pixels": squares})["pixels"]
    rng = np.random.default_rng(0)
    rates = {}
    for layer in (HEATMAP_LAYER, "layer4"):
        maps, probs = grad_cam(model, pixels, layer=layer, calibration=Calibration.of(meta))
        tp = probs >= meta["threshold"]
        hits = np.array([_hit(findings[n][0], peak(m), size) for n, m in zip(names, maps)])
        random_peaks = rng.integers(0, size, (len(names), 200, 2))
        random_hits = np.array(
            [[_hit(findings[n][0], xy, size) for xy in random_peaks[i]] for i, n in enumerate(names)]
        )
        rates[layer] = {
            "true_positives": int(tp.sum()),
            "of_images_with_a_fracture": len(names),
            "hit_rate": float(hits[tp].mean()),
            "random_map_rate": float(random_hits[tp].mean()),
            "box_share": float(np.mean([findings[n][1] for n, t in zip(names, tp) if t])),
        }
    print("pointing game", json.dumps(rates, indent=1))
    r = rates[HEATMAP_LAYER]
    assert r["true_positives"] >= 20, r
    # The demo model differs from run to run (Ray Data's order): its hit rate has been seen from 0.45 up.
    # The claim is the one that holds for each: the rate's 95% Wilson lower bound is twice a random map's.
    n, z = r["true_positives"], 1.96
    p = r["hit_rate"]
    lower = (p + z * z / (2 * n) - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert lower >= 2 * r["random_map_rate"], (lower, r)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_explain_writes_one_overlay_per_image_of_the_named_studies(demo_model, tmp_path):
    from mura_ray.review.explain import run_explain

    root, model_dir = demo_model
    studies = sorted({os.path.dirname(n) for n in _findings(root) if "/valid/" in n})[:2]
    cfg = ExplainConfig(model=model_dir, data=root, out=str(tmp_path / "ex"), studies=",".join(studies))
    result = run_explain(cfg)
    expected = sorted(
        os.path.join(s, f) for s in studies for f in os.listdir(os.path.join(root, s)) if f.endswith(".png")
    )
    assert result["images"] == len(expected) and result["errors"] == 0
    index = pq.read_table(tmp_path / "ex" / "index.parquet")
    assert index["heatmap"].to_pylist() == [e + SUFFIX for e in expected]
    for rel in index["heatmap"].to_pylist():
        picture = Image.open(tmp_path / "ex" / rel)
        assert picture.mode == "RGB" and picture.size[0] == 2 * DISPLAY + 4
    assert pc.min(index["peak_x"]).as_py() >= 0 and pc.max(index["peak_x"]).as_py() < 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_score_heatmaps_flagged_are_committed_once_with_the_run(demo_model, tmp_path):
    """Overlays for exactly the images the run scored in studies predicted abnormal, committed with the run;
    a second run that scores nothing writes none; heatmaps off writes none."""
    from mura_ray.scoring.run import run_scoring

    root, model_dir = demo_model
    out = str(tmp_path / "scores")
    first = run_scoring(
        ScoreConfig(model=model_dir, data=root, out=out, split="valid", heatmaps="flagged", commit_every=100)
    )
    assert first["chunks"] >= 2
    studies, images = scores(out, "study"), scores(out, "image")
    # One current row per study: the one over all its images, from the run's last chunk that touched it.
    assert studies.num_rows == len(set(studies["study_uri"].to_pylist()))
    flagged = {r["study_uri"] for r in studies.to_pylist() if r["predicted_abnormal"]}
    wanted = sorted(r["image_uri"] for r in images.to_pylist() if r["study_uri"] in flagged and r["error"] is None)
    index = scores(out, "heatmap")
    assert sorted(index["image_uri"].to_pylist()) == wanted and first["heatmaps"] == len(wanted) > 0
    assert all(os.path.exists(os.path.join(out, rel)) for rel in index["heatmap"].to_pylist())
    run_dir = os.path.join(out, "heatmaps", f"run_date={images['scored_at'][0].as_py():%Y-%m-%d}")
    pngs = [os.path.join(d, f) for d, _, fs in os.walk(run_dir) for f in fs if f.endswith(SUFFIX)]
    assert len(pngs) == len(wanted)
    # Every PNG is named by a row (none left over), and every row by the run that drew it.
    assert {os.path.relpath(p, out) for p in pngs} == set(index["heatmap"].to_pylist())
    assert set(index["run_id"].to_pylist()) == {first["run_id"]}
    Image.open(io.BytesIO(open(pngs[0], "rb").read())).verify()
    # The rows were committed all at once, with the run's final chunk: the version before it has none.
    assert scores(out, "heatmap", version=first["version"] - 1).num_rows == 0
    assert scores(out, "heatmap", version=first["version"]).num_rows == len(wanted)
    (run_row,) = scores(out, "run").to_pylist()
    assert run_row["final"] and json.loads(run_row["totals"])["run"]["heatmaps"] == len(wanted)
    assert sorted(os.listdir(out)) == ["heatmaps", "scores"]  # no staging: the table and the PNGs it names

    again = run_scoring(ScoreConfig(model=model_dir, data=root, out=out, split="valid", heatmaps="flagged"))
    assert again["images"] == 0 and again["heatmaps"] == 0
    assert len([f for _, _, fs in os.walk(os.path.join(out, "heatmaps")) for f in fs if f.endswith(SUFFIX)]) == len(
        wanted
    )
    assert sorted(scores(out, "heatmap")["image_uri"].to_pylist()) == wanted
    off = str(tmp_path / "off")
    run_scoring(ScoreConfig(model=model_dir, data=root, out=off, split="valid"))
    assert not os.path.exists(os.path.join(off, "heatmaps")) and scores(off, "heatmap").num_rows == 0
    assert scores(off, "image").num_rows == images.num_rows


def test_a_gallery_skips_an_image_gone_or_broken_since_it_was_scored(untrained_models, tmp_path):
    from mura_ray.review.explain import overlays_of

    (model, _), _ = untrained_models
    weights, meta = read_checkpoint(model)
    good, broken, gone = (str(tmp_path / n) for n in ("good.png", "broken.png", "gone.png"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80), dtype=np.uint8)).save(good)
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    pictures = overlays_of([good, broken, gone], str(tmp_path), weights, meta, display=64, probs=[0.9, 0.8, 0.7])
    assert pictures[0].ndim == 3 and pictures[0].shape[2] == 3 and pictures[1:] == [None, None]
