"""Temperature scaling of the model's probabilities. No Ray, no torch.

The model's two logits give P(abnormal) = sigmoid(z) with z = z1 - z0;
temperature scaling replaces z with z / T, one number fitted on the tuning
split by minimising the negative log-likelihood (Guo et al., 2017). It moves
probabilities towards or away from 0.5 and never changes their order, so
AUROC is unchanged; the decision threshold is chosen after it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

EPS = 1e-7
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by ``temperature`` (float32; 1.0 returns them unchanged)."""
    probs = np.asarray(probs, dtype=np.float32)
    if temperature == 1.0:
        return probs
    return (1.0 / (1.0 + np.exp(-logit(probs) / temperature))).astype(np.float32)


def nll(labels: np.ndarray, probs: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of 0/1 ``labels`` under the tempered probabilities."""
    z = logit(probs) / temperature
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
