"""Train-stage throughput and memory: Ray Train + DeepSpeed against a plain PyTorch loop, same model/data/batch.

CPU (default) runs each arm in a fresh process, so each peak RSS is its own; every process or worker gets
--threads threads (default 1: on a shared machine, OpenMP threads that wait on a preempted sibling burn CPU):
  plain     a hand-written PyTorch loop in one process (AdamW, clipping, the same micro-batches and loss)
  ds_local  the aftray loop under DeepSpeed without Ray (`train_stage_local`), one process
  ray_1     Ray Train + DeepSpeed, 1 worker
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

Usage: python benchmarks/train.py [--model tiny|PATH|HUB_ID] [--steps 5] [--threads 1] [--gpu]
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


def make_groups(n: int, k: int, prompt_len: int, cot_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random-token group rows (docs/internals.md); lengths vary +-25% so padding is realistic."""
    rng = random.Random(seed)

    def tokens(length):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(length * 3 // 4, length * 5 // 4))]

    from aftray.rows import group_row

    correct = [j % 2 == 0 for j in range(k)]
    return [group_row(id=f"q{i:05d}", prompt="", prompt_ids=tokens(prompt_len), answer="", ref_cot="",
                      ref_cot_ids=tokens(cot_len), cots=[""] * k, cot_ids=[tokens(cot_len) for _ in range(k)],
                      sample_logp=[-1.5 * cot_len] * k, sample_token_logp=[[]] * k,
                      finish_reasons=["stop"] * k, pred=[""] * k,
                      labels=["correct" if c else "wrong_answer" for c in correct], correct=correct,
                      process=[1.0] * k, rank=[1 + j % 2 for j in range(k)], counts=[1] * k, num_sampled=k,
                      weights_version=0)
            for i in range(n)]


def throughput(history: list[dict]) -> tuple[float, float]:
    """Over steps 2..N: tokens per wall second (from the steps' end timestamps) and per CPU second of the
    training processes (all workers)."""
    tokens = sum(h["tokens"] for h in history[1:])
    return (tokens / (history[-1]["timestamp"] - history[0]["timestamp"]),
            tokens / sum(h["cpu_s"] for h in history[1:]))


def plain_loop(groups, model_path, train, loss_cfg) -> dict:
    """The baseline: the same batches, loss and optimizer as the aftray loop, nothing else."""
    import torch

    from aftray.models import load_model, load_tokenizer
    from aftray.train.deepspeed_config import ADAM_BETAS
    from aftray.train.losses import OBJECTIVES, sequences_needed
    from aftray.train.scores import collate_groups, score_groups
    from aftray.train.worker import lr_at, num_tokens, step_groups

    torch.set_num_threads(int(train.cpus_per_worker))
    pad_id = load_tokenizer(model_path).pad_token_id
    model = load_model(model_path, train.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay)
    objective, (with_ref, with_samples) = OBJECTIVES[loss_cfg.name], sequences_needed(loss_cfg)
    groups = sorted(groups, key=lambda g: g["id"])
    accum = -(-train.questions_per_step // train.micro_batch_questions)
    history = []
    for step in range(train.steps_per_stage):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train.steps_per_stage, train)
        mine, tokens, cpu0 = step_groups(groups, step, train.questions_per_step, train.seed), 0, time.process_time()
        for i in range(accum):
            rows = mine[i * len(mine) // accum:(i + 1) * len(mine) // accum]
            batch = collate_groups(rows, train.max_seq_len, train.packing, with_ref, with_samples, pad_id)
            loss, _ = objective(loss_cfg, score_groups(model, batch))
            (loss * len(rows) / len(mine)).backward()
            tokens += num_tokens(batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "tokens": tokens, "timestamp": time.time(),
                        "cpu_s": time.process_time() - cpu0})
    return {"history": history, "peak_rss_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]}


def run_arm(arm: str, spec: dict) -> dict:
    """One arm, in this process (called in a child process by `main`)."""
    from aftray.config import LossConfig, TrainConfig
    from aftray.train.service import train_stage
    from aftray.train.worker import train_stage_local

    groups, loss = spec["groups"], LossConfig(name=spec["loss"])
    train = TrainConfig(**spec["train"], cpus_per_worker=spec["threads"])
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
            hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024, max_position_embeddings=512))
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
            with tempfile.TemporaryDirectory() as tmp:
                spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
                spec_path.write_text(json.dumps(spec))
                subprocess.run([sys.executable, __file__, "--arm", arm, str(spec_path), str(out_path)], check=True)
                res = json.loads(out_path.read_text())
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


def gpu_benchmark(args) -> dict:
    """DeepSpeed bf16 ZeRO-2 on a ~1.1B Llama without Ray; a torchrun rank or a lone process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aftray.config import LossConfig, TrainConfig
    from aftray.models import build_tiny_tokenizer, cache_dir
    from aftray.train.worker import train_stage_local

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
                        dtype="bf16", packing=True)
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
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, interleaved; the best one counts")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process / worker")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--questions-per-step", type=int, default=None, help="default: CPU 4, GPU 16")
    p.add_argument("--micro-batch-questions", type=int, default=4, help="GPU only (CPU: 2)")
    p.add_argument("--k", type=int, default=None, help="sampled COTs per question (default: CPU 3, GPU 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: CPU 48, GPU 256")
    p.add_argument("--cot-len", type=int, default=None, help="default: CPU 64, GPU 384")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--arm", nargs=3, help=argparse.SUPPRESS)  # internal: ARM SPEC_JSON OUT_JSON
    args = p.parse_args()
    if args.arm:
        arm, spec_path, out_path = args.arm
        Path(out_path).write_text(json.dumps(run_arm(arm, json.loads(Path(spec_path).read_text()))))
        return
    gpu = args.gpu
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
