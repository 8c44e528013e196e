"""Refresh the generated section of a results page (docs/results.md) from a comparison: the command, versions,
seeds, wall time, the table and the plots. Text outside the markers (the reading of the results) is kept."""
from __future__ import annotations

import shutil
from pathlib import Path

from aftray.experiments.compare import markdown_table

START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def update_results_page(result: dict, out_dir: Path, page: Path, command: str) -> None:
    assets = page.parent / page.stem  # docs/results/ next to docs/results.md
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(out_dir / "comparison.json", assets / "comparison.json")
    images = []
    for png in sorted((out_dir / "plots").glob("*.png")):
        shutil.copy(png, assets / png.name)
        images.append(f"![{png.stem}]({assets.name}/{png.name})")
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    generated = "\n".join([
        START,
        f"Command: `{command}`  ",
        f"Preset: `{result['preset']}` with overrides `{' '.join(result['overrides']) or '(none)'}`  ",
        f"Seeds: {result['seeds']}; arms: {', '.join(result['arms'])}  ",
        f"Time: the runs took {result['runs_time_s'] / 60:.1f} min in all (sum of their rounds' wall times; "
        f"this invocation {result['wall_time_s'] / 60:.1f} min) on this machine (2 cores); versions: {versions}",
        "",
        markdown_table(result),
        *images,
        END,
    ])
    text = page.read_text() if page.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    page.write_text(head + generated + rest.split(END, 1)[1])
