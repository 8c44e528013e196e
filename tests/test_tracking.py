"""Tracking: MLflow to sqlite and to a live `mlflow server` on 127.0.0.1; a dead server loses nothing."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aftray.config import TrackingConfig
from aftray.run.tracking import KIND_TAG, TRAINING_KIND, Tracker, mlflow_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_back(uri: str, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return run, client.get_metric_history(run_id, "eval/accuracy")


def _log_two_rounds(tracker: Tracker, tmp_path: Path) -> None:
    tracker.log_params({"train.lr": 1e-5, "loss.name": "aft_bc"})
    tracker.log_metrics({"round": 0, "accuracy": 0.25, "train_loss": 1.5}, step=0, name=mlflow_name)
    tracker.log_metrics({"round": 1, "accuracy": 0.5, "train_loss": 1.2, "skip_nan": float("nan")}, step=1,
                        name=mlflow_name)
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
    assert set(run.data.metrics) == {"eval/accuracy", "train/loss"}  # grouped; the round is the step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"round", "accuracy", "train_loss"} <= set(rows[0])  # the jsonl mirror keeps the plain keys
    # resume re-attaches to the same MLflow run
    again = Tracker(TrackingConfig(experiment="t"), tmp_path / "run", "r1", tmp_path)
    assert again.run_id == tracker.run_id


def test_runs_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    """A second job in the same process (the loss comparison, a test session) logs to its own output dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker(TrackingConfig(experiment="t"), tmp_path / "a" / "run", "ra", tmp_path / "a") as first:
        first.log_metrics({"accuracy": 0.1}, step=0, name=mlflow_name)
    with Tracker(TrackingConfig(experiment="t"), tmp_path / "b" / "run", "rb", tmp_path / "b") as second:
        second.log_metrics({"accuracy": 0.2}, step=0, name=mlflow_name)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert second.uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert [m.value for m in _read_back(second.uri, second.run_id)[1]] == [0.2]


def test_round_metrics_are_grouped_by_phase():
    names = {key: mlflow_name(key) for key in (
        "accuracy", "accuracy_se", "num_eval_questions", "assessment_accuracy", "min_score_neg",
        "rollout_tokens_per_s", "rollout_assessment_accuracy", "pass_at_k", "num_questions", "truncated_prompts",
        "train_loss", "train_logp_drift_mean", "train_setup_start_s", "time_train_s", "overhead_share", "round")}
    assert names == {
        "accuracy": "eval/accuracy", "accuracy_se": "eval/accuracy_se",
        "num_eval_questions": "eval/num_eval_questions", "assessment_accuracy": "eval/assessment_accuracy",
        "min_score_neg": "eval/min_score_neg",
        "rollout_tokens_per_s": "rollout/tokens_per_s", "rollout_assessment_accuracy": "rollout/assessment_accuracy",
        "pass_at_k": "rollout/pass_at_k", "num_questions": "rollout/num_questions",
        "truncated_prompts": "rollout/truncated_prompts", "train_loss": "train/loss",
        "train_logp_drift_mean": "train/logp_drift_mean", "train_setup_start_s": "train/setup_start_s",
        "time_train_s": "time/train_s", "overhead_share": "time/overhead_share", "round": None}


def test_experiment_opens_as_model_training(tmp_path, monkeypatch):
    """The experiment's kind is model training (an experiment made before the tag gets it; a kind chosen in the UI
    stays), and the printed link opens the UI's model-training view."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("old")
    client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    for name, kind in (("new", TRAINING_KIND), ("old", TRAINING_KIND), ("chosen", "genai_development")):
        with Tracker(TrackingConfig(experiment=name), tmp_path / name, "r", tmp_path) as tracker:
            assert tracker.where() == (f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/#/experiments/"
                                       f"{tracker.experiment_id}/runs/{tracker.run_id}?workflowType=machine_learning")
        assert client.get_experiment_by_name(name).tags[KIND_TAG] == kind


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    # without MLflow's job runner (its GenAI jobs: eight more processes); in a session of its own, so that the
    # server's children go with it
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
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
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_live_server(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # instead of the sqlite file in the output dir
    with Tracker(TrackingConfig(experiment="live"),
                 tmp_path / "run", "r1", tmp_path) as tracker:
        assert tracker.uri == mlflow_server
        _log_two_rounds(tracker, tmp_path)
    run, history = _read_back(mlflow_server, tracker.run_id)
    assert [m.value for m in history] == [0.25, 0.5]
    assert run.data.params["loss.name"] == "aft_bc"
    assert tracker.where() == (f"{mlflow_server}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
                               "?workflowType=machine_learning")
    # what the UI reads: the experiment's kind tag and the grouped metric names (REST API)
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=live") as r:
        tags = {t["key"]: t["value"] for t in json.load(r)["experiment"]["tags"]}
    assert tags[KIND_TAG] == TRAINING_KIND
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={tracker.run_id}") as r:
        assert {m["key"] for m in json.load(r)["run"]["data"]["metrics"]} == {"eval/accuracy", "train/loss"}


def test_unreachable_server_keeps_metrics(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    start = time.time()
    with Tracker(TrackingConfig(), tmp_path / "run", "r1", tmp_path) as tracker:
        _log_two_rounds(tracker, tmp_path)
    assert time.time() - start < 15
    assert tracker.run_id is None and tracker.where() == f"off; metrics in {tmp_path / 'run' / 'metrics.jsonl'}"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in rows] == [(0, 0.25), (1, 0.5)]
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # warned once
