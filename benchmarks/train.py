"""Train-stage throughput and memory: Ray Train + DeepSpeed against a plain PyTorch loop, same model/data/batch.

CPU (default) runs each arm in a fresh process, so each peak RSS is its own; every process or worker gets
--threads threads (default 1: on a shared machine, OpenMP threads that wait on a preempted sibling burn CPU):
  plain     a hand-written PyTorch loop in one process (AdamW, clipping, the same micro-batches and loss)
  ds_local  the aftray loop under DeepSpeed without Ray (`train_stage_local` here), one process
  ray_1     Ray Train + DeepSpeed, 1 worker (`train_stage` here: a `TrainService` for one stage)
  ray_2     Ray Train + DeepSpeed, 2 workers (same global batch: each does half the micro-batches)
Two throughputs over steps 2..N (step 1 warms up): tokens/s = tokens / wall time from the end of step 1 to the
end of step N (Ray's per-step report included), and tokens per CPU-second of the training processes (all workers;
far less sensitive than wall time to other processes on a shared machine). Arms take turns for --repeats rounds;
wall tokens/s keeps each arm's best run (load only ever slows a run down), CPU throughput the median. Ray's
workers run at niceness 0 here like the other arms (Ray's default is 15). Writes benchmarks/results/train.json
with ray_1 / plain (target >= 0.85), ray_2 / ray_1 and ds_local / plain.

--gpu: DeepSpeed bf16 ZeRO-2 on a ~1.1B random-init Llama (TinyLlama shape), without Ray; for several GPUs run
`torchrun --nproc_per_node N benchmarks/train.py --gpu`. Reports tokens/s and MFU = model FLOPs (6 x params
+ attention, per token) x tokens/s / (--peak-tflops x GPUs); writes benchmarks/results/train_gpu.json.

--shared-prefix-compare: the default preset's training (SmolLM2, round-1 groups of its 1-shot arith prompts,
k = 4, 4 questions a step in micro-batches of 2, 2 threads) under `train_stage_local` (DeepSpeed, no Ray), one
fresh process per arm, arms interleaved for --repeats rounds: unshared fp32, shared-prefix fp32, shared-prefix
amp_bf16. Throughput counts each arm's tokens as the unshared layout does (prompt once per sequence), so
`shared_over_unshared` is how much sooner the same groups are trained. `max_abs_score_diff`: the largest
|S_shared - S_unshared| over every sequence of the first 8 groups (fp32, summed log-probs). Groups: a `make run`
round-1 samples.parquet (--groups, default runs/words_cpu/rounds/1/), else made from the preset's task (its
prompts; COTs: the question's reference (right) and other questions' references (wrong), sampled-COT length).
Writes benchmarks/results/train_shared_prefix.json; prints one JSON line last.

--scoring-compare: the trainer's forward + backward as it was until session 19 (the logits of every position,
then the scored ones read; attention under the dense tree mask) against the LM head only at the positions that
predict a scored token (`token_logps` on the dense mask), and that with block-wise attention (`tree_attention`,
what the trainer runs now), on the same groups (--groups, default as above), in one process, 2 threads: the
preset's loss over micro-batches of 2 groups in the shared-prefix layout, the arms interleaved for --repeats
rounds, the best pass each. Checks that all give the same log-probs and gradients. Writes
benchmarks/results/train_scoring.json.

Usage: python benchmarks/train.py [--model tiny|PATH|HUB_ID] [--steps 5] [--threads 1] [--gpu]
       python benchmarks/train.py --shared-prefix-compare
       python benchmarks/train.py --scoring-compare [--groups runs/X/rounds/1/samples.parquet]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
PRESET = REPO / "configs" / "words_cpu.yaml"


def bench_group(gid: str, prompt_ids: list[int], ref_cot_ids: list[int], cot_ids: list[list[int]],
                correct: list[bool]) -> dict:
    """A group row (aftray/rows.py) of given tokens; the fields training does not read are placeholders."""
    from aftray.rows import group_row

    k = len(cot_ids)
    return group_row(id=gid, prompt="", prompt_ids=prompt_ids, answer="", ref_cot="", ref_cot_ids=ref_cot_ids,
                     cots=[""] * k, cot_ids=cot_ids, sample_logp=[-1.5 * len(c) for c in cot_ids],
                     sample_token_logp=[[]] * k, finish_reasons=["stop"] * k, pred=[""] * k,
                     labels=["correct" if c else "wrong_answer" for c in correct], correct=correct,
                     process=[1.0] * k, rank=[1 if c else 2 for c in correct], counts=[1] * k, num_sampled=k,
                     weights_version=0)


def make_groups(n: int, k: int, prompt_len: int, cot_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random-token group rows (docs/internals.md); lengths vary +-25% so padding is realistic."""
    rng = random.Random(seed)

    def tokens(length):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(length * 3 // 4, length * 5 // 4))]

    return [bench_group(f"q{i:05d}", tokens(prompt_len), tokens(cot_len), [tokens(cot_len) for _ in range(k)],
                        [j % 2 == 0 for j in range(k)]) for i in range(n)]


def throughput(history: list[dict]) -> tuple[float, float]:
    """Over steps 2..N: tokens per wall second (from the steps' end timestamps) and per CPU second of the
    training processes (all workers)."""
    tokens = sum(h["tokens"] for h in history[1:])
    return (tokens / (history[-1]["timestamp"] - history[0]["timestamp"]),
            tokens / sum(h["cpu_s"] for h in history[1:]))


def train_stage_local(stage: str, groups: list[dict] | str | Path, model_path: str | Path, stage_dir: str | Path,
                      train, loss, *, trust_remote_code: bool = False):
    """One stage of the aftray loop (`aftray.train.worker.run_stage`) without Ray, in this process: alone, or as
    one rank of `torchrun` (env-var rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE; a process group already up
    is reused). No mid-stage checkpoints; the final weights go to `<stage_dir>/checkpoint`. A `StageResult`."""
    import torch
    import torch.distributed as dist

    from aftray.cluster import free_port
    from aftray.train.stage import StageJob, StageResult
    from aftray.train.worker import run_stage, use_device

    job = StageJob.create(stage, stage, groups, model_path, stage_dir, train, loss, trust_remote_code)
    start = time.perf_counter()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    use_device(device, train.cpus_per_worker)
    if not dist.is_initialized():  # torchrun's env vars, or a world of one on a free port
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        out, policy = run_stage(job, device)
        policy.engine.destroy()
    finally:
        dist.destroy_process_group()
    result = StageResult.from_loop(Path(stage_dir).absolute(), out, time.perf_counter() - start)
    if int(os.environ["RANK"]) == 0:
        result.save()
    return result


def train_stage(stage: str, groups, model_path: str | Path, stage_dir: str | Path, train, loss):
    """One stage on Ray Train workers of its own (Ray must be initialised), stopped afterwards: a `TrainService`
    for one stage, its Ray Train run in `<stage_dir>/ray/` until the stage has finished. A `StageResult`."""
    from aftray.train.service import TrainService

    with TrainService(train, Path(stage_dir).absolute() / "ray") as service:
        return service.train(stage, groups, model_path, stage_dir, train, loss)


def plain_loop(groups, model_path, train, loss_cfg) -> dict:
    """The baseline: the same batches, loss and optimizer as the aftray loop, nothing else."""
    import torch

    from aftray.models import load_model, load_tokenizer
    from aftray.train.deepspeed_config import ADAM_BETAS
    from aftray.train.losses import OBJECTIVES
    from aftray.train.scores import collate_groups, score_groups, takes_custom_masks
    from aftray.train.worker import lr_at, step_groups

    torch.set_num_threads(int(train.cpus_per_worker))
    pad_id = load_tokenizer(model_path).pad_token_id
    model = load_model(model_path, train.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay)
    objective = OBJECTIVES[loss_cfg.name]
    with_ref, with_samples = objective.row.sequences_needed(loss_cfg)
    groups = sorted(groups, key=lambda g: g["id"])
    accum = -(-train.questions_per_step // train.micro_batch_questions)
    history = []
    for step in range(train.steps_per_stage):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train.steps_per_stage, train)
        mine, tokens, cpu0 = step_groups(groups, step, train.questions_per_step, train.seed), 0, time.process_time()
        for i in range(accum):
            rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
            batch = collate_groups(rows, train.max_seq_len, train.layout != "padded", with_ref, with_samples, pad_id,
                                   train.layout == "shared_prefix" and takes_custom_masks(model))
            loss, _ = objective(loss_cfg, score_groups(model, batch))
            (loss * len(rows) / len(mine)).backward()
            tokens += batch.sequence_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "tokens": tokens, "timestamp": time.time(),
                        "cpu_s": time.process_time() - cpu0})
    return {"history": history, "peak_rss_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]}


def run_arm(arm: str, spec: dict) -> dict:
    """One arm, in this process (called in a child process by `main`)."""
    from aftray.config import LossConfig, TrainConfig

    groups, loss = spec["groups"], LossConfig(name=spec["loss"])
    train = TrainConfig(**spec["train"], resources_per_worker={"CPU": spec["threads"]}, seed=0)
    with tempfile.TemporaryDirectory(prefix="aftray-bench-") as stage_dir:
        if arm == "plain":
            return plain_loop(groups, spec["model_path"], train, loss)
        if arm == "ds_local":
            result = train_stage_local("align", groups, spec["model_path"], stage_dir, train, loss)
        else:
            import ray

            workers = int(arm.split("_")[1])
            # Ray runs workers at niceness 15; under load from other processes that alone would slow them.
            os.environ["RAY_worker_niceness"] = "0"
            ray.init(num_cpus=spec["threads"] * workers + 1, include_dashboard=False, log_to_driver=False)
            train.num_workers = workers
            result = train_stage("align", groups, spec["model_path"], stage_dir, train, loss)
            ray.shutdown()
    return {"history": result.history, "peak_rss_mb": result.metrics["peak_rss_mb"]}


def cpu_benchmark(args) -> dict:
    from aftray.config import ModelConfig, TinyModelConfig
    from aftray.models import load_tokenizer, resolve_model_path

    if args.model == "tiny":  # a ~11M-parameter random Llama with the char tokenizer
        cfg = ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(
            hidden_size=384, num_layers=6, seed=0))
    else:
        cfg = ModelConfig(name_or_path=args.model)
    model_path = str(resolve_model_path(cfg))
    vocab = len(load_tokenizer(model_path))
    spec = {"model_path": model_path, "loss": "aft_bc", "threads": args.threads,
            "groups": make_groups(args.questions, args.k, args.prompt_len, args.cot_len, vocab),
            "train": {"lr": 1e-5, "warmup_steps": 1, "steps_per_stage": args.steps, "max_seq_len": 512,
                      "questions_per_step": args.questions_per_step, "micro_batch_questions": 2, "zero_stage": 2}}
    runs = {arm: [] for arm in args.arms}
    for rep in range(args.repeats):
        for arm in args.arms:
            res = run_in_child(arm, spec)
            tokens_per_s, tokens_per_cpu_s = throughput(res["history"])
            runs[arm].append({"tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_cpu_s,
                              "peak_rss_mb_per_worker": res["peak_rss_mb"], "load_avg_1m": os.getloadavg()[0]})
            print(f"{arm:9s} {tokens_per_s:8.1f} tokens/s {tokens_per_cpu_s:8.1f} tokens/CPU-s  peak RSS/worker "
                  f"{', '.join(f'{m:.0f}' for m in res['peak_rss_mb'])} MB  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    out = {arm: {"tokens_per_s": max(r["tokens_per_s"] for r in rs),
                 "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
                 "peak_rss_mb_per_worker": rs[0]["peak_rss_mb_per_worker"], "runs": rs} for arm, rs in runs.items()}
    ratios = {}  # wall: of the best runs; CPU: of the medians
    for name, a, b in [("ray_1_over_plain", "ray_1", "plain"), ("ray_2_over_ray_1", "ray_2", "ray_1"),
                       ("ds_local_over_plain", "ds_local", "plain")]:
        if a in out and b in out:
            ratios[name] = {unit: out[a][unit] / out[b][unit] for unit in ("tokens_per_s", "tokens_per_cpu_s")}
    print(json.dumps(ratios))
    return {"model": args.model, "model_path": model_path, "arms": out, "ratios": ratios,
            "settings": {k: v for k, v in spec.items() if k != "groups"} | {
                "questions": args.questions, "k": args.k, "prompt_len": args.prompt_len, "cot_len": args.cot_len},
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "platform": platform.platform()}}


