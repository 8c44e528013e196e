"""The run directory contract and `summary.json`.

<output_dir>/<run_name>/
  config.yaml                 resolved config
  rounds/<r>/samples.parquet  the round's verified groups (one row per question)
  rounds/<r>/metrics.json     the round's metrics; written last, so its presence marks the round finished
  rounds/<r>/checkpoint/      HF-loadable weights after the round's training (every loop.checkpoint_every rounds)
  rounds/<r>/train_result.json  the round's training stage: metrics and per-step history
  summary.json                {"run_name", "mode", "loss", "model", "task", "rounds": [...], "final": {...}}
  plots/*.png
  train_state/                Ray Train's run while the run goes (mid-stage checkpoints, the trainer's end state
                              at checkpointed rounds); removed at the end
A checkpointed round is the unit of resume: `finished_rounds()` lists rounds whose metrics.json exists, and a
re-run keeps those up to the last with a checkpoint (`aftray.loop.rounds.resume_point`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Every round record in summary.json holds at least these keys (architecture.md).
ROUND_KEYS = (
    "round", "accuracy", "assessment_accuracy", "pass_at_k", "maj_at_k", "num_questions", "num_samples",
    "num_positive", "num_negative", "mean_score_pos", "mean_score_neg", "train_loss", "time_rollout_s",
    "time_verify_s", "time_train_s", "time_sync_s", "time_eval_s", "rollout_tokens_per_s", "train_tokens_per_s",
)
SUMMARY_KEYS = ("run_name", "mode", "loss", "model", "task", "rounds", "final")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / str(r)

    def samples_path(self, r: int) -> Path:
        return self.round_dir(r) / "samples.parquet"

    def metrics_path(self, r: int) -> Path:
        return self.round_dir(r) / "metrics.json"

    def checkpoint_dir(self, r: int) -> Path:
        return self.round_dir(r) / "checkpoint"

    def has_checkpoint(self, r: int) -> bool:
        return (self.checkpoint_dir(r) / "config.json").is_file()

    def finished_rounds(self) -> list[int]:
        rounds = self.root / "rounds"
        if not rounds.is_dir():
            return []
        return sorted(int(p.name) for p in rounds.iterdir() if p.name.isdigit() and (p / "metrics.json").is_file())

    def write_round_metrics(self, r: int, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_path(r), metrics)

    def read_round_metrics(self, r: int) -> dict[str, Any]:
        return json.loads(self.metrics_path(r).read_text())


def read_parquet_rows(path: str | Path) -> list[dict]:
    """Rows of a parquet file or of the folder Ray Data writes, as plain Python values, in id order: Ray Data
    writes its pieces in the order they finish, and sums over rows in another order differ in the last bits."""
    import pyarrow.parquet as pq

    rows = pq.read_table(str(path)).to_pylist()
    return sorted(rows, key=lambda row: row["id"]) if rows and "id" in rows[0] else rows


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2))
    os.replace(tmp, path)


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    for rec in summary.get("rounds", []):
        missing += [f"rounds[{rec.get('round')}].{k}" for k in ROUND_KEYS if k not in rec]
    if missing:
        raise ValueError(f"summary.json is missing keys: {', '.join(missing)}")
    write_json(Path(path), summary)


def read_summary(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    summary = json.loads(path.read_text())
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise ValueError(f"{path}: not an aftray summary (missing {', '.join(missing)})")
    return summary
