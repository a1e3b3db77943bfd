"""What the training workers tell the driver, and how the driver shows it.

Rank 0 pushes small events to an event sink actor (fire and forget): the
progress inside an epoch (``StepReporter``), each finished epoch's metrics
and a few notes (resumed, stopped early). The driver drains the sink while
``TorchTrainer.fit`` runs and ``TrainingDisplay`` turns the events into a
progress bar per epoch and one line per epoch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mura_ray.progress import Progress

log = logging.getLogger(__name__)


class StepReporter:
    """Rank 0's progress inside an epoch, pushed to the driver's event sink at most every half second."""

    def __init__(self, sink: Any, epoch: int, epochs: int, steps: int, images_per_step: int) -> None:
        self.sink, self.epoch, self.epochs, self.steps, self.per_step = sink, epoch, epochs, steps, images_per_step
        self.last = 0.0

    def __call__(self, i: int, loss: Any) -> None:
        """``loss``: the batch's loss, a float or a tensor on the device (read only when it is pushed)."""
        now = time.monotonic()
        if self.sink is not None and (now - self.last >= 0.5 or i + 1 == self.steps):
            self.sink.push.remote(
                {
                    "kind": "step",
                    "epoch": self.epoch,
                    "epochs": self.epochs,
                    "images": (i + 1) * self.per_step,
                    "total": self.steps * self.per_step,
                    "loss": float(loss),
                }
            )
            self.last = now


def tell_driver(sink: Any, **event: Any) -> None:
    if sink is not None:
        sink.push.remote(event)  # fire and forget: the driver's console


class TrainingDisplay:
    """The driver's view of the workers' events: a bar per epoch and one line when each epoch ends."""

    def __init__(self, also: Any = None) -> None:
        self.bar: Progress | None = None
        self.bar_epoch = 0
        self.also = also  # another listener (experiment tracking), called after the display

    def handle(self, event: dict[str, Any]) -> None:
        self._show(event)
        if self.also is not None:
            self.also(event)

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "step":
            if self.bar is None or self.bar_epoch != event["epoch"]:
                self.close()
                self.bar = Progress(f"epoch {event['epoch']}/{event['epochs']}", event["total"])
                self.bar_epoch = event["epoch"]
            self.bar.set(event["images"], postfix=f"loss {event['loss']:.4f}")
        elif kind == "epoch":
            self.close()
            log.info(
                "epoch %d/%d  train loss %.4f  tune loss %.4f  F1 %.3f  AUROC %.3f  study kappa %.3f  lr %.2g  "
                "%.1f images/s  %.0fs%s",
                event["epoch"],
                event["epochs"],
                event["train_loss"],
                event["tune_loss"],
                event["tune_f1"],
                event["tune_auroc"],
                event["tune_study_kappa"],
                event["lr"],
                event["train_images"] / max(event["train_seconds"], 1e-9),
                event["epoch_seconds"],
                "  (best so far)" if event["best"] else "",
            )
        elif kind == "note":
            self.close()
            log.info("%s", event["text"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
