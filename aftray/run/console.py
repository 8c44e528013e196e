"""The console a person reads: one line per phase and per round, live counters on a terminal, the result last.

On a terminal, long phases show a live line (tqdm, redrawn in place; log lines print above it): questions done
for rollout and evaluation, elapsed time for training (its steps run in the Ray Train workers). When the output
goes to a file or a job log (`ray job submit`) there are only the plain lines. Ray Data's own progress (bars on
a terminal, an 8-line block every few seconds elsewhere) and its per-dataset INFO lines stay off the console;
Ray's session log folder keeps them. Other libraries' lines go to the run's log file, not the console
(`log_to_file`, `aftray.logs`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from aftray.logs import route
from aftray.run.metrics import binomial_se

log = logging.getLogger("aftray")
# aftray's own INFO lines are for people: time and message; anything else keeps its level and logger name
_PLAIN = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
_FULL = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def live() -> bool:
    """Live lines only on a terminal: a file or a job log would get every redraw."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class _Handler(logging.StreamHandler):
    def format(self, record: logging.LogRecord) -> str:
        ours = record.levelno == logging.INFO and record.name.split(".")[0] == "aftray"
        return (_PLAIN if ours else _FULL).format(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)  # above a live line, which is redrawn below
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


def setup_logging() -> None:
    """INFO lines on stderr for the command line and the jobs. Call it before Ray starts: the environment set
    here reaches the processes of a cluster this driver starts."""
    logging.basicConfig(level=logging.INFO, handlers=[_Handler()], force=True)
    # forwarded worker lines this driver drops (Ray's log deduplicator, read when Ray is imported): Ray Train's
    # record of every `ray.train.report`, and a warning its placement-group cleaner repeats each second when the
    # cluster runs without a dashboard (its state API)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                          "Reporting training result|Failed to query Ray Train Controller actor state")
    if not live():  # no colour codes around the forwarded lines' "(Actor pid=...)" in a file or a job log
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars for loading and saving weights
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database set-up lines


def log_to_file(path: str | Path) -> Path:
    """From here on, other libraries' lines go to the file at `path`, in this process and in the Ray workers it
    starts after this (`aftray.logs`); the console keeps our lines, the live lines and errors. Says where, once.
    Call it after the libraries are imported (it takes their console handlers over) and before Ray starts."""
    console = next((h for h in logging.getLogger().handlers if isinstance(h, _Handler)), None) or _Handler()
    path = route(path, console)
    log.info("log file: %s (other libraries' warnings and notices)", path)
    return path


def quiet_ray_data() -> None:
    """No Ray Data progress bars or progress blocks, and only its warnings on the console (the driver's settings,
    so this holds under `ray job submit` too, whose entrypoint is the driver)."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):  # the session's ray-data.log keeps everything
            handler.setLevel(logging.WARNING)
    # which says, once, that the progress bars are off and how to turn them on
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextmanager
def progress(desc: str, count: Callable[[], int] | None = None, total: int | None = None) -> Iterator[None]:
    """A live line while the block runs, on a terminal only: `count()` (questions) against `total`, polled each
    second, or the seconds elapsed when there is nothing to count. It disappears when the block ends."""
    if not live():
        yield
        return
    bar = tqdm(desc=desc, total=total, unit=" questions", leave=False, dynamic_ncols=True,
               bar_format=None if count else "{desc}: {elapsed}")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            try:
                bar.n = count() if count else 0
            except Exception:  # noqa: BLE001 - the count is decoration; the phase reports its own errors
                return
            bar.refresh()

    thread = threading.Thread(target=poll, name="aftray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


@contextmanager
def phase(name: str, m: dict, rounds: int) -> Iterator[None]:
    """`progress` (elapsed time) while the block runs, then the phase's line from `m`, which the block updates."""
    with progress(f"round {m['round']} {name}"):
        yield
    log.info(phase_line(name, m, rounds))


def generated(pool, r: int) -> Callable[[], int]:
    """Counts the questions the rollout pool generates for round r from now on (its router's round stats)."""
    start = pool.metrics(r).get("num_questions", 0)
    return lambda: pool.metrics(r).get("num_questions", 0) - start


def _f(x: float | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """A number for the console; "n/a" for a missing one (null in JSON, NaN in memory)."""
    return "n/a" if x is None or math.isnan(x) else format(scale * x, spec)


def phase_line(phase: str, m: dict, rounds: int) -> str:
    """The line a phase of round m["round"] (of `rounds`) ends with; `m` holds the round's metrics so far.
    Phases: rollout, verify, train, sync, eval, and done (the round's end)."""
    if phase == "rollout":
        text = (f"{m['num_questions']} questions, {m['num_samples']} distinct COTs, "
                + ("found on disk, not sampled again" if m.get("reused_samples") else
                   f"{m['rollout_tokens_per_s']:.0f} tokens/s, {m['time_rollout_s']:.0f} s"))
    elif phase == "verify":
        text = (f"{m['num_positive']} right / {m['num_negative']} wrong COTs, {m['rollout_num_mixed_groups']} "
                f"mixed groups, pass@k {_f(m['pass_at_k'], '.2f')}, {m['time_verify_s']:.1f} s")
    elif phase == "train":
        drift = (f", log-prob drift {_f(m['train_logp_drift_mean'])} (max {_f(m['train_logp_drift_max'])})"
                 if "train_logp_drift_mean" in m else "")
        text = (f"{m['train_steps']} steps, loss {_f(m['train_loss'], '.4f')}, {m['train_tokens_per_s']:.0f} "
                f"tokens/s{drift}, {m['time_train_s']:.0f} s ({m['time_train_s'] - m['train_compute_s']:.0f} s "
                "set-up)")
    elif phase == "sync":
        text = f"weights of round {m['round']} into the samplers, {m['time_sync_s']:.1f} s"
    elif phase == "eval":
        text = (f"accuracy {_f(m['accuracy'], '.1f', 100)}% ± {_f(m['accuracy_se'], '.1f', 100)} "
                f"({m['num_eval_questions']} questions), assessment {_f(m.get('assessment_accuracy'))}, "
                f"{m['time_eval_s']:.0f} s")
    else:
        text = f"in {m['time_round_s']:.0f} s, {m['time_overhead_s']:.0f} s of it outside the phases' compute"
    return f"round {m['round']}/{rounds} {phase:<8}{text}"


def result_line(first: dict, last: dict) -> str:
    """`accuracy 12.0% → 19.5% (+7.5 ± 2.7, 200 questions); assessment ...` from the first and last rounds."""
    p0, p1, n = first["accuracy"], last["accuracy"], last["num_eval_questions"]
    if p0 is None or p1 is None:
        return "accuracy not measured (task.num_test=0)"
    # the SE of a difference of two independent binomial proportions, sqrt(se0² + se1²); both rounds answer the
    # same questions, and the positive correlation between their answers makes this the conservative (larger) SE.
    # A round 0 linked from an older base run lacks num_eval_questions: it answered the same questions
    se = math.hypot(binomial_se(p0, first.get("num_eval_questions", n)), binomial_se(p1, n))
    return (f"accuracy {100 * p0:.1f}% → {100 * p1:.1f}% ({100 * (p1 - p0):+.1f} ± {100 * se:.1f}, {n} questions); "
            f"assessment accuracy {_f(first['assessment_accuracy'])} → {_f(last['assessment_accuracy'])}")
