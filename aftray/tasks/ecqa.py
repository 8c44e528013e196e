"""ECQA (tasksource/ecqa): CommonsenseQA with human explanations; five options, the free-flow explanation
(`taskB`) is the reference COT, followed by `#### <letter>`.

Not available offline here: a local copy is read from `<data_dir>/ecqa/{train,test}.jsonl` in the hub's schema
(q_no, q_concept, q_text, q_op1..q_op5, q_ans = the answer's text, taskA_pos, taskA_neg, taskB).
"""
from __future__ import annotations

from aftray.config import TaskConfig
from aftray.tasks.base import Example, RowError, Task, get_field, load_split
from aftray.tasks.answers import LETTERS


def parse_row(row: dict, lineno: int, split: str) -> Example:
    question, explanation = get_field(row, "q_text"), get_field(row, "taskB")
    choices = [get_field(row, f"q_op{i}").strip() for i in range(1, 6)]
    answer = get_field(row, "q_ans").strip().lower()
    matches = [i for i, c in enumerate(choices) if c.lower() == answer]
    if len(matches) != 1:
        raise RowError("q_ans", f"{answer!r} is not exactly one of the options")
    letter = LETTERS[matches[0]]
    cot = f"{explanation.strip()}\n#### {letter}"
    return Example(id=f"ecqa-{split}-{lineno}", question=question.strip(), answer=letter, cot=cot,
                   choices=choices, raw_cot=cot)


def load(cfg: TaskConfig) -> Task:
    splits = {
        split: load_split(cfg, ("tasksource/ecqa", None, split), f"ecqa/{split}.jsonl",
                          lambda row, n, split=split: parse_row(row, n, split))
        for split in ("train", "test")
    }
    return Task("ecqa", "choice", splits["train"], splits["test"], cfg)
