"""Generated multi-step arithmetic: the CPU testbed, where correct COTs other than the reference exist.

A problem is a start amount and independent gain/loss events, e.g.
  "Ann has 43 eggs. Ann loses 26. Ann gets 30. Ann gets 28. How many eggs does Ann have?"
Every order of the events whose running totals stay >= 0 is a valid solution, and each problem with two or
more events is generated to have at least two distinct ones; the reference COT takes a random valid order, in
GSM8K style:
  style "equations": "43-26=17. 17+30=47. 47+28=75. #### 75"  (short, a small character set: char-level models)
  style "words":     "Ann has 43 eggs.\nAnn loses 26, so Ann has 43 - 26 = 17 eggs.\n...\n#### 75"  (one step a
                     line, as GSM8K writes them: for pretrained models)
Knobs (`task.arith`): steps ([lo, hi] events, both inclusive), max_value (numbers in the story are below it),
style. Deterministic in `seed` (both styles draw the same problems); test questions never repeat a training
question. The splits hold NUM_TRAIN and NUM_TEST problems (more when task.num_train / task.num_test ask for
more), drawn train first: the first n questions of a split are the same whatever the split sizes, as long as
the training split's size is the same.
"""
from __future__ import annotations

import random

from aftray.config import ArithConfig, TaskConfig
from aftray.tasks.base import Example, Task

NAMES = ["Ann", "Tom", "Sue", "Bob", "Amy", "Sam"]
ITEMS = ["eggs", "pens", "cards", "coins", "books", "apples"]
GAINS = ["gets", "finds", "buys"]
LOSSES = ["loses", "sells", "gives away"]
NUM_TRAIN, NUM_TEST = 4000, 500  # generated split sizes: task.num_train / num_test slice them


def has_two_orders(ops: list[int]) -> bool:
    """Whether at least two distinct valid orders exist, given that the story order is valid.

    Gains first, then losses, is always valid (the running total only falls to the final answer >= 0). So a
    second order exists if the story order is not of that form, or if two different gains (or two different
    losses) can swap places within it.
    """
    gains, losses = [o for o in ops if o > 0], [o for o in ops if o < 0]
    return ops != gains + losses or len(set(gains)) > 1 or len(set(losses)) > 1


def random_valid_order(start: int, ops: list[int], rng: random.Random) -> list[int]:
    """Pick, step by step, a random event that keeps the total >= 0; any such prefix can be completed (gains
    first, then losses), so every valid order can come out."""
    order, remaining, total = [], list(ops), start
    while remaining:
        op = rng.choice([o for o in remaining if total + o >= 0])
        order.append(op)
        remaining.remove(op)
        total += op
    return order


def cot_for(start: int, order: list[int], story: tuple[str, str, dict[int, str]] | None = None) -> str:
    """The COT of one order of the events: equations, or with `story` = (name, item, verb of each amount)
    sentences."""
    if story is None:
        steps, total = [], start
        for op in order:
            steps.append(f"{total}{'+' if op > 0 else '-'}{abs(op)}={total + op}.")
            total += op
        return " ".join(steps) + f" #### {total}"
    name, item, verbs = story
    lines, total = [f"{name} has {start} {item}."], start
    for op in order:
        lines.append(f"{name} {verbs[op]} {abs(op)}, so {name} has {total} {'+' if op > 0 else '-'} {abs(op)} = "
                     f"{total + op} {item}.")
        total += op
    return "\n".join(lines) + f"\n#### {total}"


def make_problem(rng: random.Random, cfg: ArithConfig) -> tuple[str, int, list[int], tuple | None]:
    """(question, start, events in story order, story for a words COT or None) with valid running totals and,
    from 2 events on, >= 2 valid orders (one always exists with a loss first: the start is >= 1)."""
    n = rng.randint(*cfg.steps)
    while True:
        start = rng.randint(1, cfg.max_value - 1)
        ops = [rng.choice((1, -1)) * rng.randint(1, cfg.max_value - 1) for _ in range(n)]
        totals = [start + sum(ops[:i + 1]) for i in range(n)]
        if min(totals) >= 0 and (n == 1 or has_two_orders(ops)):
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    verbs = [rng.choice(GAINS if o > 0 else LOSSES) for o in ops]
    story = None
    if cfg.style == "words":  # one verb per amount, so that a COT in any order names each event as the story does
        by_amount = {}
        for o, verb in zip(ops, verbs):
            by_amount.setdefault(o, verb)
        verbs, story = [by_amount[o] for o in ops], (name, item, by_amount)
    events = [f"{name} {verb} {abs(o)}." for o, verb in zip(ops, verbs)]
    question = " ".join([f"{name} has {start} {item}.", *events, f"How many {item} does {name} have?"])
    return question, start, ops, story


def generate(cfg: ArithConfig, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST
             ) -> tuple[list[Example], list[Example]]:
    if cfg.seed is None:
        raise ValueError("task.arith.seed: expected an integer (load_config derives it from seed), got None")
    rng, seen, repeats = random.Random(cfg.seed), set(), 0
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for split, count in (("train", num_train), ("test", num_test)):
        while len(splits[split]) < count:
            question, start, ops, story = make_problem(rng, cfg)
            if question in seen:
                repeats += 1
                if repeats > 10 * (num_train + num_test):
                    raise ValueError(f"task.arith: cannot generate {num_train + num_test} distinct "
                                     "questions with these knobs (raise max_value or steps)")
                continue
            seen.add(question)
            cot = cot_for(start, random_valid_order(start, ops, rng), story)
            answer = str(start + sum(ops))
            splits[split].append(Example(id=f"arith-{split}-{len(splits[split])}", question=question,
                                         answer=answer, cot=cot, raw_cot=cot))
    return splits["train"], splits["test"]


def load(cfg: TaskConfig) -> Task:
    train, test = generate(cfg.arith, max(NUM_TRAIN, cfg.num_train or 0), max(NUM_TEST, cfg.num_test or 0))
    return Task("arith", "number", train, test, cfg)
