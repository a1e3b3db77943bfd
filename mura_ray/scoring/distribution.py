"""What a scoring run's scores looked like, kept in its manifest for the nightly monitor. No Ray, no torch.

``ScoreDistribution`` counts, as rows are written: a histogram of
``prob_abnormal`` over ``BINS`` equal-width bins of [0, 1], and per body
part the images, the errors and the images predicted abnormal. Fine bins
let the monitor regroup them into the reference distribution's quantiles
later without the scores themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BINS = 100


def histogram(probs: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Counts of ``probs`` in ``bins`` equal-width bins of [0, 1] (1.0 in the last)."""
    which = np.clip((np.asarray(probs, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    return np.bincount(which, minlength=bins)


@dataclass
class ScoreDistribution:
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    body_parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, table: pa.Table) -> None:
        """Count a batch of image rows (``prob_abnormal``, ``predicted_abnormal``, ``body_part``)."""
        probs = table["prob_abnormal"]
        scored = probs.drop_null().to_numpy() if hasattr(probs, "drop_null") else probs
        self.counts += histogram(np.asarray(scored))
        parts = pc.fill_null(table["body_part"], "UNKNOWN").to_pylist()
        flags = pc.fill_null(table["predicted_abnormal"], False).to_pylist()
        for part, prob, flagged in zip(parts, probs.to_pylist(), flags):
            d = self.body_parts.setdefault(part, {"images": 0, "errors": 0, "flagged": 0})
            d["images"] += 1
            d["errors"] += prob is None
            d["flagged"] += bool(flagged)

    def record(self) -> dict[str, Any]:
        """The manifest's ``distribution``: ``bins``, ``histogram`` and ``body_parts``."""
        return {
            "bins": BINS,
            "histogram": self.counts.tolist(),
            "body_parts": {k: dict(v) for k, v in sorted(self.body_parts.items())},
        }
