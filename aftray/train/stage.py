"""One training stage: its settings, its result, and how to run it alone (`train_stage` on Ray Train,
`train_local` in this process, alone or under torchrun). The loop runs its stages on one long-lived
`aftray.train.service.TrainService` instead.

Two stages use the same loop (`aftray.train.worker.run_stage`): `vft` (reference COTs only, loss "vft", the
`vft_*` settings) and `align` (the configured objective on the sampled groups).

Stage directory (`stage_dir`, e.g. `rounds/<r>`):
    checkpoint/                       the stage's final weights, HF-loadable, plus train_result.json (written
                                      last: a stage with it is finished and is not redone)
`train_stage` keeps Ray Train's run (mid-stage checkpoints, `train.checkpoint_every`) in `<stage_dir>/ray/`,
removed once the stage has finished unless keep_state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftray.config import LossConfig, TrainConfig

RESULT_FILE = "train_result.json"


@dataclass
class StageResult:
    checkpoint: Path  # HF folder of the final weights (model.safetensors, config.json, tokenizer files)
    metrics: dict[str, Any]  # train_loss (mean over the steps), final_loss, steps, tokens, tokens_per_s, time_s, ...
    history: list[dict]  # one record per optimizer step (loss terms, pair_acc, lr, grad_norm, tokens_per_s, ...)

    @classmethod
    def from_loop(cls, checkpoint: Path, out: dict, time_s: float) -> StageResult:
        metrics = summarize(out["history"], time_s)
        metrics.update({k: out[k] for k in ("restarts", "setup_s", "worker_pids", "peak_rss_mb")})
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
        return (dataclasses.replace(train, lr=train.vft_lr or train.lr, steps_per_round=train.vft_steps or None,
                                    min_lr_ratio=min_lr_ratio,
                                    questions_per_step=train.vft_questions_per_step or train.questions_per_step),
                dataclasses.replace(loss, name="vft", vft_weight=1.0, vft_on_positives=False))
    raise ValueError(f"stage: expected 'vft' or 'align', got {stage!r}")


def loop_config(stage, name, groups, model_path, train, loss, trust_remote_code, out_dir, on_ray: bool) -> dict:
    """What a worker needs to run one stage (`aftray.train.worker.run_stage`)."""
    if isinstance(groups, (str, Path)):
        groups = str(Path(groups).absolute())
    return {"stage": stage, "name": name, "groups": groups, "model_path": str(model_path),
            "trust_remote_code": trust_remote_code, "train": dataclasses.asdict(train),
            "loss": dataclasses.asdict(loss), "out_dir": str(out_dir), "posted_at": time.time(), "on_ray": on_ray}


def train_stage(stage: str, groups, model_path: str | Path, stage_dir: str | Path, train: TrainConfig,
                loss: LossConfig, *, trust_remote_code: bool = False, placement_strategy: str = "PACK",
                keep_state: bool = False) -> StageResult:
    """Train one stage on Ray Train workers of its own (Ray must be initialised); see `TrainService.train`.

    groups: a parquet path on storage every worker's node sees (the loop's run directory), or a list of rows
    (shipped with the job). Every worker reads all rows itself (they are token ids, small next to the model): a
    Ray Data shard would cost ~30 s of dataset start-up per stage here and give nothing, as every worker needs
    the whole, identically ordered list anyway. model_path: the weights the stage starts from."""
    from aftray.train.service import TrainService

    with TrainService(train, Path(stage_dir).absolute() / "ray", placement_strategy, keep_state) as service:
        return service.train(stage, groups, model_path, stage_dir, train, loss, trust_remote_code=trust_remote_code)


def train_local(stage: str, groups: list[dict] | str | Path, model_path: str | Path, stage_dir: str | Path,
                train: TrainConfig, loss: LossConfig, *, trust_remote_code: bool = False) -> StageResult:
    """The same stage without Ray, in this process: alone, or as one rank of `torchrun` (env-var rendezvous:
    MASTER_ADDR/PORT, RANK, WORLD_SIZE). groups: a list of rows or a parquet path, read by every rank.
    No mid-stage checkpoints; the final weights go to `<stage_dir>/checkpoint`."""
    from aftray.train.worker import train_loop

    final = Path(stage_dir).absolute() / "checkpoint"
    train, loss = stage_configs(stage, train, loss)
    start = time.perf_counter()
    out = train_loop(loop_config(stage, stage, groups, model_path, train, loss, trust_remote_code, final,
                                 on_ray=False))
    result = StageResult.from_loop(final, out, time.perf_counter() - start)
    if int(os.environ["RANK"]) == 0:
        result.save()
    return result


def summarize(history: list[dict], time_s: float) -> dict:
    """Stage metrics from the per-step records; tokens/s over the steps' own time (no start-up)."""
    tokens = sum(h["tokens"] for h in history)
    step_time = sum(h["time_s"] for h in history)
    return {"train_loss": sum(h["loss"] for h in history) / len(history), "final_loss": history[-1]["loss"],
            "steps": len(history), "tokens": int(tokens), "tokens_per_s": tokens / step_time, "time_s": time_s,
            "train_time_s": step_time}
