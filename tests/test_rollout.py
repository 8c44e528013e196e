"""Rollout: the HF engine in-process (sampling, T = 1 log-probs, determinism, weights in place) and the Ray
pool on local Ray with real models (group rows, determinism per (question, round), refresh, prompt
truncation, an engine process killed mid-round), each on both engines: HF, and vLLM (its CPU build here; those
are slow). The vLLM engine in-process is tested in test_vllm.py."""
import copy
import importlib.util
import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from aftray.config import ModelConfig, RolloutConfig, TaskConfig, VerifyConfig
from aftray.loop.pipeline import sample_groups
from aftray.models import load_model, load_tokenizer, resolve_model_path
from aftray.rollout import (RolloutPool, SamplingParams, derive_seed, encode_prompts, make_engine,
                            question_rows)
from aftray.rollout.pool import truncate_prompts
from aftray.tasks import load_task
from aftray.weights import put_weights

LABELS = {"correct", "wrong_answer", "no_answer", "truncated"}
MAX_PROMPT = 200  # tiny model: one token per character, so about half the GSM8K prompts are longer
GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=16)


def config(**kw) -> RolloutConfig:
    return RolloutConfig(**{"k": 4, "temperature": 1.0, "max_new_tokens": 24, "batch_size": 2,
                            "max_prompt_tokens": MAX_PROMPT, "seed": 0, **kw})


def other_weights(model_path, seed=1) -> dict:
    """A fresh init of the same architecture (tied weights appear once, as in named_parameters) at 10x the
    usual scale: at the usual scale a random tiny model greedily repeats the prompt's last token."""
    config = copy.deepcopy(load_model(model_path).config)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return {name: p.detach() for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}


def tokens(completions) -> list:
    return [c.token_ids for c in completions]


def groups_by_id(pool, rows, round_index, answer_kind, verify=None, params=None) -> dict:
    import ray

    verify = verify or VerifyConfig(process="none")
    out = sample_groups(pool, ray.data.from_items(rows), round_index, verify, answer_kind, params).take_all()
    assert len(out) == len({g["id"] for g in out}), "a question came back twice"
    return {g["id"]: g for g in out}


@pytest.fixture(scope="module")
def task(data_dir):
    return load_task(TaskConfig(name="gsm8k", num_test=8, data_dir=str(data_dir)))


@pytest.fixture(scope="module")
def tiny_rows(task, tiny_model_path):
    return question_rows(task.test[:6], task, load_tokenizer(tiny_model_path))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_path):
    return make_engine("hf", tiny_model_path, config())


