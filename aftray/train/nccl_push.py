"""Trainer rank 0 -> N vLLM engines over NCCL: the trainer's half of vLLM 0.32's weight transfer (backend "nccl").

Never run on a GPU yet: written from vLLM's sources (`vllm/distributed/weight_transfer/nccl_engine.py`,
`nccl_common.py`, `v1/worker/gpu_worker.py`, `entrypoints/rl/offline.py`).

The NCCL group: rank 0 is trainer rank 0, which also hosts the rendezvous (a TCPStore at
master_address:master_port); then every engine's tensor-parallel workers, engine i at ranks
1 + i*tp ... (i+1)*tp; world_size = 1 + N*tp. Each vLLM worker computes its own rank as
rank_offset + its TP rank, so engine i is told rank_offset = 1 + i*tp (`EngineGroup` rewrites the one payload
vLLM's trainer engine builds, which assumes a single engine at offset 1).

Engines: GPU `VLLMEngine`s started with `weight_transfer_config={"backend": "nccl"}` (rollout.weight_sync=nccl),
on GPUs none of the trainer's ranks uses (NCCL refuses two ranks of one communicator on one GPU). Their
`init_weight_transfer(init_info)` and `receive_weights(update_info, version)` block inside NCCL collectives.

Order (every trainer rank calls both; only rank 0 talks to the engines and sends):
1. once: `connect(engines, model, ...)`: rank 0 calls every engine's init_weight_transfer at once (Ray calls in
   flight together) while it opens its own endpoint; returns when all ranks have joined.
2. each refresh: `push(sender, version, model)`: every engine's receive_weights in flight while rank 0 sends the
   weights in packed chunks of about `buffer_bytes` (each side holds up to `num_buffers` chunks on its GPU);
   returns when every engine has loaded them.
A ZeRO-3 model is gathered one parameter at a time on every rank (a collective: all ranks must call `push`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

BUFFER_BYTES = 256 << 20  # packed chunk size (vLLM's default, 1 GiB, would sit beside a full KV cache twice)


def rank_offsets(num_engines: int, tensor_parallel_size: int = 1) -> list[int]:
    """Engine i's first rank in the group (rank 0 is the trainer)."""
    return [1 + i * tensor_parallel_size for i in range(num_engines)]


class EngineGroup:
    """vLLM's `VLLMWeightSyncClient` over N engine actors (Ray handles whose `init_method` / `receive_method`
    reach `VLLMEngine.init_weight_transfer` / `receive_weights`). `receive_weights` starts, fills and finishes an
    update in one call, so the start and finish hooks are empty; `version` labels the weights of the next push."""

    def __init__(self, engines: Sequence, tensor_parallel_size: int = 1, init_method: str = "init_weight_transfer",
                 receive_method: str = "receive_weights"):
        self.engines, self.tp = list(engines), tensor_parallel_size
        self.init_method, self.receive_method = init_method, receive_method
        self.version: int | None = None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import ray

        offsets = rank_offsets(len(self.engines), self.tp)
        ray.get([getattr(e, self.init_method).remote({**init_info, "rank_offset": off})
                 for e, off in zip(self.engines, offsets, strict=True)])

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        import ray

        ray.get([getattr(e, self.receive_method).remote(update_info, self.version) for e in self.engines])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass


def model_source(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """vLLM `WeightSource` over an HF model's parameters (DeepSpeed: `engine.module`), cast to `dtype` (the
    engines', e.g. bf16; None: as they are). A tied LM head is sent as `lm_head.weight` too: the engines serve an
    untied copy (aftray.rollout.vllm_engine). ZeRO-3 partitions are gathered per parameter and copied out."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    params = list(model.named_parameters())  # a tied head's Parameter appears once, as the embedding
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in dict(params):
        params.append(("lm_head.weight", model.get_input_embeddings().weight))

    class Source(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(n, dtype or p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in params]

        def __iter__(self):
            for name, p in params:
                if hasattr(p, "ds_id"):  # a ZeRO-3 partition
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([p]):
                        t = p.data.to(dtype or p.dtype, copy=True)
                else:
                    t = p.data.to(dtype or p.dtype)
                yield name, t

    return Source()


def connect(engines: Sequence, model: torch.nn.Module, *, rank: int, tensor_parallel_size: int = 1,
            master_address: str | None = None, master_port: int | None = None, dtype: torch.dtype | None = None,
            buffer_bytes: int = BUFFER_BYTES, num_buffers: int = 2):
    """vLLM's `NCCLTrainerWeightTransferEngine`, joined with the engines (step 1 above). `rank`: this trainer
    rank (0 sends). master_address/port: where rank 0 listens, default this node's IP and a free port."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    from aftray.cluster import free_port

    if master_address is None:
        import ray

        master_address = ray.util.get_node_ip_address()
    info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port or free_port(""),
                               world_size=1 + len(engines) * tensor_parallel_size, packed=True,
                               packed_buffer_size_bytes=buffer_bytes, packed_num_buffers=num_buffers, rank=rank)
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=EngineGroup(engines, tensor_parallel_size),
                                                        source=model_source(model, dtype))


def push(sender, version: int, model: torch.nn.Module | None = None, dtype: torch.dtype | None = None) -> None:
    """Send the current weights to every engine (step 2 above); the engines then hold `version`. `model`: a
    model other than `connect`'s (each stage loads a fresh one; the NCCL group outlives it), same architecture."""
    if model is not None:
        sender.source = model_source(model, dtype)
    sender.client.version = version
    if torch.cuda.is_available():  # vLLM packs on side streams, which do not wait for the optimizer's step
        torch.cuda.current_stream().synchronize()
    sender.send_weights()


def close(sender) -> None:
    """Tear down rank 0's communicator (the engines keep theirs until `shutdown_weight_transfer_engine`)."""
    sender.shutdown()
