"""PNG plots for evaluation reports and training runs (matplotlib, no display needed)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from mura_ray.archive import storage  # noqa: E402
from mura_ray.model.calibration import Calibration  # noqa: E402


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save(fig, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    storage.write_bytes(fs, path, png(fig))


def confusion(levels: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, uri: str) -> None:
    """Confusion matrices side by side: {title: (labels, probs)}."""
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8))
    fig.subplots_adjust(wspace=0.45)
    for ax, (title, (y, p)) in zip(np.atleast_1d(axes), levels.items()):
        cm = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14, color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([0, 1], ["normal", "abnormal"])
        ax.set_yticks([0, 1], ["normal", "abnormal"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} (threshold {threshold:.3f})")
    save(fig, uri)


def roc(levels: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, uri: str) -> None:
    """ROC curves with the operating point (the threshold's sensitivity and 1 - specificity) marked."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for title, (y, p) in levels.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        pred = p >= threshold
        op = (
            float((pred & (y == 0)).sum() / max((y == 0).sum(), 1)),
            float((pred & (y == 1)).sum() / max((y == 1).sum(), 1)),
        )
        (line,) = ax.plot(fpr, tpr, label=title)
        ax.plot(*op, "o", color=line.get_color(), markersize=8)
        ax.annotate(f"{title} operating point", op, textcoords="offset points", xytext=(8, -12), fontsize=8)
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    save(fig, uri)


def body_part_kappa(report: dict[str, Any], uri: str) -> None:
    """Kappa per body part, image and study level, with 95% bootstrap intervals."""
    parts = list(report["per_body_part"])
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(parts) + 2), 4))
    x = np.arange(len(parts))
    for offset, level in ((-0.2, "image"), (0.2, "study")):
        vals = np.array([report["per_body_part"][b][level]["kappa"] for b in parts], dtype=float)
        ci = np.array([report["per_body_part"][b][level]["kappa_ci"] for b in parts], dtype=float)
        err = np.abs(np.vstack([vals - ci[:, 0], ci[:, 1] - vals]))
        ax.bar(x + offset, np.nan_to_num(vals), width=0.4, yerr=np.nan_to_num(err), capsize=3, label=level)
        for xi, v in zip(x + offset, vals):
            if np.isnan(v):  # undefined, e.g. one class only or a constant prediction
                ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(report["study"]["kappa"], color="gray", linestyle="--", linewidth=1, label="all studies")
    ax.set_xticks(x, parts, rotation=30)
    ax.set_ylabel("Cohen's kappa")
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.05)
    ax.set_title("Kappa by body part (95% bootstrap CI)")
    ax.legend()
    save(fig, uri)


def reliability(report: dict[str, Any], uri: str) -> None:
    fs, path = storage.filesystem(uri)
    storage.write_bytes(fs, path, reliability_png(report))


