"""What a person reads: the console lines, the live line (terminals only), Ray Data kept quiet, and the plots."""
import logging
import math
import time

import pytest

from aftray.run import console, plots
from aftray.run.metrics import binomial_se

ROUND = {"round": 1, "num_questions": 32, "num_samples": 120, "rollout_tokens_per_s": 1234.5, "time_rollout_s": 12.3,
         "num_positive": 40, "num_negative": 80, "rollout_num_mixed_groups": 12, "pass_at_k": 0.45,
         "time_verify_s": 0.8, "train_steps": 8, "train_loss": 0.81234, "train_tokens_per_s": 410.0,
         "time_train_s": 44.0, "train_compute_s": 8.0, "time_sync_s": 0.4, "accuracy": 0.15, "accuracy_se": 0.08,
         "num_eval_questions": 20, "assessment_accuracy": None, "time_eval_s": 9.0, "time_round_s": 70.0,
         "time_overhead_s": 6.0}


def test_binomial_se():
    assert binomial_se(0.2, 100) == pytest.approx(0.04)
    assert binomial_se(0.0, 50) == 0.0 and math.isnan(binomial_se(math.nan, 0))


def test_one_line_per_phase():
    lines = [console.phase_line(p, ROUND, 2) for p in ("rollout", "verify", "train", "sync", "eval", "done")]
    assert lines == [
        "round 1/2 rollout 32 questions, 120 distinct COTs, 1234 tokens/s, 12 s",
        "round 1/2 verify  40 right / 80 wrong COTs, 12 mixed groups, pass@k 0.45, 0.8 s",
        "round 1/2 train   8 steps, loss 0.8123, 410 tokens/s, 44 s (36 s set-up)",
        "round 1/2 sync    weights of round 1 into the samplers, 0.4 s",
        "round 1/2 eval    accuracy 15.0% ± 8.0 (20 questions), assessment n/a, 9 s",
        "round 1/2 done    in 70 s, 6 s of it outside the phases' compute",
    ]
    drift = console.phase_line("train", {**ROUND, "train_logp_drift_mean": 0.01, "train_logp_drift_max": 0.5}, 2)
    assert "log-prob drift 0.010 (max 0.500)" in drift


def test_result_line_names_the_gain_and_its_se():
    first = {"accuracy": 0.12, "num_eval_questions": 200, "assessment_accuracy": 0.333}
    last = {"accuracy": 0.195, "num_eval_questions": 200, "assessment_accuracy": 0.41}
    se = math.sqrt(0.12 * 0.88 / 200 + 0.195 * 0.805 / 200)  # 0.0362: two independent binomial proportions
    assert console.result_line(first, last) == (f"accuracy 12.0% → 19.5% (+7.5 ± {100 * se:.1f}, 200 questions); "
                                                "assessment accuracy 0.333 → 0.410")
    assert console.result_line({**first, "accuracy": None}, last) == "accuracy not measured (task.num_test=0)"


def test_log_format():
    handler = console._Handler()
    ours = logging.LogRecord("aftray", logging.INFO, __file__, 1, "round 1/2 eval", None, None)
    other = logging.LogRecord("ray.data", logging.WARNING, __file__, 1, "careful", None, None)
    assert handler.format(ours) == f"{time.strftime('%H:%M:%S', time.localtime(ours.created))} round 1/2 eval"
    assert handler.format(other).endswith(" WARNING ray.data: careful")


def test_progress_only_on_a_terminal(monkeypatch, capsys):
    with console.progress("round 1 rollout", lambda: 3, total=5):
        time.sleep(1.2)
    assert capsys.readouterr().err == ""  # pytest's output is no terminal: plain lines only
    monkeypatch.setattr(console, "live", lambda: True)
    with console.progress("round 1 rollout", lambda: 3, total=5):
        time.sleep(1.2)
    err = capsys.readouterr().err  # redrawn in place, then cleared
    assert "\rround 1 rollout" in err and "3/5" in err


def test_ray_data_progress_off():
    import ray.data

    console.quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    assert not (ctx.enable_progress_bars or ctx.enable_operator_progress_bars or ctx.print_on_execution_start)
    from ray.data._internal.logging import SessionFileHandler
    levels = {type(h).__name__: h.level for h in logging.getLogger("ray.data").handlers
              if not isinstance(h, SessionFileHandler)}
    assert levels and set(levels.values()) == {logging.WARNING}


def _summary(drift: bool) -> dict:
    rounds = []
    for r, acc in enumerate((0.1, 0.2, 0.3)):
        rec = {"round": r, "accuracy": acc, "num_eval_questions": 50, "accuracy_se": binomial_se(acc, 50),
               "assessment_accuracy": 0.5, "pass_at_k": 0.4, "maj_at_k": 0.2, "mean_score_pos": -0.5,
               "mean_score_neg": -0.9, "min_score_neg": -2.0, "time_rollout_s": 3.0, "time_train_s": 5.0}
        if drift and r == 2:  # one point: matplotlib's own ticks would be 1.95, 2.0, 2.05...
            rec.update(train_logp_drift_mean=0.01, train_logp_drift_max=0.1)
        rounds.append(rec)
    return {"run_name": "t", "loss": "aft_bc", "task": "arith", "rounds": rounds}


def test_plots_integer_rounds_error_bars_and_drift(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figures to look at their axes
    paths = plots.plot_run(_summary(drift=True), tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "scores.png", "phase_times.png", "logp_drift.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    for fig in figures:
        ticks = fig.axes[0].get_xticks()
        assert all(float(t).is_integer() for t in ticks), ticks  # whole rounds
    accuracy = figures[0].axes[0]
    bars = accuracy.containers[0]  # greedy accuracy ± one binomial SE
    (low_high,) = bars.lines[2]
    spans = [seg[1, 1] - seg[0, 1] for seg in low_high.get_segments()]
    assert spans == pytest.approx([2 * binomial_se(p, 50) for p in (0.1, 0.2, 0.3)])
    drift = figures[3].axes[0]
    assert [line.get_label() for line in drift.get_lines()] == ["mean", "max"]
    assert list(drift.get_lines()[0].get_xdata()) == [2]  # rounds without the metric are left out


def test_no_drift_plot_without_the_metric(tmp_path):
    assert "logp_drift.png" not in [p.name for p in plots.plot_run(_summary(drift=False), tmp_path)]