def preset_groups(path: Path, n: int = 32) -> list[dict]:
    """The default preset's round-1 groups: `make run`'s round-1 samples when they exist, else made from its task
    (see the module docstring)."""
    from aftray.train.worker import load_groups

    if path.exists():
        return load_groups(path)[:n]
    from aftray.config import load_config
    from aftray.models import load_tokenizer, resolve_model_path
    from aftray.rollout import question_rows
    from aftray.tasks import load_task

    cfg = load_config(PRESET)
    task = load_task(cfg.task)
    rows = question_rows(task.train[:n + cfg.rollout.k], task, load_tokenizer(resolve_model_path(cfg.model)))
    k = cfg.rollout.k
    return [bench_group(r["id"], r["prompt_ids"], r["ref_cot_ids"],
                        [rows[i + j]["ref_cot_ids"] for j in range(k)], [j == 0 for j in range(k)])
            for i, r in enumerate(rows[:n])]


def max_score_diff(groups: list[dict], model_path: str, max_seq_len: int) -> float:
    """max |S_shared - S_unshared| over every sequence of the groups (fp32, no gradient)."""
    import torch

    from aftray.models import load_model
    from aftray.train.scores import collate_groups, sequence_logps

    model = load_model(model_path, "fp32").eval()
    with torch.no_grad():
        plain, shared = (sequence_logps(model, collate_groups(groups, max_seq_len, shared_prefix=flag))
                         for flag in (False, True))
    return float((plain - shared).abs().max())


