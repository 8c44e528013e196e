"""The testbed's first three sections of docs/results.md under the current statistics (issue #26).

Those sections were generated before the harness had t-tests and Holm's correction; their tables mark a contrast
resolved at |Δ| ≥ 3 SE. Their runs are gone, but each stored comparison.json keeps every run's final accuracy by
seed, which is all a paired test needs. This script reads them and prints, per section, the contrasts its reading
discusses with the harness's own tests and table (`aftray.experiments.compare`): seed as the unit and, on task
seeds 1-3, the task seed as the unit; Holm over each family. None of this was pre-registered: the p-values are exploratory.

    .venv/bin/python docs/results/restat.py
"""
from __future__ import annotations

import json
from pathlib import Path

from aftray.experiments.compare import ALPHA, adjust_and_decide, contrast_table, contrast_test
from aftray.experiments.declaration import START

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


def section_table(path: Path, pairs: list[tuple[str, str]]) -> list[str]:
    """The section's contrasts tested and Holm-adjusted as the harness does (`contrast_test`, `adjust_and_decide`
    with no primary test: nothing resolved) and printed as its contrast table."""
    result = json.loads(path.read_text())
    acc = {arm: {int(s): a for s, a in e["per_seed_final_accuracy"].items()} for arm, e in result["arms"].items()}
    task_of = {s: 1 + s % 3 for s in result["seeds"]} if result.get("task_seeds") else {}  # seed i: task 1 + i mod 3
    start = {s: TASK_BASES[t] for s, t in task_of.items()} or {
        s: result["arms"]["vft_continued"]["rounds"]["0"]["accuracy"]["mean"] for s in result["seeds"]}
    contrasts = {f"{a} - {b}": contrast_test(
        {s: acc[a][s] - (start[s] if b == START else acc[b][s]) for s in acc[a]}, task_of, ALPHA) for a, b in pairs}
    adjust_and_decide(contrasts, None, ALPHA)
    return contrast_table({"contrasts": contrasts, "alpha": ALPHA, "declaration": None})


def main() -> None:
    for title, (file, pairs) in SECTIONS.items():
        print(f"{title}:\n")
        print("\n".join(section_table(HERE / file, pairs)), end="\n\n")


if __name__ == "__main__":
    main()
