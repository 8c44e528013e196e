"""Round metrics from verified groups (docs/method.md §Metrics). Pure functions over group rows.

A group row carries, per de-duplicated COT: `correct`, `pred`, `counts` (multiplicity before dedup) and a score
(`sample_logp` / token count, or a re-scored value). All functions accept plain lists so they run on parquet
rows, pandas batches or test fixtures alike.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (n samples, c correct)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(preds: Sequence[str], correct: Sequence[bool], counts: Sequence[int]) -> bool:
    """maj@k for one question: is the most voted final answer (ties: first seen) correct? Empty answers don't vote."""
    votes: Counter[str] = Counter()
    right: dict[str, bool] = {}
    for p, ok, n in zip(preds, correct, counts):
        if p:
            votes[p] += n
            right[p] = bool(ok)
    if not votes:
        return False
    return right[votes.most_common(1)[0][0]]


def pair_accuracy(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Fraction of (positive, negative) pairs with s_p > s_n; None without both kinds (docs/method.md §Metrics)."""
    pos = [s for s, ok in zip(scores, correct) if ok]
    neg = [s for s, ok in zip(scores, correct) if not ok]
    if not pos or not neg:
        return None
    return sum(p > n for p in pos for n in neg) / (len(pos) * len(neg))


def group_scores(row: dict) -> list[float]:
    """Token-averaged score s = S / |c| of each COT of a group row."""
    return [lp / max(len(ids), 1) for lp, ids in zip(row["sample_logp"], row["cot_ids"])]


def sample_metrics(rows: Iterable[dict], k: int) -> dict[str, float]:
    """pass@k, maj@k, counts, assessment accuracy and score health over sampled groups."""
    rows = list(rows)
    n_pos = n_neg = 0
    passes, majs, pair_accs, s_pos, s_neg = [], [], [], [], []
    for row in rows:
        counts = list(row.get("counts") or [1] * len(row["correct"]))
        correct = [bool(c) for c in row["correct"]]
        n = int(row.get("num_sampled") or sum(counts))
        c = sum(m for m, ok in zip(counts, correct) if ok)
        passes.append(pass_at_k(n, c, min(k, n)) if n else 0.0)
        majs.append(float(majority_correct(row["pred"], correct, counts)))
        scores = row.get("scores") or group_scores(row)
        acc = pair_accuracy(scores, correct)
        if acc is not None:
            pair_accs.append(acc)
        n_pos += sum(correct)
        n_neg += len(correct) - sum(correct)
        s_pos += [s for s, ok in zip(scores, correct) if ok]
        s_neg += [s for s, ok in zip(scores, correct) if not ok]
    return {
        "num_questions": len(rows),
        "num_samples": n_pos + n_neg,
        "num_positive": n_pos,
        "num_negative": n_neg,
        "num_mixed_groups": len(pair_accs),
        "mixed_fraction": len(pair_accs) / len(rows) if rows else math.nan,
        "questions_per_mixed_group": len(rows) / len(pair_accs) if pair_accs else math.nan,
        "pass_at_k": _mean(passes),
        "maj_at_k": _mean(majs),
        "assessment_accuracy": _mean(pair_accs),
        "mean_score_pos": _mean(s_pos),
        "mean_score_neg": _mean(s_neg),
        "score_gap": _mean(s_pos) - _mean(s_neg),
        "min_score_neg": min(s_neg) if s_neg else math.nan,
    }


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p(1-p)/n) of a fraction p of n independent trials (an accuracy on n questions)."""
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan
