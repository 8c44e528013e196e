"""AQuA-RAT (deepmind/aqua_rat, raw): algebra word problems, options A-E, a rationale per problem.

Locally only dev.json and test.json exist (JSON lines), so offline the dev split (254) is the training split;
the hub's train split (97k) is used when reachable. The learnable COT is the rationale followed by
`#### <letter>` (rationales state their option inconsistently, if at all).
"""
from __future__ import annotations

import re

from aftray.config import TaskConfig
from aftray.tasks.base import Example, RowError, Task, get_field, load_split
from aftray.tasks.answers import LETTERS

_OPTION_RE = re.compile(r"\s*([A-E])\s*\)\s*(.*)", re.S)


def parse_row(row: dict, lineno: int, split: str) -> Example:
    question, rationale = get_field(row, "question"), get_field(row, "rationale")
    options, correct = get_field(row, "options", list), get_field(row, "correct").strip()
    choices = []
    for i, option in enumerate(options):
        m = _OPTION_RE.fullmatch(option) if isinstance(option, str) else None
        if not m or m.group(1) != LETTERS[i]:
            raise RowError("options", f"option {i + 1} is not '{LETTERS[i]})<text>': {str(option)[:30]!r}")
        choices.append(m.group(2).strip())
    if correct not in LETTERS[:len(choices)]:
        raise RowError("correct", f"not an option letter: {correct!r}")
    cot = f"{rationale.rstrip()}\n#### {correct}"
    return Example(id=f"aqua_rat-{split}-{lineno}", question=question.strip(), answer=correct, cot=cot,
                   choices=choices, raw_cot=cot)


def load(cfg: TaskConfig) -> Task:
    train = load_split(cfg, ("deepmind/aqua_rat", "raw", "train"), "aqua_rat/dev.json",
                       lambda row, n: parse_row(row, n, "train"))
    test = load_split(cfg, ("deepmind/aqua_rat", "raw", "test"), "aqua_rat/test.json",
                      lambda row, n: parse_row(row, n, "test"))
    return Task("aqua_rat", "choice", train, test, cfg)
