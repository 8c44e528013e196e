"""Weight refresh on SmolLM2-135M through the Ray pool (one vLLM actor), with the trainer's side included:
`object_store` (rank 0's state dict put in Ray's object store, each engine loads it in place) against `folder`
(rank 0 writes the HF checkpoint folder, each engine reads it). Prints and writes
benchmarks/results/weight_sync.json.

The trainer side runs here as train rank 0 runs it (`worker.push_weights`: `full_state_dict` + `put_weights`, or
`save_pretrained` as `save_final` writes it); the engine side is `RolloutPool.refresh`. Each version scales
one weight, so every refresh loads new weights, and the two paths then score a COT to the same bits: a check
that both delivered the same weights. Modes alternate; medians over `--repeats`.

    .venv/bin/python benchmarks/weight_sync.py [--repeats 7]
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from aftray.config import ModelConfig, RolloutConfig
from aftray.models import load_model, load_tokenizer, resolve_model_path
from aftray.rollout import RolloutPool
from aftray.weights import put_weights

OUT = Path(__file__).parent / "results" / "weight_sync.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config={"worker_niceness": 0})
    path = resolve_model_path(ModelConfig())
    tokenizer = load_tokenizer(path)
    trainer = load_model(path)  # what train rank 0 holds (fp32, ZeRO-0/2: the whole module)
    cfg = RolloutConfig(engine="vllm", resources_per_actor={"CPU": args.threads}, seed=0)
    pool = RolloutPool(cfg, path, version=0)
    prompt = tokenizer("Q: 3 apples and 4 more?\nA:", add_special_tokens=False)["input_ids"]
    cot = tokenizer(" 3 + 4 = 7\n#### 7", add_special_tokens=False)["input_ids"]
    norm = trainer.model.norm.weight
    folder_root = Path(tempfile.mkdtemp(prefix="aftray-sync-"))
    times: dict = {"object_store": [], "folder": []}
    scores: dict = {"object_store": [], "folder": []}
    version = 0
    for i in range(args.repeats + 1):  # the first of each is a warm-up (first reload after start-up)
        with torch.no_grad():
            norm.mul_(1.001)
        for mode in ("object_store", "folder"):
            version += 1
            start = time.perf_counter()
            if mode == "object_store":
                trainer_side = time.perf_counter()
                weights = put_weights(trainer.state_dict())
            else:
                trainer_side = time.perf_counter()
                weights = folder_root / f"v{version}"
                trainer.save_pretrained(weights)
                tokenizer.save_pretrained(weights)
            put_s = time.perf_counter() - trainer_side
            load_s = pool.refresh(weights, version)
            total = time.perf_counter() - start
            if i:
                times[mode].append({"total_s": total, "trainer_s": put_s, "engine_s": load_s})
            scores[mode].append(pool.score([prompt], [cot])[0])
            if mode == "folder":
                shutil.rmtree(weights)
    pool.shutdown()
    ray.shutdown()
    shutil.rmtree(folder_root, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return round(statistics.median(t[key] for t in times[mode]), 3)

    results = {
        "setup": {"model": "SmolLM2-135M-Instruct (fp32)", "engine": "vllm (1 actor)", "repeats": args.repeats,
                  "threads": args.threads, "cpus": os.cpu_count()},
        **{mode: {"median_total_s": med(mode, "total_s"), "median_trainer_s": med(mode, "trainer_s"),
                  "median_engine_s": med(mode, "engine_s"),
                  "all_total_s": [round(t["total_s"], 3) for t in times[mode]]} for mode in times},
        "object_store_over_folder": round(statistics.median(
            a["total_s"] / b["total_s"] for a, b in zip(times["object_store"], times["folder"])), 3),
        # both paths loaded the same weights each repeat: the score after each equals the other's
        "same_scores": scores["object_store"] == scores["folder"],
        "target_object_store_s": 0.5,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
