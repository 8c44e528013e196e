"""GSM8K (openai/gsm8k, main): grade-school word problems; reference = the answer text, gold = the number
after ####.

The learnable COT drops the calculator annotations `<<48/2=24>>` (they are a tool-use format, not reasoning,
and no calculator runs beside the sampler); `raw_cot` keeps them for the step checker. The final line is
rewritten to the canonical gold ("#### 1,000" -> "#### 1000") so every COT ends with `#### <answer>`.
"""
from __future__ import annotations

import re

from aftray.config import TaskConfig
from aftray.tasks.base import Example, RowError, Task, get_field, load_split
from aftray.tasks.answers import format_number, parse_number

_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


def strip_calculator(text: str) -> str:
    return _ANNOTATION_RE.sub("", text)


def parse_row(row: dict, lineno: int, split: str) -> Example:
    question, answer = get_field(row, "question"), get_field(row, "answer")
    body, sep, final = answer.rpartition("####")
    value = parse_number(final) if sep else None
    if value is None:
        raise RowError("answer", f"no number after '####' (ends {answer[-30:]!r})")
    gold = format_number(value)
    raw_cot = f"{body.rstrip()}\n#### {gold}"
    return Example(id=f"gsm8k-{split}-{lineno}", question=question.strip(), answer=gold,
                   cot=strip_calculator(raw_cot), raw_cot=raw_cot)


def load(cfg: TaskConfig) -> Task:
    splits = {
        split: load_split(cfg, ("openai/gsm8k", "main", split), f"gsm8k/{split}.jsonl",
                          lambda row, n, split=split: parse_row(row, n, split))
        for split in ("train", "test")
    }
    return Task("gsm8k", "number", splits["train"], splits["test"], cfg)
