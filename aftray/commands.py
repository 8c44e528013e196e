"""`aftray eval` and `aftray sample`: a checkpoint's held-out numbers, or a few of its sampled COTs, printed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from aftray.cluster import start_ray
from aftray.config import Config, MissingInputError
from aftray.loop.evaluate import greedy_accuracy
from aftray.loop.pipeline import sample_groups
from aftray.models import load_tokenizer
from aftray.rollout import RolloutPool, question_rows
from aftray.run.metrics import sample_metrics
from aftray.tasks import load_task


def _checkpoint_pool(cfg: Config, checkpoint: str, questions: int | None = None):
    if not Path(checkpoint).is_dir():
        raise MissingInputError(f"{checkpoint}: not a folder (expected an HF checkpoint folder)")
    task = load_task(cfg.task)
    tokenizer = load_tokenizer(checkpoint, cfg.model.trust_remote_code)
    rows = question_rows(task.test[:questions], task, tokenizer)  # only what the command uses
    start_ray(cfg)
    return RolloutPool(cfg.rollout, Path(checkpoint), dtype=cfg.train.weights_dtype), rows, task.answer_kind


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """`aftray eval`: greedy accuracy and, from k samples per question, pass@k / maj@k / assessment accuracy."""
    pool, rows, answer_kind = _checkpoint_pool(cfg, checkpoint)
    start = time.perf_counter()
    accuracy = greedy_accuracy(pool, rows, 0, cfg, answer_kind)
    sampled = sample_groups(pool, ray.data.from_items(rows), 0, cfg.verify, answer_kind).take_all()
    result = {"checkpoint": checkpoint, "task": cfg.task.name, "num_questions": len(rows), "accuracy": accuracy,
              **{k: v for k, v in sample_metrics(sampled, cfg.rollout.k).items() if k != "num_questions"},
              "time_s": time.perf_counter() - start}
    pool.shutdown()
    print(json.dumps(result, indent=2))
    return result


def sample_checkpoint(cfg: Config, checkpoint: str, questions: int) -> None:
    """`aftray sample`: print k COTs for the first few held-out questions with their labels."""
    pool, rows, answer_kind = _checkpoint_pool(cfg, checkpoint, questions)
    for group in sample_groups(pool, ray.data.from_items(rows), 0, cfg.verify, answer_kind).take_all():
        print(f"=== {group['id']} (gold {group['answer']})\n{group['prompt']}")
        for cot, lab, proc in zip(group["cots"], group["labels"], group["process"]):
            print(f"--- {lab} (process {proc:.2f})\n{cot}")
    pool.shutdown()
