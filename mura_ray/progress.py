"""Progress of long work: a live bar on a terminal, a plain line every few seconds elsewhere.

``Progress(label, total)`` shows done/total, images/s and the time left.
On a terminal it is a tqdm bar redrawn in place; when standard output is a
file or a pipe (Ray Jobs logs, CI, cron) it prints one plain line every
``PLAIN_SECONDS`` instead, so logs stay short and readable.

``event_sink()`` is how Ray workers and tasks tell the driver how far they
are: a small actor (``_Sink``) they push events to (fire and forget), which
a ``Follower`` thread of the driver drains.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_SECONDS = float(os.environ.get("MURA_RAY_PROGRESS_SECONDS", "10"))

_bars: list[Any] = []  # live tqdm bars, so that log lines are written above them


def write_line(text: str, stream: TextIO) -> None:
    """Write one line, above the live bars if any are drawn."""
    if _bars:
        from tqdm import tqdm

        tqdm.write(text, file=stream)
    else:
        stream.write(text + "\n")
        stream.flush()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """done/total, rate and time left for one stage."""

    def __init__(
        self, label: str, total: int, *, unit: str = "images", stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stdout
        self.done = 0
        self.postfix = ""
        self.t0 = self._last = time.monotonic()
        self.enabled = enabled
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=label,
                unit=" " + unit.rstrip("s"),
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
                smoothing=0.1,
                bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{rate_fmt}, {remaining} left]{postfix}",
            )
            _bars.append(self._bar)

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.set(self.done + n, postfix)

    def set(self, done: int, postfix: str = "") -> None:
        """Record that ``done`` of ``total`` are finished."""
        step = done - self.done
        self.done, self.postfix = done, postfix or self.postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= PLAIN_SECONDS and self.done < self.total:
            self._last = now
            write_line(f"{time.strftime('%H:%M:%S')}   {self.line()}", self.stream)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-9)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def line(self) -> str:
        left = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
        eta = _fmt_seconds(left) if left == left else "?"
        extra = f"  {self.postfix}" if self.postfix else ""
        return f"{self.label} {self.done}/{self.total} {self.unit}  {self.rate:.1f} {self.unit}/s  {eta} left{extra}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            _bars.remove(self._bar)
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Sink:
    """The events workers pushed and the driver has not drained yet."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def push(self, event: Any) -> None:
        self.events.append(event)

    def drain(self) -> list[Any]:
        events, self.events = self.events, []
        return events


def event_sink():
    """A new ``_Sink`` actor (no CPU reserved): workers call ``sink.push.remote(event)``."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=4)(_Sink).remote()


class Follower:
    """Drains an event sink in a driver thread and hands each event to ``handle``, while the driver blocks."""

    def __init__(self, sink: Any, handle: Callable[[Any], None], interval: float = 0.5) -> None:
        self.sink, self.handle, self.interval = sink, handle, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mura-ray-progress", daemon=True)

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:  # the display must never fail the job
            return
        for event in events:
            self.handle(event)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
