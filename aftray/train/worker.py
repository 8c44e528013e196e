"""The train loop of one stage, run by every Ray Train worker.

`serve` keeps a worker alive for the whole run and runs one stage per request (see `aftray.train.service`);
`run_stage` runs one in any process group (benchmarks/train.py also runs it without Ray, under torchrun or
alone, with `StageJob.on_ray` False). A stage (`run_stage`), top to bottom: the stage's group rows, in one
order on every worker -> the policy (model under DeepSpeed) it starts from, as the
job's `init` says (`aftray.train.stage`): loaded, kept with a new optimizer, or kept whole -> resume ->
optimizer steps (LR from the run's schedule, micro-batches of whole question groups, the loss from the job's
`objective`, `engine.step`) -> metrics -> mid-stage checkpoints through `ray.train.report` (Ray only) -> the
final weights: pushed to the object store, and/or written to the stage's folder with the end state (optimizer
included) in Ray Train's storage. `run_stage` imports Ray only where `job.on_ray` asks for it.

The resident policy. A worker keeps its DeepSpeed engine between stages, so a run's align stages after the
first load nothing and keep Adam's moments. A worker that lost it (a restarted worker group, a resumed run)
restores model and optimizer from the end-state checkpoint of the stage it continues.

Batching. Optimizer step t takes the next `per_step` groups of an endless stream: the groups in a seeded
shuffled order, reshuffled on each pass (a stage whose steps cannot take every group once keeps the mixed ones
first: `groups_for_steps`). `per_step` is `questions_per_step` rounded up to a multiple of the
world size; each worker takes every world-th group of the step and splits its share into `accum` micro-batches
(sizes differ by at most one, so every worker runs the same number of backward passes, as ZeRO needs). A
micro-batch's loss is a mean over its groups, so it is weighted by its share of the worker's groups: the step's
gradient is the mean over all its groups. As the order is a function of (seed, step), a worker group restarted
from the checkpoint of step k sees exactly the batches it would have seen and ends after the same number of
steps.

Simplifications: every worker holds all of the stage's group rows (token ids, small next to the model); a
stage without Ray has no mid-stage checkpoints.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aftray.config import TrainConfig
from aftray.logs import worker_setup
from aftray.models import load_model, load_tokenizer
from aftray.rows import TRAIN_COLUMNS, check_group_table, mixed_first, mixed_or_reference
from aftray.train.checkpoint import checkpoint_state, full_state_dict, load_checkpoint, save_checkpoint
from aftray.train.stage import StageJob
from aftray.train.deepspeed_config import ADAM_BETAS, deepspeed_config, skip_shm_comm_op
from aftray.train.scores import (collate_groups, has_samples, logp_drift, sampled_drift, scored_batch,
                                 takes_custom_masks, token_logps)

log = logging.getLogger("aftray")
# Counts (and CPU seconds of all workers' processes); the rest are means.
SUMMED = ("groups", "groups_no_pairs", "groups_with_both", "tokens", "forward_tokens", "truncated", "cpu_s")
WEIGHTED_BY = {"pair_acc": "groups_with_both"}  # means over groups, pair accuracy over groups that have pairs
# steps between live metric reports to Ray Train: each `ray.train.report` synchronises every worker with the
# controller (~1.5 s on 2 loaded cores, 3x a tiny model's step); the full per-step history is returned anyway
REPORT_EVERY = 10


def serve(config: dict) -> None:
    """Ray Train's function on every worker of a `TrainService`: train each `StageJob` the driver posts to the
    inbox (config["inbox"], a `StageInbox` actor), in order, until it posts None. The worker process, its process
    group, `import deepspeed` and the policy (model and optimizer) are kept from one stage to the next; a
    restarted worker group skips the stages finished before and resumes the pending one from the latest
    checkpoint (mid-stage, or the end state of the stage it continues)."""
    import ray
    import ray.train
    import ray.train.torch

    worker_setup()  # again: Ray Train re-configured this process's root logger when it started the worker
    # the GPU Ray assigned to this worker (CUDA_VISIBLE_DEVICES is set per worker, so LOCAL_RANK need not index
    # it); Ray Train has set up the process group
    device = ray.train.torch.get_device()
    use_device(device, config["cpus_per_worker"])
    import deepspeed  # noqa: F401  seconds, paid here while the driver is still busy before its first stage

    inbox = config["inbox"]
    resume = ray.train.get_checkpoint()  # the latest checkpoint of this run (any stage); None on a fresh start
    index = ray.get(inbox.first_unfinished.remote())
    policy, links = None, {}
    try:
        while (job := ray.get(inbox.job.remote(index))) is not None:
            out, policy = run_stage(job, device, resume, policy, links)
            if dist.get_rank() == 0:
                ray.get(inbox.finish.remote(index, out))
            resume, index = None, index + 1
    finally:
        if policy is not None:
            policy.engine.destroy()
        dist.destroy_process_group()


class Policy:
    """What a worker keeps between stages: the DeepSpeed engine (model, optimizer, ZeRO partitions), the
    tokenizer, the stage that left them, and the gradient-accumulation count the engine was built for."""

    def __init__(self, engine, tokenizer, stage: str, accum: int):
        self.engine, self.tokenizer, self.stage, self.accum = engine, tokenizer, stage, accum


def build_engine(model, train: TrainConfig, accum: int, world: int, device: torch.device):
    """`model` under DeepSpeed with a new AdamW."""
    import deepspeed

    on_gpu = device.type == "cuda"
    offload = on_gpu and train.offload_optimizer  # then DeepSpeed's CPU Adam steps on the host
    optimizer = None if offload else torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay, fused=on_gpu)
    skip_shm_comm_op()  # nothing here uses it, and it is a C++ compile
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model.parameters(),
                                      config=deepspeed_config(train, accum, world, offload))
    return engine


def start_policy(job: StageJob, accum: int, device: torch.device, policy: Policy | None, resume
                 ) -> tuple[Policy, dict | None, str]:
    """The policy this stage starts from (see `aftray.train.stage`), the loop state of a checkpoint it was
    restored from when that is this stage's own mid-stage one (step and history go on from it), and how it got
    it: "kept" (model and optimizer as the last stage left them), "new_optimizer", "restored" (from a
    checkpoint) or "loaded" (from job.model_path)."""
    world = dist.get_world_size()
    state = {}
    if resume is not None:
        with resume.as_directory() as path:
            state = checkpoint_state(Path(path))
    held = policy is not None and policy.stage == job.after and state.get("stage") != job.name
    if held and job.init == "continue" and policy.accum == accum:
        policy.stage = job.name
        return policy, None, "kept"  # nothing to load, nothing to build
    if policy is not None:
        if held and job.init == "reset" and policy.engine.zero_optimization_stage() < 3:
            model, tokenizer = policy.engine.module, policy.tokenizer  # the weights stay; the optimizer goes
            policy.engine.destroy()
            return (Policy(build_engine(model, job.train, accum, world, device), tokenizer, job.name, accum), None,
                    "new_optimizer")
        policy.engine.destroy()  # the state of another stage (another run's, after a reset under ZeRO-3)
        policy = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if state and (state["stage"] == job.name or (job.init == "continue" and state["stage"] == job.after)):
        with resume.as_directory() as path:  # model and optimizer as the checkpoint left them
            tokenizer = load_tokenizer(path, job.trust_remote_code)
            model = load_model(path, weights_dtype(job.train), job.trust_remote_code,
                               job.train.gradient_checkpointing)
            engine = build_engine(model, job.train, accum, world, device)
            load_checkpoint(engine, Path(path))
        own = state if state["stage"] == job.name else None
        return Policy(engine, tokenizer, job.name, accum), own, "restored"
    if job.init == "continue":
        raise RuntimeError(f"stage {job.name} continues {job.after}, whose model and optimizer this worker "
                           f"does not hold and no checkpoint has (latest: {state.get('stage')!r}); the run "
                           "resumes from its last checkpointed round")
    tokenizer = load_tokenizer(job.model_path, job.trust_remote_code)
    model = load_model(job.model_path, weights_dtype(job.train), job.trust_remote_code,
                       job.train.gradient_checkpointing)
    return Policy(build_engine(model, job.train, accum, world, device), tokenizer, job.name, accum), None, "loaded"


def weights_dtype(train: TrainConfig) -> str:
    return "fp32" if train.dtype == "amp_bf16" else train.dtype


def autocast(train: TrainConfig, device: torch.device):
    """The forward passes' precision context: bf16 matmuls under `train.dtype: amp_bf16`, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.dtype == "amp_bf16")


