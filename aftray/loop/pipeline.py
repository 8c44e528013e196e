"""Rollout joined with verify: question rows stream through the pool's engines (rows with their completions) and
on through verify (group rows, docs/internals.md), one lazy Ray Data pipeline, so that sampling, verifying and
writing overlap. Verify's seconds land in the pool's round stats (`time_verify_s`)."""
from __future__ import annotations

import time

import pyarrow as pa
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
