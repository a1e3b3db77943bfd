"""Fault injection for the crash tests: ``MURA_RAY_FAULT=point`` or ``point@N``.

At the named point (on its Nth pass, default the first) the process kills
itself with SIGKILL, as a node loss or the OOM killer would, or, at a
``pause-`` point, stops itself with SIGSTOP, as a paused VM or a debugger
would, until someone sends it SIGCONT. Unset, every check is a dictionary
lookup and nothing else. This is the only way faults are injected: no
user-facing setting knows of them.

Points: ``score`` (the scoring driver, after adding a batch of rows),
``chunk-committed@K`` (after the Kth chunk of a scoring run committed),
``heatmap`` (after a batch of overlays was written, before their commit),
``pause-after-plan`` (a scoring run that has read its model and planned
what to score, before it starts Ray), and ``train-epoch@E`` (the last
training worker, in the middle of epoch E, on the first attempt only). Ray
Train's workers do not see the driver's environment, so the training driver
hands them the setting (``spec()``).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passes: Counter[str] = Counter()


def _armed(point: str) -> bool:
    spec = os.environ.get("MURA_RAY_FAULT", "")
    if not spec:
        return False
    name, _, nth = spec.partition("@")
    if name != point:
        return False
    _passes[point] += 1
    return _passes[point] == int(nth or 1)


def spec() -> str | None:
    """The fault asked for in this process's environment, to hand on to Ray workers."""
    return os.environ.get("MURA_RAY_FAULT") or None


def armed_in_epoch(spec: str | None, epoch: int) -> bool:
    """Whether ``spec`` (from ``spec()``) asks a training worker to die in ``epoch``."""
    if not spec:
        return False
    name, _, nth = spec.partition("@")
    return name == "train-epoch" and int(nth or 1) == epoch


def maybe_kill(point: str) -> None:
    """SIGKILL this process if ``MURA_RAY_FAULT`` names ``point`` and its pass has come."""
    if _armed(point):
        kill_now()


def maybe_pause(point: str) -> None:
    """SIGSTOP this process if ``MURA_RAY_FAULT`` names ``point`` and its pass has come."""
    if _armed(point):
        os.kill(os.getpid(), signal.SIGSTOP)


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
