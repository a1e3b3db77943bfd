"""The nightly monitor: PSI by hand, and drift that can be checked on real scoring runs of the demo model."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from mura_ray import cli
from mura_ray.archive.sample import write_sample
from mura_ray.reporting.monitor import decile_groups, psi
from mura_ray.scoring.distribution import histogram


def test_psi_by_hand_and_decile_groups():
    rng = np.random.default_rng(0)
    reference = histogram(rng.beta(2, 5, 20000))
    groups = decile_groups(reference)
    shares = np.array([reference[a:b].sum() for a, b in groups]) / reference.sum()
    assert len(groups) == 10 and np.all(np.abs(shares - 0.1) < 0.03)
    same = histogram(rng.beta(2, 5, 5000))
    shifted = histogram(rng.beta(5, 2, 5000))
    assert psi(reference, same, groups) < 0.02
    assert psi(reference, shifted, groups) > 1.0
    # Two groups written out: PSI = sum (p - q) ln(p / q).
    two = [(0, 50), (50, 100)]
    ref, new = np.zeros(100), np.zeros(100)
    ref[10], ref[90], new[10], new[90] = 50, 50, 80, 20
    assert psi(ref, new, two) == pytest.approx((0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5))


def _move_studies(src_root, dst_root, studies):
    for s in studies:
        target = os.path.join(dst_root, s)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copytree(os.path.join(src_root, s), target)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_monitor_flags_the_night_whose_images_are_inverted_and_no_other(demo_model, tmp_path, capsys):
    """Three nights of new radiographs like the validation split's, then a night of inverted ones."""
    _, model_dir = demo_model
    fresh = str(tmp_path / "fresh")
    write_sample(fresh, studies=240, seed=7)  # new patients, drawn like the training data
    studies = sorted(
        os.path.relpath(os.path.join(d), fresh)
        for d, _, files in os.walk(fresh)
        if any(f.endswith(".png") for f in files)
    )
    nights = [studies[i::4] for i in range(4)]
    archive, out = str(tmp_path / "archive"), str(tmp_path / "scores")
    for night, chosen in enumerate(nights):
        _move_studies(fresh, archive, chosen)
        if night == 3:  # tonight's images are inverted (a modality or export setting changed)
            for s in chosen:
                for f in os.listdir(os.path.join(archive, s)):
                    path = os.path.join(archive, s, f)
                    ImageOps.invert(Image.open(path).convert("L")).save(path)
        rc = cli.main(
            ["-q", "score", "--model", model_dir, "--data", archive, "--out", out, "--run-id", f"night{night}"]
        )
        assert rc == 0
        capsys.readouterr()
        code = cli.main(["-q", "monitor", "--scores", out, "--model", model_dir])
        printed = capsys.readouterr().out
        report = json.load(open(os.path.join(out, "monitor", "monitor.json")))
        assert [n["run_id"] for n in report["nights"]] == [f"night{k}" for k in range(night + 1)]
        assert code == (4 if night == 3 else 0), printed
    psis = {n["run_id"]: round(n["psi"], 3) for n in report["nights"]}
    print("PSI per night", psis)
    assert all(psis[f"night{k}"] < 0.2 for k in range(3)) and psis["night3"] > 0.2, psis
    assert len(report["alerts"]) == 1 and "night3" in report["alerts"][0]
    assert report["nights"][3]["images"] == sum(len(os.listdir(os.path.join(archive, s))) for s in nights[3])
    md = open(os.path.join(out, "monitor", "monitor.md")).read()
    assert "| night3 |" in md and "PSI" in md
    with open(os.path.join(out, "monitor", "monitor.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
