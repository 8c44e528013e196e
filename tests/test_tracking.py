"""Tracking: MLflow to sqlite and to a live `mlflow server` on 127.0.0.1; a dead server loses nothing."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aftray.config import TrackingConfig
from aftray.run.tracking import Tracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_back(uri: str, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return run, client.get_metric_history(run_id, "accuracy")


def _log_two_rounds(tracker: Tracker, tmp_path: Path) -> None:
    tracker.log_params({"train.lr": 1e-5, "loss.name": "aft_bc"})
    tracker.log_metrics({"accuracy": 0.25, "train_loss": 1.5}, step=0)
    tracker.log_metrics({"accuracy": 0.5, "train_loss": 1.2, "skip_nan": float("nan")}, step=1)
    art = tmp_path / "summary.json"
    art.write_text("{}")
    tracker.log_artifact(art)


def test_sqlite_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker(TrackingConfig(experiment="t"), tmp_path / "run", "r1", tmp_path) as tracker:
        assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
        _log_two_rounds(tracker, tmp_path)
    run, history = _read_back(tracker.uri, tracker.run_id)
    assert run.data.params["train.lr"] == "1e-05" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5)]
    # resume re-attaches to the same MLflow run
    again = Tracker(TrackingConfig(experiment="t"), tmp_path / "run", "r1", tmp_path)
    assert again.run_id == tracker.run_id


def test_runs_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    """A second job in the same process (the loss comparison, a test session) logs to its own output dir."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker(TrackingConfig(experiment="t"), tmp_path / "a" / "run", "ra", tmp_path / "a") as first:
        first.log_metrics({"accuracy": 0.1}, step=0)
    with Tracker(TrackingConfig(experiment="t"), tmp_path / "b" / "run", "rb", tmp_path / "b") as second:
        second.log_metrics({"accuracy": 0.2}, step=0)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert second.uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert [m.value for m in _read_back(second.uri, second.run_id)[1]] == [0.2]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_live_server(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the environment overrides the config
    with Tracker(TrackingConfig(experiment="live", tracking_uri="sqlite:///ignored.db"),
                 tmp_path / "run", "r1", tmp_path) as tracker:
        assert tracker.uri == mlflow_server
        _log_two_rounds(tracker, tmp_path)
    run, history = _read_back(mlflow_server, tracker.run_id)
    assert [m.value for m in history] == [0.25, 0.5]
    assert run.data.params["loss.name"] == "aft_bc"


def test_unreachable_server_keeps_metrics(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    start = time.time()
    with Tracker(TrackingConfig(), tmp_path / "run", "r1", tmp_path) as tracker:
        _log_two_rounds(tracker, tmp_path)
    assert time.time() - start < 15
    assert tracker.run_id is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in rows] == [(0, 0.25), (1, 0.5)]
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # warned once
