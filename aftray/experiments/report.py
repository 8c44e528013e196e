"""Refresh a generated section of a results page (docs/results.md) from a comparison: its declaration (or that it
has none), the command, versions, seeds and task seeds, arms, wall time, the tables and the plots. Text outside
the markers (the reading of the results) is kept.

A page holds one generated section per experiment: the unnamed one (markers `generated:start` / `generated:end`,
assets in docs/results/) and named ones (`generated:<name>:start` / `generated:<name>:end`, assets in
docs/results/<name>/, so two experiments' plots do not overwrite each other). A section not yet on the page is
appended at its end."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from aftray.experiments.compare import markdown_table

START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def markers(section: str | None) -> tuple[str, str]:
    """A section's start and end markers; a name is letters, digits, `_` and `-` (it is also a folder name)."""
    if section is None:
        return START, END
    if not re.fullmatch(r"[\w-]+", section):
        raise ValueError(f"--results-section {section!r}: expected letters, digits, '_' or '-'")
    return f"<!-- generated:{section}:start -->", f"<!-- generated:{section}:end -->"


def _declaration(result: dict) -> list[str]:
    """The pre-registration first, as committed, so a reader sees what was fixed before the numbers."""
    d = result["declaration"]
    if d is None:
        return ["Not pre-registered: an ad-hoc comparison (no `--declaration`); its p-values are exploratory and "
                "nothing below is marked resolved.", ""]
    return [f"Declaration `{d['path']}` (experiment `{d['name']}`, sha256 {d['sha256'][:12]}), fixed before the "
            "runs:", "", "```yaml", d["text"].rstrip("\n"), "```", ""]


def _machine(result: dict) -> str:
    """The machine the runs took their time on: its cores and the widest vector instructions torch found (vLLM's
    CPU kernels run 3-4x slower on AVX2 than on AVX512; docs/benchmarks.md). A comparison written before either
    was recorded: unknown."""
    if not result.get("cpus"):
        return "the machine of that session"
    isa = f" ({result['cpu_capability']})" if result.get("cpu_capability") else ""
    return f"a machine with {result['cpus']} cores{isa}"


def _header(result: dict, command: str) -> list[str]:
    """What it takes to reproduce the section: the command, the preset, seeds, task seeds, arms, time, versions."""
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    return [*_declaration(result),
        f"Command: `{command}`  ",
        f"Preset: `{result['preset']}` with overrides `{' '.join(result['overrides']) or '(none)'}`  ",
        f"Seeds: {result['seeds']}; task seeds: {result['task_seeds'] or 'none (the preset task)'}; "
        f"arms: {', '.join(result['arm_names'])}  ",
        *_reused(result),
        f"Time: the runs took {result['runs_time_s'] / 60:.1f} min in all (sum of their rounds' wall times; "
        f"this invocation {result['wall_time_s'] / 60:.1f} min) on {_machine(result)}; versions: {versions}",
    ]


def _reused(result: dict) -> list[str]:
    """Which runs came from an earlier experiment (its `reuse`), not from this command (their time is not
    counted)."""
    reused = result.get("reused")
    if not reused:
        return []
    runs = "; ".join(f"{label} (seeds {', '.join(map(str, seeds))})" for label, seeds in reused["runs"].items())
    bases = f" and the VFT bases {', '.join(reused['bases'])}" if reused.get("bases") else ""
    return [f"Reused, not re-run: the finished runs of {runs}{bases}, from `{reused['from']}`  "]


def update_results_page(result: dict, out_dir: Path, page: Path, command: str, section: str | None = None) -> None:
    """Replace what is between `section`'s markers (see `markers`), nothing else: the hand-written reading and the
    other sections stay byte for byte."""
    start, end = markers(section)
    assets = page.parent / page.stem / (section or "")  # docs/results/[<section>/] next to docs/results.md
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(out_dir / "comparison.json", assets / "comparison.json")
    images = []
    for png in sorted((out_dir / "plots").glob("*.png")):
        shutil.copy(png, assets / png.name)
        images.append(f"![{png.stem}]({assets.relative_to(page.parent).as_posix()}/{png.name})")
    generated = "\n".join([start, *_header(result, command), "", markdown_table(result), *images, end])
    text = page.read_text() if page.exists() else "# Results\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    page.write_text(head + generated + rest.split(end, 1)[1])