# ---------------------------------------------------------------------------------------------- in-process
def test_question_rows(tiny_rows, tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    row = tiny_rows[0]
    assert set(row) == {"id", "prompt", "prompt_ids", "answer", "ref_cot", "ref_cot_ids", "choices"}
    assert len(row["prompt_ids"]) == len(row["prompt"])  # one token per character, no BOS added
    assert row["ref_cot_ids"][-1] == tok.eos_token_id and len(row["ref_cot_ids"]) == len(row["ref_cot"]) + 1


def test_prompts_are_encoded_in_one_batch_with_one_bos(tiny_model_path):
    """A tokenizer that adds BOS: a prompt a chat template began with BOS gets none added, the others one; the
    batched encoding equals encoding each prompt alone, in the prompts' order."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(tiny_model_path)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    texts = ["ab", "<s>ab", "c", "<s>c d"]
    ids = encode_prompts(tok, texts)
    alone = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ("ab", "ab", "c", "c d")]
    assert ids == alone
    assert encode_prompts(tok, []) == []


def test_truncation_is_from_the_left_and_counted():
    prompts = [list(range(10)), list(range(3))]
    assert truncate_prompts(prompts, 4) == ([[6, 7, 8, 9], [0, 1, 2]], 1)


def test_cores_are_claimed_once_and_freed_when_the_holder_dies():
    """rollout.vllm.cpu_cores=auto: each engine pins its OpenMP threads to cores no other engine holds; a killed
    actor's cores are free again for its restart."""
    import subprocess
    import sys

    from aftray.rollout.vllm_engine import claim_cores

    n = len(os.sched_getaffinity(0))
    first, locks = claim_cores(1)
    assert first == [min(os.sched_getaffinity(0))]
    second, more = claim_cores(n - 1)  # the rest, not the one held
    assert sorted(first + second) == sorted(os.sched_getaffinity(0))
    assert claim_cores(1) == ([], [])  # none left
    for f in locks + more:
        f.close()
    holder = subprocess.Popen([sys.executable, "-c", "from aftray.rollout.vllm_engine import claim_cores; "
                               f"c, l = claim_cores({n}); print(c, flush=True); import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == str(sorted(os.sched_getaffinity(0)))
    assert claim_cores(1) == ([], [])  # held by another process
    holder.kill()
    holder.wait()
    again, locks = claim_cores(n)
    assert again == sorted(os.sched_getaffinity(0))
    for f in locks:
        f.close()


def test_seeds_are_stable_across_processes():
    # sha256-based, not hash(): a restarted or other actor derives the same seed
    assert derive_seed(0, 1, "gsm8k-test-1") == derive_seed(0, 1, "gsm8k-test-1") == 1581215692
    assert derive_seed(0, 2, "gsm8k-test-1") != derive_seed(0, 1, "gsm8k-test-1")


def test_hf_engine_sampling(tiny_engine, tiny_rows):
    prompts = [r["prompt_ids"][-MAX_PROMPT:] for r in tiny_rows[:3]]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=7)
    first = tiny_engine.generate(prompts, params)
    assert [len(cs) for cs in first] == [4, 4, 4]
    for prompt, cs in zip(prompts, first, strict=True):
        # log-probs are those of the raw logits (T = 1) under the current weights: they sum to score()
        assert [sum(c.logprobs) for c in cs] == pytest.approx(tiny_engine.score([prompt] * 4, tokens(cs)),
                                                             abs=1e-3)
        for c in cs:
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert (c.finish_reason == "stop") == (c.token_ids[-1] in tiny_engine.eos)
            assert c.finish_reason == "stop" or len(c.token_ids) == 24
    assert len({tuple(t) for t in tokens(first[0])}) > 1  # k different samples
    # the same prompt and seed give the same COTs alone or in any batch; another seed gives others
    again = tiny_engine.generate([prompts[2], prompts[0]], params)
    assert tokens(again[1]) == tokens(first[0]) and tokens(again[0]) == tokens(first[2])
    assert tokens(tiny_engine.generate([prompts[2]], params)[0]) == tokens(first[2])
    assert tokens(tiny_engine.generate(prompts[:1], replace(params, seed=8))[0]) != tokens(first[0])
    # temperature changes what is drawn, not the reported (T = 1) log-probs
    cold = tiny_engine.generate(prompts[:1], replace(params, temperature=0.5))[0]
    assert [sum(c.logprobs) for c in cold] == pytest.approx(tiny_engine.score([prompts[0]] * 4, tokens(cold)),
                                                           abs=1e-3)
    # greedy at T = 0; a top-p so small that only the top token is left is greedy too
    greedy = tiny_engine.generate(prompts[:1], replace(params, temperature=0))[0]
    assert len({tuple(t) for t in tokens(greedy)}) == 1
    assert tokens(tiny_engine.generate(prompts[:1], replace(params, top_p=1e-9))[0]) == tokens(greedy)


def test_hf_engine_stops_at_eos(tiny_model_path, tiny_rows):
    engine = make_engine("hf", tiny_model_path, config())
    prompt = tiny_rows[0]["prompt_ids"][-MAX_PROMPT:]
    full = engine.generate([prompt], GREEDY)[0][0]
    stop = full.token_ids[5]  # make a token the model emits greedily an end-of-sequence token
    engine.eos = [stop]
    cut = engine.generate([prompt], GREEDY)[0][0]
    end = full.token_ids.index(stop) + 1
    assert cut.finish_reason == "stop" and full.finish_reason == "length"
    assert cut.token_ids == full.token_ids[:end] and cut.logprobs == pytest.approx(full.logprobs[:end])


def test_hf_engine_weights_in_place(tiny_model_path, tiny_rows, tmp_path):
    engine = make_engine("hf", tiny_model_path, config())
    prompts = [r["prompt_ids"][-MAX_PROMPT:] for r in tiny_rows[:3]]
    before = [tokens(cs) for cs in engine.generate(prompts, GREEDY)]
    storage = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    state = other_weights(tiny_model_path)
    engine.update_weights(state, 1)
    after = [tokens(cs) for cs in engine.generate(prompts, GREEDY)]
    assert engine.version == 1 and after != before
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == storage  # copied in, not rebuilt
    # the same weights from a checkpoint folder (what the trainer writes) give the same outputs
    model = load_model(tiny_model_path)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(tmp_path)
    other = make_engine("hf", tiny_model_path, config())
    other.load_weights(tmp_path, 1)
    assert [tokens(cs) for cs in other.generate(prompts, GREEDY)] == after
    with pytest.raises(ValueError, match="missing"):  # refused before anything is copied
        engine.update_weights({"model.norm.weight": torch.zeros_like(state["model.norm.weight"])}, 2)
    assert engine.version == 1 and [tokens(cs) for cs in engine.generate(prompts, GREEDY)] == after


# ---------------------------------------------------------------------------------------------- Ray pool
# every pool test runs on both engines; vLLM's are slow (an engine start is ~8.5 s in-process, ~17 s in a pool)
ENGINES = ["hf", pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
    not importlib.util.find_spec("vllm"), reason="vLLM is not installed")])]


