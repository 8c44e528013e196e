"""Config: presets + overrides build typed sections; bad keys, types and values fail early, naming the key."""
import dataclasses
import importlib.util
import re
import time
import typing
from pathlib import Path

import pytest

from aftray.config import Config, ConfigError, flatten, load_config, parse_overrides, save_config, to_dict


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "rollout.k=8", "loop.rounds=3", "train.resources_per_worker={trainer: 1}",
                             "task.num_train=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.rollout.k == 8 and cfg.loop.rounds == 3
    assert cfg.train.resources_per_worker == {"trainer": 1.0}
    assert cfg.task.num_train is None


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: x\ntrain:\n  lr: 3e-5\nloss:\n  name: aft_dc\n")
    cfg = load_config(path, ["loss.bc_margin=0.5"])
    assert (cfg.run_name, cfg.train.lr, cfg.loss.name, cfg.loss.bc_margin) == ("x", 3e-5, "aft_dc", 0.5)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("train.lr=abc", "train.lr: expected float"),
    ("rollout.k=2.5", "rollout.k: expected int"),
    ("rollout.k=0", "rollout.k: expected an integer >= 1"),
    ("train.lr=-1e-5", "train.lr: expected a learning rate > 0"),
    ("loss.bc_margin=-0.1", "loss.bc_margin: expected a boundary margin >= 0"),
    ("loss.name=nope", "loss.name: expected one of"),
    ("rollout.engine=sglang", "rollout.engine: expected one of 'hf', 'vllm'"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.vft.min_lr_ratio=2", "train.vft.min_lr_ratio: expected a value in"),
    ("trainlr", "expected key=value"),
    ("train.steps_per_round=4", "train.steps_per_round was renamed to train.steps_per_stage"),
    ("loop.eval_k=4", "loop.eval_k was removed"),
    ("rollout.vllm.cpu_cores=0-", "rollout.vllm.cpu_cores: expected 'auto', null or a core list"),
    ("rollout.vllm.block_size=24", "rollout.vllm.block_size: expected null or a multiple of 16"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization: expected a fraction"),
    ("train.weight_decay=-1", "train.weight_decay: expected a value >= 0"),
    ("train.grad_clip=-1", "train.grad_clip: expected a value >= 0"),
    ("loss.pref_beta=0", "loss.pref_beta: expected null or a value > 0"),
    ("task.arith.steps=[3, 2]", "task.arith.steps: expected [lo, hi] with 1 <= lo <= hi"),
    ("task.arith.steps=[0, 2]", "task.arith.steps: expected [lo, hi] with 1 <= lo <= hi"),
    ("task.arith.steps=[2]", "task.arith.steps: expected [lo, hi] with 1 <= lo <= hi"),
    ("task.arith.steps=2", "task.arith.steps: expected a list"),
    ("loss.process_gap=-1", "loss.process_gap: expected a value >= 0"),
    ("cluster.precheck_timeout_s=-1", "cluster.precheck_timeout_s: expected seconds >= 0"),
    ("model.tiny.hidden_size=100", "model.tiny.hidden_size: expected a multiple of 32"),
    # moved and removed keys name their replacement (issue #25)
    ("loop.eval_questions=50", "loop.eval_questions was replaced by task.num_test"),
    ("task.arith.num_train=400", "task.arith.num_train was replaced by task.num_train"),
    ("rollout.gpu_memory_utilization=0.8", "rollout.gpu_memory_utilization was moved to "
                                           "rollout.vllm.gpu_memory_utilization"),
    ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size was moved to rollout.vllm.tensor_parallel_size"),
    ("train.vft_steps=10", "train.vft_steps was moved to train.vft.steps"),
    ("train.vft_questions_per_step=8", "train.vft_questions_per_step was moved to train.vft.questions_per_step"),
    ("model.cache_dir=/tmp", "model.cache_dir was removed: set AFTRAY_CACHE_DIR"),
    ("tracking.tracking_uri=x", "tracking.tracking_uri was removed: set MLFLOW_TRACKING_URI"),
    ("rollout.strict_prompts=true", "rollout.strict_prompts was removed: prompts over rollout.max_prompt_tokens"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync: expected auto, object_store or folder: nccl needs"),
    ("rollout.weight_sync=disk", "rollout.weight_sync: expected one of 'auto', 'object_store', 'nccl', 'folder'"),
    ("loop.checkpoint_every=-1", "loop.checkpoint_every: expected an integer >= 0"),
    ("rollout.gpus_per_actor=1", "rollout.gpus_per_actor was replaced by rollout.resources_per_actor"),
    ("train.resources.trainer=1", "train.resources was replaced by train.resources_per_worker"),
    ("train.packing=true", "train.packing was replaced by train.layout"),
    ("train.lr_schedule=linear", "train.lr_schedule was removed: the learning rate always decays on a cosine"),
    ("tracking.enabled=false", "tracking.enabled was replaced by tracking.experiment"),
    ("verify.last_number_fallback=false", "verify.last_number_fallback was removed"),
    ("rollout.vllm.enforce_eager=true", "rollout.vllm.enforce_eager was removed: vLLM runs eager on CPU"),
    ("task.arith.distractors=2", "task.arith.distractors was removed"),
    ("task.strict=true", "task.strict was removed: a bad dataset row always raises"),
    ("train.layout=flat", "train.layout: expected one of 'padded', 'packed', 'shared_prefix'"),
    # issue #25's third cut: one key where two said one thing
    ("cluster.num_cpus=4", "cluster.num_cpus was removed: a local Ray gets the CPUs the rollout actors and train"),
    ("rollout.threads_per_actor=2", "rollout.threads_per_actor was replaced by rollout.resources_per_actor.CPU"),
    ("task.arith.min_steps=1", "task.arith.min_steps was replaced by task.arith.steps: [lo, hi]"),
    ("task.arith.max_steps=3", "task.arith.max_steps was replaced by task.arith.steps: [lo, hi]"),
    ("loss.beta=0.1", "loss.beta was renamed to loss.bc_margin"),
    ("loss.dpo_beta=0.1", "loss.dpo_beta was replaced by loss.pref_beta (DPO's beta, ORPO's lambda"),
    ("loss.orpo_lambda=1", "loss.orpo_lambda was replaced by loss.pref_beta (DPO's beta, ORPO's lambda"),
    ("rollout.vllm.dtype=bfloat16", "rollout.vllm.dtype was removed: vLLM serves the weights in the dtype the "
                                    "trainer pushes them"),
    ("rollout.dtype=auto", "rollout.dtype was removed: vLLM serves the weights"),
])
def test_bad_values_name_the_key(override, message):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["task.name=gsm8k", override])
    assert time.monotonic() - start < 5  # fails before anything heavy (Ray) starts


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_presets_load(data_dir):
    presets = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    for preset in presets:
        load_config(preset)