def reliability_png(report: dict[str, Any]) -> bytes:
    """Reliability diagrams (observed frequency against mean predicted probability per bin), images and
    studies, before and after calibration; ``report`` is ``calibration_report``'s."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    for ax, level in zip(axes, ("image", "study")):
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="perfectly calibrated")
        for when, style in (("before", "o--"), ("after", "s-")):
            m = report[level][when]
            b = m["bins"]
            keep = [i for i, c in enumerate(b["count"]) if c > 0]
            ax.plot(
                [b["mean_prob"][i] for i in keep],
                [b["frequency"][i] for i in keep],
                style,
                label=f"{when} calibration: ECE {m['ece']:.3f}, Brier {m['brier']:.3f}",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted P(abnormal) in bin")
        ax.set_ylabel("observed share abnormal")
        ax.set_title(f"{level} level ({Calibration.of(report).describe()})")
        ax.legend(fontsize=7, loc="upper left")
    return png(fig)


def gallery(items: list[tuple[str, np.ndarray, float, str]], rows: list[str], uri: str) -> None:
    """A grid of images, one row per title in ``rows``; items are (row title, gray or RGB image, score,
    caption)."""
    cols = max([sum(1 for it in items if it[0] == row) for row in rows] + [1])
    wide = any(np.ndim(it[1]) == 3 for it in items)  # overlays: radiograph and heatmap side by side
    fig, axes = plt.subplots(len(rows), cols, figsize=((4.6 if wide else 2.4) * cols, 2.9 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(rows):
        mine = [it[1:] for it in items if it[0] == row]
        axes[i, 0].set_title(row if not mine else "", fontsize=9, loc="left")
        for j, (img, score, caption) in enumerate(mine):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=255)
            head = f"{row}\n" if j == 0 else ""
            axes[i, j].set_title(f"{head}p(abnormal) {score:.3f}", fontsize=8)
            axes[i, j].text(0.5, -0.04, caption, transform=axes[i, j].transAxes, ha="center", va="top", fontsize=6)
    save(fig, uri)


def training_curves(history: list[dict[str, Any]], uri: str) -> None:
    """Loss, F1, kappa and learning rate by epoch."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["tune_loss"] for h in history], "o-", label="tuning")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [h["tune_f1"] for h in history], "o-", label="image F1")
    axes[1].plot(epochs, [h["tune_study_f1"] for h in history], "o-", label="study F1")
    axes[1].set_title("tuning split F1 (chooses the epoch)")
    axes[2].plot(epochs, [h["tune_kappa"] for h in history], "o-", label="image kappa")
    axes[2].plot(epochs, [h["tune_study_kappa"] for h in history], "o-", label="study kappa")
    axes[2].set_title("tuning split Cohen's kappa")
    axes[3].plot(epochs, [h["lr"] for h in history], "o-")
    axes[3].set_yscale("log")
    axes[3].set_title("learning rate")
    best = [h["epoch"] for h in history if h.get("best")]
    for ax in axes:
        ax.set_xlabel("epoch")
        if best:
            ax.axvline(best[-1], color="gray", linestyle=":", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save(fig, uri)


def monitor(report: dict[str, Any], uri: str) -> None:
    """Per night: images, error rate, share flagged (overall and per body part), PSI; and the latest night's
    score distribution against the reference."""
    nights = report["nights"]
    x = np.arange(len(nights))
    labels = [n["run_date"] + "\n" + n["run_id"][-6:] for n in nights]
    fig, axes = plt.subplots(1, 5, figsize=(24, 4))
    axes[0].bar(x, [n["images"] for n in nights], color="tab:blue")
    axes[0].set_title("images scored")
    axes[1].plot(x, [n["error_rate"] for n in nights], "o-", color="tab:red")
    axes[1].axhline(report["max_error_rate"], color="gray", linestyle=":", label="alert")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("error rate")
    axes[2].plot(x, [n["flagged_share"] for n in nights], "o-", color="black", linewidth=2, label="all")
    for part in sorted({p for n in nights for p in n["flagged_share_by_body_part"]}):
        axes[2].plot(x, [n["flagged_share_by_body_part"].get(part, np.nan) for n in nights], ".-", label=part)
    axes[2].set_title("share predicted abnormal")
    axes[3].bar(
        x,
        [n["psi"] for n in nights],
        color=["tab:red" if n["psi"] > max(report["psi_alert"], n["psi_noise"]) else "tab:green" for n in nights],
    )
    axes[3].axhline(report["psi_alert"], color="gray", linestyle=":", label="--psi-alert")
    axes[3].plot(x, [n["psi_noise"] for n in nights], "k_", markersize=20, label="chance bound")
    axes[3].set_title("PSI of the scores vs reference")
    for ax in axes[:4]:
        ax.set_xticks(x, labels, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    edges = np.linspace(0, 1, report["bins"] + 1)
    for name, counts in (("reference", report["reference_histogram"]), ("latest night", nights[-1]["histogram"])):
        counts = np.asarray(counts, dtype=np.float64)
        axes[4].stairs(counts / max(counts.sum(), 1), edges, label=name)
    axes[4].set_title("score distribution")
    axes[4].set_xlabel("P(abnormal)")
    axes[4].legend(fontsize=7)
    save(fig, uri)
