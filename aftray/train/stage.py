"""One training stage: the job a stage's workers receive (`StageJob`), the settings it trains with, and its
result. `aftray.train.service.TrainService` runs stages on Ray Train workers kept for a whole run
(`train_stage`: one stage on workers of its own); `aftray.train.worker.train_stage_local` runs one in this
process, alone or under torchrun.

Two stages use the same loop (`aftray.train.worker.run_stage`): `vft` (reference COTs only, loss "vft", the
`vft_*` settings) and `align` (the configured objective on the sampled groups).

Stage directory (`stage_dir`, e.g. `rounds/<r>`):
    checkpoint/                       the stage's final weights, HF-loadable, plus train_result.json (written
                                      last: a stage with it is finished and is not redone)
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftray.config import LossConfig, TrainConfig

RESULT_FILE = "train_result.json"


@dataclass(frozen=True)
class StageJob:
    """What every worker of a stage receives (`aftray.train.worker.run_stage`); pickled through Ray."""
    stage: str  # "vft" or "align"
    name: str  # tags the stage's mid-stage checkpoints: unique within a run, the same after a driver restart
    groups: list[dict] | str  # group rows, or a parquet path on storage every worker's node sees
    model_path: str  # the weights the stage starts from
    out_dir: str  # where its final weights go (<stage_dir>/checkpoint)
    train: TrainConfig  # the settings it trains with (`stage_configs`)
    loss: LossConfig
    trust_remote_code: bool = False
    on_ray: bool = False  # mid-stage checkpoints and live reports through ray.train
    posted_at: float = 0.0  # Unix time the driver asked for it (a worker measures its start-up from it)

    @classmethod
    def create(cls, stage: str, name: str, groups, model_path: str | Path, stage_dir: str | Path,
               train: TrainConfig, loss: LossConfig, trust_remote_code: bool = False, on_ray: bool = False
               ) -> StageJob:
        train, loss = stage_configs(stage, train, loss)
        groups = str(Path(groups).absolute()) if isinstance(groups, (str, Path)) else groups
        return cls(stage, name, groups, str(model_path), str(Path(stage_dir).absolute() / "checkpoint"), train,
                   loss, trust_remote_code, on_ray, time.time())


@dataclass
class StageResult:
    checkpoint: Path  # HF folder of the final weights (model.safetensors, config.json, tokenizer files)
    metrics: dict[str, Any]  # train_loss (mean over the steps), final_loss, steps, tokens, tokens_per_s, time_s, ...
    history: list[dict]  # one record per optimizer step (loss terms, pair_acc, lr, grad_norm, tokens_per_s, ...)

    @classmethod
    def from_loop(cls, checkpoint: Path, out: dict, time_s: float) -> StageResult:
        metrics = summarize(out["history"], time_s)
        metrics.update({k: out[k] for k in ("restarts", "setup_s", "logp_drift", "worker_pids", "peak_rss_mb")})
        return cls(checkpoint, metrics, out["history"])

    def save(self) -> None:
        """Into the checkpoint folder, written last: its presence marks the stage finished."""
        tmp = self.checkpoint / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps({"metrics": self.metrics, "history": self.history}))
        tmp.replace(self.checkpoint / RESULT_FILE)

    @classmethod
    def load(cls, checkpoint: Path) -> StageResult:
        saved = json.loads((checkpoint / RESULT_FILE).read_text())
        return cls(checkpoint, saved["metrics"], saved["history"])


def stage_configs(stage: str, train: TrainConfig, loss: LossConfig) -> tuple[TrainConfig, LossConfig]:
    """The settings a stage trains with: `align` as configured; `vft` with loss "vft" and the `vft_*` keys
    (vft_steps = 0: one pass over the groups)."""
    if stage == "align":
        return train, loss
    if stage == "vft":
        min_lr_ratio = train.min_lr_ratio if train.vft_min_lr_ratio is None else train.vft_min_lr_ratio
        return (dataclasses.replace(train, lr=train.vft_lr or train.lr, steps_per_stage=train.vft_steps or None,
                                    min_lr_ratio=min_lr_ratio,
                                    questions_per_step=train.vft_questions_per_step or train.questions_per_step),
                dataclasses.replace(loss, name="vft", vft_weight=1.0, vft_on_positives=False))
    raise ValueError(f"stage: expected 'vft' or 'align', got {stage!r}")


def summarize(history: list[dict], time_s: float) -> dict:
    """Stage metrics from the per-step records; tokens/s over the steps' own time (no start-up)."""
    tokens = sum(h["tokens"] for h in history)
    step_time = sum(h["time_s"] for h in history)
    return {"train_loss": sum(h["loss"] for h in history) / len(history), "final_loss": history[-1]["loss"],
            "steps": len(history), "tokens": int(tokens), "tokens_per_s": tokens / step_time, "time_s": time_s,
            "train_time_s": step_time}
