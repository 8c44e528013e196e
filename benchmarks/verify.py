"""COTs verified per second on one core, with and without the arithmetic process score.

Groups of k completions per question are built from the reference COTs of GSM8K test (when the data is
there) and of the generated arith task: the reference, a whitespace duplicate (removed by dedup), a wrong
final answer, arithmetic slips (another number changed), and a truncated copy. Each group goes through
`verify_group` as the verify stage would run it. Prints and writes benchmarks/results/verify.json.

    .venv/bin/python benchmarks/verify.py [--questions 500] [--k 8]
"""
import argparse
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from aftray.config import TaskConfig, VerifyConfig
from aftray.tasks import load_task
from aftray.tasks.base import default_data_dir
from aftray.verify import verify_group


@dataclass
class Completion:
    text: str
    token_ids: list
    logprobs: list
    finish_reason: str = "stop"


def bump_nth(text: str, n: int) -> str:
    """Add 1 to the n-th number: n = -1 is the final answer, other n are arithmetic slips."""
    numbers = list(re.finditer(r"\d+", text))
    if not numbers:
        return text + " 0"
    m = numbers[n % len(numbers)]
    return text[:m.start()] + str(int(m.group()) + 1) + text[m.end():]


def variants(cot: str, k: int) -> list[Completion]:
    texts = [cot, cot.replace(" ", "  ", 1)] + [bump_nth(cot, -1 - i) for i in range(k - 3)]
    out = [Completion(t, list(range(len(t) // 4 + 1)), [-0.3] * (len(t) // 4 + 1)) for t in texts]
    return out + [Completion(cot[:len(cot) // 2], [0] * 8, [-0.3] * 8, "length")]


def groups(task, n: int, k: int) -> list[tuple[dict, list[Completion]]]:
    return [({"id": e.id, "prompt": "", "prompt_ids": [], "answer": e.answer, "ref_cot": e.cot,
              "ref_cot_ids": [], "weights_version": 0}, variants(e.cot, k)) for e in task.test[:n]]


def cots_per_second(work, answer_kind: str, process: str) -> float:
    cfg = VerifyConfig(process=process)
    start = time.perf_counter()
    for row, completions in work:
        verify_group(row, completions, cfg, answer_kind)
    return sum(len(c) for _, c in work) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "verify.json"))
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: the verify stage is one task per core

    tasks = [("arith", TaskConfig(name="arith"))]
    if (default_data_dir() / "gsm8k" / "test.jsonl").is_file():
        tasks.append(("gsm8k", TaskConfig(name="gsm8k", data_dir=str(default_data_dir()))))
    results = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "cores": 1, "k": args.k, "tasks": {}}
    for name, cfg in tasks:
        task = load_task(cfg)
        work = groups(task, args.questions, args.k)
        texts = [c.text for _, completions in work for c in completions]
        row = {"cots": len(texts),
               "cots_per_s_no_process": cots_per_second(work, task.answer_kind, "none"),
               "cots_per_s_arith_process": cots_per_second(work, task.answer_kind, "arith"),
               "mean_cot_chars": sum(map(len, texts)) / len(texts)}
        results["tasks"][name] = row
        print(f"{name:6s} {row['cots']:6d} COTs  no process: {row['cots_per_s_no_process']:8.0f} COTs/s   "
              f"arith process: {row['cots_per_s_arith_process']:8.0f} COTs/s   "
              f"(mean {row['mean_cot_chars']:.0f} chars)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
