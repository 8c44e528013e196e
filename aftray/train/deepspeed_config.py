"""The DeepSpeed config of a train worker, from `TrainConfig`.

One DeepSpeed "micro-batch" is one of our micro-batches of whole question groups (its size in sequences varies),
so `train_micro_batch_size_per_gpu` is 1 and the global batch is counted in micro-batches; the batch in
questions is set by the loop (`aftray.train.worker`). The learning rate is set by the loop each step (warmup +
decay written out there), so no DeepSpeed scheduler is configured.
"""
from __future__ import annotations

from aftray.config import TrainConfig

ADAM_BETAS = (0.9, 0.95)


def deepspeed_config(train: TrainConfig, grad_accum: int, world_size: int, offload: bool) -> dict:
    """The config dict for `deepspeed.initialize(config=...)`.

    The caller passes torch's AdamW as the client optimizer (fused on GPU; DeepSpeed's own Adam kernels would
    JIT-compile), hence `zero_allow_untested_optimizer`. With `offload` (GPU with train.offload_optimizer; on
    CPU the state is in host memory anyway) the optimizer state and step move to the host, where DeepSpeed
    needs its own CPU Adam: it is built from the "optimizer" section instead."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints gather the full weights
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop logs; keep DeepSpeed's own step prints out of worker logs
        "wall_clock_breakdown": False,
    }
    if offload:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                          "betas": list(ADAM_BETAS)}}
    return config


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building its `deepspeed_shm_comm` op. Its communication backend builds it when it is
    created, at a process's first `deepspeed.initialize` (deepspeed/comm/torch.py: TorchBackend.__init__ calls
    build_shm_op): on CPU a C++ JIT compile, ~55 s on 2 cores the first time, after probing every op's compiler
    support. Only DeepSpeed inference's tensor-parallel all-reduce (`inference_all_reduce`) uses the op;
    training's collectives go through torch.distributed at any world size. Called before `initialize`."""
    import importlib

    # the module itself: the attribute deepspeed.comm.torch is the torch package (deepspeed.comm star-imports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
