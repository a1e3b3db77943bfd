"""Calibration of the model's probabilities: an affine map of its logit. No Ray, no torch.

The model's two logits give P(abnormal) = sigmoid(z) with z = z1 - z0. A
``Calibration`` replaces z with z / T + b, fitted on the tuning split by
minimising the negative log-likelihood. It never changes the order of the
scores, so AUROC is unchanged; the decision threshold is chosen after it.

- ``platt`` (Platt 1999), the default: T and b both fitted. Training with
  class weights w_c (``steps.class_weights``) moves the minimiser of the
  loss from the true logit by log(w_1 / w_0), about log(n_0 / n_1): the
  offset b takes that shift back, which dividing by T cannot do.
- ``temperature`` (Guo et al., 2017): b = 0, T fitted.

The metadata holds ``temperature``, ``logit_offset`` and ``calibration_method``
(models written before the offset existed have T only: b = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

EPS = 1e-7
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]
OFFSET_BOUNDS = (-10.0, 10.0)
METHODS = ("platt", "temperature")


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """P = sigmoid(z / temperature + offset), with z the logit of the model's own probability."""

    temperature: float = 1.0
    offset: float = 0.0
    method: str = "temperature"

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Calibration:
        """The calibration a model's metadata records (T = 1, b = 0 where it records none)."""
        return cls(
            float(meta.get("temperature", 1.0)),
            float(meta.get("logit_offset", 0.0)),
            str(meta.get("calibration_method", "temperature")),
        )

    def record(self) -> dict[str, Any]:
        """The metadata fields of this calibration."""
        return {"temperature": self.temperature, "logit_offset": self.offset, "calibration_method": self.method}

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float32); the identity returns ``probs`` unchanged."""
        probs = np.asarray(probs, dtype=np.float32)
        if self.temperature == 1.0 and self.offset == 0.0:
            return probs
        return (1.0 / (1.0 + np.exp(-(logit(probs) / self.temperature + self.offset)))).astype(np.float32)

    def describe(self) -> str:
        """``T = 1.62, b = -0.41 (platt)``."""
        return f"T = {self.temperature:.2f}, b = {self.offset:+.2f} ({self.method})"


IDENTITY = Calibration()


def nll(labels: np.ndarray, probs: np.ndarray, temperature: float, offset: float = 0.0) -> float:
    """Mean negative log-likelihood of 0/1 ``labels`` under the calibrated probabilities."""
    z = logit(probs) / temperature + offset
    y = np.asarray(labels, dtype=np.float64)
    # log(1 + e^-z) for y = 1 and log(1 + e^z) for y = 0, written without overflow.
    return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -z, z))))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T that minimises the NLL of ``labels`` (bounded search over log T); 1.0 without both classes."""
    labels = np.asarray(labels)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0
    res = minimize_scalar(lambda t: nll(labels, probs, float(np.exp(t))), bounds=LOG_T_BOUNDS, method="bounded")
    return float(np.exp(res.x))


def fit_platt(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The (T, b) that minimise the NLL of ``labels`` (bounded, over log T and b); (1, 0) without both classes.

    Started from the fitted temperature with b = 0, so it never ends worse than temperature scaling."""
    labels = np.asarray(labels)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0, 0.0
    start = np.array([np.log(fit_temperature(labels, probs)), 0.0])
    res = minimize(
        lambda v: nll(labels, probs, float(np.exp(v[0])), float(v[1])),
        start,
        method="L-BFGS-B",
        bounds=[LOG_T_BOUNDS, OFFSET_BOUNDS],
    )
    best = res.x if res.fun <= nll(labels, probs, float(np.exp(start[0]))) else start
    return float(np.exp(best[0])), float(best[1])


def fit(labels: np.ndarray, probs: np.ndarray, method: str = "platt") -> Calibration:
    """The calibration ``method`` fitted on ``labels`` and the model's own ``probs``."""
    if method == "platt":
        return Calibration(*fit_platt(labels, probs), method="platt")
    if method == "temperature":
        return Calibration(fit_temperature(labels, probs), 0.0, method="temperature")
    raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")


def class_weight_offset(class_weights: list[float]) -> float:
    """The logit offset that weighted cross-entropy adds, log(w_1 / w_0): the ``b`` that undoes it is its negative."""
    return float(np.log(class_weights[1] / class_weights[0]))
