import collections
import os

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from mura_ray.archive.sample import BODY_PARTS, draw_radiograph, plan_sample, render_radiograph


def test_plan_is_deterministic_and_patients_stay_in_one_split():
    a, b = plan_sample(200, seed=3), plan_sample(200, seed=3)
    assert a == b
    assert plan_sample(200, seed=4) != a
    splits = collections.defaultdict(set)
    for img in a:
        splits[img.patient_id].add(img.split)
    assert all(len(s) == 1 for s in splits.values())
    studies = {i.study_rel: i for i in a}
    assert len(studies) == 200
    per_study = collections.Counter(i.study_rel for i in a)
    assert set(per_study.values()) <= {1, 2, 3, 4}
    per_patient = collections.defaultdict(set)
    for i in a:
        per_patient[i.patient_id].add(i.study_rel)
    assert {len(s) for s in per_patient.values()} <= {1, 2, 3}
    assert {i.body_part for i in a} == set(BODY_PARTS)
    abnormal = np.mean([s.label for s in studies.values()])
    assert 0.3 < abnormal < 0.5


def test_render_is_deterministic():
    assert np.array_equal(render_radiograph(7, True), render_radiograph(7, True))


def test_archive_layout_and_csv_formats(small_archive):
    root, plan = small_archive
    base = os.path.join(root, "MURA-v1.1")
    for split in ("train", "valid"):
        lines = open(os.path.join(base, f"{split}_image_paths.csv")).read().splitlines()
        assert lines == [i.rel_path for i in plan if i.split == split]
        assert all(line.startswith(f"MURA-v1.1/{split}/XR_") and line.endswith(".png") for line in lines)
        for line in open(os.path.join(base, f"{split}_labeled_studies.csv")).read().splitlines():
            study, label = line.split(",")
            assert study.endswith("/") and label in ("0", "1")
            assert ("positive" in study) == (label == "1")
            assert os.path.isdir(os.path.join(root, study))


def _image_stats(root, plan):
    rows = []
    for item in plan:
        path = os.path.join(root, item.rel_path)
        with Image.open(path) as im:
            w, h = im.size
            mode = im.mode
            mean = float(np.asarray(im.convert("L")).mean())
        rows.append((item.label, w, h, mode, mean, os.path.getsize(path)))
    return rows


def test_images_vary_and_trivial_statistics_do_not_give_the_label_away(learn_archive):
    root, plan = learn_archive
    rows = _image_stats(root, plan)
    labels = np.array([r[0] for r in rows])
    widths, heights = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    assert widths.min() >= 150 and heights.min() >= 150
    assert max(widths.max(), heights.max()) <= 512
    modes = collections.Counter(r[3] for r in rows)
    assert modes["L"] > 0 and modes["RGB"] > 0
    for name, values in {
        "pixel count": widths * heights,
        "mean brightness": np.array([r[4] for r in rows]),
        "file size": np.array([r[5] for r in rows]),
    }.items():
        auc = roc_auc_score(labels, values)
        assert 0.4 < auc < 0.6, f"{name} predicts the label (AUROC {auc:.3f})"


def test_the_hard_kind_has_each_body_parts_shape_and_fractures_that_a_centre_crop_cuts(tmp_path):
    import csv

    from mura_ray.archive.sample import FINDINGS_CSV, HARD_ASPECT, write_sample
    from mura_ray.bench.recipe import findings_by_place

    root = str(tmp_path / "hard")
    plan = write_sample(root, studies=80, seed=5, workers=1, kind="hard")
    for item in plan:
        with Image.open(os.path.join(root, item.rel_path)) as im:
            lo, hi = HARD_ASPECT[item.body_part]
            assert lo - 0.02 <= im.height / im.width <= hi + 0.02, (item.body_part, im.size)
    places = findings_by_place(root)
    outside = sum(not inside for inside in places.values())
    print(f"hard sample: {len(places)} images show a fracture, {outside} of them outside the centre crop's square")
    assert len(places) > 40 and 0.15 < outside / len(places) < 0.6
    with open(os.path.join(root, FINDINGS_CSV)) as f:
        assert {r["image"] for r in csv.DictReader(f)} == set(places)
    # The demo kind ignores the body part: its images are drawn as before.
    for seed in (1, 2, 3):
        a, _ = draw_radiograph(seed, True)
        b, _ = draw_radiograph(seed, True, "FOREARM", "demo")
        assert np.array_equal(a, b)
