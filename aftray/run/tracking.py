"""MLflow tracking for a job: one MLflow run per job, params = flattened config, metrics with `step = round`.

The experiment is tagged as model training (not GenAI), and the link the console prints opens MLflow's UI in its
model-training view; round metrics are grouped by the phase they measure (`mlflow_name`: eval/, rollout/, train/,
time/).

The tracking URI is `MLFLOW_TRACKING_URI` if set (MLflow's own variable, e.g. a tracking server), else a sqlite
file in the output dir. Every metric also lands in `<run_dir>/metrics.jsonl`, so when the tracking server is
unreachable the run goes on (one warning) and nothing is lost. A resumed job re-attaches to its MLflow run (id kept in the run dir).
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from aftray.config import TrackingConfig

log = logging.getLogger(__name__)

# Keep a dead server from stalling the loop for minutes in MLflow's retry/backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# MLflow's UI picks an experiment's view by this tag (the other kind is "genai_development")
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# round metrics of the held-out evaluation; the rest go by their prefix, or to rollout/ (sample statistics)
EVAL_METRICS = ("accuracy", "accuracy_se", "num_eval_questions", "assessment_accuracy", "mean_score_pos",
                "mean_score_neg", "score_gap", "min_score_neg", "num_mixed_groups", "weights_version")


def mlflow_name(key: str) -> str | None:
    """A round metric's MLflow name, grouped as MLflow's UI groups charts (by the part before '/'), as verl and
    OpenRLHF group theirs: eval/accuracy, rollout/tokens_per_s (rollout_tokens_per_s), rollout/pass_at_k,
    train/loss (train_loss), time/train_s (time_train_s), time/overhead_share. None for `round`, the step.
    summary.json, metrics.json and metrics.jsonl keep the plain keys."""
    if key == "round":
        return None
    if key in EVAL_METRICS:
        return f"eval/{key}"
    if key == "overhead_share":
        return f"time/{key}"
    group, _, rest = key.partition("_")
    return f"{group}/{rest}" if group in ("rollout", "train", "time") else f"rollout/{key}"


def tracking_uri(output_dir: str | Path) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).absolute() / 'mlflow.db'}"


def _reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


class Tracker:
    """Thin MLflow wrapper with a jsonl mirror. Use as a context manager; all methods are safe to call offline."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, run_name: str, output_dir: str | Path,
                 parent_run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.uri = tracking_uri(output_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._mlflow = None
        if cfg.experiment is None:
            return
        if not _reachable(self.uri):
            self._warn(f"tracking server {self.uri} is unreachable")
            return
        try:
            import mlflow

            # a client bound to this run's URI: `mlflow.set_tracking_uri` would also export MLFLOW_TRACKING_URI,
            # which the next Tracker in this process would then take for a user override
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                self.experiment_id = client.create_experiment(cfg.experiment, tags={KIND_TAG: TRAINING_KIND})
            else:
                self.experiment_id = experiment.experiment_id
                if KIND_TAG not in experiment.tags:  # made before the tag; a kind chosen in the UI stays
                    client.set_experiment_tag(self.experiment_id, KIND_TAG, TRAINING_KIND)
            id_file = self.run_dir / "mlflow_run_id"
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            if id_file.is_file():  # resume: continue the same MLflow run
                self.run_id = client.get_run(id_file.read_text().strip()).info.run_id
            else:
                self.run_id = client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
                id_file.write_text(self.run_id)
            self._mlflow = client
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._warn(f"MLflow at {self.uri} failed ({type(err).__name__}: {err})")

    def _warn(self, what: str) -> None:
        if self._mlflow is not None or not getattr(self, "_warned", False):
            log.warning("%s; metrics go to %s only", what, self.jsonl)
        self._warned = True
        self._mlflow = None

    def _call(self, fn: str, *args, **kwargs) -> None:
        if self._mlflow is None:
            return
        try:
            getattr(self._mlflow, fn)(self.run_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._warn(f"MLflow {fn} failed ({type(err).__name__}: {err})")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self._mlflow is None:
            return
        try:  # a resumed run already has them; MLflow refuses to change a param
            existing = self._mlflow.get_run(self.run_id).data.params
        except Exception:  # noqa: BLE001
            existing = {}
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self._call("log_batch", params=new[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    name: Callable[[str], str | None] = lambda key: key) -> None:
        """The numeric metrics into metrics.jsonl under their keys and into MLflow as `name(key)` (None: not
        to MLflow)."""
        from mlflow.entities import Metric

        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **numeric}) + "\n")
        now = int(time.time() * 1000)
        batch = [Metric(name(k), v, now, step) for k, v in numeric.items() if name(k)]
        for i in range(0, len(batch), 500):
            self._call("log_batch", metrics=batch[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", str(path), artifact_path)

    def where(self) -> str:
        """Where to look at the run, for the console. MLflow 3.17's UI shows its GenAI view unless the link asks
        for the model-training one (`workflowType`: a switch kept per browser, which the kind tag does not set)."""
        if self.run_id is None:
            return f"off; metrics in {self.jsonl}"
        page = f"/#/experiments/{self.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return self.uri.rstrip("/") + page
        return f"mlflow ui --backend-store-uri {self.uri}, then http://127.0.0.1:5000{page}"

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")
