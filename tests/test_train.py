"""Training stage: batching and LR schedule; the loop without Ray; Ray Train + DeepSpeed on 2 CPU workers
(ZeRO 0 and 2) kept for several stages: loss goes down, checkpoints reload in transformers with the trained
weights' logits, and a killed worker is restarted from the last checkpoint and the stage ends with the same
number of steps."""
import random
from pathlib import Path

import pytest
import torch

from aftray.config import LossConfig, TrainConfig, VftConfig
from aftray.rows import group_row
from aftray.train.worker import lr_at, step_groups


def make_groups(tokenizer, n: int = 8, seed: int = 0) -> list[dict]:
    """Group rows (docs/internals.md) of a+b questions: the right COT and two wrong ones per question."""
    rng = random.Random(seed)

    def ids(text, eos=True):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])

    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"Q: {a}+{b}?\nA: "
        cots = [f"{a}+{b}={s}\n#### {s}" for s in (a + b, a + b + 1, a * b + 2)]
        rows.append(group_row(
            id=f"q{i}", prompt=prompt, prompt_ids=ids(prompt, eos=False), answer=str(a + b), ref_cot=cots[0],
            ref_cot_ids=ids(cots[0]), cots=cots, cot_ids=[ids(c) for c in cots],
            sample_logp=[-20.0, -21.0, -22.0], sample_token_logp=[[]] * 3, finish_reasons=["stop"] * 3,
            pred=[c.rsplit(" ", 1)[1] for c in cots], labels=["correct", "wrong_answer", "wrong_answer"],
            correct=[True, False, False], process=[1.0, 0.0, 0.0], rank=[1, 2, 2], counts=[1] * 3,
            num_sampled=3, weights_version=0))
    return rows


def small_train(**overrides) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=1, steps_per_stage=6, questions_per_step=4, micro_batch_questions=1,
                max_seq_len=64, num_workers=2, resources_per_worker={"CPU": 1}, max_failures=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Q: 3+4?\nA: 3+4=7\n#### 7", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_lr_warms_up_then_decays_to_min():
    t = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, 10, t) for s in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_steps_take_every_group_once_per_pass_in_a_seeded_order():
    groups = list(range(10))
    stream = [g for s in range(5) for g in step_groups(groups, s, 4, seed=0)]  # 20 = two passes
    assert sorted(stream[:10]) == groups and sorted(stream[10:]) == groups
    assert stream[:10] != stream[10:]  # reshuffled per pass
    assert step_groups(groups, 3, 4, seed=0) == stream[12:16]  # a function of (seed, step): exact resume
    assert step_groups(groups, 0, 4, seed=1) != stream[:4]


def test_planned_steps_span_the_run():
    """The align stages' one learning-rate schedule: steps_per_stage each, else one pass over a round's questions
    (in steps of questions_per_step rounded up to a multiple of the workers)."""
    from aftray.train.stage import planned_steps

    assert planned_steps(TrainConfig(steps_per_stage=8), 16, 3) == 24
    assert planned_steps(TrainConfig(questions_per_step=4), 16, 2) == 8
    assert planned_steps(TrainConfig(questions_per_step=3, num_workers=2), 16, 2) == 8  # 4 a step


def test_stage_job_refuses_a_continue_without_its_predecessor(tmp_path):
    from aftray.train.stage import StageJob

    with pytest.raises(ValueError, match="'continue' names the stage it continues"):
        StageJob.create("align", "b", [], "m", tmp_path, TrainConfig(), LossConfig(), init="continue")
    with pytest.raises(ValueError, match="expected one of"):
        StageJob.create("align", "b", [], "m", tmp_path, TrainConfig(), LossConfig(), init="warm")


def test_inbox_drops_what_it_has_finished(ray_local):
    """A service trains a comparison's dozens of runs: its inbox holds only pending jobs and unread results."""
    import ray

    from aftray.train.service import StageInbox

    inbox = StageInbox.remote()
    first = ray.get(inbox.post.remote("job0"))  # one at a time, as the driver posts (an async actor may reorder)
    second = ray.get(inbox.post.remote("job1"))
    assert ray.get(inbox.first_unfinished.remote()) == first
    ray.get(inbox.finish.remote(first, {"history": []}))
    assert ray.get(inbox.first_unfinished.remote()) == second and ray.get(inbox.pending.remote()) == 2
    assert ray.get(inbox.result.remote(first)) == {"history": []}
    assert ray.get(inbox.pending.remote()) == 1  # job1 alone
    ray.get(inbox.finish.remote(second, {}))
    ray.get(inbox.result.remote(second))
    assert ray.get(inbox.pending.remote()) == 0 and ray.get(inbox.first_unfinished.remote()) == 2


