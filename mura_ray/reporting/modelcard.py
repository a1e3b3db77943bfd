"""``model_card.md``: what a kept checkpoint is, how it was made, how well it did, and what it is not for."""

from __future__ import annotations

from typing import Any

from mura_ray.model.calibration import Calibration, class_weight_offset
from mura_ray.model.ensemble import is_ensemble
from mura_ray.reporting.calibration import calibration_table
from mura_ray.reporting.guard import engine_rows
from mura_ray.reporting.metrics import fmt, fmt_ci

FIT_WORDS = {
    "pad": "the long side scaled to the input and the rest letterboxed: the whole image",
    "stretch": "the whole image resized to the square",
    "crop": "the short side scaled and the centre cut: the ends of a long image are not seen",
}


def _selected(cfg: dict[str, Any]) -> str:
    """The tuning metric that chose the kept epoch (``--select-on``; image F1 before it existed)."""
    return {"study_kappa": "study kappa", "auroc": "AUROC"}.get(cfg.get("select_on") or "f1", "F1 at threshold 0.5")


def render_model_card(meta: dict[str, Any]) -> str:
    """``model_card.md`` of a checkpoint, from its metadata."""
    sections = (
        _what_it_is,
        _data_and_configuration,
        _protocol,
        _threshold_and_metrics,
        _calibration,
        _engines,
        _use_and_limits,
    )
    return "\n".join(line for section in sections for line in section(meta)) + "\n"


def _what_it_is(meta: dict[str, Any]) -> list[str]:
    if is_ensemble(meta):
        return _what_the_ensemble_is(meta)
    cfg, m = meta.get("train_config", {}), meta.get("metrics", {})
    return [
        f"# Model card: mura-ray ResNet18 {meta['model_id'][:12]}",
        "",
        "## What it is",
        "",
        f"- Binary classifier (normal / abnormal) of musculoskeletal radiographs, {meta['architecture']} with a "
        f"{meta['num_classes']}-class head, input {meta['image_size']}x{meta['image_size']} grayscale "
        "repeated to 3 channels, "
        f"ImageNet normalisation; each image fitted to the square by `{meta.get('fit', 'crop')}` "
        f"({FIT_WORDS.get(meta.get('fit', 'crop'), '')}).",
        f"- Model id (sha256 of `model.safetensors`): `{meta['model_id']}`",
        f"- Created {meta.get('created_at', 'n/a')} by mura-ray {meta.get('package_version', 'n/a')}.",
        f"- Kept epoch: {m.get('epoch', 'n/a')} of at most {cfg.get('epochs', 'n/a')} "
        f"(best {_chooser(meta, 'epoch')} {_selected(cfg)}).",
        "",
    ]


def _what_the_ensemble_is(meta: dict[str, Any]) -> list[str]:
    members = meta["members"]
    lines = [
        f"# Model card: mura-ray ensemble of {len(members)} ResNet18 models {meta['model_id'][:12]}",
        "",
        "## What it is",
        "",
        f"- Binary classifier (normal / abnormal) of musculoskeletal radiographs: P(abnormal) is the mean of its "
        f"{len(members)} members' probabilities (as the MURA paper's ensemble), then calibrated. Input "
        f"{meta['image_size']}x{meta['image_size']} grayscale repeated to 3 channels, resized to each member's "
        f"side; each image fitted to the square by `{meta.get('fit', 'crop')}` "
        f"({FIT_WORDS.get(meta.get('fit', 'crop'), '')}).",
        f"- Model id (sha256 of `model.safetensors`, which holds every member's weights): `{meta['model_id']}`",
        f"- Created {meta.get('created_at', 'n/a')} by mura-ray {meta.get('package_version', 'n/a')}.",
        "",
        "| member | model id | input | validation study kappa (alone) | from |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | `{m['model_id'][:12]}` | {m['image_size']} | {fmt(m.get('validation_study_kappa'))} | "
        f"`{m['source']}` |"
        for k, m in enumerate(members)
    ]
    return [*lines, ""]