def test_round_trip_and_flatten(tmp_path):
    cfg = load_config(None, ["train.lr=2e-5", "rollout.resources_per_actor={CPU: 2, rollout: 1}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(to_dict(cfg))
    assert flat["train.lr"] == 2e-5 and flat["rollout.resources_per_actor.rollout"] == 1.0


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_pinned_samplers_are_refused_beside_overlapping_trainers():
    """With loop.overlap a CPU node samples while it trains: auto would pin the samplers onto the trainers' cores."""
    vllm_cpu = ["task.name=gsm8k", "rollout.engine=vllm", "loop.overlap=true"]
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (engine=vllm fails validation first)")
    with pytest.raises(ConfigError, match="rollout.vllm.cpu_cores: expected null or cores the train workers do not"):
        load_config(None, vllm_cpu)
    assert load_config(None, vllm_cpu + ["rollout.vllm.cpu_cores=null"]).rollout.vllm.cpu_cores is None
    assert load_config(None, vllm_cpu + ["rollout.resources_per_actor={GPU: 1}"]).rollout.vllm.cpu_cores == "auto"  # GPU


def test_weight_sync_auto_picks_what_the_placement_allows():
    """auto: NCCL where vLLM samplers and trainers both hold GPUs, else the object store; folder reads every
    round's checkpoint, so it needs one each round."""
    assert load_config(None, []).rollout.weight_sync == "object_store"
    gpus = ["rollout.engine=vllm", "rollout.resources_per_actor={GPU: 1}", "train.resources_per_worker={GPU: 1}"]
    if importlib.util.find_spec("vllm") is not None:
        assert load_config(None, gpus).rollout.weight_sync == "nccl"
        assert load_config(None, gpus + ["rollout.weight_sync=object_store"]).rollout.weight_sync == "object_store"
    with pytest.raises(ConfigError, match="rollout.weight_sync: expected object_store or auto when "
                                          "loop.checkpoint_every > 1"):
        load_config(None, ["rollout.weight_sync=folder", "loop.checkpoint_every=2"])


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted keys a user can set: the leaves of the Config dataclass tree (a dict-valued key is one)."""
    hints = typing.get_type_hints(cls)
    return [key for f in dataclasses.fields(cls) for key in (
        leaf_keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name])
        else [prefix + f.name])]


def test_config_stays_small():
    """Every key is one more thing to read, document and test (issue #25: 110 leaves before it, 96 after its
    first reorganisation, 85 after the second, 80 after the third)."""
    keys = leaf_keys()
    assert len(keys) <= 80, f"{len(keys)} config keys: {keys}"


def test_what_removed_keys_now_follow():
    """An actor computes on as many threads as it holds CPUs (at least one); vLLM serves the dtype of the
    trainer's weights (amp_bf16 keeps fp32 weights)."""
    cpus = {cpu: load_config(None, [f"rollout.resources_per_actor={{CPU: {cpu}}}"]).rollout.threads_per_actor
            for cpu in (0.5, 2, 2.6)}
    assert cpus == {0.5: 1, 2: 2, 2.6: 3}
    dtypes = {d: load_config(None, [f"train.dtype={d}"]).train.weights_dtype for d in ("fp32", "bf16", "amp_bf16")}
    assert dtypes == {"fp32": "float32", "bf16": "bfloat16", "amp_bf16": "float32"}


def test_one_seed_derives_the_others_and_each_can_be_pinned():
    cfg = load_config(None, ["seed=3"])
    assert cfg.rollout.seed == cfg.train.seed == cfg.model.tiny.seed == cfg.task.arith.seed == 3
    pinned = load_config(None, ["seed=3", "task.arith.seed=1", "model.tiny.seed=0"])
    assert (pinned.task.arith.seed, pinned.model.tiny.seed, pinned.rollout.seed, pinned.train.seed) == (1, 0, 3, 3)


def test_renamed_presets_name_the_new_one():
    configs = Path(__file__).parents[1] / "configs"
    for old, new in (("gsm8k_cpu", "words_cpu"), ("gsm8k_compare", "words_compare")):
        with pytest.raises(ConfigError, match=f"gsm8k_.*: renamed to .*configs/{new}.yaml"):
            load_config(configs / f"{old}.yaml")
        assert load_config(configs / f"{new}.yaml").task.name == "arith"  # GSM8K's format, generated problems


def test_config_and_the_loss_table_import_no_torch():
    """`loss.name` is validated against aftray/loss_table.py before anything heavy is imported."""
    import subprocess
    import sys

    code = "import sys, aftray.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
