"""One aftray run: round 0 evaluates the starting model; rounds 1..R sample → verify → train → refresh → evaluate.

Offline mode (the paper's recipe) is the same loop with R = 1: round 0 runs the VFT stage on reference COTs, round
1 samples k COTs for every training question with the VFT model and runs one alignment stage. Online mode samples
a fresh slice of questions each round with the current weights. With `loop.overlap`, round r+1's rollout runs
while round r trains (its samples are one round stale); by default the loop is strictly on-policy.

The policy stays in memory. The train workers keep model and optimizer from one align stage to the next (a
run's first align stage starts a new optimizer on the VFT weights), the learning rate follows one schedule
over the run's align steps, and the new weights reach the samplers through Ray's object store
(`rollout.weight_sync`), so a round need not write a folder. Rows stay out of the driver: the round's groups
go from Ray Data's blocks to the trainer as object refs, and its metrics are computed by a task beside them.

A checkpointed round is the unit of resume (`loop.checkpoint_every`: its weights in rounds/<r>/checkpoint,
the trainer's optimizer in Ray Train's storage): a re-run with the same run name continues after the last
finished round that has one, without redoing finished work (samples or a finished stage found on disk are
reused); later rounds are redone.
"""
from __future__ import annotations

import logging
import math
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from aftray.cluster import check_cluster_fits, start_ray
from aftray.config import Config, flatten, save_config, to_dict
from aftray.loss_table import LOSS_ROWS
from aftray.loop.evaluate import NOT_EVALUATED, Evaluator, sample_text
from aftray.loop.pipeline import sample_round
from aftray.models import load_tokenizer, resolve_model_path
from aftray.rollout import RolloutPool, question_rows
from aftray.run.console import generated, phase, phase_line, progress, result_line
from aftray.rows import check_group_table, question_group_row
from aftray.run.metrics import sample_metrics
from aftray.run.plots import plot_run
from aftray.run.rundir import RunDir, write_summary
from aftray.run.tracking import Tracker, mlflow_name
from aftray.tasks import load_task
from aftray.train.service import TrainService
from aftray.train.stage import planned_steps

log = logging.getLogger("aftray")
SAMPLES_PER_LABEL = 3  # COTs per label in rounds/<r>/samples.txt (a glance; the parquet holds them all)


def round_questions(rows: list[dict], cfg: Config, r: int) -> list[dict]:
    """Offline: every training question. Online: round r's block of one seeded shuffle (wrapping around), in
    the order they are sampled: `questions_per_round` questions, or with dynamic sampling the cap of
    `max_oversample` times as many (`sample_round` takes what it needs from the front). A block never holds a
    question twice, and depends only on (seed, round)."""
    if cfg.loop.mode == "offline":
        return rows
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    lp = cfg.loop
    n = math.ceil(lp.questions_per_round * lp.max_oversample) if lp.min_mixed_groups else lp.questions_per_round
    return [rows[order[(i + (r - 1) * n) % len(rows)]] for i in range(min(n, len(rows)))]


@ray.remote(num_cpus=0)
def summarize_round(groups, k: int, per_label: int) -> tuple[dict, str]:
    """The round's sample metrics and a few of its COTs as text, computed beside the rows (the driver gets the
    numbers alone). groups: refs to Ray Data's arrow blocks, or the samples' parquet folder."""
    import pyarrow.parquet as pq

    tables = ray.get(groups) if isinstance(groups, list) else [pq.read_table(groups)]
    for table in tables:
        check_group_table(table, groups if isinstance(groups, str) else "the round's group rows")
    rows = sorted((row for t in tables for row in t.to_pylist()), key=lambda row: row["id"])
    return sample_metrics(rows, k), sample_text(rows, per_label)


def resume_point(run_dir: RunDir) -> list[int]:
    """The finished rounds a re-run keeps: up to the last one whose weights are on disk (round 0 always
    counts: its weights are the VFT stage's checkpoint or the base model). Later rounds are redone: their
    folders go, except the next round's samples (drawn by the kept weights) and a stage that finished with its
    weights saved (read back: its end state is the trainer's latest checkpoint)."""
    finished = run_dir.finished_rounds()
    last = max((r for r in finished if r == 0 or run_dir.has_checkpoint(r)), default=-1)
    for r in range(last + 1, max(finished, default=-1) + 2):
        folder = run_dir.round_dir(r)
        if run_dir.has_checkpoint(r) or not folder.exists():
            continue
        for path in folder.iterdir():
            if not (r == last + 1 and path == run_dir.samples_path(r)):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [r for r in finished if r <= last]