def run_stage(job: StageJob, device: torch.device, resume=None, policy: Policy | None = None,
              links: dict | None = None) -> tuple[dict, Policy]:
    """One stage on this worker (the process group is up). resume: the run's latest Ray checkpoint (used if it
    belongs to this stage, or is the end state of the stage it continues); policy: what the last stage left;
    links: connections kept across stages (the NCCL group to the rollout engines).
    Returns ({"history": per-step records, "restarts": steps resumed from, "setup_s": seconds of each phase,
    "weights": [object ref] when pushed, "policy": how it started (`start_policy`), "worker_pids" and
    "peak_rss_mb": per rank}, the policy to keep)."""
    # start_s: from the driver's request to this worker starting the stage: a worker group's start-up on the
    # first stage (processes, imports, process group), ~0 for the stages after it
    setup = {"start_s": max(0.0, time.time() - job.posted_at)}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        setup[name], mark = time.perf_counter() - mark, time.perf_counter()

    import deepspeed  # noqa: F401  seconds on a worker's first stage; a served worker pays it once

    links = {} if links is None else links
    lap("import_s")
    train, loss_cfg = job.train, job.loss
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = load_groups(job.groups)
    if job.mixed_or_reference:
        groups = mixed_or_reference(groups, job.max_groups)
    lap("load_groups_s")
    if not groups:
        raise ValueError(f"stage {job.stage}: no group rows to train on")
    per_step = -(-train.questions_per_step // world) * world
    accum = -(-(per_step // world) // train.micro_batch_questions)
    total_steps = train.steps_per_stage or -(-len(groups) // per_step)
    groups = groups_for_steps(groups, total_steps * per_step, train.seed)
    schedule_start, schedule_total = job.schedule or (0, total_steps)

    policy, restored, started = start_policy(job, accum, device, policy, resume)
    engine, tokenizer = policy.engine, policy.tokenizer
    lap("model_and_deepspeed_s")
    step, history, restarts = 0, [], []
    if restored is not None:
        step, history, restarts = restored["step"], restored["history"], restored["restarts"] + [restored["step"]]
    lap("resume_s")

    shared = train.layout == "shared_prefix" and takes_custom_masks(engine.module)  # else packed
    objective = job.objective
    with_ref, with_samples = objective.row.sequences_needed(loss_cfg)
    # the sampler<->trainer drift before any update: read from the first step's own forward passes when they
    # carry sampled COTs (the same decision on every rank: it sees the whole step), else a pass of its own
    drift, first_diffs = {}, None
    if step == 0 and with_samples and any(map(has_samples, step_groups(groups, 0, per_step, train.seed))):
        first_diffs = []
    elif step == 0:
        with autocast(train, device):  # the drift the training forward passes see
            drift = first_step_drift(engine, groups, per_step, accum, job, tokenizer.pad_token_id, device, shared)
    lap("drift_s")
    cpu_mark = time.process_time()
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(schedule_start + step, schedule_total, train)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        mine = step_groups(groups, step, per_step, train.seed)[rank::world]
        parts, module_norm = [], None
        for i in range(accum):
            rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
            batch = collate_groups(rows, train.max_seq_len, train.layout != "padded", with_ref, with_samples,
                                   tokenizer.pad_token_id, shared).to(device)
            with autocast(train, device):
                token_logp = token_logps(engine, batch)
                if first_diffs is not None:
                    first_diffs += sampled_drift(batch, token_logp, rows)
                loss, metrics = objective(loss_cfg, scored_batch(batch, token_logp))
            engine.backward(loss * len(rows) * accum / len(mine))  # DeepSpeed divides by accum
            if i == accum - 1 and engine.zero_optimization_stage() == 0:  # where DeepSpeed drops the norm
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                module_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            engine.step()  # the optimizer steps (and clips) on the last micro-batch only
            # tokens: as a layout without sharing counts them (comparable across layouts); forward_tokens: run
            parts.append({**metrics, "tokens": batch.sequence_tokens, "forward_tokens": batch.forward_tokens,
                          "truncated": batch.num_truncated})
        step += 1
        if first_diffs is not None:
            drift, first_diffs = gather_drift(first_diffs), None
        cpu_s, cpu_mark = time.process_time() - cpu_mark, time.process_time()  # since the last step's end
        grad_norm = engine.get_global_grad_norm()
        grad_norm = module_norm if grad_norm is None else grad_norm
        record = {"step": step, "lr": lr, "grad_norm": math.nan if grad_norm is None else float(grad_norm),
                  **reduce_metrics(parts + [{"cpu_s": cpu_s}], device)}
        record["time_s"] = time.perf_counter() - t0
        record["timestamp"] = time.time()  # differences cover whole steps, reports and checkpoints included
        record["tokens_per_s"] = record["tokens"] / record["time_s"]
        history.append(record)

        every = train.checkpoint_every
        if step < total_steps and job.on_ray:  # the same steps on every rank
            if every > 0 and step % every == 0:
                report(record, engine, tokenizer, {"stage": job.name, "step": step, "history": history,
                                                   "restarts": restarts}, f"step_{step:06d}")
            elif step % REPORT_EVERY == 0:
                import ray.train  # on Ray only (see `serve`)

                ray.train.report(record)
    lap("steps_s")
    weights = None
    if job.nccl_engines and not send_over_nccl(engine, job, links):
        weights = push_weights(engine)  # the NCCL group could not be set up: the object store instead
    elif job.push_weights:
        weights = push_weights(engine)
    lap("push_s")
    if job.save_weights:
        save_final(engine, tokenizer, Path(job.out_dir), {"stage": job.name, "step": step, "history": history})
        if job.on_ray:  # the end state, for a stage that continues this one after a restart or resume
            report(history[-1], engine, tokenizer, {"stage": job.name, "step": step, "history": history,
                                                    "restarts": restarts}, "end")
    lap("save_s")

    processes = [None] * world
    dist.all_gather_object(processes, (os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return ({"history": history, "restarts": restarts, "setup_s": setup, "logp_drift": drift, "weights": weights,
             "policy": started,
             "worker_pids": [pid for pid, _ in processes], "peak_rss_mb": [rss for _, rss in processes]}, policy)


def send_over_nccl(engine, job: StageJob, links: dict) -> bool:
    """Broadcast the weights from rank 0 to the rollout engines over NCCL (vLLM's weight transfer). The group
    is set up on the first call for these engines and kept in `links` (a comparison's next run brings new
    engines: a new group). False when it cannot be set up or a push fails (an engine that Ray restarted is not
    in the group): the caller falls back to the object store, and later stages do too. Collective. Not yet run
    on a GPU (docs/cluster.md)."""
    from aftray.train import nccl_push

    engines, tp, dtype, version = job.nccl_engines
    dtype, key = getattr(torch, dtype), tuple(e._actor_id.hex() for e in engines)
    if links.get("nccl_engines") != key:
        if links.get("nccl"):
            nccl_push.close(links["nccl"])
        links["nccl_engines"], links["nccl"] = key, None
        try:
            links["nccl"] = nccl_push.connect(engines, engine.module, rank=dist.get_rank(),
                                              tensor_parallel_size=tp, dtype=dtype)
        except Exception as e:  # noqa: BLE001  the run goes on through the object store
            log.warning("rollout.weight_sync=nccl: the NCCL group could not be set up (%s: %s); weights go "
                        "through the object store", type(e).__name__, e)
        if not everywhere(links["nccl"] is not None, engine.device):
            links["nccl"] = None
    if links["nccl"] is None:
        return False
    try:
        nccl_push.push(links["nccl"], version, engine.module, dtype)
        pushed = True
    except Exception as e:  # noqa: BLE001
        log.warning("rollout.weight_sync=nccl: the push failed (%s: %s); weights go through the object store "
                    "from now on", type(e).__name__, e)
        pushed = False
    if not everywhere(pushed, engine.device):
        links["nccl"] = None
    return links["nccl"] is not None


def everywhere(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on every rank: ranks take the same branch after a step that can fail
    on one of them. Collective."""
    ok = torch.tensor([int(flag)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def push_weights(engine) -> list | None:
    """Rank 0 puts the full state dict (gathered layer by layer under ZeRO-3) in Ray's object store: [ref] on
    rank 0, None elsewhere. Collective."""
    weights = full_state_dict(engine)
    if dist.get_rank() != 0:
        return None
    from aftray.weights import put_weights

    return [put_weights(weights)]  # in a list: Ray hands the ref on as it is, unresolved


def first_step_drift(engine, groups: list[dict], per_step: int, accum: int, job: StageJob, pad_id: int,
                     device: torch.device, shared_prefix: bool) -> dict:
    """Sampler↔trainer log-prob drift before any update, from a forward pass of its own over the first step's
    worth of the stage's rows that carry sampled COTs: for a stage whose first step has none to read it from
    (its loss trains reference COTs only, or dynamic sampling left the step reference-only rows). {} when no
    row has any (a VFT stage)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sampled = [g for g in groups if has_samples(g)]  # the same rows on every rank
    if not sampled:
        return {}
    mine = step_groups(sampled, 0, per_step, job.train.seed)[rank::world]
    diffs = []
    for i in range(accum):  # the training step's micro-batches: same count on every rank (ZeRO-3 gathers)
        rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
        diffs += logp_drift(engine, rows, job.train.max_seq_len, pad_id, device, shared_prefix)
    return gather_drift(diffs)


def gather_drift(diffs: list[float]) -> dict:
    """{"mean", "max", "tokens"} of the per-token drifts over all ranks, {} when there are none. Collective."""
    world = dist.get_world_size()
    parts = [None] * world
    dist.all_gather_object(parts, (sum(diffs), len(diffs), max(diffs, default=0.0)))
    tokens = sum(n for _, n, _ in parts)
    if not tokens:
        return {}
    return {"mean": sum(s for s, _, _ in parts) / tokens, "max": max(m for _, _, m in parts), "tokens": tokens}


def use_device(device: torch.device, cpus: float) -> None:
    """Make `device` this process's current GPU; on CPU, as many torch threads as the CPUs it was given."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(cpus)))


def load_groups(source) -> list[dict]:
    """The stage's group rows (the columns training reads, as plain Python values), in the same order on every
    worker. source: a parquet file or folder (Ray Data writes folders), a list of rows, or a list of object
    refs to lists of rows or to arrow tables (Ray Data's blocks)."""
    import pyarrow as pa

    if isinstance(source, (str, Path)):
        import pyarrow.parquet as pq

        parts = [pq.read_table(source)]
    elif source and not isinstance(source[0], dict):
        import ray

        parts = ray.get(list(source))
    else:
        parts = [source]
    rows = []
    for part in parts:
        if isinstance(part, pa.Table):  # refused here, naming the column, rather than deep in a loss
            check_group_table(part, str(source) if isinstance(source, (str, Path)) else "the stage's group rows")
            part = part.select(list(TRAIN_COLUMNS)).to_pylist()
        rows += [{c: row[c] for c in TRAIN_COLUMNS if c in row} for row in part]
    return sorted(rows, key=lambda row: (row["id"], row.get("cot_ids", [])))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return random.Random(f"{seed}:{epoch}").sample(range(n), n)


def groups_for_steps(groups: list, capacity: int, seed: int | None) -> list:
    """The groups a stage whose steps take `capacity` groups trains: all of them when they fit, else the mixed
    ones (a right and a wrong COT) first and the rest in a seeded order. A round that samples more questions than
    its steps train (say 32 for 8) so gives every loss the groups a pairwise loss learns from, and the arms of a
    comparison the same groups, as DAPO's filter keeps the groups with a signal; unfilled places take others."""
    if len(groups) <= capacity:
        return groups
    return mixed_first([groups[i] for i in epoch_order(len(groups), seed or 0, -1)], capacity)


def step_groups(groups: list, step: int, per_step: int, seed: int) -> list:
    """The `per_step` groups of optimizer step `step` (0-based) in the endless, reshuffled-per-pass stream."""
    n, seed = len(groups), seed or 0  # null (a config built without load_config): the root seed's default
    return [groups[epoch_order(n, seed, i // n)[i % n]] for i in range(step * per_step, (step + 1) * per_step)]


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - 1 - train.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * decay)


def reduce_metrics(parts: list[dict], device: torch.device) -> dict:
    """One step's metrics over this worker's micro-batches and all workers: counts summed, the rest averaged
    over groups (see WEIGHTED_BY), NaN values (e.g. pair accuracy without pairs) left out."""
    keys = sorted(set().union(*parts))
    sums = torch.zeros(2, len(keys), dtype=torch.float64)
    for m in parts:
        for i, k in enumerate(keys):
            if k in SUMMED:
                sums[0, i] += m.get(k, 0)
            elif k in m and math.isfinite(m[k]):
                w = m[WEIGHTED_BY.get(k, "groups")]
                sums[0, i] += m[k] * w
                sums[1, i] += w
    sums = sums.to(device)
    dist.all_reduce(sums)
    sums = sums.cpu()
    return {k: float(sums[0, i]) if k in SUMMED else float(sums[0, i] / sums[1, i]) if sums[1, i] > 0 else math.nan
            for i, k in enumerate(keys)}


def report(record: dict, engine, tokenizer, state: dict, tag: str) -> None:
    """A resumable checkpoint (weights, optimizer, loop state) through `ray.train.report`, into Ray Train's
    storage as `<stage>_<tag>`: each worker reports the part it wrote."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="aftray-ckpt-") as tmp:
        save_checkpoint(engine, tokenizer, Path(tmp), state)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"{state['stage']}_{tag}")


def save_final(engine, tokenizer, out: Path, state: dict) -> None:
    """The stage's final weights (HF folder, no optimizer state) into `out`, replacing it only when complete.
    Collective. `out` is on storage the driver sees (the run directory)."""
    tmp = out.with_name(out.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_checkpoint(engine, tokenizer, tmp, state, with_optimizer=False)
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
