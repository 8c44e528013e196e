"""The weights payload (aftray/weights.py): a state dict through Ray's object store and back, tied tensors
once, bf16 bits intact; and what a re-run keeps of a run directory (aftray.loop.rounds.resume_point)."""
import json

import torch

from aftray.run.rundir import RunDir
from aftray.weights import from_payload, to_payload


def test_payload_round_trip_keeps_values_dtypes_and_ties():
    embed = torch.randn(5, 3)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed,  # tied: one storage
             "model.norm.weight": torch.randn(3).to(torch.bfloat16), "step": torch.tensor(7)}
    payload = to_payload(state)
    assert set(payload["arrays"]) == {"model.embed_tokens.weight", "model.norm.weight", "step"}
    assert payload["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    back = from_payload(payload)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert "lm_head.weight" not in from_payload(payload, with_tied=False)


def test_same_shaped_tensors_that_do_not_share_storage_both_travel():
    a, b = torch.zeros(4), torch.ones(4)
    assert set(to_payload({"a": a, "b": b})["arrays"]) == {"a", "b"}


def _round(run: RunDir, r: int, *, metrics: bool, checkpoint: bool, samples: bool = True) -> None:
    folder = run.round_dir(r)
    folder.mkdir(parents=True)
    if samples:
        run.samples_path(r).mkdir()
    if checkpoint:
        run.checkpoint_dir(r).mkdir()
        (run.checkpoint_dir(r) / "config.json").write_text("{}")
    if metrics:
        run.write_round_metrics(r, {"round": r})
    (folder / "train_result.json").write_text(json.dumps({}))


def test_resume_point_keeps_rounds_up_to_the_last_checkpoint(tmp_path):
    """Rounds 0-3 finished, 1 and 2 checkpointed, 3 not (loop.checkpoint_every), 4 half done: a re-run keeps
    0-2, redoes 3 (keeping its samples, drawn by round 2's weights) and 4."""
    from aftray.loop.rounds import resume_point

    run = RunDir(tmp_path)
    _round(run, 0, metrics=True, checkpoint=False, samples=False)
    _round(run, 1, metrics=True, checkpoint=True)
    _round(run, 2, metrics=True, checkpoint=True)
    _round(run, 3, metrics=True, checkpoint=False)
    _round(run, 4, metrics=False, checkpoint=False)
    assert resume_point(run) == [0, 1, 2]
    assert run.finished_rounds() == [0, 1, 2]
    assert [p.name for p in run.round_dir(3).iterdir()] == ["samples.parquet"]
    assert not any(run.round_dir(4).iterdir())
    assert (run.round_dir(2) / "train_result.json").is_file()


def test_resume_point_reads_back_a_saved_stage_of_an_unfinished_round(tmp_path):
    """Round 2's stage finished and saved its weights, but the round did not finish (its evaluation was cut):
    its folder stays, so the stage is read back instead of trained again."""
    from aftray.loop.rounds import resume_point

    run = RunDir(tmp_path)
    _round(run, 0, metrics=True, checkpoint=True, samples=False)
    _round(run, 1, metrics=True, checkpoint=True)
    _round(run, 2, metrics=False, checkpoint=True)
    assert resume_point(run) == [0, 1]
    assert (run.round_dir(2) / "train_result.json").is_file() and run.has_checkpoint(2)
