"""Where a SmolLM2 comparison's compute goes on this host, and how fast its matrix products run.

The comparison's arm runs are greedy evaluation (vLLM) and training steps (torch), both compute-bound in fp32 on
2 cores (docs/benchmarks.md). This script says by how much, on the host it runs on:
- matmul: the rate (GFLOP/s) of fp32 matrix products at SmolLM2-135M's shapes (its projections and LM head, 64
  to 1,024 rows), as the trainer runs them (torch's `linear`: MKL), through torch's own oneDNN linear (dense
  weight, as a trainer could call it) and as vLLM runs them (its oneDNN `onednn_mm` on a prepacked weight),
  same inputs, same process;
- greedy: vLLM's greedy decoding of the comparison's held-out questions (configs/words_compare.yaml, in-process
  engine, 2 threads) under torch's profiler: seconds, tokens, and each op's share of the CPU time;
- train: the trainer's forward + backward of the preset's loss over round-1 micro-batches (shared-prefix layout,
  block-wise attention, as `aftray.train.worker` runs them) under the profiler: the same shares.
An op's share is its self CPU time over the profiled total; GFLOP/s of a phase are its matrix products' FLOPs
over their time. On a host with AVX512 where torch's products run far below vLLM's, the trainer's fp32
products are the lever (docs/benchmarks.md, "Where the time goes"). Writes benchmarks/results/compute_profile.json.

    .venv/bin/python benchmarks/compute_profile.py [--questions 64] [--groups runs/X/rounds/1/samples.parquet]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from train import RESULTS, cpu_info, preset_groups  # benchmarks/train.py, beside this script

PRESET = Path(__file__).resolve().parents[1] / "configs" / "words_compare.yaml"
# SmolLM2-135M: hidden 576, MLP 1536, 9 query and 3 key/value heads of 64, vocabulary 49,152
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_rates(repeats: int) -> dict:
    """GFLOP/s of y = x W^T per shape and row count: torch (MKL), torch's oneDNN linear and vLLM's oneDNN op,
    with the largest difference of an output from torch's."""
    from vllm import _custom_ops as ops

    out = {}
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        handler = ops.create_onednn_mm(weight.t(), 32)
        for m in (64, 256, 1024):
            x = torch.randn(m, k)
            flops = 2 * m * n * k
            runs = {"torch": lambda x=x, w=weight: torch.nn.functional.linear(x, w),
                    "torch_onednn": lambda x=x, w=weight: torch.ops.mkldnn._linear_pointwise(x, w, None, "none",
                                                                                             [], ""),
                    "vllm_onednn": lambda x=x, h=handler: ops.onednn_mm(h, x, None)}
            seconds = {arm: _seconds(fn, repeats) for arm, fn in runs.items()}
            row = {f"{arm}_gflops": round(flops / s / 1e9, 1) for arm, s in seconds.items()}
            row["vllm_onednn_over_torch"] = round(seconds["torch"] / seconds["vllm_onednn"], 2)
            row["max_abs_diff"] = max(float((fn() - runs["torch"]()).abs().max()) for fn in runs.values())
            out[f"{name}_m{m}"] = row
            print(name, m, out[f"{name}_m{m}"], flush=True)
    return out


def shares(prof, top: int = 8) -> dict:
    """Each of the top ops' share of the profiled self CPU time, and the rest."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    out = {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:top]}
    return {**out, "rest": round(1 - sum(out.values()), 3), "profiled_cpu_s": round(total / 1e6, 2)}


def greedy_profile(questions: int) -> dict:
    from aftray.config import load_config
    from aftray.models import load_tokenizer, resolve_model_path
    from aftray.rollout import SamplingParams, question_rows
    from aftray.rollout.pool import make_engine
    from aftray.tasks import load_task

    cfg = load_config(PRESET)
    path = resolve_model_path(cfg.model)
    task = load_task(replace(cfg.task, num_test=questions))
    prompts = [r["prompt_ids"] for r in question_rows(task.test, task, load_tokenizer(path))]
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    rollout = replace(cfg.rollout, resources_per_actor={"CPU": 2}, vllm=replace(cfg.rollout.vllm, cpu_cores=cores))
    engine = make_engine("vllm", path, rollout)
    try:
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=rollout.max_new_tokens, seed=0, logprobs=False)
        engine.generate(prompts[:1], replace(greedy, max_new_tokens=2))  # first forward pass
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            outputs = engine.generate(prompts, greedy)
            seconds = time.perf_counter() - start
    finally:
        engine.close()
    tokens = sum(len(out[0].token_ids) for out in outputs)
    print(f"greedy: {len(prompts)} questions, {tokens} tokens, {seconds:.1f} s", flush=True)
    return {"questions": len(prompts), "tokens": tokens, "seconds": round(seconds, 2), "op_shares": shares(prof)}


def train_profile(groups_path: Path, questions: int) -> dict:
    from aftray.config import load_config
    from aftray.models import load_model, resolve_model_path
    from aftray.train.losses import OBJECTIVES
    from aftray.train.scores import collate_groups, scored_batch, token_logps

    cfg = load_config(PRESET)
    model = load_model(str(resolve_model_path(cfg.model)), "fp32").train()
    groups = preset_groups(groups_path, n=questions)
    per = cfg.train.micro_batch_questions
    batches = [collate_groups(groups[i:i + per], cfg.train.max_seq_len, shared_prefix=True)
               for i in range(0, len(groups), per)]

    def passes(todo):
        for batch in todo:
            OBJECTIVES[cfg.loss.name](cfg.loss, scored_batch(batch, token_logps(model, batch)))[0].backward()

    passes(batches[:1])  # first pass: allocations
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        passes(batches)
        seconds = time.perf_counter() - start
    mm = [e for e in prof.key_averages() if e.key == "aten::mm"]
    gflops = mm[0].flops / mm[0].self_cpu_time_total / 1e3 if mm and mm[0].self_cpu_time_total else None
    print(f"train: {len(batches)} micro-batches, {seconds:.1f} s, aten::mm at {gflops} GFLOP/s", flush=True)
    return {"groups": len(groups), "micro_batches": len(batches),
            "forward_tokens": sum(b.forward_tokens for b in batches), "seconds": round(seconds, 2),
            "mm_gflops": None if gflops is None else round(gflops, 1), "op_shares": shares(prof)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=64, help="held-out questions decoded greedily")
    parser.add_argument("--train-questions", type=int, default=8, help="round-1 groups trained on")
    parser.add_argument("--groups", default=str(RESULTS.parents[1] / "runs/words_cpu/rounds/1/samples.parquet"),
                        help="a round's samples.parquet (else groups made from the default preset)")
    parser.add_argument("--repeats", type=int, default=20, help="products timed per shape")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"machine": {**cpu_info(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "cpus": len(os.sched_getaffinity(0))},
              "matmul": matmul_rates(args.repeats),
              "greedy": greedy_profile(args.questions),
              "train": train_profile(Path(args.groups), args.train_questions)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compute_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"greedy_shares": result["greedy"]["op_shares"], "train_shares": result["train"]["op_shares"],
                      "train_mm_gflops": result["train"]["mm_gflops"]}))


if __name__ == "__main__":
    main()