def _data_and_configuration(meta: dict[str, Any]) -> list[str]:
    if is_ensemble(meta):
        return [f"- Training data fingerprint (the first member's): `{meta.get('data_fingerprint', 'n/a')}`.", ""]
    cfg = meta.get("train_config", {})
    lines = [
        "## Data",
        "",
        f"- Training data: `{cfg.get('data', 'n/a')}`; catalog fingerprint (sha256 of paths, labels, sizes, tags): "
        f"`{meta.get('data_fingerprint', 'n/a')}`.",
        f"- Class weights (normal, abnormal): {', '.join(f'{w:.3f}' for w in meta.get('class_weights', []))}.",
        "",
        "## Configuration",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | `{cfg[key]}` |" for key in sorted(cfg) if key != "fault"]
    return [*lines, ""]


def _chooser(meta: dict[str, Any], choice: str) -> str:
    split = (meta.get("protocol") or {}).get("chosen_on", {}).get(choice, "valid")
    return "tuning split" if split == "tune" else "validation split"


def _protocol(meta: dict[str, Any]) -> list[str]:
    p = meta.get("protocol")
    if not p:
        return ["## Protocol", "", "The validation split chose the epoch and the threshold and also reports.", ""]
    if p["tune_fraction"] == 0:
        head = "The validation split chose the epoch, temperature and threshold, and also reports: its figures "
        return ["## Protocol", "", head + "are optimistic.", ""]
    return [
        "## Protocol",
        "",
        f"- Tuning split: {p['tune_patients']} training patients ({p['tune_fraction']:.0%}, stratified by body part; "
        f"{p['tune_images']} images), listed in the run's `{p['patients_file']}`, never trained on.",
        "- It chose the kept epoch (early stopping), the temperature and the decision threshold.",
        f"- The validation split ({p['valid_images']} images) chose nothing: it only reports, below.",
        "",
    ]


def _method_line(meta: dict[str, Any]) -> str:
    cal = Calibration.of(meta)
    if cal.method != "platt":
        return f"Temperature scaling, P = sigmoid(z / T) with T = {cal.temperature:.3f}"
    line = f"Platt scaling, P = sigmoid(z / T + b) with T = {cal.temperature:.3f} and b = {cal.offset:+.3f}"
    if meta.get("class_weights"):
        line += (
            f" (the class weights shift the logit by log(w1 / w0) = {class_weight_offset(meta['class_weights']):+.3f}"
            ", which b takes back)"
        )
    return line


def _calibration(meta: dict[str, Any]) -> list[str]:
    c = meta.get("calibration")
    if not c:
        return []
    lines = [
        "## Calibration (validation split)",
        "",
        f"{_method_line(meta)}, fitted on the {_chooser(meta, 'temperature')}; "
        f"`prob_abnormal` is calibrated. ECE over {c['bins']} equal-width bins; reliability diagram in "
        "`reliability.png`.",
        "",
        *calibration_table(c),
    ]
    return [*lines, ""]


def _threshold_and_metrics(meta: dict[str, Any]) -> list[str]:
    val = meta.get("validation", {})
    lines = [
        "## Decision threshold",
        "",
        f"{fmt(meta.get('threshold'))}: {meta.get('threshold_rule', 'default')}. `mura-ray score` and "
        "`mura-ray evaluate` use it unless told otherwise.",
        "",
        "## Validation metrics at that threshold",
        "",
        "95% percentile bootstrap intervals over patients (each drawn patient brings all their studies and images). "
        "A study's score is the mean of its images' scores (as in the MURA paper).",
        "",
        "| level | n | kappa (95% CI) | AUROC (95% CI) | F1 | sensitivity | specificity | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in ("image", "study"):
        r = val.get(level)
        if r:
            lines.append(
                f"| {level} | {r['n']} | {fmt(r['kappa'])} {fmt_ci(r['kappa_ci'])} | "
                f"{fmt(r['auroc'])} {fmt_ci(r['auroc_ci'])} | {fmt(r['f1'])} | "
                f"{fmt(r['sensitivity'])} | {fmt(r['specificity'])} | {fmt(r['accuracy'])} |"
            )
    if val.get("per_body_part"):
        lines += ["", "| body part | studies | study kappa (95% CI) |", "|---|---|---|"]
        for part, levels in val["per_body_part"].items():
            r = levels["study"]
            lines.append(f"| {part} | {r['n']} | {fmt(r['kappa'])} {fmt_ci(r['kappa_ci'])} |")
    return [*lines, ""]


def _engines(meta: dict[str, Any]) -> list[str]:
    record = meta.get("engine_guard")
    if not record:
        return []
    lines = [
        "## Inference engines",
        "",
        f"Each engine against torch fp32 on {record['images']} validation images ({record['measured_on']}); "
        "`--backend auto` does not use an engine that fails.",
        "",
        *engine_rows(record["engines"]),
    ]
    return [*lines, ""]


def _use_and_limits(meta: dict[str, Any]) -> list[str]:
    versions = meta.get("package_versions", {})
    return [
        "## Software",
        "",
        ", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a",
        "",
        "## Intended use",
        "",
        "Research and operational triage support: ranking or flagging musculoskeletal radiographs for review by a "
        "radiologist, and measuring how a model behaves on an institution's archive.",
        "",
        "## Limitations",
        "",
        "- Not for clinical diagnosis. It has not been validated prospectively or cleared by any regulator; a "
        "radiologist must read every study.",
        "- The metrics above come from the validation split of the training data. They say little about other "
        "hospitals, scanners, populations or body parts, nor about images unlike MURA's (children, implants, casts, "
        "other projections). Validate on local data with `mura-ray evaluate` before use.",
        "- A study's label is shared by its images; the model sees one image at a time. Grad-CAM overlays "
        "(`mura-ray explain`) show where it looked, coarsely; they are not a localisation of the finding.",
        f"- The threshold trades sensitivity for specificity as chosen on the {_chooser(meta, 'threshold')}; "
        "revisit it for each use.",
    ]
