"""Rollout joined with verify: question rows stream through the pool's engines (rows with their completions) and
on through verify (group rows, docs/internals.md), one lazy Ray Data pipeline, so that sampling, verifying and
writing overlap. Verify's seconds and mixed-group count land in the pool's round stats (`time_verify_s`,
`mixed_groups`); the group rows stay in Ray's object store (the trainer gets refs to them) and in the round's
parquet folder, never in the driver.

Dynamic sampling (`sample_round` with `loop.min_mixed_groups`): a group whose COTs are all right or all wrong
gives the alignment term no pair, so a round keeps sampling fresh questions until it has enough mixed groups, or
has used its questions (`loop.max_oversample` x `loop.questions_per_round`), as verl, OpenRLHF and DAPO do.
They then drop the other groups; here samples.parquet keeps every group. Under a pairwise loss (AFT, DPO, ORPO:
`aftray.loss_table.LossRow.needs_pairs`) the stage trains each other group's reference COT alone
(`StageJob.mixed_or_reference`): AFT's VFT term learns from every question, while samples without a pair,
which would cost k forward and backward passes each and add nothing to the loss, are left out; and it trains
`loop.questions_per_round` groups, the mixed ones first (`StageJob.max_groups`), so that a round costs the steps
it planned however many questions it sampled. Losses that
learn from such groups (RFT from all-right ones, the ranked losses from rank levels) train on every group
whole."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa
import ray

from aftray.config import VerifyConfig
from aftray.rollout import Completion, RolloutPool, SamplingParams
from aftray.rows import GROUP_SCHEMA, is_mixed
from aftray.verify import verify_group


def _verify_batch(batch: pa.Table, router, round_index: int, cfg: VerifyConfig, answer_kind: str,
                  sample_continuations) -> pa.Table:
    start = time.perf_counter()
    groups = [verify_group(row, [Completion(**c) for c in row["completions"]], cfg, answer_kind,
                           sample_continuations) for row in batch.to_pylist()]
    ray.get(router.add.remote(round_index, {"time_verify_s": time.perf_counter() - start,  # in before the rows
                                            "mixed_groups": sum(is_mixed(g) for g in groups)}))
    return pa.Table.from_pylist(groups, schema=GROUP_SCHEMA)


def sample_groups(pool: RolloutPool, questions: ray.data.Dataset, round_index: int, cfg: VerifyConfig,
                  answer_kind: str, params: SamplingParams | None = None, batch_size: int | None = None
                  ) -> ray.data.Dataset:
    """Group rows for question rows, lazily (see `RolloutPool.sample`, which takes `batch_size`).
    verify.process="mc" samples its step continuations with the pool's engines."""
    params = params or SamplingParams.from_config(pool.cfg)
    sample_continuations = pool.continuation_sampler(round_index, params) if cfg.process == "mc" else None
    return pool.sample(questions, round_index, params, batch_size).map_batches(
        _verify_batch, batch_format="pyarrow", fn_kwargs={
            "router": pool.router, "round_index": round_index, "cfg": cfg, "answer_kind": answer_kind,
            "sample_continuations": sample_continuations})


def sample_round(pool: RolloutPool, questions: list[dict], first: int, min_mixed: int, out: Path,
                 round_index: int, cfg: VerifyConfig, answer_kind: str) -> list[ray.ObjectRef]:
    """Group rows of `questions`, taken in order, into the parquet folder `out` and Ray's object store: the
    first `first`, then more while the round has fewer than `min_mixed` mixed groups and questions remain;
    each further batch is sized by the mixed fraction so far to reach `min_mixed`. Returns refs to the rows'
    arrow blocks (what the trainer reads)."""
    used, take, blocks = 0, first, []
    while True:
        groups = sample_groups(pool, ray.data.from_items(questions[used:used + take]), round_index, cfg,
                               answer_kind).materialize()
        groups.write_parquet(str(out))  # the round's record; appends its files
        blocks += groups.to_arrow_refs()
        used += take
        mixed = pool.metrics(round_index).get("mixed_groups", 0)
        if mixed >= min_mixed or used >= len(questions):
            return blocks
        take = min(len(questions) - used, math.ceil((min_mixed - mixed) * used / max(mixed, 1)))
