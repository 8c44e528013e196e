"""One training stage: the job a stage's workers receive (`StageJob`), the settings it trains with, and its
result. `aftray.train.service.TrainService` runs stages on Ray Train workers kept for a whole run.

Two stages use the same loop (`aftray.train.worker.run_stage`): `vft` (reference COTs only, loss "vft", the
`train.vft.*` settings) and `align` (the configured objective on the sampled groups).

Where a stage starts (`StageJob.init`): "load" builds the model from `model_path` with a new optimizer; "reset"
keeps the model the workers hold after stage `after` (else loads `model_path`) with a new optimizer (a run's
first align stage, after VFT); "continue" keeps model and optimizer (ZeRO partitions included) of stage `after`
(else restores both from its end-of-stage checkpoint). The learning rate follows one schedule over the stages
that share an optimizer: `schedule = (steps before this stage, planned steps in all)`.

Stage directory (`stage_dir`, e.g. `rounds/<r>`):
    train_result.json                 the stage's metrics and history, written last: a stage with it is finished
    checkpoint/                       the final weights, HF-loadable, when the job saves them (`save_weights`)
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aftray.config import LossConfig, TrainConfig
from aftray.train.losses import OBJECTIVES, Objective

RESULT_FILE = "train_result.json"
INITS = ("load", "reset", "continue")


@dataclass(frozen=True)
class StageJob:
    """What every worker of a stage receives (`aftray.train.worker.run_stage`); pickled through Ray."""
    stage: str  # "vft" or "align"
    name: str  # tags the stage's checkpoints: unique among the runs a service trains, the same after a restart
    # group rows: a list (small), a one-item list holding an object ref to such a list, a list of refs to
    # Ray Data's arrow blocks, or a parquet path on storage every worker's node sees
    groups: Any
    model_path: str  # the weights the stage starts from when it loads (init "load", or "reset" without `after`)
    out_dir: str  # where its final weights go (<stage_dir>/checkpoint) when `save_weights`
    train: TrainConfig  # the settings it trains with (`stage_configs`)
    loss: LossConfig
    # `loss.name` resolved in the driver (its table row and method): the workers train exactly this, functions
    # included, so a loss registered only in the driver's process trains too (tests/test_train.py)
    objective: Objective
    trust_remote_code: bool = False
    on_ray: bool = False  # mid-stage checkpoints and live reports through ray.train (False: benchmarks/train.py)
    posted_at: float = 0.0  # Unix time the driver asked for it (a worker measures its start-up from it)
    init: Literal["load", "reset", "continue"] = "load"
    after: str | None = None  # the stage whose end state "reset" and "continue" start from
    schedule: tuple[int, int] | None = None  # (steps before this stage, planned in all); None: this stage's own
    save_weights: bool = True  # the HF folder in out_dir, and under Ray the end state (model + optimizer)
    push_weights: bool = False  # rank 0 puts the final state dict in Ray's object store (`aftray.weights`)
    # rank 0 broadcasts the final weights to these vLLM engine actors over NCCL (`aftray.train.nccl_push`):
    # (engine handles, tensor-parallel size, the engines' dtype, the version they then hold)
    nccl_engines: tuple | None = None
    mixed_or_reference: bool = False  # train mixed groups whole and every other group's reference COT alone
    max_groups: int | None = None  # with mixed_or_reference: train this many groups at most, mixed ones first

    @classmethod
    def create(cls, stage: str, name: str, groups, model_path: str | Path, stage_dir: str | Path,
               train: TrainConfig, loss: LossConfig, trust_remote_code: bool = False, on_ray: bool = False,
               **options) -> StageJob:
        train, loss = stage_configs(stage, train, loss)
        if loss.name not in OBJECTIVES:
            raise ValueError(f"stage {name}: loss.name: expected one of {', '.join(OBJECTIVES)}, "
                             f"got {loss.name!r}")
        groups = str(Path(groups).absolute()) if isinstance(groups, (str, Path)) else groups
        job = cls(stage, name, groups, str(model_path), str(Path(stage_dir).absolute() / "checkpoint"), train,
                  loss, OBJECTIVES[loss.name], trust_remote_code, on_ray, time.time(), **options)
        if job.init not in INITS or (job.init == "continue" and not job.after):
            raise ValueError(f"stage {name}: init {job.init!r} (after {job.after!r}): expected one of {INITS}, "
                             "and 'continue' names the stage it continues")
        return job


@dataclass
class StageResult:
    stage_dir: Path  # train_result.json; checkpoint/ when the stage saved its weights
    metrics: dict[str, Any]  # train_loss (mean over the steps), final_loss, steps, tokens, tokens_per_s, time_s, ...
    history: list[dict]  # one record per optimizer step (loss terms, pair_acc, lr, grad_norm, tokens_per_s, ...)
    weights: Any = None  # [object ref] of the final state dict when the job pushed it (not saved)

    @property
    def checkpoint(self) -> Path | None:
        """HF folder of the final weights, if the stage saved them."""
        folder = self.stage_dir / "checkpoint"
        return folder if (folder / "config.json").is_file() else None

    @classmethod
    def from_loop(cls, stage_dir: Path, out: dict, time_s: float) -> StageResult:
        metrics = summarize(out["history"], time_s)
        metrics.update({k: out[k] for k in ("restarts", "setup_s", "logp_drift", "policy", "worker_pids",
                                            "peak_rss_mb")})
        return cls(stage_dir, metrics, out["history"], out.get("weights"))

    def save(self) -> None:
        """Into the stage folder, written last: its presence marks the stage finished."""
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stage_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps({"metrics": self.metrics, "history": self.history}))
        tmp.replace(self.stage_dir / RESULT_FILE)

    @classmethod
    def load(cls, stage_dir: Path) -> StageResult:
        saved = json.loads((stage_dir / RESULT_FILE).read_text())
        return cls(stage_dir, saved["metrics"], saved["history"])


def stage_configs(stage: str, train: TrainConfig, loss: LossConfig) -> tuple[TrainConfig, LossConfig]:
    """The settings a stage trains with: `align` as configured; `vft` with loss "vft" and the `train.vft` keys
    (steps = 0: one pass over the groups)."""
    if stage == "align":
        return train, loss
    if stage == "vft":
        vft = train.vft
        min_lr_ratio = train.min_lr_ratio if vft.min_lr_ratio is None else vft.min_lr_ratio
        return (dataclasses.replace(train, lr=vft.lr or train.lr, steps_per_stage=vft.steps or None,
                                    min_lr_ratio=min_lr_ratio,
                                    questions_per_step=vft.questions_per_step or train.questions_per_step),
                dataclasses.replace(loss, name="vft", vft_weight=1.0, vft_on_positives=False))
    raise ValueError(f"stage: expected 'vft' or 'align', got {stage!r}")


def planned_steps(train: TrainConfig, questions_per_stage: int, stages: int) -> int:
    """Optimizer steps planned over `stages` align stages (the horizon of their one learning-rate schedule):
    `steps_per_stage` each, else one pass over `questions_per_stage` groups. A stage that trains more groups
    (dynamic sampling adds some) takes its extra steps at the schedule's final rate."""
    per_step = -(-train.questions_per_step // train.num_workers) * train.num_workers
    return stages * (train.steps_per_stage or -(-questions_per_stage // per_step))


def summarize(history: list[dict], time_s: float) -> dict:
    """Stage metrics from the per-step records; tokens/s over the steps' own time (no start-up)."""
    tokens = sum(h["tokens"] for h in history)
    step_time = sum(h["time_s"] for h in history)
    return {"train_loss": sum(h["loss"] for h in history) / len(history), "final_loss": history[-1]["loss"],
            "steps": len(history), "tokens": int(tokens), "tokens_per_s": tokens / step_time, "time_s": time_s,
            "train_time_s": step_time}
