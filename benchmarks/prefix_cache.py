"""vLLM's KV-cache block size on CPU: 32 tokens (aftray's CPU default, `rollout.vllm.block_size`) against vLLM's own
CPU default of 128, on the SmolLM2 comparison's prompts (configs/words_compare.yaml: SmolLM2-135M, 1-shot
arithmetic word problems; every prompt opens with the same 1-shot prefix, which the prefix cache can only reuse in
whole blocks: a 108-token prefix is 3 blocks of 32 and no block of 128).

Measures per block size, on the same questions: greedy evaluation (`--greedy-batch` prompts per engine call),
sampling (k COTs per question) and `score` (the held-out assessment: log-probs of sampled COTs), and checks that
both block sizes give the same tokens and the same scores. Engines run one after the other in this process (each
closed before the next starts), alternating over `--repeats`; ratios are medians of per-repeat ratios. Writes
benchmarks/results/prefix_cache.json.

    .venv/bin/python benchmarks/prefix_cache.py [--questions 256] [--greedy-batch 128] [--repeats 2]
"""
import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from aftray.config import load_config
from aftray.models import load_tokenizer, resolve_model_path
from aftray.rollout import SamplingParams, question_rows
from aftray.rollout.pool import make_engine
from aftray.tasks import load_task

OUT = Path(__file__).parent / "results" / "prefix_cache.json"
PRESET = Path(__file__).parents[1] / "configs" / "words_compare.yaml"


def measure(path, cfg, rows: list[dict], args) -> dict:
    """Seconds for greedy evaluation, sampling and scoring with one engine, and what they produced."""
    engine = make_engine("vllm", path, cfg)
    try:
        prompts = [r["prompt_ids"] for r in rows]
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=0)
        engine.generate(prompts[:1], replace(greedy, max_new_tokens=2))  # first forward pass
        start = time.perf_counter()
        greedy_ids = [list(out[0].token_ids) for i in range(0, len(prompts), args.greedy_batch)
                      for out in engine.generate(prompts[i:i + args.greedy_batch], greedy)]
        greedy_s = time.perf_counter() - start
        few = prompts[:args.sampled_questions]
        sampled = SamplingParams(n=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=1)
        start = time.perf_counter()
        cots = [list(c.token_ids) for out in engine.generate(few, sampled) for c in out]
        sample_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = engine.score([p for p in few for _ in range(cfg.k)], cots)
        score_s = time.perf_counter() - start
    finally:
        engine.close()
    return {"greedy_s": greedy_s, "greedy_tokens": sum(map(len, greedy_ids)), "sample_s": sample_s,
            "score_s": score_s, "outputs": (greedy_ids, cots, scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--greedy-batch", type=int, default=128)
    parser.add_argument("--sampled-questions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    preset = load_config(PRESET)
    path = resolve_model_path(preset.model)
    task = load_task(replace(preset.task, num_test=args.questions))
    rows = question_rows(task.test, task, load_tokenizer(path))
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:args.threads]))
    base = replace(preset.rollout, resources_per_actor={"CPU": args.threads},
                   vllm=replace(preset.rollout.vllm, cpu_cores=cores, kv_cache_gb=2))
    blocks = {"block_32": 32, "block_128": 128}
    runs: dict = {name: [] for name in blocks}
    for _ in range(args.repeats):
        for name, size in blocks.items():
            runs[name].append(measure(path, replace(base, vllm=replace(base.vllm, block_size=size)), rows, args))

    first = {name: r[0]["outputs"] for name, r in runs.items()}
    same = {part: first["block_32"][i] == first["block_128"][i] for i, part in enumerate(("greedy", "sampled"))}
    score_diff = max(abs(a - b) for a, b in zip(first["block_32"][2], first["block_128"][2]))
    results = {
        "setup": {"preset": PRESET.name, "model": preset.model.name_or_path, "questions": len(rows),
                  "greedy_batch": args.greedy_batch, "sampled_questions": args.sampled_questions, "k": base.k,
                  "max_new_tokens": base.max_new_tokens, "threads": args.threads, "repeats": args.repeats,
                  "mean_prompt_tokens": round(statistics.fmean(len(r["prompt_ids"]) for r in rows), 1),
                  "shared_prefix_tokens": len(os.path.commonprefix([r["prompt_ids"] for r in rows])),
                  "machine": platform.machine()},
        **{name: {k: [round(r[k], 2) for r in rs] for k in ("greedy_s", "sample_s", "score_s")}
           | {"greedy_tokens": rs[0]["greedy_tokens"]} for name, rs in runs.items()},
        "speedup_32_vs_128": {k: round(statistics.median(b[k] / a[k] for a, b in
                                                         zip(runs["block_32"], runs["block_128"])), 2)
                              for k in ("greedy_s", "sample_s", "score_s")},
        "same_tokens": same, "max_score_difference": score_diff,
    }
    print(json.dumps(results, indent=2))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
