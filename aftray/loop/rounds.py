"""One aftray run: round 0 evaluates the starting model; rounds 1..R sample → verify → train → refresh → evaluate.

Offline mode (the paper's recipe) is the same loop with R = 1: round 0 runs the VFT stage on reference COTs, round
1 samples k COTs for every training question with the VFT model and runs one alignment stage. Online mode samples
a fresh slice of questions each round with the current weights. With `loop.overlap`, round r+1's rollout runs
while round r trains (its samples are one round stale); by default the loop is strictly on-policy.

A round is the unit of resume: its samples, checkpoint and metrics.json are durable, and a re-run with the same
run name continues after the last finished round without redoing finished work (samples or a finished stage
found on disk are reused).
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
from aftray.loop.evaluate import NOT_EVALUATED, Evaluator, write_sample_text
from aftray.loop.pipeline import sample_round
from aftray.models import load_tokenizer, resolve_model_path
from aftray.rollout import RolloutPool, question_rows
from aftray.run.console import generated, phase, phase_line, progress, result_line
from aftray.run.metrics import sample_metrics
from aftray.run.plots import plot_run
from aftray.run.rundir import RunDir, write_summary
from aftray.run.tracking import Tracker, mlflow_name
from aftray.tasks import load_task
from aftray.train.losses import needs_pairs
from aftray.train.service import TrainService

log = logging.getLogger("aftray")


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


NO_SAMPLES = {"cots": [], "cot_ids": [], "sample_logp": [], "sample_token_logp": [], "finish_reasons": [],
              "pred": [], "labels": [], "correct": [], "process": [], "rank": [], "counts": []}


def vft_rows(rows: list[dict]) -> list[dict]:
    """Question rows as group rows without samples: the VFT stage learns their reference COTs."""
    return [{**{k: row[k] for k in ("id", "prompt", "prompt_ids", "answer", "ref_cot", "ref_cot_ids")},
             **NO_SAMPLES, "num_sampled": 0, "weights_version": 0} for row in rows]


def mixed_or_reference(groups: list[dict]) -> list[dict]:
    """Dynamic sampling's training rows: a mixed group whole, any other group with its reference COT alone (for
    the VFT term). Its samples would give the alignment term no pair, yet cost k forward and backward passes."""
    return [g if any(g["correct"]) and not all(g["correct"]) else {**g, **NO_SAMPLES} for g in groups]


class Run:
    """The state one run needs across rounds: config, run dir, samplers, train workers.

    trainer: train workers to use (a comparison shares one between its runs); else the run starts its own."""

    def __init__(self, cfg: Config, trainer=None):
        self.cfg, self.dir = cfg, RunDir(cfg.run_dir)
        save_config(cfg, self.dir.config_path)
        self.task = load_task(cfg.task)
        self.base_model = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(self.base_model, cfg.model.trust_remote_code)
        self.train_rows = question_rows(self.task.train, self.task, tokenizer)
        self.eval_rows = question_rows(self.task.test[:cfg.loop.eval_questions], self.task, tokenizer)
        log.info("task %s: %d train / %d eval questions; model %s", cfg.task.name, len(self.train_rows),
                 len(self.eval_rows), self.base_model)
        start_ray(cfg)
        check_cluster_fits(cfg)
        self.finished = self.dir.finished_rounds()
        # weights are labelled with the round that produced them; the base model, before any round, is -1
        self.version = max(self.finished, default=-1)
        self.weights = self.checkpoint_of(self.version)
        self.pool = RolloutPool(cfg.rollout, self.weights, version=self.version)
        self.evaluator = Evaluator(cfg, self.pool, self.task.answer_kind, self.eval_rows, self.dir)
        self.owns_trainer = trainer is None
        self.trainer = trainer or TrainService(cfg.train, self.dir.root / "train_state",
                                               cfg.cluster.placement_strategy)

    def checkpoint_of(self, r: int) -> Path:
        """Weights after round r (round 0: after the VFT stage, if there was one); the base model before any."""
        for k in range(r, -1, -1):
            if (self.dir.checkpoint_dir(k) / "config.json").is_file():
                return self.dir.checkpoint_dir(k)
        return self.base_model

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
        sample_round(self.pool, questions, first, self.cfg.loop.min_mixed_groups, tmp, r, self.cfg.verify,
                     self.task.answer_kind)
        tmp.rename(out)
        wall = time.perf_counter() - start
        stats = self.pool.metrics(r)  # verify seconds and generated tokens, summed over the round's batches
        return {"time_rollout_s": wall - stats["time_verify_s"], "time_verify_s": stats["time_verify_s"],
                "rollout_tokens": stats["rollout_tokens"], "truncated_prompts": stats["truncated_prompts"]}

    def train(self, r: int, stage: str = "align") -> dict:
        if stage == "vft":
            groups = vft_rows(self.train_rows)
        else:
            # dynamic sampling oversamples to find mixed groups; the others' samples add nothing to a pairwise loss
            groups = mixed_or_reference(self.dir.read_samples(r)) if self.cfg.loop.min_mixed_groups and \
                needs_pairs(self.cfg.loss) else self.dir.samples_path(r)
        start = time.perf_counter()
        result = self.trainer.train(stage, groups, self.weights, self.dir.round_dir(r), self.cfg.train,
                                    self.cfg.loss, trust_remote_code=self.cfg.model.trust_remote_code)
        self.weights = result.checkpoint
        return {"time_train_s": time.perf_counter() - start, "train_compute_s": result.metrics["train_time_s"],
                "train_loss": result.metrics["train_loss"],
                "train_steps": result.metrics["steps"], "train_tokens_per_s": result.metrics["tokens_per_s"],
                **{f"train_{k}": v for k, v in result.history[-1].items()
                   if k in ("pair_acc", "s_pos", "s_neg", "alignment", "constraint", "vft")},
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
        if self.cfg.train.vft_steps > 0 or self.cfg.loop.mode == "offline":
            with phase("train", metrics, self.cfg.loop.rounds):  # the VFT stage on the reference COTs
                metrics.update(self.train(0, stage="vft"))
            with phase("sync", metrics, self.cfg.loop.rounds):
                metrics.update(self.refresh(0))
        metrics.update(self.evaluator.evaluate(0))
        self.finish_round(0, metrics, time.perf_counter() - start, tracker)

    def run_round(self, r: int, tracker: Tracker, prefetched: dict | None = None) -> None:
        start = time.perf_counter()
        if prefetched is None:
            with progress(f"round {r} rollout", generated(self.pool, r)):
                prefetched = self.rollout(r)
        metrics = {"round": r, **prefetched}
        groups = self.dir.read_samples(r)
        metrics.update(sample_metrics(groups, self.cfg.rollout.k))
        metrics["rollout_tokens_per_s"] = metrics.pop("rollout_tokens") / max(metrics["time_rollout_s"], 1e-9)
        write_sample_text(groups, self.dir.round_dir(r) / "samples.txt", self.cfg.loop.samples_to_log)
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
            metrics.update(self.evaluator.evaluate(r))
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
        return {"run_name": cfg.run_name, "mode": cfg.loop.mode, "loss": cfg.loss.name,
                "model": cfg.model.name_or_path, "task": cfg.task.name, "rounds": rounds,
                "final": {**rounds[-1], "checkpoint": str(self.checkpoint_of(rounds[-1]["round"]))}}


def run_loop(cfg: Config, parent_run_id: str | None = None, trainer=None) -> dict:
    """Run (or resume) every round of `cfg`; returns the summary (also at <run_dir>/summary.json).
    trainer: a `TrainService` to train on (left running); by default the run starts and stops its own."""
    run = Run(cfg, trainer)
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
        run.pool.shutdown()
        if run.owns_trainer:
            run.trainer.close()
    log.info(result_line(summary["rounds"][0], summary["rounds"][-1]))
    log.info("summary  %s", run.dir.summary_path)
    log.info("plots    %s", run.dir.plots_dir)
    log.info("MLflow   %s", tracker.where())
    return summary
