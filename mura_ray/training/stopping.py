"""Early stopping on a score that should rise (a tuning-split metric: F1, study kappa or AUROC)."""

from __future__ import annotations

import math


class EarlyStopping:
    """Stop after ``patience`` epochs without a higher score."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.bad_epochs = 0

    def step(self, score: float) -> bool:
        """Record an epoch's score; returns whether it is the best so far. An undefined score (NaN: a kappa
        where every prediction is one class) ranks below any defined one, and the first epoch is kept."""
        if math.isnan(score):
            score = -math.inf
        if score > self.best or self.best == -math.inf:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load(self, state: dict[str, float]) -> None:
        self.best, self.bad_epochs = state["best"], int(state["bad_epochs"])
