"""Deterministic synthetic archive in the MURA-v1.1 layout.

``write_sample(out, studies=..., seed=...)`` writes::

    OUT/MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageM.png
    OUT/MURA-v1.1/{train,valid}_image_paths.csv       one relative image path a line
    OUT/MURA-v1.1/{train,valid}_labeled_studies.csv   "study_dir/,label"
    OUT/sample_findings.csv                            where each drawn fracture is (image, box)

Each image is a synthetic radiograph: one or two bright bones across soft
tissue on a dark, noisy background. Abnormal studies show a displaced
fracture (a dark jagged gap across a bone, the far fragment shifted) in most
of their images. Image size, storage mode (gray or RGB), noise, brightness
and contrast are drawn independently of the label, and every image is
re-normalised to a randomly drawn mean, so that none of size, mean
brightness or file size gives the label away.

``kind="hard"`` draws what a centre crop and a weak recipe miss, as MURA
has it: each body part's own shape (tall forearms, humeri and fingers up to
1:2.6 with the bone along the long side, wide hands and wrists), the
fracture anywhere along the bone, ends included, and slightly subtler (a
narrower gap, a smaller shift and angulation; at the sides a CPU can train
in minutes, much subtler ones are not learnt at all). The default kind is the
demo's and its bytes do not change.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mura_ray.archive import storage
from mura_ray.errors import UsageError

BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
ROOT_NAME = "MURA-v1.1"
ABNORMAL_FRACTION = 0.4
# Fraction of abnormal-study images that show the finding: in MURA the label
# is per study and not every view shows the abnormality.
FINDING_VISIBLE = 0.85
RGB_FRACTION = 0.2
MIN_SIDE, MAX_SIDE = 150, 512
FINDINGS_CSV = "sample_findings.csv"  # beside MURA-v1.1/, never read by catalog, training or scoring
KINDS = ("demo", "hard")
# kind="hard": height / width of each body part's images (a range), as MURA's tend to be.
HARD_ASPECT = {
    "FOREARM": (1.8, 2.6),
    "HUMERUS": (1.8, 2.6),
    "FINGER": (1.6, 2.4),
    "HAND": (0.75, 1.0),
    "WRIST": (0.8, 1.1),
    "ELBOW": (1.0, 1.4),
    "SHOULDER": (0.8, 1.2),
}


@dataclass(frozen=True)
class SampleImage:
    """One image of the archive, as the generator planned it."""

    rel_path: str  # relative to OUT, starting with MURA-v1.1/
    split: str
    body_part: str
    patient_id: str
    study_rel: str  # study directory relative to OUT, trailing slash as in MURA's CSVs
    label: int
    seed: int


def plan_sample(studies: int, seed: int, valid_fraction: float = 0.25) -> list[SampleImage]:
    """Decide patients, studies and images without drawing any pixels.

    Patients are drawn first (1-3 studies each), then whole patients go to the
    validation split until it holds ``valid_fraction`` of the studies, so no
    patient is in both splits.
    """
    if studies < 4:
        raise UsageError(f"--studies must be at least 4 (2 per split), got {studies}")
    rng = np.random.default_rng(seed)
    patients: list[int] = []  # studies per patient
    while sum(patients) < studies:
        patients.append(int(min(rng.integers(1, 4), studies - sum(patients))))
    valid: set[int] = set()
    target_valid = max(2, round(studies * valid_fraction))
    n_valid = 0
    for p in rng.permutation(len(patients)):
        if n_valid >= target_valid:
            break
        if n_valid + patients[p] <= target_valid + 1 and len(valid) < len(patients) - 1:
            valid.add(int(p))
            n_valid += patients[p]

    images: list[SampleImage] = []
    for p, n_studies in enumerate(patients):
        split = "valid" if p in valid else "train"
        patient_id = f"patient{p + 1:05d}"
        per_part: dict[str, int] = {}
        for _ in range(n_studies):
            part = BODY_PARTS[int(rng.integers(len(BODY_PARTS)))]
            per_part[part] = per_part.get(part, 0) + 1
            label = int(rng.random() < ABNORMAL_FRACTION)
            study_dir = f"study{per_part[part]}_{'positive' if label else 'negative'}"
            study_rel = f"{ROOT_NAME}/{split}/XR_{part}/{patient_id}/{study_dir}/"
            for m in range(int(rng.integers(1, 5))):
                images.append(
                    SampleImage(
                        rel_path=f"{study_rel}image{m + 1}.png",
                        split=split,
                        body_part=part,
                        patient_id=patient_id,
                        study_rel=study_rel,
                        label=label,
                        seed=int(rng.integers(2**63 - 1)),
                    )
                )
    return images


def _bone_profile(d: np.ndarray, half_width: float) -> np.ndarray:
    """Radiographic density across a long bone: bright cortex, darker medulla."""
    inside = np.clip(1.0 - (d / half_width) ** 2, 0.0, 1.0)
    cortex = np.exp(-(((d - 0.75 * half_width) / (0.18 * half_width)) ** 2))
    return 0.55 * np.sqrt(inside) + 0.35 * cortex * (d < half_width * 1.05)


def render_radiograph(seed: int, abnormal: bool) -> np.ndarray:
    """Draw one synthetic radiograph as an (H, W) uint8 array.

    The finding, when drawn, lies in the central part of the image, where a
    centre crop keeps it.
    """
    return draw_radiograph(seed, abnormal)[0]


def draw_radiograph(
    seed: int, abnormal: bool, body_part: str | None = None, kind: str = "demo"
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The radiograph and, when a fracture is drawn, its box ``(x0, y0, x1, y1)`` in pixels (inclusive):
    where the dark gap crosses the bone. ``body_part`` shapes the image under ``kind="hard"`` only."""
    rng = np.random.default_rng(seed)
    hard = kind == "hard"
    long_side = int(rng.integers(300, MAX_SIDE + 1))
    if hard:
        lo, hi = HARD_ASPECT.get(body_part or "", (0.8, 1.25))
        aspect = rng.uniform(lo, hi)  # height / width
        h, w = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        rng.random()  # keeps the draws below in step with the demo kind's
    else:
        short_side = int(rng.integers(max(MIN_SIDE, int(long_side * 0.55)), long_side + 1))
        h, w = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    side = min(h, w)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.08 + 0.06 * (yy / h) * rng.uniform(-1, 1) + 0.06 * (xx / w) * rng.uniform(-1, 1)

    cx = w / 2 + rng.uniform(-0.08, 0.08) * side
    cy = h / 2 + rng.uniform(-0.08, 0.08) * side
    theta = rng.uniform(0, np.pi)
    if hard and max(h, w) / side > 1.3:  # a long bone runs along the image's long side
        theta = (np.pi / 2 if h > w else 0.0) + (theta - np.pi / 2) * 0.1
    ux, uy = np.cos(theta), np.sin(theta)  # bone axis
    along = (xx - cx) * ux + (yy - cy) * uy  # signed distance along the axis
    across = -(xx - cx) * uy + (yy - cy) * ux  # signed distance across it

    tissue_half = side * rng.uniform(0.28, 0.4)
    img += 0.18 * np.exp(-((across / tissue_half) ** 4))

    n_bones = 2 if rng.random() < 0.35 else 1
    half_width = side * rng.uniform(0.07, 0.11) / (1.3 if n_bones == 2 else 1.0)
    offsets = [0.0] if n_bones == 1 else [-1.3 * half_width, 1.3 * half_width]
    broken = int(rng.integers(n_bones)) if abnormal else -1
    brightness = rng.uniform(0.8, 1.0)
    box = None
    for i, off in enumerate(offsets):
        a = across - off
        if i == broken:
            # Where along the axis it breaks: near the centre, or (hard) anywhere to near the bone's ends.
            at = rng.uniform(-0.12, 0.12) * side if not hard else rng.uniform(-0.42, 0.42) * max(h, w)
            tilt = rng.uniform(-0.5, 0.5)  # fracture line not quite perpendicular
            jag = 0.015 * side * np.sin(a / (0.02 * side) + rng.uniform(0, 6.3))
            line = along - at - tilt * a + jag
            gap = side * (rng.uniform(0.05, 0.07) if not hard else rng.uniform(0.045, 0.065))
            shift = half_width * (rng.uniform(0.6, 0.9) if not hard else rng.uniform(0.5, 0.8)) * rng.choice([-1, 1.0])
            far = line > 0
            # Angulation: the far fragment turns about the break point.
            phi = (rng.uniform(0.3, 0.5) if not hard else rng.uniform(0.25, 0.45)) * rng.choice([-1.0, 1.0])
            a_far = np.sin(phi) * (along - at) + np.cos(phi) * a
            a = np.where(far, a_far - shift, a)
            bone = _bone_profile(np.abs(a), half_width)
            darkened = 1.0 - np.exp(-((line / gap) ** 2))  # the dark gap
            box = _box((bone * (1.0 - darkened)) > 0.1)
            bone *= darkened
        else:
            bone = _bone_profile(np.abs(a), half_width)
        img += brightness * bone

    img += rng.normal(0.0, rng.uniform(0.015, 0.05), size=img.shape).astype(np.float32)
    # Re-normalise to a mean and contrast drawn independently of the label.
    target_mean = rng.uniform(70, 135)
    gain = rng.uniform(150, 230) / max(float(img.std()) * 4.0, 1e-6)
    out = (img - img.mean()) * gain + target_mean
    return np.clip(out, 0, 255).astype(np.uint8), box


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of a boolean mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def encode_png(pixels: np.ndarray, rgb: bool) -> bytes:
    """PNG bytes of a gray array, stored as RGB when asked (as some MURA files are)."""
    image = Image.fromarray(pixels, mode="L")
    if rgb:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _render_one(
    item: SampleImage, kind: str = "demo"
) -> tuple[bytes, tuple[int, int, int, int] | None, tuple[int, int]]:
    """PNG bytes, the drawn fracture's box (None when the image shows none) and the image's (height, width)."""
    rng = np.random.default_rng(item.seed ^ 0x5EED)
    shows_finding = bool(item.label) and rng.random() < FINDING_VISIBLE
    pixels, box = draw_radiograph(item.seed, shows_finding, item.body_part, kind)
    return encode_png(pixels, rgb=rng.random() < RGB_FRACTION), box, pixels.shape


