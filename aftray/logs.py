"""Where log lines go, in every process of a run: the terminal is for people, the run's log file for the rest.

The terminal shows the project's own lines (logger "aftray", any level, from any process), the progress bars and
errors (ERROR and above, from any library). What other libraries say besides (their warnings and info, Python
warnings, C++ notices, their loading bars) goes to the log file (`<run_dir>/run.log` for a run), which keeps a
copy of our lines too. Each process calls one function once:
- the driver: `route(path, terminal)` (`aftray.run.console.log_to_file`), after its libraries are imported (it
  takes their console handlers over) and before Ray starts (`ray_runtime_env` hands the path to the workers);
- every Ray worker process of the job (rollout actors, Ray Data tasks, Ray Train's controller and workers):
  `worker_setup`, which Ray runs as the job's `worker_process_setup_hook` before the process runs anything else.
  A Ray Train worker calls it again (`aftray.train.worker.serve`): Ray Train re-configures the root logger of the
  processes it starts.

In a worker, the process's stdout and stderr themselves (file descriptors 1 and 2) go to the file, so C++
output, prints, and the output of its child processes (a spawned vLLM engine core) land there as well. Our
handler writes to a copy of the original stderr, which Ray still forwards to the driver (log_to_driver), so a
worker's warnings and errors show there with its "(EngineActor pid=...)" prefix. vLLM's own logging set-up is
off (VLLM_CONFIGURE_LOGGING=0): its loggers then reach the root logger like any other library's.
A library that adds a console handler of its own after `route` (DeepSpeed when a train worker imports it)
prints through it: to the file in a worker (its fds), to the terminal in the driver.

Multi-node: there is no shared disk; a process on another node writes to the same path on its own node.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

LOG_FILE = "AFTRAY_LOG_FILE"  # the environment variable that names the log file to the workers
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s")
_WORKER_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
_RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:")  # lines by which Ray names a worker's output
_forwarded: TextIO | None = None  # a Ray worker's original stderr, once its own goes to the log file


def for_people(record: logging.LogRecord) -> bool:
    """The terminal's share when a log file takes the rest: our lines, and errors from anyone."""
    return record.name.split(".")[0] == "aftray" or record.levelno >= logging.ERROR


def route(path: str | Path, terminal: logging.Handler) -> Path:
    """Every log line of this process to the file at `path` (appended), those `for_people` also to `terminal`;
    Python warnings are logged. Calling it again replaces what the last call installed."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "aftray", False)]:
        root.removeHandler(handler)
        handler.close()  # a file handler's file (a stream handler leaves its stream open)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(_FORMAT)
    to_file.setLevel(logging.INFO)  # some libraries' loggers pass DEBUG records on (Ray Data's)
    terminal.addFilter(for_people)
    for handler in (to_file, terminal):
        handler.aftray = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    _take_over_console_handlers()
    logging.captureWarnings(True)  # warnings.warn (torch's FutureWarnings, ...) as records of "py.warnings"
    os.environ[LOG_FILE] = str(path)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # read when vLLM is imported, here and in its child processes
    return path


def _take_over_console_handlers() -> None:
    """Loggers that print through a console handler of their own (Ray's "ray" and "ray.data", torch's, ...) hand
    their records to the root logger instead: to the file, and to the terminal when they are errors. Their
    file handlers (Ray's session logs) stay."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger) or logger.name.split(".")[0] == "aftray":
            continue
        console = [h for h in logger.handlers if _prints(h)]
        for handler in console:
            logger.removeHandler(handler)
        if console and logger is not logging.getLogger():
            logger.propagate = True


def _prints(handler: logging.Handler) -> bool:
    """A handler that writes to this process's stdout or stderr (and is not one of ours)."""
    if getattr(handler, "aftray", False) or not isinstance(handler, logging.StreamHandler) \
            or isinstance(handler, logging.FileHandler):
        return False
    try:
        return handler.stream.fileno() in (1, 2)
    except (AttributeError, ValueError, OSError):  # a StringIO (pytest's capture), a closed stream
        return False


def ray_runtime_env() -> dict:
    """For `ray.init(runtime_env=...)`: every worker process of the job runs `worker_setup` first, with the log
    file this process routes to. {} when it routes to none."""
    path = os.environ.get(LOG_FILE)
    return {"env_vars": {LOG_FILE: path}, "worker_process_setup_hook": "aftray.logs.worker_setup"} if path else {}


def worker_setup() -> None:
    """Route a Ray worker's lines (see the module docstring); a no-op without $AFTRAY_LOG_FILE."""
    global _forwarded
    path = os.environ.get(LOG_FILE)
    if not path:
        return
    try:
        if _forwarded is None:
            _forwarded = _redirect_std(path)
        terminal = logging.StreamHandler(_forwarded)
        terminal.setFormatter(_WORKER_FORMAT)
        route(path, terminal)
    except OSError as e:  # a failed hook would stop the worker: rather keep its output where Ray puts it
        print(f"aftray: cannot log to {path} ({e}); this worker's output stays in Ray's logs", file=sys.stderr)


def _redirect_std(path: str) -> TextIO:
    """Point file descriptors 1 and 2 at the log file; returns a stream on the original stderr."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = (os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8") for fd in (1, 2))
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    sys.stdout, sys.stderr = _WorkerStream(sys.stdout, out), _WorkerStream(sys.stderr, err)
    return err


class _WorkerStream:
    """sys.stdout or sys.stderr of a worker whose output goes to the log file, except Ray's marker lines
    (":actor_name:EngineActor", printed as an actor or task starts): they still go where Ray reads them, so the
    driver keeps naming the process a forwarded line comes from."""

    def __init__(self, stream: TextIO, forwarded: TextIO):
        self.stream, self.forwarded = stream, forwarded
        self.target, self.line_start = stream, True

    def write(self, text: str) -> int:
        if text.startswith(_RAY_MARKERS):
            self.target = self.forwarded
        elif self.line_start:  # else the rest of a line, which goes where its start went (print writes its end
            self.target = self.stream  # separately, and Ray's print(..., end="") an empty string)
        self.line_start = text.endswith("\n") if text else self.line_start
        return self.target.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)
