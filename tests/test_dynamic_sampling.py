"""Dynamic sampling (loop.min_mixed_groups): a round's questions, and a round on the arith preset that keeps
sampling fresh questions until it has N mixed groups or has used its cap."""
import math
from pathlib import Path

import pytest

from aftray.config import load_config
from aftray.loop.rounds import round_questions
from aftray.rows import TRAIN_COLUMNS, group_row, mixed_or_reference
from aftray.train.worker import groups_for_steps, load_groups

PRESET = Path(__file__).resolve().parents[1] / "configs" / "arith_cpu.yaml"


def _ids(cfg, r, rows):
    return [row["id"] for row in round_questions(rows, cfg, r)]


def test_round_blocks_are_deterministic_and_fresh():
    rows = [{"id": f"q{i}"} for i in range(100)]
    off = load_config(PRESET, ["loop.questions_per_round=8"])
    on = load_config(PRESET, ["loop.questions_per_round=8", "loop.min_mixed_groups=4", "loop.max_oversample=2.5"])
    for r in (1, 2, 3):
        assert len(_ids(off, r, rows)) == 8 and len(_ids(on, r, rows)) == 20  # the cap: ceil(8 x 2.5)
        assert _ids(on, r, rows) == _ids(on, r, rows) and len(set(_ids(on, r, rows))) == 20
    assert _ids(on, 1, rows)[:8] == _ids(off, 1, rows)  # round 1 starts where it would without the option
    assert not set(_ids(on, 1, rows)) & set(_ids(on, 2, rows))  # rounds draw disjoint blocks
    assert len(set(_ids(on, 1, rows[:12]))) == 12  # a block never holds a question twice
    other_seed = load_config(PRESET, ["seed=1", "loop.questions_per_round=8", "loop.min_mixed_groups=4",
                                      "loop.max_oversample=2.5"])
    assert _ids(other_seed, 1, rows) != _ids(on, 1, rows)


def test_training_rows_keep_mixed_groups_whole_and_references_of_the_rest():
    def group(i, correct):
        k, pred = len(correct), ["7" if c else "8" for c in correct]
        return group_row(id=f"q{i}", prompt="Q", prompt_ids=[1], answer="7", ref_cot="#### 7",
                         ref_cot_ids=[2, 3], cots=[f"#### {p}" for p in pred], cot_ids=[[4]] * k,
                         sample_logp=[-1.0] * k, sample_token_logp=[[-1.0]] * k, finish_reasons=["stop"] * k,
                         pred=pred, labels=["correct" if c else "wrong_answer" for c in correct], correct=correct,
                         process=[1.0] * k, rank=[1] * k, counts=[1] * k, num_sampled=k, weights_version=1)

    groups = [group(0, [True, False]), group(1, [True, True]), group(2, [False, False, False])]
    rows = mixed_or_reference(load_groups(groups))  # as the stage does
    assert rows[0] == {c: groups[0][c] for c in TRAIN_COLUMNS}
    for row, g in zip(rows[1:], groups[1:]):
        assert row["ref_cot_ids"] == g["ref_cot_ids"] and row["cot_ids"] == row["correct"] == row["rank"] == []
    # a round trains the groups it planned: the mixed ones first, then references in the rows' order
    capped = mixed_or_reference(load_groups(groups[::-1]), limit=2)
    assert [row["id"] for row in capped] == ["q0", "q1"] and capped[0]["cot_ids"] and not capped[1]["cot_ids"]
    assert [row["id"] for row in mixed_or_reference(load_groups(groups[1:]), limit=1)] == ["q1"]


def test_a_stage_with_fewer_places_than_groups_trains_the_mixed_ones_first():
    def group(i, correct):
        return {"id": f"q{i}", "correct": correct}

    groups = [group(i, c) for i, c in enumerate([[True, True], [False], [True, False], [False, False],
                                                  [False, True], [True]])]
    assert groups_for_steps(groups, 6, seed=0) == groups  # they fit: untouched
    for seed in range(5):
        picked = groups_for_steps(groups, 4, seed)
        assert [g["id"] for g in picked[:2]] in (["q2", "q4"], ["q4", "q2"]) and len(picked) == 4
        assert len({g["id"] for g in picked}) == 4 and picked == groups_for_steps(groups, 4, seed)
    # the places left over go to the other groups in a seeded order, not always the first ones
    assert len({tuple(g["id"] for g in groups_for_steps(groups, 3, seed)) for seed in range(8)}) > 1


@pytest.mark.slow
def test_round_samples_until_mixed_groups_or_cap(tmp_path, ray_local):
    from aftray.loop.rounds import run_loop
    from aftray.run.rundir import read_parquet_rows

    need, per_round, cap = 10, 8, 24  # need > per_round: the first batch alone can never be enough
    cfg = load_config(PRESET, [f"output_dir={tmp_path}", "run_name=dynamic", "task.num_train=400",
                               "task.num_test=20", "train.vft.steps=30",
                               "train.steps_per_stage=2", "loop.rounds=1", f"loop.questions_per_round={per_round}",
                               f"loop.min_mixed_groups={need}", "loop.max_oversample=3", "tracking.experiment=null"])
    rec = run_loop(cfg)["rounds"][1]
    samples = read_parquet_rows(cfg.run_dir / "rounds" / "1" / "samples.parquet")
    ids = [row["id"] for row in samples]
    n, mixed = rec["num_questions"], rec["rollout_num_mixed_groups"]
    assert len(ids) == len(set(ids)) == n > per_round  # more questions were sampled, none twice
    assert set(ids) == set(_ids(cfg, 1, [{"id": f"arith-train-{i}"} for i in range(400)])[:n])  # the block's front
    assert mixed == sum(any(row["correct"]) and not all(row["correct"]) for row in samples)
    assert mixed >= need or n == cap
    assert rec["rollout_mixed_fraction"] == pytest.approx(mixed / n)
    assert rec["rollout_questions_per_mixed_group"] == (pytest.approx(n / mixed) if mixed else None)
    assert rec["time_train_s"] > 0 and not math.isnan(rec["train_loss"])