def findings_csv(rows: list[tuple[str, tuple[int, int, int, int], tuple[int, int]]]) -> str:
    """The sidecar: one line per image that shows a fracture, its path and box in the image's pixels."""
    lines = ["image,x0,y0,x1,y1,height,width"]
    lines += [f"{rel},{b[0]},{b[1]},{b[2]},{b[3]},{shape[0]},{shape[1]}" for rel, b, shape in rows]
    return "\n".join(lines) + "\n"


def write_sample(
    out: str, studies: int = 400, seed: int = 0, workers: int | None = None, kind: str = "demo"
) -> list[SampleImage]:
    """Write the archive under ``out`` (a local path or s3:// URI); return the plan."""
    if kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    plan = plan_sample(studies, seed)
    fs, base = storage.filesystem(out)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    findings = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for item, (data, box, shape) in zip(plan, pool.map(_render_one, plan, [kind] * len(plan), chunksize=8)):
            storage.write_bytes(fs, storage.join(base, item.rel_path), data)
            if box is not None:
                findings.append((item.rel_path, box, shape))
    # Outside the MURA layout: where each fracture was drawn, to check heatmaps against.
    storage.write_bytes(fs, storage.join(base, FINDINGS_CSV), findings_csv(findings).encode())
    for split in ("train", "valid"):
        rows = [i for i in plan if i.split == split]
        paths = "".join(f"{i.rel_path}\n" for i in rows)
        studies_seen: dict[str, int] = {}
        for i in rows:
            studies_seen.setdefault(i.study_rel, i.label)
        labels = "".join(f"{s},{lab}\n" for s, lab in studies_seen.items())
        storage.write_bytes(fs, storage.join(base, ROOT_NAME, f"{split}_image_paths.csv"), paths.encode())
        storage.write_bytes(fs, storage.join(base, ROOT_NAME, f"{split}_labeled_studies.csv"), labels.encode())
    return plan
