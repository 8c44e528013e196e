"""The comparison's statistics against published worked examples, and its pre-registration: declarations and the
refusal to pool runs of another experiment (fast; no Ray)."""
from pathlib import Path

import pytest

from aftray.experiments.declaration import Declaration, check_pooling, load_declaration, parse_contrast
from aftray.experiments.stats import holm, paired_test, task_level_test

REPO = Path(__file__).resolve().parents[1]

# Student's sleep data (Cushny & Peebles 1905), extra hours of sleep under two drugs, 10 patients: R's
# `t.test(extra ~ group, data = sleep, paired = TRUE)` prints t = -4.0621, df = 9, p-value = 0.002833,
# 95 percent confidence interval -2.4598858 -0.7001142, mean difference -1.58
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_test_gives_the_textbook_values():
    test = paired_test([a - b for a, b in zip(DRUG_1, DRUG_2)])
    assert (test["mean"], test["t"], test["df"], test["p"]) == pytest.approx((-1.58, -4.0621, 9, 0.002833),
                                                                             abs=1e-4)
    assert test["ci"] == pytest.approx([-2.4598858, -0.7001142], abs=1e-7)
    assert test["se"] == pytest.approx(test["std"] / 10 ** 0.5)
    assert paired_test([b - a for a, b in zip(DRUG_1, DRUG_2)])["p"] == pytest.approx(test["p"])  # two-sided
    wider = paired_test([a - b for a, b in zip(DRUG_1, DRUG_2)], alpha=0.01)["ci"]
    assert wider[0] < test["ci"][0] and wider[1] > test["ci"][1]


@pytest.mark.parametrize("diffs", [[0.05], [0.02, 0.02], [0.3 - 0.1, 0.4 - 0.2, 0.5 - 0.3]])
def test_no_standard_error_means_no_test(diffs):
    # one seed; equal differences, also where floating point leaves them unequal in the last bits
    test = paired_test(diffs)
    assert test["t"] is None and test["p"] is None and test["ci"] is None and test["n"] == len(diffs)


def test_holm_gives_the_textbook_values():
    # Holm's procedure, the worked example of its Wikipedia article: four hypotheses at α = 0.05 with
    # p = 0.01, 0.04, 0.03, 0.005 reject H4 (0.005 < 0.05/4) and H1 (0.01 < 0.05/3), then stop at H3
    # (0.03 > 0.05/2). Adjusted: sorted p times 4, 3, 2, 1, kept non-decreasing: 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a contrast without a p still counts in the family: the other one is adjusted for two, not one
    assert holm([0.01, None]) == [pytest.approx(0.02), None]
    assert holm([]) == []


def test_task_level_estimate_averages_within_each_task_first():
    # task seed 0 has two seeds (-1, +1 points), task 1 two (+1, +3), task 2 one (+4): task means 0, 2, 4 points
    test = task_level_test({0: [-0.01, 0.01], 1: [0.01, 0.03], 2: [0.04]})
    assert test["task_means"] == pytest.approx({0: 0.0, 1: 0.02, 2: 0.04})
    # mean 2, std 2, SE 2/√3 points: t = √3, df = 2; with 2 df the two-sided p is 1 - t / √(t² + 2)
    assert (test["mean"], test["std"], test["n"], test["df"]) == pytest.approx((0.02, 0.02, 3, 2))
    assert (test["t"], test["p"]) == pytest.approx((3 ** 0.5, 1 - (3 / 5) ** 0.5))
    half = 4.302653 * 0.02 / 3 ** 0.5  # t(0.975, 2) = 4.303 in any t table
    assert test["ci"] == pytest.approx([0.02 - half, 0.02 + half])
    assert paired_test([-0.01, 0.01, 0.01, 0.03, 0.04])["mean"] == pytest.approx(0.016)  # per seed: tasks unequal


def _declare(tmp_path, text: str) -> Declaration:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return load_declaration(path)


DECLARATION = """name: e1
question: does aft_bc beat vft_continued?
config: configs/arith_compare.yaml
arms: [vft_continued, aft_bc]
seeds: [0, 1, 2]
task_seeds: [1, 2, 3]
contrasts: [aft_bc - vft_continued, aft_bc - start]
primary: task
alpha: 0.05
reuse: [bases]
"""


def test_a_declaration_states_the_analysis(tmp_path):
    d = _declare(tmp_path, DECLARATION)
    assert d.contrasts == [("aft_bc", "vft_continued"), ("aft_bc", "start")]
    assert (d.primary, d.alpha, d.task_seeds, d.overrides, d.reuse) == ("task", 0.05, [1, 2, 3], [], ["bases"])
    assert d.record() == {"name": "e1", "sha256": d.sha256} and len(d.sha256) == 64 and d.text == DECLARATION
    assert parse_contrast("a - start") == ("a", "start")


