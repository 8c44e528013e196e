"""The statistics of a comparison: paired t-tests with their confidence intervals, Holm's correction over a
family of contrasts, and the task-level estimate (docs/method.md §Statistics of a comparison).

A paired difference is one number per unit (a seed: same task, base and questions for both arms); its test is a
one-sample t-test of those numbers against 0, df = n − 1. Fewer than two units, or differences that are all
equal, have no standard error: no t, no p, and such a contrast is never resolved."""
from __future__ import annotations

import math
import statistics

import scipy.stats
from statsmodels.stats.multitest import multipletests


def paired_test(diffs: list[float], alpha: float = 0.05) -> dict:
    """Mean, std, standard error (std / √n), the (1 − alpha) t confidence interval, t and the two-sided p of the
    differences (the paired t-test: `scipy.stats.ttest_rel(a, b)` is this test of a − b). No SE: t, p, CI None."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    std = statistics.stdev(diffs) if n > 1 else 0.0 if n else math.nan
    se = std / math.sqrt(n) if n else math.nan
    out = {"mean": mean, "std": std, "se": se, "n": n, "df": n - 1, "t": None, "p": None, "ci": None}
    if n < 2 or se < 1e-12:  # equal differences can still differ in their last bits (0.3 - 0.1, 0.4 - 0.2)
        return out
    test = scipy.stats.ttest_1samp(diffs, 0.0)
    half = float(scipy.stats.t.ppf(1 - alpha / 2, n - 1)) * se
    return {**out, "t": float(test.statistic), "p": float(test.pvalue), "ci": [mean - half, mean + half]}


def task_level_test(diffs_by_task: dict[int, list[float]], alpha: float = 0.05) -> dict:
    """The task seed as the unit: each task's paired differences averaged, then `paired_test` over those means
    (df = tasks − 1). Seeds on one task share its base and questions, so they are not independent draws of
    "a task"; this estimate generalises over tasks, the per-seed one only over seeds on these tasks."""
    means = {t: statistics.fmean(d) for t, d in sorted(diffs_by_task.items()) if d}
    return {**paired_test(list(means.values()), alpha), "task_means": means}


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of one family (statsmodels' `multipletests(method="holm")`). A contrast without a
    p (no SE) still counts in the family, as p = 1: the family is what was declared, not what came out testable."""
    if not p_values:
        return []
    adjusted = multipletests([1.0 if p is None else p for p in p_values], method="holm")[1]
    return [None if p is None else float(a) for p, a in zip(p_values, adjusted)]
