"""Where log lines go (aftray/logs.py): other libraries' lines to the run's log file, ours and errors to the terminal,
in the driver and in a Ray worker process (here a plain subprocess that runs the same set-up hook)."""
import io
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from aftray import logs


@pytest.fixture
def restore_logging(monkeypatch):
    """route() changes process-wide state: put the loggers, warnings capture and environment back."""
    monkeypatch.delenv(logs.LOG_FILE, raising=False)
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    yield
    logging.captureWarnings(False)
    for lg in logging.Logger.manager.loggerDict.values():
        if isinstance(lg, logging.Logger) and lg.name.startswith("thirdparty"):
            lg.handlers.clear()
    for lg, handlers, propagate, level in saved:
        for h in lg.handlers:
            if getattr(h, "aftray", False):
                h.close()
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


def test_driver_other_libraries_to_the_file_ours_and_errors_to_the_terminal(tmp_path, capfd, restore_logging):
    lib = logging.getLogger("thirdparty.lib")  # a library that prints through a handler of its own
    lib.addHandler(logging.StreamHandler(sys.__stderr__))
    lib.propagate = False
    terminal = io.StringIO()
    path = logs.route(tmp_path / "run" / "run.log", logging.StreamHandler(terminal))
    lib.warning("lib notice")
    lib.error("lib failure")
    logging.getLogger("thirdparty.other").info("other info")
    logging.getLogger("aftray").info("round 1/2 eval")
    logging.getLogger("aftray.cluster").warning("ours, careful")
    warnings.warn("a deprecation", FutureWarning, stacklevel=1)
    shown, kept = terminal.getvalue(), path.read_text()
    assert shown.splitlines() == ["lib failure", "round 1/2 eval", "ours, careful"]
    for line in ("lib notice", "lib failure", "other info", "round 1/2 eval", "ours, careful", "a deprecation"):
        assert line in kept
    assert capfd.readouterr().err == ""  # the library's own handler no longer prints
    assert logs.ray_runtime_env() == {"env_vars": {logs.LOG_FILE: str(path)},
                                      "worker_process_setup_hook": "aftray.logs.worker_setup"}


def test_no_log_file_no_hook(restore_logging):
    assert logs.ray_runtime_env() == {}


WORKER = textwrap.dedent("""
    import logging, os, subprocess, sys
    from aftray import logs
    logs.worker_setup()
    logs.worker_setup()  # a Ray Train worker calls it twice: nothing doubles
    sys.stdout.write("")
    print(":actor_name:EngineActor", end="")  # as Ray marks a worker's output (then an empty write)
    print()
    print("a library's print")
    os.write(2, b"a C++ notice\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('a child process', file=sys.stderr)"])
    logging.getLogger("vllm.worker").warning("libtcmalloc is not found")
    logging.getLogger("vllm.worker").error("the engine failed")
    logging.getLogger("aftray").warning("cores left unpinned")
    print("VLLM_CONFIGURE_LOGGING", os.environ["VLLM_CONFIGURE_LOGGING"])
""")


def test_ray_worker_output_to_the_file_ours_and_errors_forwarded(tmp_path):
    path = tmp_path / "run.log"
    env = {"PATH": "/usr/bin:/bin", logs.LOG_FILE: str(path)}
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path), check=True)
    forwarded = done.stdout + done.stderr  # what Ray reads and the driver prints
    assert done.stdout == ":actor_name:EngineActor\n"
    assert [line.split(" ", 1)[1] for line in done.stderr.splitlines()] == [
        "ERROR vllm.worker: the engine failed", "WARNING aftray: cores left unpinned"]
    kept = path.read_text()
    for line in ("a library's print", "a C++ notice", "a child process", "libtcmalloc is not found",
                 "the engine failed", "cores left unpinned", "VLLM_CONFIGURE_LOGGING 0"):
        assert line in kept and (line in forwarded) == (line in ("the engine failed", "cores left unpinned"))
    assert kept.count("cores left unpinned") == 1
