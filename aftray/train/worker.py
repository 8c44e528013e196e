"""The train loop of one stage, run by every worker: a Ray Train worker, a torchrun rank, or a lone process.

Under Ray, `serve` keeps a worker alive for the whole run and runs one stage per request (see
`aftray.train.service`); without Ray, `train_stage_local` runs one. A stage (`run_stage`), top to bottom: the
stage's group rows, in one order on every worker -> model under DeepSpeed (fresh from the stage's starting
weights, fresh optimizer) -> resume -> optimizer steps (LR, micro-batches of whole question groups, loss from
`OBJECTIVES`, `engine.step`) -> metrics -> mid-stage checkpoints through `ray.train.report` (Ray only) -> the
final weights, written straight into the stage's folder. `import ray` happens on the Ray path only.

Batching. Optimizer step t takes the next `per_step` groups of an endless stream: the groups in a seeded
shuffled order, reshuffled on each pass. `per_step` is `questions_per_step` rounded up to a multiple of the
world size; each worker takes every world-th group of the step and splits its share into `accum` micro-batches
(sizes differ by at most one, so every worker runs the same number of backward passes, as ZeRO needs). A
micro-batch's loss is a mean over its groups, so it is weighted by its share of the worker's groups: the step's
gradient is the mean over all its groups. As the order is a function of (seed, step), a worker group restarted
from the checkpoint of step k sees exactly the batches it would have seen and ends after the same number of
steps.

Simplifications: every worker holds all of the stage's group rows (token ids, small next to the model); the
path without Ray has no mid-stage checkpoints.
"""
from __future__ import annotations

import functools
import math
import os
import random
import resource
import runpy
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aftray.config import LossConfig, TrainConfig
from aftray.models import load_model, load_tokenizer
from aftray.train.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from aftray.train.stage import StageJob, StageResult
from aftray.train.deepspeed_config import ADAM_BETAS, deepspeed_config
from aftray.train.losses import OBJECTIVES, sequences_needed
from aftray.train.scores import collate_groups, logp_drift, score_groups

# Group-row columns the loop reads (docs/internals.md); the texts stay behind.
COLUMNS = ("id", "prompt_ids", "ref_cot_ids", "cot_ids", "sample_logp", "sample_token_logp", "correct", "rank",
           "process")
# Counts (and CPU seconds of all workers' processes); the rest are means.
SUMMED = ("groups", "groups_no_pairs", "groups_with_both", "tokens", "truncated", "cpu_s")
WEIGHTED_BY = {"pair_acc": "groups_with_both"}  # means over groups, pair accuracy over groups that have pairs


def train_stage_local(stage: str, groups: list[dict] | str | Path, model_path: str | Path, stage_dir: str | Path,
                      train: TrainConfig, loss: LossConfig, *, trust_remote_code: bool = False) -> StageResult:
    """One stage without Ray, in this process: alone, or as one rank of `torchrun` (env-var rendezvous:
    MASTER_ADDR/PORT, RANK, WORLD_SIZE). groups: a list of rows or a parquet path, read by every rank.
    No mid-stage checkpoints; the final weights go to `<stage_dir>/checkpoint`."""
    job = StageJob.create(stage, stage, groups, model_path, stage_dir, train, loss, trust_remote_code)
    start = time.perf_counter()
    device = init_distributed(job.train.cpus_per_worker)
    try:
        out = run_stage(job, device)
    finally:
        dist.destroy_process_group()
    result = StageResult.from_loop(Path(job.out_dir), out, time.perf_counter() - start)
    if int(os.environ["RANK"]) == 0:
        result.save()
    return result