@pytest.mark.parametrize("change, match", [
    (("primary: task", "primary: both"), "primary: expected seed or task"),
    (("task_seeds: [1, 2, 3]", "task_seeds: null"), "primary: expected seed, or at least two task_seeds"),
    (("aft_bc - start", "aft_bc - rft"), r"contrasts: .*unknown: \['rft'\]"),
    (("aft_bc - start", "aft_bc minus start"), "contrast 'aft_bc minus start': expected 'a - b'"),
    (("alpha: 0.05", "alpha: 5"), "alpha: expected a number between 0 and 1"),
    (("question: does aft_bc beat vft_continued?\n", ""), "question: expected a value"),
    (("reuse: [bases]", "reuse: [bases]\nseed: 3"), r"unknown keys \['seed'\]"),
    (("name: e1", "name: e 1"), "name: expected letters"),
])
def test_a_bad_declaration_is_named(tmp_path, change, match):
    with pytest.raises(ValueError, match=f"e.yaml: {match}"):
        _declare(tmp_path, DECLARATION.replace(*change))


VARIANTS = """arms: [vft_continued, aft_bc, vft_half]
variants:
  vft_half: {arm: vft_continued, overrides: [train.lr=1.5e-5]}
"""


def test_a_variant_is_an_arm_at_other_settings(tmp_path):
    from aftray.experiments.compare import overrides_of_arms

    d = _declare(tmp_path, DECLARATION.replace("arms: [vft_continued, aft_bc]\n", VARIANTS))
    assert d.variants == {"vft_half": ("vft_continued", ["train.lr=1.5e-5"])}
    assert overrides_of_arms(d.arms, d.variants)["vft_half"] == ("loss.name=vft", "train.lr=1.5e-5")
    with pytest.raises(ValueError, match=r"--arms: unknown \['vft_half \(variant of vft\)'\]"):
        overrides_of_arms(d.arms, {"vft_half": ("vft", [])})


@pytest.mark.parametrize("change, match", [
    (("arms: [vft_continued, aft_bc, vft_half]", "arms: [vft_continued, aft_bc]"), "vft_half: a label .* in arms"),
    (("overrides: [train.lr=1.5e-5]", "overrides: [train.lr]"), r"vft_half: \{arm: <an arm>, overrides"),
    (("{arm: vft_continued, overrides: [train.lr=1.5e-5]}", "vft_continued"), r"vft_half: \{arm: <an arm>"),
])
def test_a_bad_variant_is_named(tmp_path, change, match):
    with pytest.raises(ValueError, match=f"e.yaml: variants: expected {match}"):
        _declare(tmp_path, DECLARATION.replace("arms: [vft_continued, aft_bc]\n", VARIANTS.replace(*change)))


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "experiments").glob("*.yaml")))
def test_the_committed_declarations_name_real_arms_and_presets(name):
    from aftray.experiments.compare import overrides_of_arms

    d = load_declaration(REPO / "configs" / "experiments" / f"{name}.yaml")
    overrides_of_arms(d.arms, d.variants)  # raises on an unknown arm
    assert (REPO / d.config).is_file() and d.primary == "seed"


def _summary(experiment: str | None, sha256: str = "x") -> dict:
    return {"rounds": [], **({"experiment": {"name": experiment, "sha256": sha256}} if experiment else {})}


def test_runs_of_another_experiment_are_not_pooled(tmp_path):
    d = _declare(tmp_path, DECLARATION)
    check_pooling({"out/aft_bc_s0": _summary("e1", d.sha256), "bases/base_s0": _summary("bases")}, d)  # own; reused
    with pytest.raises(ValueError, match=r"declaration changed after runs of e1 started \(out/aft_bc_s0\)"):
        check_pooling({"out/aft_bc_s0": _summary("e1", "an earlier text's hash")}, d)
    refused = r"out/aft_bc_s1 \(e2\), out/aft_bc_s2 \(not pre-registered\);.*`reuse`"
    with pytest.raises(ValueError, match=f"e.yaml: refusing to pool runs of other experiments: {refused}"):
        check_pooling({"out/aft_bc_s0": _summary("e1", d.sha256), "out/aft_bc_s1": _summary("e2"),
                       "out/aft_bc_s2": _summary(None)}, d)


def test_the_old_sections_re_tested_agree_with_their_stored_aggregates_and_the_page():
    """docs/results/restat.py re-tests the testbed's first three sections from their per-seed accuracies: its
    differences must be the ones those sections stored (mean and std of AFT-BC − VFT-continued), and the page
    must carry the tables it prints."""
    import json
    import runpy

    restat = runpy.run_path(str(REPO / "docs" / "results" / "restat.py"))
    page = (REPO / "docs" / "results.md").read_text()
    for file, pairs in restat["SECTIONS"].values():
        arms = json.loads((REPO / "docs" / "results" / file).read_text())["arms"]
        aft, vft = (arms[a]["per_seed_final_accuracy"] for a in ("aft_bc", "vft_continued"))
        test = paired_test([aft[s] - vft[s] for s in aft])
        stored = arms["aft_bc"]["delta_accuracy_vs_vft_continued"]
        assert (test["mean"], test["std"]) == (pytest.approx(stored["mean"], abs=1e-12),
                                               pytest.approx(stored["std"], abs=1e-12))
        assert "\n".join(restat["section_table"](REPO / "docs" / "results" / file, pairs)) in page