@pytest.fixture(scope="module", params=ENGINES)
def tiny_pool(request, ray_local, tiny_model_path):
    pool = RolloutPool(config(engine=request.param, num_actors=2 if request.param == "hf" else 1),
                       tiny_model_path)
    yield pool
    pool.shutdown()


def test_pool_groups(tiny_pool, tiny_rows, task):
    groups = groups_by_id(tiny_pool, tiny_rows, 1, task.answer_kind, VerifyConfig(process="arith"))
    assert sorted(groups) == sorted(r["id"] for r in tiny_rows)
    for g in groups.values():
        assert g["num_sampled"] == 4 and 1 <= len(g["cots"]) <= 4
        n = len(g["cots"])
        assert all(len(g[c]) == n for c in ("cot_ids", "sample_logp", "finish_reasons", "labels", "correct",
                                            "process", "rank"))
        assert set(g["labels"]) <= LABELS and g["weights_version"] == tiny_pool.version
        assert len(g["prompt_ids"]) <= MAX_PROMPT and g["ref_cot_ids"]
    metrics = tiny_pool.metrics(1)
    assert metrics["num_questions"] == len(tiny_rows) and metrics["num_samples"] == 4 * len(tiny_rows)
    assert metrics["truncated_prompts"] == sum(len(r["prompt_ids"]) > MAX_PROMPT for r in tiny_rows) > 0
    assert metrics["rollout_tokens"] > 0 and metrics["rollout_tokens_per_s"] > 0
    assert metrics["time_verify_s"] > 0
    # an engine call holds batch_size questions at k samples each, or k times as many at one (greedy eval)
    assert metrics["num_batches"] == -(-len(tiny_rows) // 2)
    groups_by_id(tiny_pool, tiny_rows, 13, task.answer_kind, params=GREEDY)
    assert tiny_pool.metrics(13)["num_batches"] == 1
    # sample_logp is the COT's T = 1 log-prob under the weights that sampled it
    g = groups[tiny_rows[0]["id"]]
    scores = tiny_pool.score([g["prompt_ids"]] * len(g["cots"]), g["cot_ids"])
    assert g["sample_logp"] == pytest.approx(scores, abs=1e-3)
    # deterministic per (question, round): same COTs in other batches (rows rotated); new ones next round
    rotated = groups_by_id(tiny_pool, tiny_rows[1:] + tiny_rows[:1], 1, task.answer_kind)
    assert {i: g["cot_ids"] for i, g in rotated.items()} == {i: g["cot_ids"] for i, g in groups.items()}
    later = groups_by_id(tiny_pool, tiny_rows, 2, task.answer_kind)
    assert all(later[i]["cot_ids"] != g["cot_ids"] for i, g in groups.items())


def test_assessment_rescores_only_cots_of_other_weights(tiny_pool, tiny_rows, task, tmp_path):
    """The evaluator's candidate scores: a COT's sampling log-prob under the weights that drew it, the pool's
    scoring under any other (the same numbers, up to the engines' drift)."""
    from aftray.config import Config
    from aftray.loop.evaluate import Evaluator
    from aftray.run.rundir import RunDir

    groups = list(groups_by_id(tiny_pool, tiny_rows[:3], 1, task.answer_kind).values())
    evaluator = Evaluator(Config(), tiny_pool, task.answer_kind, tiny_rows, RunDir(tmp_path))
    zeros = [{**g, "sample_logp": [0.0] * len(g["cot_ids"])} for g in groups]  # marks what was not scored
    assert evaluator.summed_logps(zeros) == [z["sample_logp"] for z in zeros]
    older = [{**z, "weights_version": z["weights_version"] - 1} for z in zeros]
    assert [x for r in evaluator.summed_logps(older) for x in r] == pytest.approx(
        [x for g in groups for x in g["sample_logp"]], abs=1e-3)


def test_pool_monte_carlo_continuations(tiny_pool, tiny_rows, task):
    prefixes = [tiny_rows[0]["prompt"] + "First, ", tiny_rows[1]["prompt"] + "We know"]
    fn = tiny_pool.continuation_sampler(round_index=1)
    conts = fn(prefixes, 3)
    assert [len(c) for c in conts] == [3, 3] and all(isinstance(t, str) for c in conts for t in c)
    assert fn(prefixes, 3) == conts  # seeded by (round, prefix)
    # verify.process="mc" calls back into the pool from the Ray Data verify tasks
    groups = groups_by_id(tiny_pool, tiny_rows[:2], 3, task.answer_kind,
                          VerifyConfig(process="mc", mc_samples=2),
                          SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=0))
    assert len(groups) == 2 and all(len(g["process"]) == len(g["cots"]) for g in groups.values())


