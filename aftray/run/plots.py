"""Per-run plots from summary.json, one point per round (integer ticks): greedy accuracy with binomial error bars,
assessment accuracy, pass@k and maj@k; s_pos/s_neg; phase times; the sampler↔trainer log-prob drift when the
rounds carry it."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Ray workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PHASES = ("time_rollout_s", "time_verify_s", "time_train_s", "time_sync_s", "time_eval_s")


def _series(rounds: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(summary: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = summary["rounds"]
    title = f"{summary['run_name']} ({summary['loss']}, {summary['task']})"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = _series(rounds, "accuracy")
    # ± one binomial SE, sqrt(p(1-p)/n); none for a round recorded before accuracy_se existed
    se = [r.get("accuracy_se") or 0.0 for r in rounds if r.get("accuracy") is not None]
    ax.errorbar(xs, ys, yerr=se, marker="o", capsize=3, label="greedy accuracy (± 1 SE)")
    for key, label in (("assessment_accuracy", "assessment accuracy"), ("pass_at_k", "pass@k"),
                       ("maj_at_k", "maj@k")):
        xs, ys = _series(rounds, key)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="round", ylabel="fraction", title=title, ylim=(0, 1))
    ax.legend()
    paths.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("mean_score_pos", "mean s_pos"), ("mean_score_neg", "mean s_neg"),
                       ("min_score_neg", "min s_neg")):
        xs, ys = _series(rounds, key)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="round", ylabel="token-averaged log-prob", title=title)
    ax.legend()
    paths.append(_save(fig, out_dir / "scores.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    bottom = [0.0] * len(rounds)
    for key in PHASES:
        ys = [r.get(key) or 0.0 for r in rounds]
        ax.bar(xs, ys, bottom=bottom, label=key.removeprefix("time_").removesuffix("_s"))
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set(xlabel="round", ylabel="seconds", title="phase times")
    ax.legend()
    paths.append(_save(fig, out_dir / "phase_times.png"))

    if any(r.get("train_logp_drift_mean") is not None for r in rounds):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("train_logp_drift_mean", "mean"), ("train_logp_drift_max", "max")):
            xs, ys = _series(rounds, key)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set(xlabel="round", ylabel="|trainer - sampler| token log-prob", title="sampler↔trainer log-prob drift")
        ax.legend()
        paths.append(_save(fig, out_dir / "logp_drift.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.gca().xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # rounds: whole numbers, even one
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
