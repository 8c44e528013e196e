"""Launch one training stage: `train_stage` on Ray Train, `train_local` in this process (torchrun or alone).

Two stages use the same loop (`aftray.train.worker.train_loop`): `vft` (reference COTs only, loss "vft", the
`vft_*` settings) and `align` (the configured objective on the sampled groups).

Stage directory (`stage_dir`, e.g. `rounds/<r>`):
    checkpoint/                       the stage's final weights, HF-loadable, plus train_result.json
    ray/train/step_<k>/               Ray Train's run: resumable checkpoints (see aftray.train.checkpoint);
                                      removed once the stage has finished unless keep_state
A worker failure restarts the worker group from the last checkpoint (`FailureConfig(max_failures)`); re-running
a stage whose driver died resumes the same way (Ray Train restores the run found under `ray/train`, so the
groups and settings must be the same); a finished stage (train_result.json present) is not redone. Ray Train
registers a checkpoint when its controller next polls the workers (every 2 s): a worker that dies sooner after
reporting one loses it, and the stage resumes from the one before.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftray.config import LossConfig, TrainConfig
from aftray.train.checkpoint import DS_DIR

RESULT_FILE = "train_result.json"


@dataclass
class StageResult:
    checkpoint: Path  # HF folder of the final weights (model.safetensors, config.json, tokenizer files)
    metrics: dict[str, Any]  # train_loss (mean over the steps), final_loss, steps, tokens, tokens_per_s, time_s, ...
    history: list[dict]  # one record per optimizer step (loss terms, pair_acc, lr, grad_norm, tokens_per_s, ...)

    @classmethod
    def from_loop(cls, checkpoint: Path, out: dict, time_s: float) -> StageResult:
        metrics = summarize(out["history"], time_s)
        metrics.update(restarts=out["restarts"], peak_rss_mb=out["peak_rss_mb"], setup_s=out["setup_s"])
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
        return (dataclasses.replace(train, lr=train.vft_lr or train.lr, steps_per_round=train.vft_steps or None,
                                    questions_per_step=train.vft_questions_per_step or train.questions_per_step),
                dataclasses.replace(loss, name="vft", vft_weight=1.0, vft_on_positives=False))
    raise ValueError(f"stage: expected 'vft' or 'align', got {stage!r}")


def loop_config(stage, groups, model_path, train, loss, trust_remote_code, out_dir, on_ray: bool) -> dict:
    if isinstance(groups, (str, Path)):
        groups = str(Path(groups).absolute())
    return {"stage": stage, "groups": groups, "model_path": str(model_path), "trust_remote_code": trust_remote_code,
            "train": dataclasses.asdict(train), "loss": dataclasses.asdict(loss), "out_dir": str(out_dir),
            "on_ray": on_ray}


def train_stage(stage: str, groups, model_path: str | Path, stage_dir: str | Path, train: TrainConfig,
                loss: LossConfig, *, trust_remote_code: bool = False, placement_strategy: str = "PACK",
                keep_state: bool = False) -> StageResult:
    """Train one stage with a Ray Train `TorchTrainer` of DeepSpeed workers (Ray must be initialised).

    groups: a parquet path on storage every worker's node sees (the loop's run directory), or a list of rows
    (shipped with the workers' config). Every worker reads all rows itself (they are token ids, small next to
    the model): a Ray Data shard would cost ~30 s of dataset start-up per stage here and give nothing, as every
    worker needs the whole, identically ordered list anyway. model_path: the weights the stage starts from."""
    stage_dir = Path(stage_dir).absolute()
    final = stage_dir / "checkpoint"
    if (final / RESULT_FILE).is_file():
        if not keep_state:
            shutil.rmtree(stage_dir / "ray", ignore_errors=True)
        return StageResult.load(final)
    train, loss = stage_configs(stage, train, loss)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aftray.loop.placement import scaling_config_kwargs
    from aftray.train.worker import train_loop

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(stage, groups, model_path, train, loss, trust_remote_code, "", on_ray=True),
        scaling_config=ScalingConfig(**scaling_config_kwargs(train, placement_strategy)),
        run_config=RunConfig(name="train", storage_path=str(stage_dir / "ray"),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    start = time.perf_counter()
    result = trainer.fit()
    # Publish the last checkpoint's HF files as <stage_dir>/checkpoint: hard links are instant and outlive the
    # Ray run folder; the DeepSpeed state stays behind.
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.checkpoint.path, tmp, copy_function=os.link, ignore=shutil.ignore_patterns(DS_DIR))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    StageResult.from_loop(final, result.return_value, time.perf_counter() - start).save()
    if not keep_state:
        shutil.rmtree(stage_dir / "ray", ignore_errors=True)
    return StageResult.load(final)


def train_local(stage: str, groups: list[dict] | str | Path, model_path: str | Path, stage_dir: str | Path,
                train: TrainConfig, loss: LossConfig, *, trust_remote_code: bool = False) -> StageResult:
    """The same stage without Ray, in this process: alone, or as one rank of `torchrun` (env-var rendezvous:
    MASTER_ADDR/PORT, RANK, WORLD_SIZE). groups: a list of rows or a parquet path, read by every rank.
    No mid-stage checkpoints; the final weights go to `<stage_dir>/checkpoint`."""
    from aftray.train.worker import train_loop

    final = Path(stage_dir).absolute() / "checkpoint"
    train, loss = stage_configs(stage, train, loss)
    start = time.perf_counter()
    out = train_loop(loop_config(stage, groups, model_path, train, loss, trust_remote_code, final, on_ray=False))
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