class Run:
    """The state one run needs across rounds: config, run dir, samplers, train workers.

    trainer, pool: train workers and a rollout pool to use (a comparison shares them between its runs; the pool
    only where it `serves` this run's settings); else the run starts its own."""

    def __init__(self, cfg: Config, trainer: TrainService | None = None, pool: RolloutPool | None = None):
        self.cfg, self.dir = cfg, RunDir(cfg.run_dir)
        save_config(cfg, self.dir.config_path)
        self.task = load_task(cfg.task)
        self.base_model = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(self.base_model, cfg.model.trust_remote_code)
        self.train_rows = question_rows(self.task.train, self.task, tokenizer)
        self.eval_rows = question_rows(self.task.test, self.task, tokenizer)
        log.info("task %s: %d train / %d eval questions; model %s", cfg.task.name, len(self.train_rows),
                 len(self.eval_rows), self.base_model)
        start_ray(cfg)
        check_cluster_fits(cfg)
        self.finished = resume_point(self.dir)
        # weights are labelled with the round that produced them; the base model, before any round, is -1
        self.version = max(self.finished, default=-1)
        self.weights: str | Path | ray.ObjectRef = self.checkpoint_of(self.version)
        self.owns_trainer = trainer is None
        self.trainer = trainer or TrainService(cfg.train, self.dir.root / "train_state",
                                               cfg.cluster.placement_strategy)
        if self.owns_trainer and len(self.finished) <= cfg.loop.rounds:
            # the train workers start (processes, imports, process group) while the samplers start and round 0
            # evaluates, not when round 1 first needs them: ~25 s off the run's critical path on 2 cores
            self.trainer.start()
        dtype = cfg.train.weights_dtype
        self.owns_pool = pool is None or not pool.serves(cfg.rollout, self.base_model, dtype)
        if self.owns_pool:
            self.pool = RolloutPool(cfg.rollout, self.weights, version=self.version, dtype=dtype)
        else:
            self.pool = pool
            pool.start_run(cfg.rollout, self.weights, self.version)
        self.evaluator = Evaluator(cfg, self.pool, self.task.answer_kind, self.eval_rows, self.dir)
        self.groups: dict[int, list] = {}  # round -> refs to its group rows' blocks (until it trains)
        # align steps taken so far: where the next stage starts on the run's learning-rate schedule
        self.align_steps = sum(self.dir.read_round_metrics(r).get("train_steps", 0) for r in self.finished if r)

    def checkpoint_of(self, r: int) -> Path:
        """Weights after round r (round 0: after the VFT stage, if there was one); the base model before any."""
        for k in range(r, -1, -1):
            if self.dir.has_checkpoint(k):
                return self.dir.checkpoint_dir(k)
        return self.base_model

    def stage_name(self, r: int) -> str:
        """Unique among the runs a comparison's service trains, the same after a restart."""
        return f"{self.cfg.run_name}.{'vft' if r == 0 else 'align'}_{r}"

    # -------------------------------------------------------------------------------------------- phases
    def rollout(self, r: int) -> dict:
        """Sample k COTs per question with the current samplers, verify, write rounds/<r>/samples.parquet."""
        out = self.dir.samples_path(r)
        if out.exists():
            return {"time_rollout_s": 0.0, "time_verify_s": 0.0, "rollout_tokens": 0, "reused_samples": 1}
        start = time.perf_counter()
        questions = round_questions(self.train_rows, self.cfg, r)
        first = self.cfg.loop.questions_per_round if self.cfg.loop.mode == "online" else len(questions)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.groups[r] = sample_round(self.pool, questions, first, self.cfg.loop.min_mixed_groups, tmp, r,
                                      self.cfg.verify, self.task.answer_kind)
        tmp.rename(out)
        wall = time.perf_counter() - start
        stats = self.pool.metrics(r)  # verify seconds and generated tokens, summed over the round's batches
        return {"time_rollout_s": wall - stats["time_verify_s"], "time_verify_s": stats["time_verify_s"],
                "rollout_tokens": stats["rollout_tokens"], "truncated_prompts": stats["truncated_prompts"]}

    def train(self, r: int, stage: str = "align") -> dict:
        cfg = self.cfg
        every, last = cfg.loop.checkpoint_every, cfg.loop.rounds
        sync = cfg.rollout.weight_sync  # resolved by the config: object_store, nccl or folder
        saved = r == 0 or every > 0 and (r % every == 0 or r == last)
        options = {"name": self.stage_name(r), "save_weights": saved,
                   "push_weights": sync == "object_store"}
        if sync == "nccl":  # trainer rank 0 broadcasts to the engines; they then hold version r
            options["nccl_engines"] = (self.pool.engines, cfg.rollout.vllm.tensor_parallel_size,
                                       cfg.train.weights_dtype, r)
        if stage == "vft":  # rows built here from the question table, handed over as one object ref
            groups = [ray.put([question_group_row(row) for row in self.train_rows])]
        else:
            # the round's blocks, or its parquet folder when the samples were read back on a resume
            groups = self.groups.pop(r, None) or self.dir.samples_path(r)
            per_round = len(self.train_rows) if cfg.loop.mode == "offline" else cfg.loop.questions_per_round
            # dynamic sampling oversamples to find mixed groups; the others' samples add nothing to a pairwise
            # loss, and the stage trains as many groups as the round planned (the mixed ones first)
            pairs_only = bool(cfg.loop.min_mixed_groups) and LOSS_ROWS[cfg.loss.name].needs_pairs(cfg.loss)
            options.update(init="reset" if r == 1 else "continue", after=self.stage_name(r - 1),
                           schedule=(self.align_steps, planned_steps(cfg.train, per_round, cfg.loop.rounds)),
                           mixed_or_reference=pairs_only, max_groups=per_round if pairs_only else None)
        start = time.perf_counter()
        result = self.trainer.train(stage, groups, self.checkpoint_of(r - 1), self.dir.round_dir(r),
                                    cfg.train, cfg.loss, trust_remote_code=cfg.model.trust_remote_code, **options)
        # the samplers' next weights: pushed to the object store, else the last folder (the stage's own under
        # weight_sync=folder or on a resume; under nccl the engines hold them already and skip it, and an engine
        # that Ray restarts loads it until the next push)
        self.weights = result.weights[0] if result.weights else self.checkpoint_of(r)
        if stage == "align":
            self.align_steps += result.metrics["steps"]
        return {"time_train_s": time.perf_counter() - start, "train_compute_s": result.metrics["train_time_s"],
                "train_loss": result.metrics["train_loss"],
                "train_steps": result.metrics["steps"], "train_tokens_per_s": result.metrics["tokens_per_s"],
                **{f"train_{k}": v for k, v in result.history[-1].items()
                   if k in ("pair_acc", "s_pos", "s_neg", "s_neg_min", "alignment", "constraint", "vft")},
                # sampler vs trainer log-probs of the round's COTs before the first update (per token)
                **{f"train_logp_drift_{k}": v for k, v in result.metrics.get("logp_drift", {}).items()},
                # the stage's own set-up on rank 0 (start_s: request to start; the workers' start-up on a run's
                # first stage), so that it reaches MLflow with the round
                **{f"train_setup_{k}": v for k, v in result.metrics["setup_s"].items()}}

    def refresh(self, r: int) -> dict:
        seconds = self.pool.refresh(self.weights, version=r)
        self.version = r
        return {"time_sync_s": seconds}

    # -------------------------------------------------------------------------------------------- rounds
    def round_zero(self, tracker: Tracker) -> None:
        """Evaluate the starting model; first train it with VFT when configured (offline mode always)."""
        metrics = {"round": 0, "train_loss": float("nan"), "time_rollout_s": 0.0, "time_verify_s": 0.0,
                   "time_train_s": 0.0, "time_sync_s": 0.0, "rollout_tokens_per_s": float("nan"),
                   "train_tokens_per_s": float("nan")}
        start = time.perf_counter()
        if self.cfg.train.vft.steps > 0 or self.cfg.loop.mode == "offline":
            with phase("train", metrics, self.cfg.loop.rounds):  # the VFT stage on the reference COTs
                metrics.update(self.train(0, stage="vft"))
            with phase("sync", metrics, self.cfg.loop.rounds):
                metrics.update(self.refresh(0))
        metrics.update(self.evaluator.evaluate_round(0))
        self.finish_round(0, metrics, time.perf_counter() - start, tracker)

    def run_round(self, r: int, tracker: Tracker, prefetched: dict | None = None) -> None:
        start = time.perf_counter()
        if prefetched is None:
            with progress(f"round {r} rollout", generated(self.pool, r)):
                prefetched = self.rollout(r)
        metrics = {"round": r, **prefetched}
        sampled, text = ray.get(summarize_round.remote(self.groups.get(r) or str(self.dir.samples_path(r)),
                                                       self.cfg.rollout.k, SAMPLES_PER_LABEL))
        metrics.update(sampled)
        metrics["rollout_tokens_per_s"] = metrics.pop("rollout_tokens") / max(metrics["time_rollout_s"], 1e-9)
        (self.dir.round_dir(r) / "samples.txt").write_text(text)
        # rollout-side assessment is the sampling policy judging its own samples; the evaluator re-scores a
        # fixed held-out candidate set with the trained weights (the `assessment_accuracy` of the round)
        metrics = {f"rollout_{k}" if k in ("assessment_accuracy", "mean_score_pos", "mean_score_neg",
                                           "score_gap", "min_score_neg", "num_mixed_groups", "mixed_fraction",
                                           "questions_per_mixed_group") else k: v
                   for k, v in metrics.items()}
        log.info(phase_line("rollout", metrics, self.cfg.loop.rounds))
        log.info(phase_line("verify", metrics, self.cfg.loop.rounds))
        with ThreadPoolExecutor(1) as ahead:
            # one round stale: round r+1's samples come from the weights that entered round r
            next_rollout = (ahead.submit(self.rollout, r + 1)
                            if self.cfg.loop.overlap and r < self.cfg.loop.rounds else None)
            with phase("train", metrics, self.cfg.loop.rounds):
                metrics.update(self.train(r))
            self.prefetched = next_rollout.result() if next_rollout else None
        with phase("sync", metrics, self.cfg.loop.rounds):
            metrics.update(self.refresh(r))
        if r % self.cfg.loop.eval_every == 0 or r == self.cfg.loop.rounds:
            metrics.update(self.evaluator.evaluate_round(r))
        else:
            metrics.update(NOT_EVALUATED)
        self.finish_round(r, metrics, time.perf_counter() - start, tracker)

    def finish_round(self, r: int, metrics: dict, wall: float, tracker: Tracker) -> None:
        # orchestration overhead: the round's wall time minus the phases' compute. The train stage counts only its
        # optimizer steps; its start-up (Ray Train workers, process group, model load) and checkpoint save are
        # overhead, as are Ray Data scheduling gaps and tracking
        compute = sum(metrics.get(k, 0.0) for k in ("time_rollout_s", "time_verify_s", "train_compute_s",
                                                      "time_sync_s", "time_eval_s"))
        overhead = max(wall - compute, 0.0)
        metrics.update(time_round_s=wall, time_overhead_s=overhead, overhead_share=overhead / max(wall, 1e-9),
                       weights_version=self.version)
        self.dir.write_round_metrics(r, metrics)  # written last: marks the round finished
        tracker.log_metrics(metrics, step=r, name=mlflow_name)
        tracker.log_artifact(self.dir.round_dir(r) / "samples.txt", f"rounds/{r}")
        log.info(phase_line("done", metrics, self.cfg.loop.rounds))

    def summary(self) -> dict:
        cfg = self.cfg
        rounds = [self.dir.read_round_metrics(r) for r in self.dir.finished_rounds()]
        last = rounds[-1]["round"]
        saved = last == 0 or self.dir.has_checkpoint(last)  # not under loop.checkpoint_every: 0
        return {"run_name": cfg.run_name, "mode": cfg.loop.mode, "loss": cfg.loss.name,
                "model": cfg.model.name_or_path, "task": cfg.task.name, "rounds": rounds,
                "final": {**rounds[-1], "checkpoint": str(self.checkpoint_of(last)) if saved else None}}