def serve(config: dict) -> None:
    """Ray Train's function on every worker of a `TrainService`: train each `StageJob` the driver posts to the
    inbox (config["inbox"], a `StageInbox` actor), in order, until it posts None. The worker process, its process
    group and `import deepspeed` are paid once per run; each stage loads its starting weights afresh (a
    restarted worker group skips the stages finished before and resumes the pending one from its checkpoint).

    $AFTRAY_WORKER_SETUP names a Python file each worker runs first (tests inject worker faults with it)."""
    import ray  # Ray workers only: the path without Ray (`train_stage_local`, torchrun) never imports it
    import ray.train

    if os.environ.get("AFTRAY_WORKER_SETUP"):
        runpy.run_path(os.environ["AFTRAY_WORKER_SETUP"])
    device = init_distributed(config["cpus_per_worker"])
    inbox = config["inbox"]
    resume = ray.train.get_checkpoint()  # the latest checkpoint of this run (any stage); None on a fresh start
    index = ray.get(inbox.first_unfinished.remote())
    try:
        while (job := ray.get(inbox.job.remote(index))) is not None:
            out = run_stage(job, device, resume)
            if dist.get_rank() == 0:
                ray.get(inbox.finish.remote(index, out))
            resume, index = None, index + 1
    finally:
        dist.destroy_process_group()


