"""Rollout joined with verify: question rows stream through the pool's engines (rows with their completions) and
on through verify (group rows, docs/internals.md), one lazy Ray Data pipeline, so that sampling, verifying and
writing overlap. Verify's seconds land in the pool's round stats (`time_verify_s`).

Dynamic sampling (`sample_round` with `loop.min_mixed_groups`): a group whose COTs are all right or all wrong
gives the alignment term no pair, so a round keeps sampling fresh questions until it has enough mixed groups, or
has used its questions (`loop.max_oversample` x `loop.questions_per_round`), as verl, OpenRLHF and DAPO do.
They then drop the other groups; here samples.parquet keeps every group. Under a pairwise loss (AFT, DPO, ORPO:
`losses.needs_pairs`) the stage trains each other group's reference COT alone (`rounds.mixed_or_reference`):
AFT's VFT term learns from every question, while samples without a pair, which would cost k forward and
backward passes each and add nothing to the loss, are left out. Losses that learn from such groups (RFT from
all-right ones, the ranked losses from rank levels) train on every group whole."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from aftray.config import VerifyConfig
from aftray.rollout import Completion, RolloutPool, SamplingParams
from aftray.verify import verify_group


def _verify_batch(batch: pa.Table, router, round: int, cfg: VerifyConfig, answer_kind: str, continuations
                  ) -> pa.Table:
    start = time.perf_counter()
    groups = [verify_group(row, [Completion(**c) for c in row["completions"]], cfg, answer_kind, continuations)
              for row in batch.to_pylist()]
    ray.get(router.add.remote(round, {"time_verify_s": time.perf_counter() - start}))  # in before the rows
    return pa.Table.from_pylist(groups)


def sample_groups(pool: RolloutPool, questions: ray.data.Dataset, round: int, cfg: VerifyConfig,
                  answer_kind: str, params: SamplingParams | None = None) -> ray.data.Dataset:
    """Group rows for question rows, lazily (see `RolloutPool.sample`). verify.process="mc" samples its step
    continuations with the pool's engines."""
    params = params or SamplingParams.from_config(pool.cfg)
    continuations = pool.continuations(round, params) if cfg.process == "mc" else None
    return pool.sample(questions, round, params).map_batches(_verify_batch, batch_format="pyarrow", fn_kwargs={
        "router": pool.router, "round": round, "cfg": cfg, "answer_kind": answer_kind,
        "continuations": continuations})


def sample_round(pool: RolloutPool, questions: list[dict], first: int, min_mixed: int, out: Path, round: int,
                 cfg: VerifyConfig, answer_kind: str) -> None:
    """Group rows of `questions`, taken in order, into the parquet folder `out`: the first `first`, then more
    while `out` holds fewer than `min_mixed` mixed groups and questions remain; each further batch is sized by
    the mixed fraction so far to reach `min_mixed`."""
    used, take = 0, first
    while True:
        batch = ray.data.from_items(questions[used:used + take])
        sample_groups(pool, batch, round, cfg, answer_kind).write_parquet(str(out))  # appends its files
        used += take
        correct = pq.read_table(out, columns=["correct"]).column("correct").to_pylist()
        mixed = sum(any(c) and not all(c) for c in correct)
        if mixed >= min_mixed or used >= len(questions):
            return
        take = min(len(questions) - used, math.ceil((min_mixed - mixed) * used / max(mixed, 1)))
