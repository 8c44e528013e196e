"""Rollout pool: long-lived engine actors behind a Ray Data pipeline, with in-place weight refresh.

    questions ─ map_batches(_rollout_batch, num_cpus=0) ─► Router ─► EngineActor 0..N-1 (one model each)
              ─► question rows + their completions (verify makes group rows of them: aftray.loop.pipeline)

Why not Ray Data's own actor pool: `map_batches(SomeClass, concurrency=N)` starts its actors per dataset
execution, so every round would load the model again. Here the engine actors are created once and live as
long as the pool. The Ray Data stage is a light task (no CPU reserved) that hands its batch to the router and
waits. The router, a small async actor, gives each batch to a free engine (any idle engine takes the next
batch; the rest wait in its queue) and holds the current weights record.

Weights and faults, one mechanism: every call carries the router's current `Weights` (version + where they
are: checkpoint folder or object-store ref) and an engine holding another version loads them first. `refresh`
sends the new record to every engine. An engine process that dies is restarted by Ray (`max_restarts`) with
the initial model; its in-flight call is retried on the new process (`max_task_retries`) and loads the current
weights before generating. The batch's rows come back once, and since a question's COTs depend only on
(weights, prompt, seed, round), the retry samples the very COTs the lost call would have. The router itself
is not restarted: a fresh one would hand out the initial weights record, so losing it fails the round loudly
instead of sampling with stale weights.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from aftray.cluster import actor_options
from aftray.config import FP32, RolloutConfig
from aftray.rollout.engine import Engine, SamplingParams, derive_seed
from aftray.rollout.questions import encode_prompts
from aftray.weights import from_payload

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per engine actor, and retries of the call it was running


@dataclass(frozen=True)
class Weights:
    """The weights engines must hold. `source`: None (the initial model), a checkpoint folder, or a one-item
    list with an object-store ref (inside a list Ray passes the ref on unresolved, so an engine fetches the
    weights only when it does not hold that version yet)."""
    version: int
    source: None | str | list = None


def _engine_settings(cfg: RolloutConfig) -> RolloutConfig:
    """The settings an engine is built with: all of the rollout config but the sampling seed."""
    return replace(cfg, seed=None)


def truncate_prompts(prompts: list[list[int]], limit: int) -> tuple[list[list[int]], int]:
    """Left-truncate to `limit` tokens (the end of a prompt is what the model continues) and count them."""
    return [p[-limit:] for p in prompts], sum(len(p) > limit for p in prompts)


def make_engine(kind: str, model_path: str | Path, cfg: RolloutConfig, dtype: str = FP32) -> Engine:
    """dtype: what vLLM serves, the trainer's weights' (`TrainConfig.weights_dtype`); HF picks its own."""
    # engines import torch/transformers or vLLM (an optional extra): only the process that builds one loads them
    if kind == "hf":
        from aftray.rollout.hf_engine import HFEngine

        return HFEngine(model_path, cfg)
    if kind == "vllm":
        from aftray.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, cfg, dtype)
    raise ValueError(f"rollout.engine: expected 'hf' or 'vllm', got {kind!r}")


class EngineActor:
    """One engine in its own process for the whole run. Methods return (result, stats for the router)."""

    def __init__(self, model_path: str, cfg: RolloutConfig, version: int, dtype: str):
        self.model_path, self.cfg = model_path, cfg
        self.engine = make_engine(cfg.engine, model_path, cfg, dtype)
        self.engine.version = version  # the weights at model_path carry the pool's starting label

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.engine.close()

    def sync(self, weights: Weights, force: bool = False) -> None:
        """Load `weights` unless already held (force: whatever version the engine holds)."""
        if self.engine.version == weights.version and not force:
            return
        if weights.source is None or isinstance(weights.source, str):
            self.engine.load_weights(weights.source or self.model_path, weights.version)
        else:
            self.engine.update_weights(from_payload(ray.get(weights.source[0])), weights.version)

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join trainer rank 0's NCCL group (rollout.weight_sync=nccl; `aftray.train.nccl_push` calls it)."""
        self.engine.init_weight_transfer(init_info)

    def receive_weights(self, update_info: dict, version: int | None) -> None:
        """The weights trainer rank 0 broadcasts, in place (`aftray.train.nccl_push`)."""
        self.engine.receive_weights(update_info, version)

    def generate(self, rows: list[dict], round_index: int, params: SamplingParams, weights: Weights):
        self.sync(weights)
        prompts, truncated = truncate_prompts([r["prompt_ids"] for r in rows], self.cfg.max_prompt_tokens)
        seeded = [params if params.seed is None else
                  replace(params, seed=derive_seed(params.seed, round_index, r["id"])) for r in rows]
        start = time.perf_counter()
        outs = self.engine.generate(prompts, seeded)
        stats = {"num_batches": 1, "num_questions": len(rows), "num_samples": sum(map(len, outs)),
                 "rollout_tokens": sum(len(c.token_ids) for cs in outs for c in cs),
                 "truncated_prompts": truncated, "time_engine_s": time.perf_counter() - start}
        for row, prompt, completions in zip(rows, prompts, outs, strict=True):
            row.update(prompt_ids=prompt, completions=[asdict(c) for c in completions],
                       weights_version=self.engine.version)
        return rows, stats

    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]], weights: Weights):
        self.sync(weights)
        prompts, truncated = truncate_prompts(prompt_ids, self.cfg.max_prompt_tokens)
        return self.engine.score(prompts, cot_ids), {"truncated_prompts": truncated}

    def sample_continuations(self, prefixes: list[str], m: int, round_index: int, params: SamplingParams,
                             weights: Weights):
        """m sampled continuations of each text prefix (prompt + partial COT), seeded by (round, prefix)."""
        self.sync(weights)
        # a prefix is a prompt plus up to a whole COT
        prompts, _ = truncate_prompts(encode_prompts(self.engine.tokenizer, prefixes),
                                      self.cfg.max_prompt_tokens + self.cfg.max_new_tokens)
        seeded = [replace(params, n=m, seed=None if params.seed is None else
                          derive_seed(params.seed, round_index, p)) for p in prefixes]
        start = time.perf_counter()
        outs = self.engine.generate(prompts, seeded)
        stats = {"mc_tokens": sum(len(c.token_ids) for cs in outs for c in cs),
                 "time_mc_engine_s": time.perf_counter() - start}
        return [[c.text for c in cs] for cs in outs], stats