def run_stage(job: StageJob, device: torch.device, resume=None) -> dict:
    """One stage on this worker (the process group is up). resume: a Ray checkpoint, used if it belongs to this
    stage. Returns {"history": per-step records, "restarts": steps resumed from,
    "setup_s": seconds of each phase, "worker_pids" and "peak_rss_mb": per rank}."""
    # start_s: from the driver's request to this worker starting the stage: a worker group's start-up on the
    # first stage (processes, imports, process group), ~0 for the stages after it
    setup = {"start_s": max(0.0, time.time() - job.posted_at)}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        setup[name], mark = time.perf_counter() - mark, time.perf_counter()

    import deepspeed  # seconds on a worker's first stage; a served worker pays it once

    lap("import_s")
    train, loss_cfg = job.train, job.loss
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = load_groups(job.groups)
    lap("load_groups_s")
    if not groups:
        raise ValueError(f"stage {job.stage}: no group rows to train on")
    per_step = -(-train.questions_per_step // world) * world
    accum = -(-(per_step // world) // train.micro_batch_questions)
    total_steps = train.steps_per_stage or -(-len(groups) // per_step)

    tokenizer = load_tokenizer(job.model_path, job.trust_remote_code)
    model = load_model(job.model_path, train.dtype, job.trust_remote_code)
    on_gpu = device.type == "cuda"
    offload = on_gpu and train.offload_optimizer  # then DeepSpeed's CPU Adam steps on the host
    optimizer = None if offload else torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay, fused=on_gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model.parameters(),
                                      config=deepspeed_config(train, accum, world, offload))
    lap("model_and_deepspeed_s")

    step, history, restarts = 0, [], []
    if resume is not None:
        with resume.as_directory() as path:
            if checkpoint_state(Path(path)).get("stage") == job.name:
                state = load_checkpoint(engine, Path(path))
                step, history, restarts = state["step"], state["history"], state["restarts"] + [state["step"]]
    lap("resume_s")

    drift = first_step_drift(engine, groups, per_step, accum, job, tokenizer.pad_token_id, device) if step == 0 \
        else {}
    lap("drift_s")
    objective = OBJECTIVES[loss_cfg.name]
    with_ref, with_samples = sequences_needed(loss_cfg)
    cpu_mark = time.process_time()
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, total_steps, train)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        mine = step_groups(groups, step, per_step, train.seed)[rank::world]
        parts, module_norm = [], None
        for i in range(accum):
            rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
            batch = collate_groups(rows, train.max_seq_len, train.packing, with_ref, with_samples,
                                   tokenizer.pad_token_id).to(device)
            loss, metrics = objective(loss_cfg, score_groups(engine, batch))
            engine.backward(loss * len(rows) * accum / len(mine))  # DeepSpeed divides by accum
            if i == accum - 1 and engine.zero_optimization_stage() == 0:  # where DeepSpeed drops the norm
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                module_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            engine.step()  # the optimizer steps (and clips) on the last micro-batch only
            parts.append({**metrics, "tokens": num_tokens(batch), "truncated": batch.num_truncated})
        step += 1
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
                                                   "restarts": restarts})
            elif step % train.report_every == 0:
                import ray.train  # on Ray only (see `serve`)

                ray.train.report(record)
    lap("steps_s")
    save_final(engine, tokenizer, Path(job.out_dir), {"stage": job.name, "step": step, "history": history})
    lap("save_s")

    processes = [None] * world
    dist.all_gather_object(processes, (os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    engine.destroy()  # a served worker keeps running: free the model and optimizer before the next stage
    if on_gpu:
        torch.cuda.empty_cache()  # hand the cached blocks back (a sampler may share this GPU)
    return {"history": history, "restarts": restarts, "setup_s": setup, "logp_drift": drift,
            "worker_pids": [pid for pid, _ in processes], "peak_rss_mb": [rss for _, rss in processes]}


def first_step_drift(engine, groups: list[dict], per_step: int, accum: int, job: StageJob, pad_id: int,
                     device: torch.device) -> dict:
    """Sampler↔trainer log-prob drift before any update, on the first step's worth of the stage's rows that carry
    sampled COTs (under dynamic sampling some rows train their reference COT alone): {"mean", "max", "tokens"}
    over all ranks, or {} when no row has any (a VFT stage)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sampled = [g for g in groups if len(g.get("sample_token_logp", ()))]  # the same rows on every rank
    if not sampled:
        return {}
    mine = step_groups(sampled, 0, per_step, job.train.seed)[rank::world]
    diffs = []
    for i in range(accum):  # the training step's micro-batches: same count on every rank (ZeRO-3 gathers)
        rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
        diffs += logp_drift(engine, rows, job.train.max_seq_len, pad_id, device)
    parts = [None] * world
    dist.all_gather_object(parts, (sum(diffs), len(diffs), max(diffs, default=0.0)))
    tokens = sum(n for _, n, _ in parts)
    if not tokens:
        return {}
    return {"mean": sum(s for s, _, _ in parts) / tokens, "max": max(m for _, _, m in parts), "tokens": tokens}


def init_distributed(cpus: float) -> torch.device:
    """Join (Ray Train already set it up) or create the process group; pick this worker's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cpus)))  # as many threads as the CPUs it was given
    if not dist.is_initialized():  # torchrun's env vars, or a world of one on a free port
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_groups(source) -> list[dict]:
    """The stage's group rows (plain Python values), in the same order on every worker."""
    if isinstance(source, (str, Path)):  # a parquet file or folder (Ray Data writes folders)
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        rows = table.select([c for c in COLUMNS if c in table.column_names]).to_pylist()
    else:
        rows = [{c: row[c] for c in COLUMNS if c in row} for row in source]
    return sorted(rows, key=lambda row: (row["id"], row.get("cot_ids", [])))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return random.Random(f"{seed}:{epoch}").sample(range(n), n)


def step_groups(groups: list, step: int, per_step: int, seed: int) -> list:
    """The `per_step` groups of optimizer step `step` (0-based) in the endless, reshuffled-per-pass stream."""
    n = len(groups)
    return [groups[epoch_order(n, seed, i // n)[i % n]] for i in range(step * per_step, (step + 1) * per_step)]


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine or linear decay to lr * min_lr_ratio at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - 1 - train.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if train.lr_schedule == "cosine" else 1 - progress
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * decay)


def num_tokens(batch) -> int:
    """Tokens the forward pass ran over (padding excluded)."""
    mask = batch.inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch.inputs["input_ids"].numel()


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


def report(record: dict, engine, tokenizer, state: dict) -> None:
    """A resumable checkpoint through `ray.train.report`: each worker reports the part it wrote."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="aftray-ckpt-") as tmp:
        save_checkpoint(engine, tokenizer, Path(tmp), state)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"{state['stage']}_step_{record['step']:06d}")


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