def run_loop(cfg: Config, parent_run_id: str | None = None, trainer: TrainService | None = None,
             pool: RolloutPool | None = None) -> dict:
    """Run (or resume) every round of `cfg`; returns the summary (also at <run_dir>/summary.json).
    trainer, pool: a `TrainService` to train on and a `RolloutPool` to sample on (left running; see `Run`); by
    default the run starts and stops its own."""
    run = Run(cfg, trainer, pool)
    with Tracker(cfg.tracking, run.dir.root, cfg.run_name, cfg.output_dir, parent_run_id) as tracker:
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.log_artifact(run.dir.config_path)
        if run.finished:
            log.info("resuming %s after round %d", run.dir.root, max(run.finished))
        if 0 not in run.finished:
            run.round_zero(tracker)
        run.prefetched = None
        for r in range(max(run.dir.finished_rounds()) + 1, cfg.loop.rounds + 1):
            log.info("round %d/%d", r, cfg.loop.rounds)
            run.run_round(r, tracker, run.prefetched)
        summary = run.summary()
        write_summary(run.dir.summary_path, summary)
        for path in plot_run(summary, run.dir.plots_dir):
            tracker.log_artifact(path, "plots")
        tracker.log_artifact(run.dir.summary_path)
        if run.owns_pool:
            run.pool.shutdown()
        if run.owns_trainer:
            run.trainer.close()
    log.info(result_line(summary["rounds"][0], summary["rounds"][-1]))
    log.info("summary  %s", run.dir.summary_path)
    log.info("plots    %s", run.dir.plots_dir)
    log.info("MLflow   %s", tracker.where())
    return summary