def shared_prefix_compare(args) -> dict:
    from aftray.config import load_config
    from aftray.models import resolve_model_path

    cfg = load_config(PRESET)
    model_path = str(resolve_model_path(cfg.model))
    groups = preset_groups(Path(args.groups))
    t = cfg.train
    train = {"lr": t.lr, "warmup_steps": 1, "steps_per_stage": args.steps, "max_seq_len": t.max_seq_len,
             "questions_per_step": t.questions_per_step, "micro_batch_questions": t.micro_batch_questions}
    arms = {"unshared_fp32": {"layout": "padded", "dtype": "fp32"},
            "shared_fp32": {"layout": "shared_prefix", "dtype": "fp32"},
            "shared_amp_bf16": {"layout": "shared_prefix", "dtype": "amp_bf16"}}
    runs = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm, flags in arms.items():
            spec = {"model_path": model_path, "loss": cfg.loss.name, "threads": args.threads, "groups": groups,
                    "train": {**train, **flags}}
            res = run_in_child("ds_local", spec)
            tokens_per_s, tokens_per_cpu_s = throughput(res["history"])
            runs[arm].append({"tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_cpu_s,
                              "loss": [h["loss"] for h in res["history"]],
                              "forward_tokens": sum(h["forward_tokens"] for h in res["history"]),
                              "tokens": sum(h["tokens"] for h in res["history"]), "load_avg_1m": os.getloadavg()[0]})
            print(f"{arm:16s} {tokens_per_s:7.1f} tokens/s {tokens_per_cpu_s:7.1f} tokens/CPU-s  loss "
                  f"{' '.join(f'{x:.4f}' for x in runs[arm][-1]['loss'])}", flush=True)
    best = {arm: max(rs, key=lambda r: r["tokens_per_s"]) for arm, rs in runs.items()}
    diff = max_score_diff(groups[:8], model_path, t.max_seq_len)
    loss_gap = lambda a, b: max(abs(x - y) for x, y in zip(best[a]["loss"], best[b]["loss"]))  # noqa: E731
    line = {"shared_over_unshared": best["shared_fp32"]["tokens_per_s"] / best["unshared_fp32"]["tokens_per_s"],
            "max_abs_score_diff": diff,
            "bf16_over_fp32": best["shared_amp_bf16"]["tokens_per_s"] / best["shared_fp32"]["tokens_per_s"],
            "shared_bf16_over_unshared_fp32":
                best["shared_amp_bf16"]["tokens_per_s"] / best["unshared_fp32"]["tokens_per_s"],
            "max_abs_loss_diff_shared": loss_gap("shared_fp32", "unshared_fp32"),
            "max_abs_loss_diff_bf16": loss_gap("shared_amp_bf16", "shared_fp32")}
    out = {**line, "arms": runs, "groups": args.groups if Path(args.groups).exists() else "made from the preset",
           "num_groups": len(groups), "train": train, "threads": args.threads, "model_path": model_path,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **cpu_info()}}
    (RESULTS / "train_shared_prefix.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(line))
    return out


def scoring_compare(args) -> dict:
    import dataclasses

    import torch

    from aftray.config import load_config
    from aftray.models import load_model, resolve_model_path
    from aftray.train.losses import OBJECTIVES
    from aftray.train.scores import _model_inputs, collate_groups, scored_batch, token_logps

    def every_position(model, batch):  # the baseline: the logits of every position, then the scored ones
        logits = model(**_model_inputs(model, batch), use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[batch.logit_index].float()
        return logits.gather(-1, batch.labels[:, None]).squeeze(-1) - logits.logsumexp(-1)

    def dense_mask(model, batch):  # without its blocks, a batch is attended under its 4D mask alone
        return token_logps(model, dataclasses.replace(batch, blocks=None))

    torch.set_num_threads(args.threads)
    cfg = load_config(PRESET)
    model_path = str(resolve_model_path(cfg.model))
    groups = preset_groups(Path(args.groups), n=args.questions)
    model = load_model(model_path, "fp32").train()
    per = cfg.train.micro_batch_questions
    batches = [collate_groups(groups[i:i + per], cfg.train.max_seq_len, shared_prefix=True)
               for i in range(0, len(groups), per)]
    arms = {"every_position": every_position, "scored": dense_mask, "scored_tree": token_logps}
    seconds, logps, grads = {arm: [] for arm in arms}, {}, {}
    for _ in range(args.repeats):
        for arm, logps_of in arms.items():
            model.zero_grad(set_to_none=True)
            start, out = time.perf_counter(), []
            for batch in batches:
                token_logp = logps_of(model, batch)
                OBJECTIVES[cfg.loss.name](cfg.loss, scored_batch(batch, token_logp))[0].backward()
                out.append(token_logp.detach())
            seconds[arm].append(time.perf_counter() - start)
            logps[arm] = torch.cat(out)
            grads[arm] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            print(f"{arm:16s} {seconds[arm][-1]:6.2f} s", flush=True)
    best = {arm: min(ts) for arm, ts in seconds.items()}
    base = grads["every_position"]
    line = {"scored_over_every_position": best["every_position"] / best["scored"],
            "tree_over_dense": best["scored"] / best["scored_tree"],
            "now_over_before": best["every_position"] / best["scored_tree"],
            "max_abs_logp_diff": max(float((logps[arm] - logps["every_position"]).abs().max()) for arm in arms),
            "max_grad_rel_diff": max(float((grads[arm] - base).norm() / base.norm()) for arm in arms)}
    out = {**line, "seconds": seconds, "num_groups": len(groups), "micro_batches": len(batches),
           "forward_tokens": sum(b.forward_tokens for b in batches),
           "scored_positions": sum(len(b.labels) for b in batches),
           "groups": args.groups if Path(args.groups).exists() else "made from the preset",
           "threads": args.threads, "model_path": model_path,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **cpu_info(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    (RESULTS / "train_scoring.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(line))
    return out


def cpu_info() -> dict:
    """The CPU's model name and whether it has the bf16 matrix instructions (AMX) or dot products (AVX512)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:40])}
    flags = field.get("flags", "").split()
    return {"cpu": field.get("model name", platform.processor()), **{f: f in flags for f in ("amx_bf16", "avx512_bf16")}}


def run_in_child(arm: str, spec: dict) -> dict:
    """`run_arm` in a fresh process (DeepSpeed keeps the first process group it saw; peak RSS is the arm's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, __file__, "--arm", arm, str(spec_path), str(out_path)], check=True)
        return json.loads(out_path.read_text())


def gpu_benchmark(args) -> dict:
    """DeepSpeed bf16 ZeRO-2 on a ~1.1B Llama without Ray; a torchrun rank or a lone process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aftray.config import LossConfig, TrainConfig
    from aftray.models import build_tiny_tokenizer, cache_dir

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    path = cache_dir() / "bench-llama-1.1b"
    if int(os.environ.get("RANK", 0)) == 0 and not (path / "config.json").is_file():
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        build_tiny_tokenizer().save_pretrained(path)  # only its pad id is used: the rows hold token ids
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("nccl")  # wait for rank 0's save; the train loop reuses this group
        dist.barrier()
    groups = make_groups(args.questions, args.k, args.prompt_len, args.cot_len, config.vocab_size)
    train = TrainConfig(lr=1e-5, warmup_steps=1, steps_per_stage=args.steps, max_seq_len=2048, zero_stage=2,
                        questions_per_step=args.questions_per_step, micro_batch_questions=args.micro_batch_questions,
                        dtype="bf16", seed=0, layout="packed")  # the layout the MFU count below assumes
    with tempfile.TemporaryDirectory() as stage_dir:
        result = train_stage_local("align", groups, path, stage_dir, train, LossConfig(name="aft_bc"))
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    matmul_params = params - config.vocab_size * config.hidden_size  # the input embedding is a lookup
    tokens_per_s, _ = throughput(result.history)
    seq = args.prompt_len + args.cot_len  # PaLM's count: 6N + 12·layers·hidden·seq (attention scores)
    flops_per_token = 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq
    gpus = int(os.environ.get("WORLD_SIZE", 1))
    mfu = flops_per_token * tokens_per_s / (args.peak_tflops * 1e12 * gpus)
    out = {"params": params, "gpus": gpus, "device": torch.cuda.get_device_name(), "tokens_per_s": tokens_per_s,
           "mfu": mfu, "peak_tflops_per_gpu": args.peak_tflops, "peak_rss_mb_per_worker": result.metrics["peak_rss_mb"],
           "max_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(out, indent=1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="DeepSpeed bf16 ZeRO-2 on a ~1.1B Llama, without Ray")
    p.add_argument("--model", default="tiny", help="CPU: 'tiny' (a ~11M random Llama), a folder or a hub id")
    p.add_argument("--arms", nargs="+", default=["plain", "ds_local", "ray_1", "ray_2"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None, help="runs per arm, interleaved; the best one counts "
                   "(default 3; --shared-prefix-compare: 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process / worker (default 1; "
                   "--shared-prefix-compare: 2)")
    p.add_argument("--questions", type=int, default=None, help="default 64 (--scoring-compare: 16)")
    p.add_argument("--questions-per-step", type=int, default=None, help="default: CPU 4, GPU 16")
    p.add_argument("--micro-batch-questions", type=int, default=4, help="GPU only (CPU: 2)")
    p.add_argument("--k", type=int, default=None, help="sampled COTs per question (default: CPU 3, GPU 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: CPU 48, GPU 256")
    p.add_argument("--cot-len", type=int, default=None, help="default: CPU 64, GPU 384")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--shared-prefix-compare", action="store_true",
                   help="the default preset's groups: shared-prefix against unshared, amp_bf16 against fp32")
    p.add_argument("--scoring-compare", action="store_true",
                   help="the default preset's groups: the trainer's scoring pass before and after session 19")
    p.add_argument("--groups", default=str(REPO / "runs/words_cpu/rounds/1/samples.parquet"),
                   help="--shared-prefix-compare, --scoring-compare: a round's samples.parquet (else made "
                        "from the preset)")
    p.add_argument("--arm", nargs=3, help=argparse.SUPPRESS)  # internal: ARM SPEC_JSON OUT_JSON
    args = p.parse_args()
    if args.arm:
        arm, spec_path, out_path = args.arm
        Path(out_path).write_text(json.dumps(run_arm(arm, json.loads(Path(spec_path).read_text()))))
        return
    if args.shared_prefix_compare:
        RESULTS.mkdir(exist_ok=True)
        args.repeats, args.threads = args.repeats or 2, args.threads or 2  # the preset's worker: 2 CPUs
        shared_prefix_compare(args)
        return
    if args.scoring_compare:
        RESULTS.mkdir(exist_ok=True)
        args.repeats, args.threads, args.questions = args.repeats or 3, args.threads or 2, args.questions or 16
        scoring_compare(args)
        return
    gpu = args.gpu
    args.repeats, args.threads, args.questions = args.repeats or 3, args.threads or 1, args.questions or 64
    for name, cpu_default, gpu_default in [("questions_per_step", 4, 16), ("k", 3, 4), ("prompt_len", 48, 256),
                                           ("cot_len", 64, 384)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    result = gpu_benchmark(args) if gpu else cpu_benchmark(args)
    if int(os.environ.get("RANK", 0)) == 0:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / ("train_gpu.json" if gpu else "train.json")
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
