"""Tasks: datasets as `Example` lists with a prompt renderer (`load_task(cfg) -> Task`) and final-answer
extraction (`answers`)."""
from __future__ import annotations

from aftray.config import TaskConfig
from aftray.tasks import aqua_rat, arith, ecqa, gsm8k
from aftray.tasks.base import DataError, Example, Task

LOADERS = {"gsm8k": gsm8k.load, "aqua_rat": aqua_rat.load, "ecqa": ecqa.load, "arith": arith.load}


def num_steps(example: Example) -> int:
    """Steps of a reference solution: its non-empty lines before the final `####` line."""
    return sum(1 for line in example.raw_cot.rpartition("####")[0].splitlines() if line.strip())


def load_task(cfg: TaskConfig) -> Task:
    """The task named by `cfg.name`: its splits kept to `cfg.max_steps`, then cut to `cfg.num_train` /
    `cfg.num_test` when set."""
    task = LOADERS[cfg.name](cfg)
    if cfg.max_steps is not None:
        task.train = [e for e in task.train if num_steps(e) <= cfg.max_steps]
        task.test = [e for e in task.test if num_steps(e) <= cfg.max_steps]
    task.train = task.train[:cfg.num_train]
    task.test = task.test[:cfg.num_test]
    return task


__all__ = ["DataError", "Example", "Task", "load_task"]
