"""Rollout speed on SmolLM2-135M: vLLM vs the HF engine, the Ray pool vs the same vLLM engine in-process, weight
refresh (through the pool, and in-process against vLLM's own reload alone), engine start-up, vLLM fp32 vs bf16
(speed and log-prob drift). Prints and writes
benchmarks/results/rollout.json.

Every comparison gets the same prompts, k and per-question seeds, so the engines sample like for like; runs
alternate and repeat (`--repeats`), and ratios are medians of per-repeat ratios, since load from other processes
on a shared machine drifts.

    .venv/bin/python benchmarks/rollout.py [--questions 16] [--k 4] [--max-new-tokens 128] [--repeats 3]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from aftray.config import ModelConfig, RolloutConfig, TaskConfig, VllmConfig
from aftray.models import load_model, load_tokenizer, resolve_model_path
from aftray.rollout import RolloutPool, SamplingParams, derive_seed, question_rows
from aftray.rollout.pool import make_engine
from aftray.rollout.vllm_engine import stage_checkpoint
from aftray.tasks import load_task
from aftray.weights import put_weights

ROUND = 1
OUT = Path(__file__).parent / "results" / "rollout.json"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def in_process(engine, batches: list[list[dict]], params: SamplingParams) -> tuple[int, float, list]:
    """(generated tokens, seconds, completions) for the batches the pool would send, seeded as the pool seeds."""
    outs, start = [], time.perf_counter()
    for rows in batches:
        seeded = [replace(params, seed=derive_seed(params.seed, ROUND, r["id"])) for r in rows]
        outs += engine.generate([r["prompt_ids"] for r in rows], seeded)
    return sum(len(c.token_ids) for cs in outs for c in cs), time.perf_counter() - start, outs


def pool_round(pool: RolloutPool, rows: list[dict], params: SamplingParams) -> tuple[int, float]:
    """(generated tokens, wall seconds) of one streamed round through Ray Data and the pool's actors."""
    start = time.perf_counter()
    done = pool.sample(ray.data.from_items(rows), ROUND, params).take_all()
    return sum(len(c["token_ids"]) for r in done for c in r["completions"]), time.perf_counter() - start


def token_logprobs(engine, prompt: list[int], cot: list[int]) -> list[float]:
    """Per-token T = 1 log-probs of `cot` under a vLLM engine (prompt log-probs of prompt + COT)."""
    import vllm
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt + cot)],
                              vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                              use_tqdm=False)[0]
    return [out.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(cot)]


def rate(runs: list[tuple]) -> dict:
    per_run = [t / s for t, s, *_ in runs]
    return {"tokens": runs[0][0], "tokens_per_s": round(statistics.median(per_run), 1),
            "all_tokens_per_s": [round(r, 1) for r in per_run]}


