"""Fault injection for the crash tests: ``MURA_RAY_FAULT=point`` or ``point@N``.

At the named point (on its Nth pass, default the first) the process kills
itself with SIGKILL, as a node loss or the OOM killer would. Unset, every
check is a dictionary lookup and nothing else.
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


def maybe_kill(point: str) -> None:
    """SIGKILL this process if ``MURA_RAY_FAULT`` names ``point`` and its pass has come."""
    if _armed(point):
        kill_now()


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