def test_pool_refresh_in_place(tiny_pool, tiny_rows, task, tiny_model_path):
    def greedy(round_index):
        groups = groups_by_id(tiny_pool, tiny_rows, round_index, task.answer_kind, params=GREEDY)
        return {i: (g["cot_ids"][0], g["weights_version"]) for i, g in groups.items()}

    pids = tiny_pool.engine_pids()
    start = tiny_pool.version
    before = greedy(10)
    weights = other_weights(tiny_model_path)
    seconds = tiny_pool.refresh(put_weights(weights), start + 1)  # a state dict, via the object store
    after = greedy(11)
    assert 0 < seconds < 30 and tiny_pool.version == start + 1
    assert all(v == start + 1 for _, v in after.values())
    assert sum(after[i][0] != before[i][0] for i in before) >= len(before) - 1
    # every weight was taken, the tied LM head included: the pool scores as an HF engine holding them
    reference = make_engine("hf", tiny_model_path, config())
    reference.update_weights(weights, 1)
    prompts, cots = [r["prompt_ids"][-MAX_PROMPT:] for r in tiny_rows], [after[r["id"]][0] for r in tiny_rows]
    assert tiny_pool.score(prompts, cots) == pytest.approx(reference.score(prompts, cots), rel=1e-4, abs=1e-3)
    assert tiny_pool.engine_pids() == pids  # same processes: weights changed in place, no restart
    tiny_pool.refresh(tiny_model_path, start + 2)  # a checkpoint folder: the original weights again
    assert {i: c for i, (c, _) in greedy(12).items()} == {i: c for i, (c, _) in before.items()}


def test_a_run_taking_the_pool_over_gets_its_own_start(tiny_pool, tiny_rows, task, tiny_model_path):
    """A comparison's runs share one pool: the next run's starting weights are loaded even when the engines hold
    a version of the same label (another run's weights), with its own sampling seed and empty round stats."""
    def greedy():
        groups = groups_by_id(tiny_pool, tiny_rows, 30, task.answer_kind, params=GREEDY)
        return {i: g["cot_ids"][0] for i, g in groups.items()}

    own, v = tiny_pool.cfg, tiny_pool.version
    tiny_pool.refresh(tiny_model_path, v + 1)
    base = greedy()
    tiny_pool.refresh(put_weights(other_weights(tiny_model_path)), v + 2)  # the last run's weights, labelled v + 2
    groups_by_id(tiny_pool, tiny_rows[:2], 41, task.answer_kind)
    assert greedy() != base and tiny_pool.metrics(41)["num_questions"] == 2
    try:
        tiny_pool.start_run(replace(own, seed=5), tiny_model_path, v + 2)
        assert tiny_pool.cfg.seed == 5 and tiny_pool.version == v + 2
        assert greedy() == base and "num_questions" not in tiny_pool.metrics(41)
        # engines built for other settings (or another base model) serve no run of theirs
        engine_dtype = tiny_pool.engine_key[2]
        assert not tiny_pool.serves(replace(own, max_new_tokens=99), tiny_model_path, engine_dtype)
        assert not tiny_pool.serves(own, "/elsewhere", engine_dtype)
        with pytest.raises(ValueError, match="other settings"):
            tiny_pool.start_run(replace(own, k=2), tiny_model_path, v + 3)
    finally:
        tiny_pool.start_run(own, tiny_model_path, v + 3)