def test_deepspeed_config_takes_the_optimizer_keys():
    """train.grad_clip, train.weight_decay and train.offload_optimizer (GPU: DeepSpeed's CPU Adam on the host)."""
    from aftray.train.deepspeed_config import deepspeed_config

    train = TrainConfig(grad_clip=0.5, weight_decay=0.01, zero_stage=2, offload_optimizer=True)
    plain = deepspeed_config(train, grad_accum=2, world_size=1, offload=False)  # the worker's torch AdamW
    assert plain["gradient_clipping"] == 0.5 and "optimizer" not in plain
    offloaded = deepspeed_config(train, 2, 1, offload=train.offload_optimizer)
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded["optimizer"]["params"]["weight_decay"] == 0.01


def test_vft_stage_takes_the_vft_keys():
    from aftray.train.stage import stage_configs

    train = TrainConfig(lr=3e-4, min_lr_ratio=1.0, questions_per_step=16,
                        vft=VftConfig(steps=100, lr=2e-3, min_lr_ratio=0.1, questions_per_step=32))
    vft, loss = stage_configs("vft", train, LossConfig(name="aft_bc"))
    assert (vft.lr, vft.min_lr_ratio, vft.steps_per_stage, vft.questions_per_step) == (2e-3, 0.1, 100, 32)
    assert loss.name == "vft"
    align, loss = stage_configs("align", train, LossConfig(name="aft_bc"))
    assert (align, loss.name) == (train, "aft_bc")
    assert stage_configs("vft", TrainConfig(min_lr_ratio=0.5), LossConfig())[0].min_lr_ratio == 0.5


def test_service_refuses_a_stage_placed_differently(tmp_path):
    """The workers are placed once: a stage asking for other resources is refused (before anything starts)."""
    from aftray.train.service import TrainService

    service = TrainService(small_train(), tmp_path / "ray")
    with pytest.raises(ValueError, match="placement differs"):
        service.train("align", [], "unused", tmp_path / "stage", small_train(num_workers=1), LossConfig())
    assert service.thread is None


def test_groups_from_a_parquet_folder_in_id_order(tmp_path, tiny_model_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aftray.models import load_tokenizer
    from aftray.train.worker import load_groups

    rows = make_groups(load_tokenizer(tiny_model_path), n=4)
    (tmp_path / "samples.parquet").mkdir()  # Ray Data writes a folder of files
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "samples.parquet" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "samples.parquet" / "b.parquet")
    loaded = load_groups(tmp_path / "samples.parquet")
    assert [r["id"] for r in loaded] == ["q0", "q1", "q2", "q3"]
    assert "cots" not in loaded[0] and loaded[0]["cot_ids"] == rows[0]["cot_ids"]
    (tmp_path / "bad.parquet").mkdir()  # a table without `rank` is refused, naming the column and the file
    pq.write_table(pa.Table.from_pylist(rows).drop_columns(["rank"]), tmp_path / "bad.parquet" / "a.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: group rows: missing column 'rank'"):
        load_groups(tmp_path / "bad.parquet")


