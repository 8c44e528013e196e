"""Pre-registration: an experiment's preset, arms, seeds, task seeds, contrasts, primary test and α, declared in a
committed YAML file before its command runs (configs/experiments/*.yaml; docs/method.md §Statistics of a
comparison). The comparison records the declaration's name and hash in every run's summary and refuses to pool
runs that another experiment made, unless the declaration names that experiment under `reuse`.

    name: testbed                  # letters, digits, '_' or '-'; recorded in each run's summary
    question: does AFT-BC beat ...  # what the experiment asks, in words
    config: configs/arith_compare.yaml
    overrides: []                  # key=value, as on the command line
    arms: [vft_continued, rft, aft_bc]
    variants: {}                   # an arm at other settings, named in `arms`: label -> {arm, overrides}, e.g.
                                   # vft_continued_lr1.5e-5: {arm: vft_continued, overrides: [train.lr=1.5e-5]}
    seeds: [0, 1, 2]
    task_seeds: null               # or a list (arith only): the task-level test needs at least two
    contrasts: [aft_bc - vft_continued, aft_bc - rft, aft_bc - start]  # `start`: the arm's own round 0
    primary: seed                  # the unit of the test that decides "resolved": seed or task
    alpha: 0.05                    # on Holm-adjusted p-values over the contrasts
    reuse: []                      # experiments whose runs this one may pool: their bases, and (from the
                                   # folder --bases names) their finished arm runs of the same name and config
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

START = "start"  # the second arm of a contrast with the arm's own starting model (round 0, the base's accuracy)
UNITS = ("seed", "task")
KEYS = ("name", "question", "config", "overrides", "arms", "variants", "seeds", "task_seeds", "contrasts", "primary",
        "alpha", "reuse")


@dataclass(frozen=True)
class Declaration:
    name: str
    question: str
    config: str
    overrides: list[str]
    arms: list[str]
    variants: dict[str, tuple[str, list[str]]]  # label -> (the arm it varies, its overrides)
    seeds: list[int]
    task_seeds: list[int] | None
    contrasts: list[tuple[str, str]]
    primary: str
    alpha: float
    reuse: list[str]
    path: str
    text: str  # the file as committed: the results page prints it
    sha256: str

    def record(self) -> dict:
        """What each run's summary keeps of it (key "experiment")."""
        return {"name": self.name, "sha256": self.sha256}


def parse_contrast(text: str) -> tuple[str, str]:
    """"a - b" -> (a, b)."""
    a, sep, b = (s.strip() for s in str(text).partition(" - "))
    if not (sep and a and b):
        raise ValueError(f"contrast {text!r}: expected 'a - b' (two arms, or an arm and 'start')")
    return a, b


def load_declaration(path: str | Path) -> Declaration:
    path = Path(path)
    text = path.read_text()
    raw = yaml.safe_load(text)

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: {key}: expected {expected}, got {raw.get(key)!r}")

    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {', '.join(KEYS)}")
    for key in ("name", "question", "config", "arms", "seeds", "contrasts", "primary", "alpha"):
        if raw.get(key) is None:
            raise bad(key, "a value (a declaration states everything it fixes)")
    if not re.fullmatch(r"[\w-]+", str(raw["name"])):
        raise bad("name", "letters, digits, '_' or '-'")
    for key, kind in (("arms", str), ("seeds", int), ("task_seeds", int), ("overrides", str), ("reuse", str)):
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise bad(key, f"a list of {kind.__name__}")
    if not raw["arms"] or not raw["seeds"]:
        raise bad("arms" if not raw["arms"] else "seeds", "a non-empty list")
    variants = _variants(raw.get("variants") or {}, raw["arms"], lambda expected: bad("variants", expected))
    try:
        contrasts = [parse_contrast(c) for c in raw["contrasts"]]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    unknown_arms = [x for a, b in contrasts for x in (a, b) if x not in raw["arms"] and x != START]
    if not contrasts or unknown_arms or any(a == START for a, _ in contrasts):
        raise bad("contrasts", f"'a - b' with a among arms and b among arms or 'start' (unknown: {unknown_arms})")
    if raw["primary"] not in UNITS:
        raise bad("primary", " or ".join(UNITS))
    if raw["primary"] == "task" and len(raw.get("task_seeds") or []) < 2:
        raise bad("primary", "seed, or at least two task_seeds for the task-level test")
    if not isinstance(raw["alpha"], float) or not 0 < raw["alpha"] < 1:
        raise bad("alpha", "a number between 0 and 1")
    return Declaration(name=raw["name"], question=str(raw["question"]), config=str(raw["config"]),
                       overrides=list(raw.get("overrides") or []), arms=raw["arms"], variants=variants,
                       seeds=raw["seeds"],
                       task_seeds=raw.get("task_seeds") or None, contrasts=contrasts, primary=raw["primary"],
                       alpha=raw["alpha"], reuse=list(raw.get("reuse") or []), path=str(path), text=text,
                       sha256=hashlib.sha256(text.encode()).hexdigest())


def _variants(raw, arms: list[str], bad) -> dict[str, tuple[str, list[str]]]:
    """`variants` -> {label: (arm, overrides)}; each label is also listed in `arms` (it runs), and a name a run
    folder can carry. Whether each `arm` exists is checked with the arms (aftray.experiments.compare)."""
    if not isinstance(raw, dict):
        raise bad("a mapping of label -> {arm: ..., overrides: [key=value, ...]}")
    out = {}
    for label, spec in raw.items():
        ok = (isinstance(spec, dict) and set(spec) == {"arm", "overrides"} and isinstance(spec["arm"], str)
              and isinstance(spec["overrides"], list) and all(isinstance(o, str) and "=" in o
                                                               for o in spec["overrides"]))
        if not ok:
            raise bad(f"{label}: {{arm: <an arm>, overrides: [key=value, ...]}}")
        if not re.fullmatch(r"[\w.-]+", str(label)) or label not in arms:
            raise bad(f"{label}: a label of letters, digits, '_', '.' or '-', listed in arms")
        out[label] = (spec["arm"], list(spec["overrides"]))
    return out


def check_pooling(summaries: dict[str, dict], declaration: Declaration) -> None:
    """Refuse run folders ({folder: its summary}) that the declared experiment may not pool: made by another
    experiment that `reuse` does not name, or by no declared experiment at all (ad hoc, or before
    pre-registration)."""
    allowed = {declaration.name, *declaration.reuse}
    foreign = {folder: (s.get("experiment") or {}).get("name") for folder, s in summaries.items()
               if (s.get("experiment") or {}).get("name") not in allowed}
    edited = [folder for folder, s in summaries.items() if (s.get("experiment") or {}).get("name") ==
              declaration.name and s["experiment"].get("sha256") not in (None, declaration.sha256)]
    if edited:
        raise ValueError(f"{declaration.path}: the declaration changed after runs of {declaration.name} started "
                         f"({', '.join(edited)}): declare a new experiment (a new name) instead of editing it")
    if foreign:
        runs = ", ".join(f"{folder} ({name or 'not pre-registered'})" for folder, name in foreign.items())
        raise ValueError(f"{declaration.path}: refusing to pool runs of other experiments: {runs}; use a fresh "
                         f"--out/--bases, or name their experiment under `reuse`")
