"""Compare losses, compute-matched: every arm of a seed starts from the same VFT model and sees the same questions,
the same number of rounds, optimizer steps and samples per round.

A base run trains the VFT model and evaluates it (round 0): one base shared by every seed (the paper's setting:
one VFT model, then the fine-tuning methods; seeds vary sampling, data order and training), or one per seed with
`shared_base=False` (seeds also vary the model init). Each arm's run directory gets a hard-linked copy of its
base's round 0 and resumes from round 1, so the arms share the starting weights, the held-out candidate set and
round 0's numbers. `vft` is the "VFT continued" control: the same extra steps spent
on plain VFT on the reference COTs. Results: `comparison.json`, `comparison.md`, plots; one MLflow parent run
with a child run per arm and seed.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from aftray.config import load_config
from aftray.loop.rounds import run_loop
from aftray.run.rundir import read_summary, write_json
from aftray.run.tracking import Tracker
from aftray.train.service import TrainService

log = logging.getLogger("aftray")

# arm label -> loss name; the order is the table's
ARMS = {
    "vft_continued": "vft", "rft": "rft", "aft_dc": "aft_dc", "aft_bc": "aft_bc", "aft_rank_bc": "aft_rank_bc",
    "dpo": "dpo", "dpo_bc": "dpo_bc", "rrhf": "rrhf", "rrhf_bc": "rrhf_bc", "pro": "pro", "pro_bc": "pro_bc",
    "orpo": "orpo", "orpo_bc": "orpo_bc", "align_none": "align_none",
}
# the paper's comparison (the default of jobs/compare_losses.py); PRO and ORPO arms run on request
PAPER_ARMS = ("vft_continued", "rft", "aft_dc", "aft_bc", "aft_rank_bc", "dpo", "dpo_bc", "rrhf", "rrhf_bc",
              "align_none")
TRACKED = ("accuracy", "assessment_accuracy", "mean_score_pos", "mean_score_neg", "min_score_neg", "pass_at_k")


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


def run_comparison(preset: str | Path, arms: list[str], seeds: list[int], out_dir: str | Path,
                   overrides: list[str] | None = None, shared_base: bool = True,
                   grid: dict[str, list[str]] | None = None, bases_dir: str | Path | None = None,
                   base_seed: int | None = None) -> dict:
    """Every arm × grid setting × seed, each from its seed's VFT base (kept in `bases_dir`, default `out_dir`;
    shared bases: the one of `base_seed`, default the first seed). A grid setting's arms are compared with
    VFT-continued under the same setting; their labels are `<arm>_<setting>` (see `grid_settings`)."""
    out_dir = Path(out_dir).absolute()
    bases_dir = Path(bases_dir).absolute() if bases_dir else out_dir
    overrides = list(overrides or [])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown {unknown}; expected some of {', '.join(ARMS)}")
    settings = grid_settings(grid)
    first = load_config(preset, overrides + settings[0][1] + [f"output_dir={out_dir}"])  # fail fast on bad input
    start = time.perf_counter()
    label = {(arm, name): f"{arm}_{name}" if name else arm for name, _ in settings for arm in arms}
    runs: dict[str, dict[int, dict]] = {label[arm, name]: {} for name, _ in settings for arm in arms}
    bases: dict[int, dict] = {}
    # one set of train workers for every run: their start-up (~35 s here) is paid once, not once per arm
    with (Tracker(first.tracking, out_dir / "parent", out_dir.name, out_dir) as parent,
          TrainService(first.train, out_dir / "train_state", first.cluster.placement_strategy) as trainer):
        parent.log_params({"arms": ",".join(arms), "seeds": ",".join(map(str, seeds)), "preset": str(preset),
                           "overrides": " ".join(overrides), "grid": str(grid or {})})
        for seed in seeds:
            # the seed changes the sampling, the data order and the training (and the model init of its own
            # base when bases are not shared); the task stays the same
            b_seed = seed if not shared_base else seeds[0] if base_seed is None else base_seed
            base = load_config(preset, overrides + [f"output_dir={bases_dir}", f"seed={b_seed}",
                                                    f"model.tiny.seed={b_seed}", f"train.seed={b_seed}",
                                                    f"run_name=base_s{b_seed}", "loop.rounds=0"])
            bases[b_seed] = _finished(base) or run_loop(base, parent.run_id, trainer)
            seeded = overrides + [f"output_dir={out_dir}", f"seed={seed}", f"train.seed={seed}",
                                  f"rollout.seed={seed}", f"model.tiny.seed={b_seed}"]
            for name, setting in settings:
                for arm in arms:
                    cfg = load_config(preset, seeded + setting + [f"run_name={label[arm, name]}_s{seed}",
                                                                  f"loss.name={ARMS[arm]}"])
                    _link_round_zero(base.run_dir, cfg.run_dir)
                    runs[label[arm, name]][seed] = _finished(cfg) or run_loop(cfg, parent.run_id, trainer)
        controls = {label[arm, name]: label.get(("vft_continued", name)) for name, _ in settings for arm in arms}
        result = aggregate(runs, first.loop.rounds, controls)
        result.update(preset=str(preset), overrides=overrides, seeds=seeds, shared_base=shared_base,
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


def runs_time(bases: dict[int, dict], runs: dict[str, dict[int, dict]]) -> float:
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


def aggregate(runs: dict[str, dict[int, dict]], rounds: int, controls: dict[str, str | None] | None = None) -> dict:
    """Mean ± std over seeds per arm and round; paired differences against each arm's control (default
    "vft_continued"), seed by seed."""
    out: dict = {"arms": {}}
    for arm, by_seed in runs.items():
        control_label = (controls or {}).get(arm, "vft_continued")
        control = runs.get(control_label, {})
        per_round = {}
        for r in range(rounds + 1):
            recs = [s["rounds"][r] for s in by_seed.values() if len(s["rounds"]) > r]
            per_round[r] = {k: _mean_std([rec.get(k) for rec in recs]) for k in TRACKED}
        finals = {seed: s["rounds"][-1] for seed, s in by_seed.items()}
        entry = {"rounds": per_round, "final": per_round[rounds],
                 "per_seed_final_accuracy": {seed: f["accuracy"] for seed, f in finals.items()}}
        if control and arm != control_label:
            diffs = [finals[s]["accuracy"] - control[s]["rounds"][-1]["accuracy"] for s in finals if s in control]
            entry["delta_accuracy_vs_vft_continued"] = _mean_std(diffs)
        out["arms"][arm] = entry
    return out


def _fmt(ms: dict, pct: bool = False) -> str:
    if not ms or ms.get("n", 0) == 0:
        return "–"
    scale = 100 if pct else 1
    return f"{ms['mean'] * scale:.1f} ± {ms['std'] * scale:.1f}" if pct else f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def markdown_table(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"Final round, mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}); accuracy in %, "
             "Δ = paired difference to VFT-continued (same seed).", "",
             "| arm | accuracy | Δ vs VFT-cont. | assessment acc. | pass@k | mean s_pos | mean s_neg | min s_neg |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, e in result["arms"].items():
        f = e["final"]
        lines.append(f"| {arm} | {_fmt(f['accuracy'], True)} | {_fmt(e.get('delta_accuracy_vs_vft_continued'), True)}"
                     f" | {_fmt(f['assessment_accuracy'], True)} | {_fmt(f['pass_at_k'], True)} | "
                     f"{_fmt(f['mean_score_pos'])} | {_fmt(f['mean_score_neg'])} | {_fmt(f['min_score_neg'])} |")
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
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "ray", "deepspeed", "transformers", "mlflow")}
