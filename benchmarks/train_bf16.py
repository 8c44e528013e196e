"""The DeepSpeed train stage in bf16 against fp32 on CPU: same model, same round's groups, same steps.

Runs `train_stage_local` (DeepSpeed, no Ray) once per dtype, each in a child process, on the group rows of a
real round (default: round 2 of the `gsm8k_cpu` preset, written by `make run`), and reports per dtype: tokens/s
over steps 2..N (wall), tokens per CPU-second (far less sensitive to other processes on a shared machine), and
the loss of every step; then the bf16/fp32 speed ratios and the largest per-step loss difference. bf16 needs no
AMX to run; CPUs speed it up with AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16 dot products (AMD
Zen 4, Intel Cooper Lake), both recorded. Writes benchmarks/results/train_bf16.json.

Usage: python benchmarks/train_bf16.py [--groups PATH] [--model PATH|HUB_ID] [--steps 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from train import RESULTS, throughput  # benchmarks/train.py

REPO = Path(__file__).resolve().parents[1]


def cpu_info() -> dict:
    """The CPU's model name and whether it has the bf16 matrix instructions."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:40])}
    flags = field.get("flags", "").split()
    return {"cpu": field.get("model name", platform.processor()), **{f: f in flags for f in ("amx_bf16", "avx512_bf16")}}


def run_arm(args) -> dict:
    from aftray.config import LossConfig, ModelConfig, TrainConfig
    from aftray.models import resolve_model_path
    from aftray.train.worker import train_stage_local

    train = TrainConfig(lr=args.lr, warmup_steps=1, steps_per_stage=args.steps, dtype=args.dtype,
                        questions_per_step=args.questions_per_step, micro_batch_questions=1, max_seq_len=512,
                        cpus_per_worker=args.threads)
    with tempfile.TemporaryDirectory(prefix="aftray-bf16-") as stage_dir:
        result = train_stage_local("align", args.groups, resolve_model_path(ModelConfig(name_or_path=args.model)),
                                   stage_dir, train, LossConfig(name="aft_bc"))
    tokens_per_s, tokens_per_cpu_s = throughput(result.history)
    return {"tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_cpu_s,
            **{key: [h[key] for h in result.history] for key in ("loss", "vft", "alignment", "tokens")}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", default=str(REPO / "runs/gsm8k_cpu/rounds/2/samples.parquet"),
                   help="a round's samples.parquet (group rows)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--questions-per-step", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--dtype", help=argparse.SUPPRESS)  # internal: run one arm, write its JSON to --out
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not Path(args.groups).exists():
        raise SystemExit(f"{args.groups}: not found (run `make run` first, or pass --groups)")
    if args.dtype:
        Path(args.out).write_text(json.dumps(run_arm(args)))
        return

    arms = {}
    for dtype in ("fp32", "bf16"):  # each in a fresh process: DeepSpeed's bf16 optimizer keeps the first
        with tempfile.NamedTemporaryFile(suffix=".json") as out:  # process group it saw, gone after a stage
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--dtype", dtype, "--out", out.name], check=True)
            arms[dtype] = {**json.loads(Path(out.name).read_text()), "load_avg_1m": os.getloadavg()[0]}
        print(f"{dtype}: {arms[dtype]['tokens_per_s']:.1f} tokens/s, {arms[dtype]['tokens_per_cpu_s']:.1f} "
              f"tokens/CPU-s, loss {' '.join(f'{x:.4f}' for x in arms[dtype]['loss'])}", flush=True)
    fp32, bf16 = arms["fp32"], arms["bf16"]
    out = {"model": args.model, "groups": args.groups, "steps": args.steps, "threads": args.threads,
           "questions_per_step": args.questions_per_step, "lr": args.lr, "arms": arms,
           "bf16_over_fp32": {unit: bf16[unit] / fp32[unit] for unit in ("tokens_per_s", "tokens_per_cpu_s")},
           "max_abs_loss_diff": max(abs(a - b) for a, b in zip(fp32["loss"], bf16["loss"])),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **cpu_info()}}
    print(json.dumps({k: out[k] for k in ("bf16_over_fp32", "max_abs_loss_diff")}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_bf16.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
