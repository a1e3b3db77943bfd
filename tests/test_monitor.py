"""The nightly monitor: PSI by hand, and drift that can be checked on real scoring runs of the demo model."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from mura_ray import cli
from mura_ray.archive.sample import write_sample
from mura_ray.review.monitor import decile_groups, psi, psi_noise
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


def test_the_chance_bound_holds_small_unchanged_nights_and_not_shifted_ones():
    """2000 nights of 140 images from the reference's own population, against 265 reference images."""
    rng = np.random.default_rng(1)
    population = rng.beta(0.6, 0.9, 1_000_000)  # bimodal, as a classifier's scores are
    reference = histogram(rng.choice(population, 265))
    groups = decile_groups(reference)
    bound = psi_noise(265, 140, len(groups))
    same = np.array([psi(reference, histogram(rng.choice(population, 140)), groups) for _ in range(2000)])
    print(f"PSI of unchanged nights: mean {same.mean():.3f}, over 0.2 {np.mean(same > 0.2):.1%}, bound {bound:.3f}")
    assert np.mean(same > 0.2) > 0.01  # the rule of thumb alone would alert on some unchanged nights
    assert np.mean(same > bound) < 0.02  # 0.1% by the approximation; the fixed reference adds its own error
    shifted = [psi(reference, histogram(rng.beta(1.2, 0.6, 140)), groups) for _ in range(200)]
    assert np.mean(np.array(shifted) > bound) > 0.95
    assert psi_noise(265, 100_000, 10) < psi_noise(265, 140, 10) and psi_noise(0, 140, 10) == float("inf")


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
    psis = {n["run_id"]: (round(n["psi"], 3), round(n["psi_noise"], 3)) for n in report["nights"]}
    print("PSI and chance bound per night", psis)
    flagged = [run for run, (value, noise) in psis.items() if value > max(0.2, noise)]
    assert flagged == ["night3"], psis
    assert len(report["alerts"]) == 1 and "night3" in report["alerts"][0]
    assert report["nights"][3]["images"] == sum(len(os.listdir(os.path.join(archive, s))) for s in nights[3])
    md = open(os.path.join(out, "monitor", "monitor.md")).read()
    assert "| night3 |" in md and "PSI" in md
    with open(os.path.join(out, "monitor", "monitor.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