def paired(runs: list[tuple], baseline: list[tuple]) -> float:
    """Median over repeats of tokens/s relative to the baseline's run in the same repeat."""
    return round(statistics.median((t / s) / (bt / bs) for (t, s, *_), (bt, bs, *_) in
                                   zip(runs, baseline, strict=True)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)  # questions per pool batch
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    # Ray runs its workers at niceness 15: on a shared machine the pool's actor would lose CPU to other jobs
    # while the in-process engine (niceness 0) would not. Same priority for both.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config={"worker_niceness": 0})
    ray.data.DataContext.get_current().enable_progress_bars = False

    smol = ModelConfig()
    path = resolve_model_path(smol)
    task = load_task(TaskConfig(name="gsm8k", num_test=args.questions))
    rows = question_rows(task.test, task, load_tokenizer(path))
    # the engines in this process and the pool's actor take turns on the same cores, as samplers and trainers do
    # in the loop; cpu_cores=auto would give the first engine the cores and leave the others unpinned
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:args.threads]))
    cfg = RolloutConfig(engine="vllm", k=args.k, temperature=0.8, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, resources_per_actor={"CPU": args.threads},
                        max_prompt_tokens=512, seed=0,
                        vllm=VllmConfig(cpu_cores=cores))
    params = SamplingParams.from_config(cfg)
    batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]  # as the pool cuts
    results: dict = {"setup": {"model": smol.name_or_path, "task": "gsm8k test", "questions": len(rows),
                               "k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": 0.8,
                               "batch_size": cfg.batch_size, "threads": args.threads, "cpu_cores": cores,
                               "repeats": args.repeats}}

    # 1. engines in this process: vLLM fp32 and bf16 (eager, as on every CPU) against HF (fp32),
    # same prompts and seeds
    engines, startup = {}, {}
    for name, kind, dtype in [("hf", "hf", "float32"), ("vllm_fp32", "vllm", "float32"),
                              ("vllm_bf16", "vllm", "bfloat16")]:
        if name == "vllm_bf16":  # one in-process vLLM engine core per process: the second gets its own
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        engines[name], startup[name] = timed(make_engine, kind, path, replace(cfg, engine=kind), dtype)
        in_process(engines[name], batches[:1], replace(params, max_new_tokens=2))  # first forward pass
    runs: dict = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            runs[name].append(in_process(engine, batches, params))
    results["engines"] = {name: rate(r) for name, r in runs.items()}
    results["engines"]["vllm_fp32_vs_hf"] = paired(runs["vllm_fp32"], runs["hf"])
    results["engines"]["vllm_bf16_vs_hf"] = paired(runs["vllm_bf16"], runs["hf"])
    results["engines"]["vllm_bf16_vs_fp32"] = paired(runs["vllm_bf16"], runs["vllm_fp32"])
    results["engines"]["target_vllm_vs_hf"] = 4.0
    results["startup_s"] = {name: round(s, 1) for name, s in startup.items()}

    # 2. log-prob drift: the fp32 engine's COTs, each token's log-prob under bf16 vs under fp32
    cots = [(r["prompt_ids"], c.token_ids) for r, cs in zip(rows, runs["vllm_fp32"][0][2]) for c in cs][:32]
    diffs = [abs(a - b) for p, c in cots for a, b in zip(token_logprobs(engines["vllm_fp32"], p, c),
                                                         token_logprobs(engines["vllm_bf16"], p, c))]
    hf_vs_vllm = [abs(sum(c.logprobs) - s) / len(c.token_ids) for c, s in zip(
        [c for cs in runs["vllm_fp32"][0][2] for c in cs][:32],
        engines["hf"].score([p for p, _ in cots], [c for _, c in cots]))]
    results["logprob_drift_per_token"] = {
        "bf16_vs_fp32_mean": round(statistics.mean(diffs), 5), "bf16_vs_fp32_max": round(max(diffs), 4),
        "hf_fp32_vs_vllm_fp32_mean_of_cot_means": round(statistics.mean(hf_vs_vllm), 6), "cots": len(cots)}
    reference = runs["vllm_fp32"]
    engines.pop("hf")
    engines.pop("vllm_bf16").close()

    # 3a. refresh from a checkpoint folder in this process: the engine's load_weights (checks, staging in
    # /dev/shm, reload, prefix-cache reset) against vLLM's reload_weights alone on a folder staged beforehand
    engine, ours, bare = engines["vllm_fp32"], [], []
    staged = stage_checkpoint(path, engine.tied_embed)
    first = timed(engine.load_weights, path, 99)[1]  # the first reload after start-up is slower (reported apart)
    for i in range(args.repeats):
        ours.append(timed(engine.load_weights, path, 100 + i)[1])
        bare.append(timed(engine.llm.collective_rpc, "reload_weights", None, (), {"weights_path": str(staged)})[1])
    shutil.rmtree(staged)
    results["refresh_in_process_s"] = {"first_engine_load_weights": round(first, 3),
                                       "engine_load_weights": round(statistics.median(ours), 3),
                                       "vllm_reload_weights_alone": round(statistics.median(bare), 3),
                                       "all_engine_load_weights": [round(s, 3) for s in ours],
                                       "all_vllm_reload_weights_alone": [round(s, 3) for s in bare]}

    # 3. the Ray pool (1 actor) vs the same vLLM engine in this process, alternating
    pool, startup["pool_vllm_fp32"] = timed(RolloutPool, replace(cfg, num_actors=1), path)
    pool_round(pool, rows[:2], replace(params, max_new_tokens=2))  # Ray Data's workers, first forward pass
    local, pooled = [], []
    for _ in range(args.repeats):
        local.append(in_process(engines["vllm_fp32"], batches, params))
        pooled.append(pool_round(pool, rows, params))
    assert {t for t, *_ in local} == {t for t, _ in pooled} == {reference[0][0]}, "different COTs"
    results["pool_vs_in_process"] = {"in_process": rate(local), "pool_1_actor": rate(pooled),
                                     "ratio": paired(pooled, local), "target_ratio": 0.9}
    results["startup_s"]["pool_vllm_fp32"] = round(startup["pool_vllm_fp32"], 1)

    # 4. weight refresh in place, SmolLM2: a checkpoint folder, and a state dict through the object store
    state = {n: p.detach() for n, p in load_model(path).named_parameters()}
    folder, store = [], []
    first = pool.refresh(path, 100)  # a run's first refresh: the first reload after the engine's start-up
    for i in range(args.repeats):
        folder.append(pool.refresh(path, 2 * i + 1))
        store.append(timed(lambda v: pool.refresh(put_weights(state), v), 2 * i + 2)[1])  # the put counts too
    pool.shutdown()
    results["refresh_smollm2_s"] = {"first_checkpoint_folder": round(first, 3),
                                    "checkpoint_folder": round(statistics.median(folder), 3),
                                    "state_dict": round(statistics.median(store), 3),
                                    "all_checkpoint_folder": [round(s, 3) for s in folder],
                                    "all_state_dict": [round(s, 3) for s in store], "target": 0.5}
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_start": load_start,
                          "load_avg_end": os.getloadavg(), "python": platform.python_version(),
                          "torch": torch.__version__, "ray": ray.__version__, "vllm": _vllm_version()}
    ray.shutdown()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    main()