def test_pool_starting_label_is_not_skipped(ray_local, tiny_model_path, tiny_rows, task, tmp_path):
    """The loop labels the base model -1, so round 0's VFT weights (version 0) are loaded, not skipped as held."""
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in other_weights(tiny_model_path).items()},
              str(tmp_path / "model.safetensors"))
    pool = RolloutPool(config(num_actors=1), tiny_model_path, version=-1)
    try:
        before = groups_by_id(pool, tiny_rows, 1, task.answer_kind, params=GREEDY)
        assert pool.version == -1 and all(g["weights_version"] == -1 for g in before.values())
        pool.refresh(tmp_path, 0)
        after = groups_by_id(pool, tiny_rows, 1, task.answer_kind, params=GREEDY)
        assert all(g["weights_version"] == 0 for g in after.values())
        assert sum(after[i]["cot_ids"] != g["cot_ids"] for i, g in before.items()) >= len(before) - 1
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_pool_smollm2(ray_local, task):
    path = resolve_model_path(ModelConfig())  # SmolLM2-135M-Instruct (offline: the converted GGUF)
    rows = question_rows(task.test[:3], task, load_tokenizer(path))
    pool = RolloutPool(config(num_actors=1, k=4, temperature=0.8, max_new_tokens=48, max_prompt_tokens=512),
                       path)
    try:
        groups = groups_by_id(pool, rows, 1, task.answer_kind, VerifyConfig(process="arith"))
        assert sorted(groups) == sorted(r["id"] for r in rows)
        for g in groups.values():
            assert g["num_sampled"] == 4 and len(g["labels"]) == len(g["cots"]) >= 2
            assert set(g["labels"]) <= LABELS and g["weights_version"] == 0
        before = {i: g["cot_ids"][0] for i, g in groups_by_id(pool, rows, 2, task.answer_kind,
                                                               params=GREEDY).items()}
        state = {n: p.detach() * 1.05 for n, p in load_model(path).named_parameters()}
        seconds = pool.refresh(put_weights(state), 1)
        after = groups_by_id(pool, rows, 3, task.answer_kind, params=GREEDY)
        assert pool.version == 1 and all(g["weights_version"] == 1 for g in after.values())
        assert any(after[i]["cot_ids"][0] != c for i, c in before.items())
        assert seconds < 10
    finally:
        pool.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_killed_mid_round(ray_local, tiny_model_path, task, engine):
    rows = question_rows(task.test[:8], task, load_tokenizer(tiny_model_path))
    pool = RolloutPool(config(engine=engine, num_actors=1, batch_size=1, max_new_tokens=48), tiny_model_path)
    try:
        # weights v1 first: the restarted process starts from the initial model and must reload v1
        pool.refresh(put_weights(other_weights(tiny_model_path)), 1)
        expected = groups_by_id(pool, rows, 1, task.answer_kind)
        done = pool.metrics(1)["num_batches"]
        (pid,) = pool.engine_pids()

        def kill_after_two_batches():
            while pool.metrics(1)["num_batches"] < done + 2:
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_two_batches)
        killer.start()
        got = groups_by_id(pool, rows, 1, task.answer_kind)
        killer.join()
        assert pool.engine_pids() != [pid]  # Ray restarted the process
        assert sorted(got) == sorted(expected)  # every question exactly once (groups_by_id checks twice)
        assert all(g["weights_version"] == 1 for g in got.values())
        assert {i: g["cot_ids"] for i, g in got.items()} == {i: g["cot_ids"] for i, g in expected.items()}
        assert pool.metrics(1)["num_batches"] == done + len(rows)  # the lost call counted once, by its retry
    finally:
        pool.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="vLLM is not installed")
def test_vllm_pool_names_a_model_it_cannot_load(ray_local, tiny_model_path, tmp_path):
    """Raised when the pool starts, not mid-round, and the message names the model."""
    import json
    import shutil

    bad = tmp_path / "not-a-model"
    shutil.copytree(tiny_model_path, bad)
    config_json = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config_json, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(Exception, match="vLLM could not start model .*not-a-model"):
        RolloutPool(config(engine="vllm"), bad)
