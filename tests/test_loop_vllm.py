"""End-to-end with vLLM samplers (its CPU build here) on the default preset, cut down: SmolLM2, 2 online rounds,
the sampler↔trainer log-prob drift, and a measured gain (the arith preset on vLLM is in tests/test_loop.py)."""
import importlib.util
from pathlib import Path

import pytest

from aftray.config import load_config
from aftray.run.rundir import ROUND_KEYS, read_parquet_rows, read_summary

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="vLLM is not installed")]
VLLM = ["rollout.engine=vllm", "tracking.experiment=test", "loop.rounds=2"]


def run_preset(tmp_path, preset: str, *overrides) -> tuple[dict, Path]:
    from aftray.loop.rounds import run_loop

    cfg = load_config(REPO / "configs" / preset, [f"output_dir={tmp_path}", *VLLM, *overrides])
    run_loop(cfg)
    summary = read_summary(cfg.run_dir / "summary.json")
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for rec in summary["rounds"]:  # rounds that loop.eval_every skips have no accuracy
        assert set(ROUND_KEYS) <= set(rec) and (rec["accuracy"] is None or 0.0 <= rec["accuracy"] <= 1.0)
    for r in (1, 2):
        rec = summary["rounds"][r]
        assert rec["num_samples"] > 0 and rec["rollout_tokens_per_s"] > 0 and rec["train_loss"] == rec["train_loss"]
        samples = read_parquet_rows(cfg.run_dir / "rounds" / str(r) / "samples.parquet")
        # the samplers took each round's weights (the base model is -1; round 0's VFT stage, if any, makes 0)
        held = r - 1 if r > 1 or cfg.train.vft.steps > 0 else -1
        assert {row["weights_version"] for row in samples} == {held}
        assert all(len(t) == len(c) for row in samples for t, c in zip(row["sample_token_logp"], row["cot_ids"]))
    return summary, cfg.run_dir


def test_words_cpu_on_vllm(tmp_path, ray_local):
    """The `make run` preset cut down: SmolLM2, dynamic sampling, 2 rounds of 2-4 steps, eval after the last
    round on 64 held-out questions, plots; and it learns."""
    summary, run_dir = run_preset(tmp_path, "words_cpu.yaml", "run_name=words_vllm", "task.num_test=64",
                                  "loop.assessment_questions=8", "loop.questions_per_round=8",
                                  "loop.min_mixed_groups=2", "loop.max_oversample=2")
    assert summary["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for r in (1, 2):
        rec = summary["rounds"][r]
        # the drift is measured on the sampled COTs the stage trains: under dynamic sampling those of mixed groups
        assert ("train_logp_drift_mean" in rec) == (rec["rollout_num_mixed_groups"] > 0)
        assert rec.get("train_logp_drift_mean", 0.0) < 1e-3
        assert 8 <= rec["num_questions"] <= 16  # dynamic sampling: up to max_oversample x questions_per_round
        assert 0 <= rec["rollout_mixed_fraction"] <= 1
    assert any(summary["rounds"][r]["rollout_num_mixed_groups"] for r in (1, 2))
    assert (run_dir / "rounds" / "2" / "checkpoint" / "model.safetensors").is_file()
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == {"accuracy.png", "scores.png",
                                                                   "phase_times.png", "logp_drift.png"}
    # it learns: 9.4 % -> 31.2 / 21.9 / 28.1 % on seeds 0 / 1 / 2 (the same settings through jobs/aft_gsm8k.py,
    # gains of 8-14 questions of 64, SE ~5 points); the test asks for 4 questions more than round 0.
    # `pytest --loss-off` (no gradient) keeps round 0's weights and fails here
    first, last = summary["rounds"][0], summary["rounds"][2]
    assert last["num_eval_questions"] == first["num_eval_questions"] == 64
    assert last["accuracy"] - first["accuracy"] >= 4 / 64, (first["accuracy"], last["accuracy"])
