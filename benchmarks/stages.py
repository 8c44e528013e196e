"""What a training stage costs besides its optimizer steps: a Ray Train run per stage (benchmarks/train.py's
`train_stage`, the baseline) against one long-lived worker group for all stages (`TrainService`, what the loop
uses).

Both arms run the same N align stages in this process, on the same local Ray: each stage starts from the
previous stage's weights and takes --steps optimizer steps on the same random groups (tiny Llama, 2 workers,
ZeRO-2 unless told). Per stage: wall time seen by the driver, the optimizer steps' time, and the difference
(the overhead). Writes benchmarks/results/stages.json with the overhead per stage of both arms and their ratio.

Usage: python benchmarks/stages.py [--stages 3] [--steps 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import RESULTS, make_groups, train_stage  # noqa: E402  (benchmarks/train.py)

from aftray.config import LossConfig, ModelConfig, TinyModelConfig, TrainConfig  # noqa: E402
from aftray.models import resolve_model_path  # noqa: E402


def run_stages(train_fn, model_path: Path, root: Path, groups: list[dict], stages: int) -> list[dict]:
    """Run `stages` align stages in a chain through train_fn(model_path, stage_dir) -> StageResult."""
    records = []
    for i in range(stages):
        start = time.perf_counter()
        result = train_fn(model_path, root / str(i))
        wall = time.perf_counter() - start
        steps = result.metrics["train_time_s"]
        records.append({"wall_s": wall, "steps_s": steps, "overhead_s": wall - steps,
                        "setup_s": result.metrics["setup_s"]})
        model_path = result.checkpoint
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from aftray.train.service import TrainService

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    model_path = resolve_model_path(ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(
        hidden_size=128, num_layers=4, seed=0)))
    groups = make_groups(64, k=4, prompt_len=24, cot_len=24, vocab=70)
    train = TrainConfig(lr=1e-3, warmup_steps=0, steps_per_stage=args.steps, questions_per_step=16,
                        micro_batch_questions=8, max_seq_len=128, num_workers=args.workers,
                        zero_stage=args.zero_stage, seed=0)
    loss = LossConfig(name="aft_bc")
    with tempfile.TemporaryDirectory(prefix="aftray-bench-") as tmp:
        root = Path(tmp)
        per_stage = run_stages(lambda path, stage_dir: train_stage("align", groups, path, stage_dir, train, loss),
                               model_path, root / "per_stage", groups, args.stages)
        with TrainService(train, root / "service_state") as service:
            service_run = run_stages(
                lambda path, stage_dir: service.train("align", groups, path, stage_dir, train, loss),
                model_path, root / "service", groups, args.stages)
    ray.shutdown()

    def overhead(records, skip_first):  # the service pays its start-up once, at its first stage
        return statistics.fmean(r["overhead_s"] for r in records[1 if skip_first else 0:])

    out = {"stages": args.stages, "steps": args.steps, "workers": args.workers, "zero_stage": args.zero_stage,
           "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "per_stage_trainer": per_stage, "service": service_run,
           "overhead_s_per_stage": {"per_stage_trainer": overhead(per_stage, False),
                                    "service_first_stage": service_run[0]["overhead_s"],
                                    "service_later_stages": overhead(service_run, True)},
           "total_wall_s": {"per_stage_trainer": sum(r["wall_s"] for r in per_stage),
                            "service": sum(r["wall_s"] for r in service_run)}}
    o = out["overhead_s_per_stage"]
    out["later_stage_overhead_ratio"] = o["service_later_stages"] / o["per_stage_trainer"]
    out["total_wall_ratio"] = out["total_wall_s"]["service"] / out["total_wall_s"]["per_stage_trainer"]
    print(json.dumps({k: v for k, v in out.items() if k not in ("per_stage_trainer", "service")}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stages.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'stages.json'}")


if __name__ == "__main__":
    main()