class Router:
    """Async actor: gives each call to a free engine, stamped with the current weights; sums round stats."""

    def __init__(self, engines: list, weights: Weights):
        self.engines, self.weights = engines, weights
        self.free: asyncio.Queue = asyncio.Queue()
        for i in range(len(engines)):
            self.free.put_nowait(i)
        self.stats: dict = defaultdict(lambda: defaultdict(int))
        self.generating: dict = defaultdict(int)  # round -> its generate calls running now
        self.since: dict = {}  # round -> when its generate calls went from none to some

    async def call(self, method: str, round_index: int | None, *args):
        i = await self.free.get()
        timed = method == "generate"
        if timed:
            self._generating(round_index, +1)
        try:
            out, stats = await getattr(self.engines[i], method).remote(*args, self.weights)
        finally:
            self.free.put_nowait(i)
            if timed:
                self._generating(round_index, -1)
        self.add(round_index, stats)
        return out

    def _generating(self, round_index: int | None, delta: int) -> None:
        """time_generate_s: wall time during which some engine generated for the round (the union of its
        calls' intervals, so two executions of one round do not count the gap between them)."""
        self.generating[round_index] += delta
        if delta > 0 and self.generating[round_index] == 1:
            self.since[round_index] = time.perf_counter()
        elif delta < 0 and self.generating[round_index] == 0:
            self.stats[round_index]["time_generate_s"] += time.perf_counter() - self.since[round_index]

    def add(self, round_index: int | None, stats: dict) -> None:
        for k, v in stats.items():
            self.stats[round_index][k] += v

    async def refresh(self, weights: Weights, new_run: bool = False) -> None:
        """new_run: another run takes the pool over: its round stats start empty, and its starting weights are
        loaded whatever the engines hold (its version labels may be ones the last run used)."""
        if new_run:
            self.stats.clear()
        self.weights = weights  # calls dispatched from now on carry it; in-flight ones finish first
        await asyncio.gather(*(e.sync.remote(weights, new_run) for e in self.engines))

    def metrics(self, round_index: int | None) -> dict:
        stats = {"time_generate_s": 0.0, **self.stats.get(round_index, {})}
        seconds = stats["time_generate_s"]
        return {**stats, "rollout_tokens_per_s": stats.get("rollout_tokens", 0) / seconds if seconds else 0.0}


