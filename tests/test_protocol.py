"""Which split chooses what: the tuning split is carved by patient, stratified by body part, and reused."""

import os

import pyarrow.compute as pc
import pytest

from mura_ray.archive.catalog import build_catalog
from mura_ray.review.evaluate import protocol_warning
from mura_ray.training.protocol import PATIENTS_FILE, TUNE, carve_tuning_split, chose_on, patient_keys, record


def test_the_tuning_split_takes_whole_training_patients_by_body_part(learn_archive, tmp_path):
    root, plan = learn_archive
    catalog = build_catalog(root)
    carved, patients = carve_tuning_split(catalog, 0.1, seed=0, run_dir=str(tmp_path))
    train_patients = {i.patient_id for i in plan if i.split == "train"}
    assert len(patients) == round(0.1 * len(train_patients))
    split_of = {}
    for key, split in zip(patient_keys(carved), carved["split"].to_pylist()):
        split_of.setdefault(key, set()).add(split)
    # A patient is wholly in one split; the tuning patients came from training; validation is untouched.
    assert all(len(s) == 1 for s in split_of.values())
    assert {p for p, s in split_of.items() if s == {TUNE}} == set(patients) <= train_patients
    assert pc.sum(pc.equal(carved["split"], "valid")).as_py() == sum(i.split == "valid" for i in plan)
    # Stratified: every body part with at least 10 training patients gives at least one.
    first_part = {}
    for i in sorted(plan, key=lambda i: i.study_rel):
        if i.split == "train":
            first_part.setdefault(i.patient_id, i.body_part)
    for part in set(first_part.values()):
        mine = [p for p, b in first_part.items() if b == part]
        if len(mine) >= 10:
            assert set(mine) & set(patients), part
    # The list is written once and a rerun of the RUN_DIR reads it back, whatever the seed.
    listed = open(os.path.join(tmp_path, PATIENTS_FILE)).read().split()
    assert listed == patients
    assert carve_tuning_split(catalog, 0.1, seed=99, run_dir=str(tmp_path))[1] == patients
    assert carve_tuning_split(catalog, 0.0, seed=0, run_dir=str(tmp_path / "none"))[1] == []


@pytest.mark.parametrize(
    "fraction, split, chose",
    [
        (0.1, "valid", []),
        (0.1, "train", ["weights", "epoch", "temperature", "threshold"]),
        (0.0, "valid", ["epoch", "temperature", "threshold"]),
        (0.1, "test", []),
    ],
)
def test_evaluate_warns_when_the_reported_split_chose_something(fraction, split, chose):
    meta = {"protocol": record(fraction, ["p1"] if fraction else [], 10, 20)}
    assert chose_on(meta, split) == chose
    warning = protocol_warning(meta, split)
    assert (warning is None) == (not chose)
    if chose:
        assert split in warning and "optimistic" in warning
    # A model from before the tuning split chose everything on validation.
    assert protocol_warning({}, "valid") is not None
