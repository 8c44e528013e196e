"""Rollout speed: generated tokens/s of the Ray pool vs the same engine in-process, actors x threads, the cost
of per-question determinism, and weight-refresh seconds. Prints and writes benchmarks/results/rollout.json.

The pool and the in-process engine get the same prompts in the same batches with the same per-question seeds,
so they sample the same COTs and their throughputs compare like for like. On a shared machine, measurements
are repeated (`--repeats`), alternating pool and in-process, and medians are reported.

    .venv/bin/python benchmarks/rollout.py [--questions 6] [--k 4] [--max-new-tokens 32] [--batch-size 3]
        [--repeats 3]
"""
import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from aftray.config import ModelConfig, RolloutConfig, TaskConfig, VerifyConfig
from aftray.models import load_model, load_tokenizer, resolve_model_path
from aftray.rollout import RolloutPool, SamplingParams, derive_seed, make_engine, question_rows
from aftray.rollout.hf_engine import BUCKET
from aftray.tasks import load_task

ROUND = 1
OUT = Path(__file__).parent / "results" / "rollout.json"


def in_process(engine, batches: list[list[dict]], params: SamplingParams, one_by_one: bool = False
               ) -> tuple[int, float]:
    """(generated tokens, seconds) for the batches the pool would send, seeded exactly as the pool seeds
    them; `one_by_one`: one `generate` call per question instead."""
    tokens, start = 0, time.perf_counter()
    for rows in batches:
        seeded = [replace(params, seed=derive_seed(params.seed, ROUND, r["id"])) for r in rows]
        if one_by_one:
            outs = [engine.generate([r["prompt_ids"]], [p])[0] for r, p in zip(rows, seeded, strict=True)]
        else:
            outs = engine.generate([r["prompt_ids"] for r in rows], seeded)
        tokens += sum(len(c.token_ids) for cs in outs for c in cs)
    return tokens, time.perf_counter() - start


def padded_batch(engine, batches: list[list[dict]], params: SamplingParams) -> tuple[int, float]:
    """The alternative the HF engine does not take: each batch in one `generate` call padded to its longest
    prompt (a question's COTs then depend on which questions share its batch)."""
    tok = engine.tokenizer
    tokens, start = 0, time.perf_counter()
    torch.manual_seed(params.seed)
    for rows in batches:
        prompts = [r["prompt_ids"] for r in rows for _ in range(params.n)]
        width = max(map(len, prompts))
        x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = engine.model.generate(input_ids=x, attention_mask=mask, do_sample=True, top_k=0,
                                        temperature=params.temperature, top_p=params.top_p,
                                        max_new_tokens=params.max_new_tokens, eos_token_id=engine.eos,
                                        pad_token_id=tok.pad_token_id)
        tokens += sum(next((i + 1 for i, t in enumerate(row) if t in engine.eos), len(row))
                      for row in out[:, width:].tolist())
    return tokens, time.perf_counter() - start


def pool_round(pool: RolloutPool, rows: list[dict], params: SamplingParams, answer_kind: str
               ) -> tuple[int, float, float]:
    """(generated tokens, wall seconds, engine busy seconds) of one streamed round, Ray Data and verify in."""
    before = pool.metrics(ROUND)
    start = time.perf_counter()
    pool.generate_groups(ray.data.from_items(rows), ROUND, VerifyConfig(process="arith"), answer_kind,
                         params).materialize()
    seconds = time.perf_counter() - start
    after = pool.metrics(ROUND)
    return (after["rollout_tokens"] - before.get("rollout_tokens", 0), seconds,
            after["time_engine_s"] - before.get("time_engine_s", 0.0))


def rate(runs: list[tuple]) -> dict:
    """Median tokens/s of (tokens, seconds, ...) runs, and every run's."""
    per_run = [t / s for t, s, *_ in runs]
    return {"tokens": runs[0][0], "tokens_per_s": round(statistics.median(per_run), 2),
            "all_tokens_per_s": [round(r, 2) for r in per_run]}


def paired(runs: list[tuple], baseline: list[tuple]) -> float:
    """Median over repeats of tokens/s relative to the baseline run of the same repeat (load drifts)."""
    return round(statistics.median((t / s) / (bt / bs) for (t, s, *_), (bt, bs, *_) in
                                   zip(runs, baseline, strict=True)), 3)


def warm(pool: RolloutPool, rows: list[dict], params: SamplingParams, answer_kind: str) -> None:
    """Start Ray Data's worker processes and the engine's first forward pass outside the timings."""
    pool.generate_groups(ray.data.from_items(rows[:2]), 0, VerifyConfig(process="none"), answer_kind,
                         replace(params, max_new_tokens=2)).materialize()


