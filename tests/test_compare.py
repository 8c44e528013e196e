"""The loss-comparison harness: aggregation over seeds (fast), and a reduced comparison end to end (slow: 2 arms,
1 seed) that checks the harness, not the effect."""
import json
import math

import pytest

from aftray.experiments.compare import aggregate, markdown_table, run_comparison
from aftray.experiments.report import END, START, update_results_page
from test_loop import PRESET, SMALL


def _summary(accs: list[float], s_neg: float = -1.0) -> dict:
    return {"rounds": [{"round": r, "accuracy": a, "assessment_accuracy": 0.5, "mean_score_pos": -0.5,
                        "mean_score_neg": s_neg, "min_score_neg": s_neg - 1, "pass_at_k": a + 0.1}
                       for r, a in enumerate(accs)]}


def test_aggregate_means_stds_and_paired_deltas():
    runs = {"vft_continued": {0: _summary([0.2, 0.30]), 1: _summary([0.2, 0.40])},
            "aft_bc": {0: _summary([0.2, 0.35]), 1: _summary([0.2, 0.50], s_neg=-2.0)}}
    out = aggregate(runs, rounds=1)
    final = out["arms"]["aft_bc"]["final"]
    assert final["accuracy"]["mean"] == pytest.approx(0.425)
    assert final["accuracy"]["std"] == pytest.approx(math.sqrt(2) * 0.075)  # sample std of (0.35, 0.50)
    assert final["mean_score_neg"]["mean"] == pytest.approx(-1.5)
    delta = out["arms"]["aft_bc"]["delta_accuracy_vs_vft_continued"]  # paired by seed: 0.05 and 0.10
    assert delta["mean"] == pytest.approx(0.075) and delta["n"] == 2
    assert "delta_accuracy_vs_vft_continued" not in out["arms"]["vft_continued"]
    assert out["arms"]["aft_bc"]["rounds"][0]["accuracy"]["std"] == 0.0


def test_markdown_table_one_row_per_arm():
    runs = {"vft_continued": {0: _summary([0.2, 0.3])}, "rft": {0: _summary([0.2, 0.25])}}
    result = {**aggregate(runs, rounds=1), "seeds": [0]}
    rows = [line for line in markdown_table(result).splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["arm", "vft_continued", "rft"]
    assert "| 25.0 ± 0.0 | -5.0 ± 0.0 |" in rows[2]  # accuracy and Δ vs VFT-continued, in points


def test_grid_settings_are_the_cartesian_product():
    from aftray.experiments.compare import grid_settings

    assert grid_settings(None) == [("", [])]
    settings = grid_settings({"train.lr": ["3e-4", "1e-3"], "loss.bc_margin": ["0.1", "0.3"]})
    assert [name for name, _ in settings] == ["lr3e-4_bc_margin0.1", "lr3e-4_bc_margin0.3", "lr1e-3_bc_margin0.1",
                                              "lr1e-3_bc_margin0.3"]
    assert settings[1][1] == ["train.lr=3e-4", "loss.bc_margin=0.3"]


def test_grid_arms_are_compared_with_the_control_of_their_setting():
    def run(acc):
        return {"rounds": [{"round": 0, "accuracy": 0.3}, {"round": 1, "accuracy": acc}]}

    runs = {"vft_continued_a": {0: run(0.4)}, "aft_bc_a": {0: run(0.5)},
            "vft_continued_b": {0: run(0.2)}, "aft_bc_b": {0: run(0.3)}}
    controls = {"vft_continued_a": "vft_continued_a", "aft_bc_a": "vft_continued_a",
                "vft_continued_b": "vft_continued_b", "aft_bc_b": "vft_continued_b"}
    result = aggregate(runs, 1, controls)
    for label in ("aft_bc_a", "aft_bc_b"):
        assert result["arms"][label]["delta_accuracy_vs_vft_continued"]["mean"] == pytest.approx(0.1)
    assert "delta_accuracy_vs_vft_continued" not in result["arms"]["vft_continued_a"]


def test_unknown_arm_is_named(tmp_path):
    with pytest.raises(ValueError, match="aft_xx"):
        run_comparison(PRESET, ["aft_bc", "aft_xx"], [0], tmp_path)


@pytest.mark.slow
def test_reduced_comparison_end_to_end(tmp_path):
    import mlflow

    arms = ["vft_continued", "aft_bc"]
    result = run_comparison(PRESET, arms, [0], tmp_path / "cmp", SMALL + ["loop.rounds=1"])
    out = tmp_path / "cmp"
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["arms"].keys() == set(arms) and saved["seeds"] == [0] and saved["runs_time_s"] > 0
    summaries = {arm: json.loads((out / f"{arm}_s0" / "summary.json").read_text()) for arm in arms}
    # every arm starts from the same base: identical round 0, the base's weights hard-linked, not retrained
    assert summaries["vft_continued"]["rounds"][0] == summaries["aft_bc"]["rounds"][0]
    assert (out / "aft_bc_s0/rounds/0/checkpoint/model.safetensors").samefile(
        out / "base_s0/rounds/0/checkpoint/model.safetensors")
    # compute-matched: the same questions, optimizer steps per round
    first, second = (summaries[a]["rounds"][1] for a in arms)
    assert first["num_questions"] == second["num_questions"] and first["train_steps"] == second["train_steps"]
    assert summaries["aft_bc"]["loss"] == "aft_bc" and summaries["vft_continued"]["loss"] == "vft"
    assert result["arms"]["aft_bc"]["final"]["accuracy"]["mean"] == second["accuracy"]
    assert {p.name for p in (out / "plots").iterdir()} == {"accuracy.png", "assessment.png", "scores.png"}

    # MLflow: one parent run, a child run per arm (and the shared base)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'cmp' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    parent = [r for r in runs if r.info.run_name == "cmp"]
    assert len(parent) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert children == {"base_s0", "vft_continued_s0", "aft_bc_s0"}

    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nreading kept\n\n{START}\nold\n{END}\n\nafter kept\n")
    update_results_page(result, out, page, "python jobs/compare_losses.py")
    text = page.read_text()
    assert "reading kept" in text and "after kept" in text and "old" not in text
    assert "| aft_bc |" in text and "![accuracy](results/accuracy.png)" in text
    assert (tmp_path / "results" / "comparison.json").is_file()
