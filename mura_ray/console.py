"""What a person sees: mura-ray's own lines on the console, Ray's output in a log file.

``setup(verbose=..., quiet=...)`` sends mura-ray's log records to standard
output as short timestamped lines. Unless ``verbose``, everything Ray prints
(its loggers, Ray Data's plans, the output of every worker and actor, Python
warnings from dependencies) goes to a log file instead: the run's folder
when the driver names one (``set_ray_log``), else Ray's session folder. The
console names that file once.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Any, TextIO

log = logging.getLogger("mura_ray")

# Warnings that a user of mura-ray can do nothing about.
IGNORED_WARNINGS = (
    r"`use_arrow_tensor_v2` is deprecated",  # raised by Ray Data's own DataContext defaults
)
RAY_LOGGERS = ("ray", "py.warnings", "filelock", "fsspec", "s3fs", "botocore", "urllib3")


class _ConsoleHandler(logging.Handler):
    """Lines to standard output; written above a live progress bar when one is drawn."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from mura_ray.progress import write_line

            write_line(self.format(record), self.stream or sys.stdout)
        except Exception:  # a broken console must not end the job
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            time_part, _, message = text.partition(" ")
            text = f"{time_part} {record.levelname.lower()}: {message}"
        return text


class _RayLog(logging.Handler):
    """Ray's output: kept in memory until the file is known, then appended to it."""

    def __init__(self) -> None:
        super().__init__()
        self.path: str | None = None
        self._file: TextIO | None = None
        self._pending: list[str] = []
        self._lock_lines = threading.Lock()
        self.setLevel(logging.INFO)  # Ray Data's loggers pass DEBUG records on to their handlers to filter
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def open(self, path: str) -> None:
        with self._lock_lines:
            if self._file is not None:
                self._file.close()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.path = path
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the process's life)
            for line in self._pending:
                self._file.write(line)
            self._pending.clear()
            self._file.flush()

    def write(self, text: str) -> None:
        with self._lock_lines:
            if self._file is None:
                self._pending.append(text)
            else:
                self._file.write(text)
                self._file.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def worker_lines(self, data: dict[str, Any]) -> None:
        """A batch of lines that a Ray worker or actor printed (Ray's log monitor delivers them)."""
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''}) "
        self.write("".join(prefix + line + "\n" for line in data.get("lines", [])))


# A line that Ray's C++ core prints in the driver process itself: "[2026-11-27 23:14:32,050 E 3874 3874] ...".
_CORE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] ")


class _StderrFilter:
    """Standard error (file descriptor 2) through a pipe: Ray's core lines to the log, the rest unchanged.

    Ray's C++ core worker inside the driver writes its errors straight to
    file descriptor 2, past Python's logging. Everything else (mura-ray's
    error lines, tracebacks) is passed through as it comes; at exit the pipe
    is drained and the real stderr restored.
    """

    def __init__(self, ray_log: _RayLog) -> None:
        self.ray_log = ray_log
        sys.stderr.flush()
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._reader = os.fdopen(read, "rb", buffering=0)
        self._thread = threading.Thread(target=self._pump, name="mura-ray-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            chunk = self._reader.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
            if pending and not _CORE_LINE.match(pending):
                self._route(pending)  # a partial line (a prompt, a progress bar): pass it on now
                pending = b""
        if pending:
            self._route(pending)

    def _route(self, line: bytes) -> None:
        if _CORE_LINE.match(line):
            self.ray_log.write(line.decode("utf-8", "replace"))
        else:
            os.write(self.real, line)

    def close(self) -> None:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(self.real, 2)  # the pipe's last writer is gone: the pump reads to its end
        self._thread.join(timeout=5)


_state: dict[str, Any] = {"verbose": True, "ray_log": None, "announced": False, "stderr": None}


def setup(*, verbose: bool = False, quiet: bool = False, own_process: bool = False) -> None:
    """Console lines for mura-ray's loggers; Ray's output to a file unless ``verbose``.

    ``own_process``: this process is the ``mura-ray`` command itself, so its
    file descriptor 2 may be filtered too (never inside a caller's process).
    """
    pkg = logging.getLogger("mura_ray")
    for h in list(pkg.handlers):
        pkg.removeHandler(h)
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.WARNING if quiet else logging.INFO)
    pkg.propagate = False
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # mura-ray draws its own
    _state["verbose"] = verbose
    if verbose:
        return
    ray_log = _RayLog()
    _state["ray_log"] = ray_log
    logging.captureWarnings(True)
    if own_process and _state["stderr"] is None:
        _state["stderr"] = _StderrFilter(ray_log)


def before_ray_init() -> None:
    """Called just before ``ray.init``: Ray's loggers go to the log file from its first line on."""
    if _state["ray_log"] is not None:
        _route_loggers(_state["ray_log"])


def _route_loggers(ray_log: _RayLog) -> None:
    """Point Ray's loggers (and the noisy loggers of its dependencies) at the log file, not the console."""
    import ray  # noqa: F401  (importing Ray configures its loggers; re-route them after that)
    import ray.data  # noqa: F401

    names = set(RAY_LOGGERS) | {n for n in logging.root.manager.loggerDict if n.startswith("ray.")}
    for name in names:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            console_handler = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            if console_handler or (isinstance(h, _RayLog) and h is not ray_log):  # an earlier command's log
                logger.removeHandler(h)
        if name in RAY_LOGGERS:
            if ray_log not in logger.handlers:
                logger.addHandler(ray_log)
            logger.propagate = False
        else:
            logger.propagate = True  # on to the "ray" logger, and from there to the log file


def set_ray_log(path: str) -> None:
    """Write Ray's output to ``path`` (a local file) from now on, with what came before."""
    ray_log = _state["ray_log"]
    if ray_log is not None and ray_log.path is None:
        ray_log.open(path)


def ray_connected() -> None:
    """Called once the driver is connected to Ray: take over the output of Ray's workers and actors."""
    ray_log = _state["ray_log"]
    if ray_log is None:
        return
    _route_loggers(ray_log)  # ray.init may have added console handlers again
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.remove_handler("mura_ray_logs")
    global_worker_stdstream_dispatcher.add_handler("mura_ray_logs", ray_log.worker_lines)
    # The raylet's warnings to the driver (e.g. "N PYTHON worker processes have been started") are
    # printed by Ray's error listener through this function directly, not through the dispatcher.
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: ray_log.worker_lines(data)
    if ray_log.path is None:
        ray_log.open(os.path.join(_session_logs_dir(), f"mura-ray-{os.getpid()}.log"))
    if not _state["announced"]:
        _state["announced"] = True
        log.info("Ray's own output goes to %s (--verbose shows it here)", ray_log.path)


def _session_logs_dir() -> str:
    try:
        import ray

        node = ray._private.worker._global_node  # the node this driver runs on
        if node is not None:
            return node.get_logs_dir_path()
    except Exception:
        pass
    return tempfile.gettempdir()