def refresh_seconds(model: ModelConfig, cfg: RolloutConfig, repeats: int) -> dict:
    """Seconds to refresh one engine in place: from a checkpoint folder, and from a state dict (object store,
    the put included)."""
    path = resolve_model_path(model)
    state = {n: p.detach() for n, p in load_model(path).named_parameters()}
    pool = RolloutPool(replace(cfg, num_actors=1), path)
    try:
        version, folder, store = 0, [], []
        for _ in range(repeats):
            version += 1
            folder.append(pool.refresh(path, version))
            version += 1
            store.append(pool.refresh(state, version))
        return {"checkpoint_folder_s": round(statistics.median(folder), 3),
                "object_store_s": round(statistics.median(store), 3),
                "params_millions": round(sum(t.numel() for t in state.values()) / 1e6, 1)}
    finally:
        pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=3)  # questions per pool batch
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    # Ray runs its workers at niceness 15; on a machine shared with other jobs the engine actor would then
    # lose CPU to them while the in-process engine (the driver, niceness 0) would not. Same priority for both.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config={"worker_niceness": 0})
    ray.data.DataContext.get_current().enable_progress_bars = False

    smol = ModelConfig()
    path = resolve_model_path(smol)
    task = load_task(TaskConfig(name="gsm8k", num_test=args.questions))
    rows = question_rows(task.test, task, load_tokenizer(path))
    cfg = RolloutConfig(k=args.k, temperature=0.8, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, threads_per_actor=1)
    params = SamplingParams.from_config(cfg)
    results: dict = {"setup": {"model": smol.name_or_path, "task": "gsm8k test", "questions": len(rows),
                               "k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": 0.8,
                               "batch_size": cfg.batch_size, "repeats": args.repeats,
                               "ray_worker_niceness": 0}}

    # 1. the Ray pool (1 actor x 1 thread) vs the same engine in this process (1 thread); 2. the cost of
    # determinism: the engine's width buckets and one generate call per question vs one padded batch of all
    # questions. Run alternately, so that load from other processes on the machine falls on all alike.
    engine = make_engine("hf", path, cfg)
    pool = RolloutPool(replace(cfg, num_actors=1), path)
    warm(pool, rows, params, task.answer_kind)
    batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]  # as the pool cuts
    in_process(engine, [rows[:1]], replace(params, max_new_tokens=2))
    local, pooled, batched, single = [], [], [], []
    for _ in range(args.repeats):
        local.append(in_process(engine, batches, params))
        pooled.append(pool_round(pool, rows, params, task.answer_kind))
        batched.append(padded_batch(engine, batches, params))
        single.append(in_process(engine, batches, params, one_by_one=True))
    assert {t for t, _ in local} == {t for t, *_ in pooled}, "pool and in-process sampled different COTs"
    pool.shutdown()
    results["pool_vs_in_process"] = {
        "in_process_1_thread": rate(local), "pool_1_actor_1_thread": rate(pooled),
        "ratio": paired(pooled, local),
        "target_ratio": 0.9,
        # where the pool's time goes: Ray Data, router and verify (wall - engine busy) vs the engine itself
        "pool_overhead_s": round(statistics.median(s - e for _, s, e in pooled), 3),
        "engine_in_actor_tokens_per_s": round(statistics.median(t / e for t, _, e in pooled), 2)}
    results["determinism_cost"] = {
        "width_buckets": rate(local), "one_call_per_question": rate(single),
        "one_padded_batch": rate(batched),
        "padded_widths_per_batch": [sorted({-(-len(r["prompt_ids"]) // BUCKET) * BUCKET for r in b})
                                    for b in batches],
        # tokens/s relative to the padded batch (which is not deterministic per question)
        "ratio_width_buckets": paired(local, batched), "ratio_one_call_per_question": paired(single, batched)}
    del engine

    # 3. two actors x one thread vs one actor x two threads, on os.cpu_count() cores; 4 questions, one per
    # batch, so both actors get work
    few = rows[:4]
    layouts = {"2_actors_x_1_thread": replace(cfg, num_actors=2, threads_per_actor=1, cpus_per_actor=1),
               "1_actor_x_2_threads": replace(cfg, num_actors=1, threads_per_actor=2, cpus_per_actor=2)}
    results["actors_x_threads"] = {"questions": len(few)}
    for name, layout in layouts.items():
        pool = RolloutPool(replace(layout, batch_size=1), path)
        warm(pool, few, params, task.answer_kind)
        results["actors_x_threads"][name] = rate([pool_round(pool, few, params, task.answer_kind)
                                                  for _ in range(args.repeats)])
        pool.shutdown()

    # 4. weight refresh, in place
    results["refresh"] = {"smollm2_135m": refresh_seconds(smol, cfg, 3),
                          "tiny": refresh_seconds(ModelConfig(name_or_path="tiny"), cfg, 3),
                          "target_smollm2_s": 1.5}
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_start": load_start,
                          "load_avg_end": os.getloadavg(), "python": platform.python_version(),
                          "torch": torch.__version__, "ray": ray.__version__, "device": "cpu"}
    ray.shutdown()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
