"""One question's sampled completions -> its group row (docs/internals.md): dedup, labels, process, ranks."""
from __future__ import annotations

import math
from typing import Any, Optional

from aftray.config import VerifyConfig
from aftray.rows import QUESTION_COLUMNS, group_row
from aftray.tasks.answers import extract_answer, is_correct
from aftray.verify.process import ContinuationSampler, arith_process_score, mc_step_values
from aftray.verify.rank import rank_cots


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def label(pred: str, gold: str, finish_reason: str, answer_kind: str) -> str:
    """`truncated` wins over the answer: a COT cut at max tokens did not finish its reasoning."""
    if finish_reason == "length":
        return "truncated"
    if not pred:
        return "no_answer"
    return "correct" if is_correct(pred, gold, answer_kind) else "wrong_answer"


def verify_group(row: dict, completions: list, cfg: VerifyConfig, answer_kind: str,
                 sample_continuations: Optional[ContinuationSampler] = None) -> dict[str, Any]:
    """Group row for one question (`aftray.rows.group_row`).

    `row` holds the question columns (`rows.QUESTION_COLUMNS`, copied through), `weights_version` (and
    `choices` for multiple choice); `completions` are objects with `text`, `token_ids`, `logprobs` (per
    generated token, or None) and `finish_reason` ("stop" | "length"). `sample_continuations` (the rollout
    engines') is needed only for `cfg.process == "mc"`.
    """
    if cfg.process == "mc" and sample_continuations is None:
        raise ValueError("verify.process='mc' needs sample_continuations (the rollout engines') to sample "
                         "step continuations")
    kept, counts, index = [], [], {}
    for c in completions:
        key = normalize_ws(c.text)
        if key in index:  # a duplicate: keep one copy, count its votes (maj@k)
            counts[index[key]] += 1
            continue
        index[key] = len(kept)
        kept.append(c)
        counts.append(1)

    gold, choices = row["answer"], row.get("choices")
    choices = [str(c) for c in choices] if choices is not None and len(choices) else None  # Ray Data: ndarray
    cots = [c.text for c in kept]
    preds = [extract_answer(t, answer_kind, choices) for t in cots]
    labels = [label(p, gold, c.finish_reason, answer_kind) for p, c in zip(preds, kept, strict=True)]
    correct = [lab == "correct" for lab in labels]
    if cfg.process == "arith":
        process = [arith_process_score(t) for t in cots]
    elif cfg.process == "mc":
        values = mc_step_values(row["prompt"], cots, gold, answer_kind, sample_continuations, cfg.mc_samples,
                                choices)
        process = [sum(v) / len(v) for v in values]
    else:
        process = [math.nan] * len(cots)
    lengths = [len(c.token_ids) or len(c.text) for c in kept]  # tokens (characters if the engine gave no ids)
    return group_row(
        **{k: row[k] for k in QUESTION_COLUMNS},
        cots=cots,
        cot_ids=[c.token_ids for c in kept],
        sample_logp=[float(sum(c.logprobs)) if c.logprobs is not None else math.nan for c in kept],
        sample_token_logp=[c.logprobs or [] for c in kept],
        finish_reasons=[c.finish_reason for c in kept],
        pred=preds,
        labels=labels,
        correct=correct,
        process=process,
        rank=rank_cots(correct, process, lengths),
        counts=counts,
        num_sampled=len(completions),
        weights_version=row["weights_version"],
    )
