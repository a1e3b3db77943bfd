"""Which split chooses what: the tuning split, carved out of training by patient.

The kept epoch (early stopping), the temperature and the decision threshold
are all chosen on the tuning split: patients taken from the training split,
stratified by body part. The validation split then only ever reports, so
its figures estimate how the model does on patients it has not met, as the
MURA paper's held-out test set does. The tuning patients are listed in
``RUN_DIR/tune_patients.txt``; a rerun of the same RUN_DIR reuses the list.
With ``--tune-fraction 0`` the validation split chooses and reports, as
before; reports then say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mura_ray.archive import storage
from mura_ray.errors import UsageError

TUNE = "tune"
PATIENTS_FILE = "tune_patients.txt"
CHOICES = ("epoch", "temperature", "threshold")


def patient_keys(table: pa.Table) -> list[str]:
    """A patient id per row; the study stands in where an archive does not name patients."""
    return [p if p is not None else s for p, s in zip(table["patient_id"].to_pylist(), table["study_uri"].to_pylist())]


def choose_patients(table: pa.Table, fraction: float, seed: int) -> list[str]:
    """About ``fraction`` of the patients of ``table`` (training rows), stratified by body part.

    A patient counts under the body part of their first study. Each part gives
    ``fraction`` of its patients, remainders going to the parts with the
    largest ones, so the total is ``round(fraction * patients)`` (at least one,
    and never every patient).
    """
    first_part: dict[str, str] = {}
    parts = [p or "UNKNOWN" for p in table["body_part"].to_pylist()]
    for patient, _study, part in sorted(zip(patient_keys(table), table["study_uri"].to_pylist(), parts)):
        first_part.setdefault(patient, part)
    by_part: dict[str, list[str]] = {}
    for patient, part in sorted(first_part.items()):
        by_part.setdefault(part, []).append(patient)
    total = len(first_part)
    want = min(max(1, round(fraction * total)), total - 1)
    if want <= 0:
        raise UsageError(f"the training split has {total} patient(s): too few to carve a tuning split from")
    shares = {part: fraction * len(ps) for part, ps in by_part.items()}
    take = {part: int(share) for part, share in shares.items()}
    for part in sorted(shares, key=lambda p: (take[p] - shares[p], p))[: max(0, want - sum(take.values()))]:
        take[part] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for part in sorted(by_part):
        patients = by_part[part]
        chosen += [patients[i] for i in sorted(rng.permutation(len(patients))[: take[part]])]
    return sorted(chosen)


def carve_tuning_split(catalog: pa.Table, fraction: float, seed: int, run_dir: str) -> tuple[pa.Table, list[str]]:
    """The catalog with the tuning patients' training rows moved to split ``tune``; and those patients.

    The list is read from ``RUN_DIR/tune_patients.txt`` when a run already wrote it (a rerun resumes
    with the same split), else chosen and written there. ``fraction == 0`` changes nothing.
    """
    if fraction == 0:
        return catalog, []
    path = storage.join(run_dir, PATIENTS_FILE)
    training = catalog.filter(pc.and_(pc.equal(catalog["split"], "train"), pc.is_valid(catalog["label"])))
    if storage.exists(path):
        patients = [line for line in storage.read_text(path).splitlines() if line]
    else:
        patients = choose_patients(training, fraction, seed)
        storage.write_text(path, "".join(f"{p}\n" for p in patients))
    keys = pa.array(patient_keys(catalog), pa.string())
    moved = pc.and_(pc.equal(catalog["split"], "train"), pc.is_in(keys, pa.array(patients, pa.string())))
    split = pc.if_else(moved, pa.scalar(TUNE), catalog["split"])
    return catalog.set_column(catalog.schema.get_field_index("split"), "split", split), patients


def record(fraction: float, patients: list[str], tune_images: int, valid_images: int) -> dict[str, Any]:
    """What the model's metadata says about the protocol: which split chose what, which one reports."""
    chooser = TUNE if fraction > 0 else "valid"
    return {
        "tune_fraction": fraction,
        "tune_patients": len(patients),
        "tune_images": tune_images,
        "valid_images": valid_images,
        "chosen_on": {choice: chooser for choice in CHOICES},
        "reported_on": "valid",
        "patients_file": PATIENTS_FILE if patients else None,
    }


def chose_on(meta: dict[str, Any], split: str) -> list[str]:
    """What the split ``split`` of the archive helped choose for this model (empty: it reports honestly).

    Models without a protocol record chose everything on the validation split. The training split
    always trained the model (and holds the tuning patients)."""
    protocol = meta.get("protocol") or {"chosen_on": {c: "valid" for c in CHOICES}}
    chosen = [c for c, s in protocol["chosen_on"].items() if s == split or (s == TUNE and split == "train")]
    return (["weights"] if split == "train" else []) + chosen
