"""The testbed's first three sections of docs/results.md under the current statistics (issue #26).

Those sections were generated before the harness had t-tests and Holm's correction; their tables mark a contrast
resolved at |Δ| ≥ 3 SE. Their runs are gone, but each stored comparison.json keeps every run's final accuracy by
seed, which is all a paired test needs. This script reads them and prints, per section, the contrasts its reading
discusses with the harness's own tests (`aftray.experiments.stats`): seed as the unit and, on task seeds 1-3, the
task seed as the unit; Holm over each family. None of this was pre-registered: the p-values are exploratory.

    .venv/bin/python docs/results/restat.py
"""
from __future__ import annotations

import json
from pathlib import Path

from aftray.experiments.stats import holm, paired_test, task_level_test

HERE = Path(__file__).parent
# The task seeds' VFT bases on 1,000 questions, as docs/results.md gives them (the comparisons stored only their mean).
TASK_BASES = {1: 0.446, 2: 0.209, 3: 0.397}
SECTIONS = {  # section: (comparison.json, contrasts; "start" = the arm's own base)
    "testbed, 3 seeds (`generated:start`)": ("comparison.json", [
        (a, "vft_continued") for a in ("rft", "aft_dc", "aft_bc", "aft_rank_bc", "dpo", "dpo_bc", "rrhf", "rrhf_bc",
                                       "align_none")]),
    "testbed at power, 12 seeds (`generated:tasks`)": ("tasks/comparison.json", [
        ("rft", "vft_continued"), ("aft_bc", "vft_continued"), ("aft_bc", "rft"),
        ("vft_continued", "start"), ("rft", "start"), ("aft_bc", "start")]),
    "AFT-BC vs VFT-continued, 24 seeds (`generated:tasks_aft`)": ("tasks_aft/comparison.json", [
        ("aft_bc", "vft_continued"), ("vft_continued", "start"), ("aft_bc", "start")]),
}


def _p(p: float | None) -> str:
    return "–" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def section_table(path: Path, pairs: list[tuple[str, str]]) -> list[str]:
    """One row per contrast and unit; Holm over the section's contrasts, per unit."""
    result = json.loads(path.read_text())
    acc = {arm: {int(s): a for s, a in e["per_seed_final_accuracy"].items()} for arm, e in result["arms"].items()}
    task_of = {s: 1 + s % 3 for s in result["seeds"]} if result.get("task_seeds") else {}  # seed i: task 1 + i mod 3
    start = {s: TASK_BASES[t] for s, t in task_of.items()} or {
        s: result["arms"]["vft_continued"]["rounds"]["0"]["accuracy"]["mean"] for s in result["seeds"]}
    tests = {}
    for a, b in pairs:
        diffs = {s: acc[a][s] - (start[s] if b == "start" else acc[b][s]) for s in acc[a]}
        tests[f"{a} − {b}"] = {"seeds": paired_test(list(diffs.values()))}
        if task_of:
            by_task: dict[int, list[float]] = {}
            for s, d in diffs.items():
                by_task.setdefault(task_of[s], []).append(d)
            tests[f"{a} − {b}"]["tasks"] = task_level_test(by_task)
    for unit in ("seeds", "tasks"):
        family = [t[unit] for t in tests.values() if unit in t]
        for t, adjusted in zip(family, holm([t["p"] for t in family])):
            t["holm_p"] = adjusted
    lines = ["| contrast | unit | Δ ± SE (points) | 95 % CI | n | p | Holm p |", "|---|---|---|---|---|---|---|"]
    for name, units in tests.items():
        for unit, t in units.items():
            lines.append(f"| {name} | {unit} | {t['mean'] * 100:+.1f} ± {t['se'] * 100:.1f} | "
                         f"[{t['ci'][0] * 100:+.1f}, {t['ci'][1] * 100:+.1f}] | {t['n']} | {_p(t['p'])} | "
                         f"{_p(t['holm_p'])} |")
    return lines


def main() -> None:
    for title, (file, pairs) in SECTIONS.items():
        print(f"{title}:\n")
        print("\n".join(section_table(HERE / file, pairs)), end="\n\n")


if __name__ == "__main__":
    main()
