"""Ranks of one question's COTs: correct first, then higher process score, then shorter (1 = best).

Ranks are dense ("1, 1, 2"): COTs with equal keys tie, and each distinct key is one level, which is what the
ranking losses cut between. A NaN process score (nothing checkable) ranks below every checked score: a COT
that shows no verifiable work is not preferred over one whose work checks out.
"""
from __future__ import annotations

import math


def rank_cots(correct: list[bool], process: list[float], lengths: list[int]) -> list[int]:
    keys = [(not c, 1.0 if math.isnan(p) else -p, n)  # ascending: correct, higher process, shorter
            for c, p, n in zip(correct, process, lengths, strict=True)]
    level = {key: i + 1 for i, key in enumerate(sorted(set(keys)))}
    return [level[key] for key in keys]