@dataclass
class PoolContinuationSampler:
    """A `ContinuationSampler` (`aftray.verify.process`): m sampled continuations per prefix, by the pool's
    engines (`EngineActor.sample_continuations`): what verify.process="mc" samples its step values with.
    Picklable: the Ray Data verify tasks call it."""
    router: Any
    round_index: int
    params: SamplingParams

    def __call__(self, prefixes: list[str], m: int) -> list[list[str]]:
        return ray.get(self.router.call.remote("sample_continuations", self.round_index, prefixes, m,
                                               self.round_index, self.params))


def _rollout_batch(batch: pa.Table, router, round_index: int, params: SamplingParams) -> pa.Table:
    rows = ray.get(router.call.remote("generate", round_index, batch.to_pylist(), round_index, params))
    return pa.Table.from_pylist(rows)


class RolloutPool:
    """`cfg.num_actors` engine actors (created here, kept until `shutdown`) and the router before them."""

    def __init__(self, cfg: RolloutConfig, model_path: str | Path, version: int = 0, dtype: str = FP32):
        """`version` labels the weights at `model_path`; a later `refresh` must use another label, since
        engines skip a version they hold (the loop starts a base model at -1: round 0's VFT weights are 0).
        `dtype`: the trainer's weights' (`TrainConfig.weights_dtype`), which vLLM engines serve."""
        self.cfg = cfg
        # what its engines were built with; a later run may sample on them if it asks for the same (`serves`)
        self.engine_key = (_engine_settings(cfg), str(Path(model_path).absolute()), dtype)
        actor = ray.remote(EngineActor).options(**actor_options(cfg), max_restarts=MAX_RESTARTS,
                                                max_task_retries=MAX_RESTARTS)
        self._engines = [actor.remote(str(model_path), cfg, version, dtype) for _ in range(cfg.num_actors)]
        self._weights = Weights(version)  # also keeps an object-store ref alive while engines may need it
        # the router actor; callers stream per-round stats into it too (verify's seconds: router.add)
        self.router = ray.remote(Router).options(num_cpus=0).remote(self._engines, self._weights)
        self.engine_pids()  # wait for the models to load: a bad model path fails here, not mid-round

    @property
    def version(self) -> int:
        return self._weights.version

    @property
    def engines(self) -> list:
        """The engine actors' handles (a trainer pushing weights over NCCL calls them directly)."""
        return list(self._engines)

    def engine_pids(self) -> list[int]:
        return ray.get([e.pid.remote() for e in self._engines])

    def sample(self, questions: ray.data.Dataset, round_index: int, params: SamplingParams | None = None,
               batch_size: int | None = None) -> ray.data.Dataset:
        """Question rows (`question_rows` columns) with their `completions` (`Completion` dicts) and
        `weights_version`, lazily: nothing runs until the dataset is consumed, and rows stream through (never
        collected on the driver). `params` defaults to the config's sampling (k, temperature, top-p, max new
        tokens, seed); its seed is the base of per-question seeds. A batch holds about `batch_size` x `k`
        sequences whatever `params.n`: greedy evaluation (n = 1) sends k times as many questions per call, since
        an engine's step costs much the same for 16 sequences as for 64. batch_size: questions per call instead."""
        params = params or SamplingParams.from_config(self.cfg)
        in_flight = 2 * self.cfg.num_actors  # one batch running and one queued per engine
        batch_size = batch_size or max(1, self.cfg.batch_size * self.cfg.k // params.n)
        return questions.map_batches(
            _rollout_batch, batch_format="pyarrow", batch_size=batch_size, num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=in_flight),
            fn_kwargs={"router": self.router, "round_index": round_index, "params": params})

    def serves(self, cfg: RolloutConfig, model_path: str | Path, dtype: str) -> bool:
        """Whether a run with these settings may sample on this pool (`start_run`): engines built alike, on the
        same base model. The sampling seed may differ (every call carries its own); NCCL weight transfer ties
        the engines to one trainer's process group, so those pools serve their own run alone."""
        return (cfg.weight_sync != "nccl"
                and (_engine_settings(cfg), str(Path(model_path).absolute()), dtype) == self.engine_key)

    def start_run(self, cfg: RolloutConfig, weights: str | Path | ray.ObjectRef, version: int) -> float:
        """Another run takes the pool over (a comparison's runs share one, as they share the trainer): its
        sampling settings and starting weights (`refresh`'s arguments), loaded even where an engine holds a
        version of that label, and round stats of its own. Returns wall seconds."""
        if not self.serves(cfg, *self.engine_key[1:]):
            raise ValueError("rollout: this pool's engines were built for other settings (RolloutPool.serves)")
        self.cfg = cfg
        return self.refresh(weights, version, new_run=True)

    def refresh(self, weights: str | Path | ray.ObjectRef, version: int, new_run: bool = False) -> float:
        """New weights into every engine, in place: a ref from `aftray.weights.put_weights` (what a train
        worker puts after its stage: `rollout.weight_sync=object_store`), or a checkpoint folder (read by each
        engine, so on storage every engine's node sees: `folder`). `version` must name these weights alone
        (engines skip a version they hold). new_run: see `start_run`. Returns wall seconds."""
        start = time.perf_counter()
        source = str(Path(weights).absolute()) if isinstance(weights, (str, Path)) else [weights]
        self._weights = Weights(version, source)
        ray.get(self.router.refresh.remote(self._weights, new_run))
        seconds = time.perf_counter() - start
        log.debug("rollout: weights v%d in %d engine(s) in %.2f s", version, len(self._engines), seconds)
        return seconds

    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]], round_index: int | None = None
              ) -> list[float]:
        """Summed T = 1 log-prob of each COT given its prompt, spread over the engines."""
        step = self.cfg.batch_size * self.cfg.k
        refs = [self.router.call.remote("score", round_index, prompt_ids[i:i + step], cot_ids[i:i + step])
                for i in range(0, len(prompt_ids), step)]
        return [s for part in ray.get(refs) for s in part]

    def continuation_sampler(self, round_index: int, params: SamplingParams | None = None
                             ) -> PoolContinuationSampler:
        return PoolContinuationSampler(self.router, round_index, params or SamplingParams.from_config(self.cfg))

    def metrics(self, round_index: int | None) -> dict:
        """Summed over the round's batches: num_batches, num_questions, num_samples, rollout_tokens,
        truncated_prompts, time_engine_s (engine busy time), time_verify_s (verify task time), mc_tokens; and
        time_generate_s (wall time during which some engine generated for the round) with
        rollout_tokens_per_s over it."""
        return ray.get(self.router.metrics.remote(round_index))

    def shutdown(self) -> None:
        # engines free their cores first: the next pool's actors may start before these processes are gone
        try:
            ray.get([e.close.remote() for e in self._engines], timeout=60)
        except ray.exceptions.RayError as e:  # a dead or hung engine: killed below all the same
            log.warning("rollout: an engine did not close (%s); killing it", type(e).__name__)
        for actor in [self.router, *self._engines]:
            ray.kill(actor)