def test_local_stage_without_ray(tmp_path, tiny_model_path, monkeypatch):
    """The same loop in this process (a world of one), VFT stage over one pass: 8 groups / 2 per step; ZeRO-3,
    so the saved weights are gathered from DeepSpeed's partitions. No C++ is compiled on the way (DeepSpeed's
    shm all-reduce op: `skip_shm_comm_op`)."""
    import torch.utils.cpp_extension

    from aftray.models import load_model, load_tokenizer
    from aftray.train.stage import StageResult
    from benchmarks.train import train_stage_local

    def no_compile(name, *args, **kwargs):
        raise AssertionError(f"a C++ build of {name} in a training stage")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compile)

    tokenizer = load_tokenizer(tiny_model_path)
    train = small_train(num_workers=1, questions_per_step=2, micro_batch_questions=2, vft=VftConfig(lr=1e-2),
                        zero_stage=3)
    result = train_stage_local("vft", make_groups(tokenizer), tiny_model_path, tmp_path, train, LossConfig())
    assert result.metrics["steps"] == 4 and [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["vft"] < result.history[0]["vft"]
    assert result.metrics["tokens"] > 0 and result.metrics["tokens_per_s"] > 0
    assert StageResult.load(tmp_path).metrics == result.metrics
    reloaded = load_model(result.checkpoint)
    assert not torch.equal(logits(reloaded, tokenizer), logits(load_model(tiny_model_path), tokenizer))


def trained_weights(checkpoint: Path, zero_stage: int) -> dict:
    """The trained fp32 weights as DeepSpeed holds them (not the HF export): ZeRO-0 keeps them in the module
    state, ZeRO-2 in the optimizer's partitioned master weights."""
    if zero_stage == 0:
        return torch.load(checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="state")


def adam_steps(checkpoint: Path) -> set[int]:
    """The `step` counts of Adam's per-parameter states (beside `exp_avg`) in a DeepSpeed checkpoint."""
    steps = set()

    def walk(x):
        if isinstance(x, dict):
            if "exp_avg" in x and "step" in x:
                steps.add(int(x["step"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for f in (checkpoint / "deepspeed" / "state").glob("*.pt"):
        walk(torch.load(f, weights_only=False))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_train_service_keeps_the_policy_between_stages(ray_local, tmp_path, tiny_model_path, zero_stage):
    """Three stages on one long-lived worker group. The second continues the first: it loads nothing, its
    learning rate goes on along one schedule and Adam's moments carry over (the end state counts 12 steps);
    the third starts a new optimizer on the weights it holds. The mid-stage checkpoint's HF export holds exactly
    the weights DeepSpeed trained; the final weights reload; the inbox keeps nothing it has finished."""
    import ray

    from aftray.models import load_model, load_tokenizer
    from aftray.train.service import TrainService

    tokenizer = load_tokenizer(tiny_model_path)
    train = small_train(zero_stage=zero_stage, checkpoint_every=3, min_lr_ratio=0.0)
    loss = LossConfig(name="aft_bc")
    with TrainService(train, tmp_path / "ray") as service:
        first = service.train("align", make_groups(tokenizer), tiny_model_path, tmp_path / "a", train, loss,
                              name="a", schedule=(0, 12))
        second = service.train("align", make_groups(tokenizer), "/nonexistent", tmp_path / "b", train, loss,
                               name="b", init="continue", after="a", schedule=(6, 12))
        # the end state the second left in Ray Train's storage: Adam's step count went on from the first's
        steps = adam_steps(tmp_path / "ray" / "train" / "b_end")
        third = service.train("align", make_groups(tokenizer), "/nonexistent", tmp_path / "c", train, loss,
                              name="c", init="reset", after="b", save_weights=False, push_weights=True)
        assert ray.get(service.inbox.pending.remote()) == 0
        # the weights the third pushed (owned by its workers: read while they live) are those they trained
        from aftray.weights import from_payload
        pushed = from_payload(ray.get(third.weights[0]))
        # the third's mid-stage checkpoint (the run keeps the latest only), read before the service removes it
        mid = tmp_path / "ray" / "train" / "c_step_000003"
        exported = load_model(mid)
        mid_weights = trained_weights(mid, zero_stage)
    losses = [h["loss"] for h in first.history]
    assert [h["step"] for h in first.history] == list(range(1, 7)) and first.metrics["restarts"] == []
    assert losses[-1] < losses[0] and first.metrics["steps"] == 6
    h = first.history[-1]
    assert h["groups"] == 4 and 0 <= h["pair_acc"] <= 1 and h["grad_norm"] > 0 and h["tokens_per_s"] > 0
    assert len(first.metrics["peak_rss_mb"]) == 2 and len(set(first.metrics["worker_pids"])) == 2
    assert second.metrics["worker_pids"] == first.metrics["worker_pids"]  # the same processes
    assert (first.metrics["policy"], second.metrics["policy"], third.metrics["policy"]) == \
        ("loaded", "kept", "new_optimizer")
    # one schedule over both stages: warm-up once, then one cosine down to 0 at step 12
    lrs = [h["lr"] for h in first.history + second.history]
    assert lrs == [lr_at(i, 12, train) for i in range(12)] and lrs[6] < lrs[5]
    assert steps == {12}
    assert second.history[0]["loss"] < first.history[0]["loss"]  # it started from the trained weights
    assert third.checkpoint is None and third.weights is not None  # pushed, not saved
    assert third.history[0]["lr"] == lr_at(0, 6, train)  # a new optimizer: warm-up again

    trained = load_model(tiny_model_path)
    missing, unexpected = trained.load_state_dict(mid_weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    assert torch.equal(logits(exported, tokenizer), logits(trained, tokenizer))
    for result in (first, second):
        assert (result.stage_dir / "train_result.json").is_file()
    assert not torch.equal(logits(load_model(first.checkpoint), tokenizer),
                           logits(load_model(tiny_model_path), tokenizer))
    model = load_model(tiny_model_path)
    model.load_state_dict(pushed)
    assert not torch.equal(logits(model, tokenizer), logits(load_model(second.checkpoint), tokenizer))


@pytest.mark.slow
def test_ray_stage_resumes_after_a_worker_dies(worker_faults, tmp_path, tiny_model_path):
    """A worker dies in the second stage, which continues the first: the restarted group skips the finished
    first stage and resumes the second from its last mid-stage checkpoint (model and optimizer); it ends with
    the same number of steps, and the restarted group keeps it for the third."""
    from aftray.models import load_tokenizer
    from aftray.train.service import TrainService

    tokenizer = load_tokenizer(tiny_model_path)
    train = small_train(zero_stage=2, checkpoint_every=2)
    loss = LossConfig(name="aft_bc")
    with TrainService(train, tmp_path / "ray") as service:
        first = service.train("align", make_groups(tokenizer), tiny_model_path, tmp_path / "a", train, loss,
                              name="a")
        worker_faults.write_text("4")  # rank 1 exits instead of reporting step 4's checkpoint: the last is step 2
        second = service.train("align", make_groups(tokenizer), "/nonexistent", tmp_path / "b", train, loss,
                               name="b", init="continue", after="a")
        third = service.train("align", make_groups(tokenizer), "/nonexistent", tmp_path / "c", train, loss,
                              name="c", init="continue", after="b")
    assert not worker_faults.exists()  # the fault fired
    assert first.metrics["restarts"] == [] and second.metrics["restarts"] == [2]
    assert second.metrics["steps"] == 6 and [h["step"] for h in second.history] == list(range(1, 7))
    assert second.metrics["worker_pids"] != first.metrics["worker_pids"]  # a new worker group
    assert (second.metrics["policy"], third.metrics["policy"]) == ("restored", "kept")
    assert not (tmp_path / "ray").exists() and (second.checkpoint / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_stage_alone(ray_local, tmp_path, tiny_model_path):
    """A service for one stage (benchmarks/train.py's `train_stage`): stopped afterwards, its Ray Train run
    removed; a finished stage is not redone."""
    from aftray.models import load_tokenizer
    from benchmarks.train import train_stage

    tokenizer = load_tokenizer(tiny_model_path)
    train = small_train(num_workers=1)
    result = train_stage("vft", make_groups(tokenizer), tiny_model_path, tmp_path, train, LossConfig())
    assert result.metrics["steps"] == 2 and not (tmp_path / "ray").exists()  # one pass: 8 groups, 4 per step
    again = train_stage("vft", make_groups(tokenizer), tiny_model_path, tmp_path, train, LossConfig())
    assert again.metrics == result.metrics


@pytest.mark.slow
def test_a_loss_registered_in_the_driver_trains_on_ray_workers(ray_local, tmp_path, tiny_model_path, monkeypatch):
    """A loss added in one place, here and nowhere in aftray: one row with its method, registered in this
    process only. The stage's job carries the objective the driver resolved, so the Ray Train workers train
    it. Its term is the negatives' mean score (pushed down), and with one group per micro-batch each step's
    `alignment` must equal its `s_neg`: under any other loss it would not."""
    from aftray.loss_table import LossRow
    from aftray.models import load_tokenizer
    from aftray.train import losses as L
    from aftray.train.service import TrainService

    def push_down(scores, positive):  # the formula, one group
        return scores[~positive].mean()

    def batched_push_down(b, cfg, constraint):  # its batched twin: [G] terms, whether each group has negatives
        negative = b.mask & ~b.positive
        return (b.scores * negative).sum(1) / negative.sum(1).clamp(min=1), negative.any(1)

    row = LossRow("push_down", "push_down", "the negatives' mean score, pushed down")
    monkeypatch.setitem(L.OBJECTIVES, row.name, L.Objective(row, L.Method(push_down, batched_push_down)))
    train, groups = small_train(num_workers=1), make_groups(load_tokenizer(tiny_model_path))
    with TrainService(train, tmp_path / "ray") as service:
        toy = service.train("align", groups, tiny_model_path, tmp_path / "a", train, LossConfig(name="push_down"))
        # and pure DPO (compare's dpo_pure arm) on the same workers: no reference COT read, no VFT term
        pure = service.train("align", groups, tiny_model_path, tmp_path / "b", train,
                             LossConfig(name="dpo", vft_weight=0))
    history = toy.history
    assert all(h["alignment"] == pytest.approx(h["s_neg"]) and h["groups_no_pairs"] == 0 for h in history)
    assert all(h["loss"] == pytest.approx(h["vft"] + h["alignment"]) for h in history)
    assert history[-1]["s_neg"] < history[0]["s_neg"]
    assert all(h["vft"] == 0 and h["loss"] == pytest.approx(h["alignment"]) for h in pure.history)
    assert pure.history[-1]["loss"] < pure.history[0]["loss"]
