"""Train checkpoints: one folder that transformers loads as a model and DeepSpeed resumes from.

    <dir>/config.json, model.safetensors, generation_config.json, tokenizer files   HF folder (rank 0)
    <dir>/trainer_state.json                                   the loop's counters: step, history (rank 0)
    <dir>/deepspeed/latest, <dir>/deepspeed/state/             DeepSpeed: module, optimizer, ZeRO shards
                                                               (one `zero_pp_rank_<r>_*` file per worker)

Under Ray every worker writes its part into its own folder and `ray.train.report` merges them into one.
The weights are stored twice (safetensors and DeepSpeed's module state) so that each reader stays standard.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

STATE_FILE = "trainer_state.json"
DS_DIR, DS_TAG = "deepspeed", "state"


def save_checkpoint(engine, tokenizer, out: Path, state: dict, with_optimizer: bool = True) -> None:
    """Collective: every rank calls it. `state` (JSON) is what the loop needs to continue exactly."""
    if with_optimizer:
        (out / DS_DIR / DS_TAG).mkdir(parents=True, exist_ok=True)  # each rank writes its own shard here
        engine.save_checkpoint(str(out / DS_DIR), tag=DS_TAG)
    weights = full_state_dict(engine)
    if dist.get_rank() == 0:
        engine.module.save_pretrained(out, state_dict=weights)
        tokenizer.save_pretrained(out)
        (out / STATE_FILE).write_text(json.dumps(state))


def full_state_dict(engine) -> dict:
    """The module's whole state dict on rank 0 (ZeRO-3 gathers its 16-bit partitions there). Collective."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def load_checkpoint(engine, path: Path) -> dict:
    """Restore module, optimizer and ZeRO state into `engine`; return the loop's state."""
    engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG)
    return checkpoint_state(path)


def checkpoint_state(path: Path) -> dict:
    """The loop's state saved with a checkpoint (stage name, step, history, ...)."""
    return json.loads((path / STATE_FILE).read_text())
