"""Evaluation each round: greedy accuracy on held-out questions, and assessment accuracy on a fixed candidate set.

The candidate set is drawn once, at round 0, by the starting model: `rollout.k` COTs per held-out question, for
the first `loop.assessment_questions` of them (default all; k COTs cost k greedy ones), in
rounds/0/eval_candidates.parquet. Every round re-scores those same COTs with the current weights, so
assessment accuracy (pairs with s_pos > s_neg) and the score health (mean s_pos, s_neg, min s_neg) are comparable
across rounds — the paper's diagnostic. Round 0 also reports pass@k / maj@k from them; later rounds report pass@k
and maj@k from their own rollout.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import ray

from aftray.config import Config
from aftray.loop.pipeline import sample_groups
from aftray.rollout import SamplingParams
from aftray.run.console import generated, phase_line, progress
from aftray.run.metrics import binomial_se, sample_metrics
from aftray.run.rundir import RunDir, read_parquet_rows

log = logging.getLogger("aftray")

# a round that `loop.eval_every` skips: its record keeps summary.json's keys, the held-out numbers unmeasured
NOT_EVALUATED = {"accuracy": None, "assessment_accuracy": None, "mean_score_pos": None, "mean_score_neg": None,
                 "time_eval_s": 0.0}


class Evaluator:
    def __init__(self, cfg: Config, pool, answer_kind: str, eval_rows: list[dict], run_dir: RunDir):
        self.cfg, self.pool, self.answer_kind, self.eval_rows, self.dir = cfg, pool, answer_kind, eval_rows, run_dir
        self.candidates_path = run_dir.round_dir(0) / "eval_candidates.parquet"

    def greedy_accuracy(self, r: int) -> float:
        if not self.eval_rows:
            return float("nan")
        with progress(f"round {r} eval (greedy)", generated(self.pool, r), len(self.eval_rows)):
            return greedy_accuracy(self.pool, self.eval_rows, r, self.cfg, self.answer_kind,
                                   self.dir.round_dir(r) / "eval_greedy.parquet")

    def candidates(self) -> list[dict]:
        if not self.candidates_path.exists():
            tmp = self.candidates_path.with_name(self.candidates_path.name + ".tmp")
            rows = self.eval_rows[:self.cfg.loop.assessment_questions]
            groups = sample_groups(self.pool, ray.data.from_items(rows), 0, self.cfg.verify, self.answer_kind,
                                   batch_size=per_engine(rows, self.pool))
            with progress("round 0 eval (candidate COTs)", generated(self.pool, 0), len(rows)):
                groups.write_parquet(str(tmp))
            tmp.rename(self.candidates_path)
        return read_parquet_rows(self.candidates_path)

    def summed_logps(self, candidates: list[dict]) -> list[list[float]]:
        """Summed log-prob of every candidate COT under the current weights. Under the weights that sampled it,
        that is its sampling log-prob (T = 1, summed; the drift check bounds the difference at ~1e-5 nats a
        token), so only COTs drawn by other weights are scored again: round 0 skips a scoring pass (~30 s of
        its ~2 min on 2 cores)."""
        fresh = [row["weights_version"] == self.pool.version and all(map(math.isfinite, row["sample_logp"]))
                 for row in candidates]
        stale = [row for row, f in zip(candidates, fresh, strict=True) if not f]
        scored = iter(self.pool.score([row["prompt_ids"] for row in stale for _ in row["cot_ids"]],
                                      [ids for row in stale for ids in row["cot_ids"]]))
        return [list(row["sample_logp"]) if f else [next(scored) for _ in row["cot_ids"]]
                for row, f in zip(candidates, fresh, strict=True)]

    def evaluate_round(self, r: int) -> dict:
        start = time.perf_counter()
        accuracy = self.greedy_accuracy(r)
        # an accuracy carries its denominator and its binomial standard error; the eval's phases their seconds
        metrics = {"accuracy": accuracy, "num_eval_questions": len(self.eval_rows),
                   "accuracy_se": binomial_se(accuracy, len(self.eval_rows)),
                   "time_eval_greedy_s": time.perf_counter() - start}
        if self.eval_rows:
            mark = time.perf_counter()
            candidates = self.candidates()
            metrics["time_eval_candidates_s"], mark = time.perf_counter() - mark, time.perf_counter()
            summed_logps = self.summed_logps(candidates)
            metrics["time_eval_score_s"] = time.perf_counter() - mark
            for row, summed in zip(candidates, summed_logps, strict=True):
                row["scores"] = [s / max(len(ids), 1) for s, ids in zip(summed, row["cot_ids"], strict=True)]
            held_out = sample_metrics(candidates, self.cfg.rollout.k)
            keys = ["assessment_accuracy", "mean_score_pos", "mean_score_neg", "score_gap", "min_score_neg",
                    "num_mixed_groups"]
            if r == 0:  # round 0 has no rollout of its own: its sample statistics come from the candidates
                keys += ["pass_at_k", "maj_at_k", "num_questions", "num_samples", "num_positive", "num_negative"]
            metrics.update({k: held_out[k] for k in keys})
        metrics["time_eval_s"] = time.perf_counter() - start
        log.info(phase_line("eval", {"round": r, **metrics}, self.cfg.loop.rounds))
        return metrics


def per_engine(rows: list[dict], pool) -> int:
    """Questions per engine call when evaluating: each engine's share in one call. An engine step costs little
    more for 200 sequences than for 64 on 2 cores, and a last, small batch would decode its longest answer
    nearly alone (200 greedy questions: 46 s, not 59 s; 50 questions x 4 candidate COTs: 23.7 s, not 31.0 s
    in 16-question calls)."""
    return max(1, -(-len(rows) // pool.cfg.num_actors))


def greedy_params(cfg: Config) -> SamplingParams:
    """The held-out accuracy reads the text alone: no log-probs (vLLM: 2-3 % of the evaluation's decode)."""
    return SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.rollout.seed,
                          logprobs=False)


def greedy_accuracy(pool, rows: list[dict], r: int, cfg: Config, answer_kind: str, out: Path | None = None
                    ) -> float:
    """Exact-match accuracy of greedy decoding (one COT per question), each engine's share in one call.
    out: a parquet folder that keeps the greedy COTs as group rows (what a policy that lost accuracy writes)."""
    groups = sample_groups(pool, ray.data.from_items(rows), r, cfg.verify, answer_kind, greedy_params(cfg),
                           per_engine(rows, pool))
    if out is not None:
        groups = groups.materialize()
        shutil.rmtree(out, ignore_errors=True)  # a killed run's partial folder
        groups.write_parquet(str(out))
    correct = groups.select_columns(["correct"]).take_all()
    return sum(bool(len(g["correct"]) and g["correct"][0]) for g in correct) / len(correct)


def sample_text(groups: list[dict], per_label: int) -> str:
    """A few positive and negative COTs of the round, for people reading the run (MLflow text artifact)."""
    lines = []
    for label in ("correct", "wrong_answer", "no_answer", "truncated"):
        shown = 0
        for row in groups:
            for cot, lab, pred in zip(row["cots"], row["labels"], row["pred"]):
                if lab == label and shown < per_label:
                    lines.append(f"=== {label} | question {row['id']} | gold {row['answer']} | pred {pred!r}\n"
                                 f"{row['prompt'][-300:]}\n--- COT ---\n{cot}\n")
                    shown += 1
    return "\n".join(lines) or "(no samples)\n"
