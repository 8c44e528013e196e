"""Config: presets + overrides build typed sections; bad keys, types and values fail early, naming the key."""
import importlib.util
import time

import pytest

from aftray.config import Config, ConfigError, flatten, load_config, parse_overrides, save_config, to_dict


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "rollout.k=8", "loop.rounds=3", "train.resources={trainer: 1}",
                             "task.num_train=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.rollout.k == 8 and cfg.loop.rounds == 3
    assert cfg.train.resources == {"trainer": 1.0}
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
    ("train.vft_min_lr_ratio=2", "train.vft_min_lr_ratio: expected a value in"),
    ("trainlr", "expected key=value"),
    ("train.steps_per_round=4", "train.steps_per_round was renamed to train.steps_per_stage"),
    ("loss.beta=0.1", "loss.beta was renamed to loss.bc_margin"),
    ("loop.eval_k=4", "loop.eval_k was removed"),
    ("rollout.cpu_cores=0-", "rollout.cpu_cores: expected 'auto', null or a core list"),
    ("rollout.block_size=24", "rollout.block_size: expected null or a multiple of 16"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync: expected auto, object_store or folder: nccl needs"),
    ("rollout.weight_sync=disk", "rollout.weight_sync: expected one of 'auto', 'object_store', 'nccl', 'folder'"),
    ("loop.checkpoint_every=0", "loop.checkpoint_every: expected an integer >= 1"),
])
def test_bad_values_name_the_key(override, message):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
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
    from pathlib import Path

    presets = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    for preset in presets:
        load_config(preset)


def test_round_trip_and_flatten(tmp_path):
    cfg = load_config(None, ["train.lr=2e-5", "rollout.resources={rollout: 1}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(to_dict(cfg))
    assert flat["train.lr"] == 2e-5 and flat["rollout.resources.rollout"] == 1.0


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_pinned_samplers_are_refused_beside_overlapping_trainers():
    """With loop.overlap a CPU node samples while it trains: auto would pin the samplers onto the trainers' cores."""
    vllm_cpu = ["task.name=gsm8k", "rollout.engine=vllm", "loop.overlap=true"]
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (engine=vllm fails validation first)")
    with pytest.raises(ConfigError, match="rollout.cpu_cores: expected null or cores the train workers do not use"):
        load_config(None, vllm_cpu)
    assert load_config(None, vllm_cpu + ["rollout.cpu_cores=null"]).rollout.cpu_cores is None
    assert load_config(None, vllm_cpu + ["rollout.gpus_per_actor=1"]).rollout.cpu_cores == "auto"  # GPU samplers


def test_weight_sync_auto_picks_what_the_placement_allows():
    """auto: NCCL where vLLM samplers and trainers both hold GPUs, else the object store; folder reads every
    round's checkpoint, so it needs one each round."""
    assert load_config(None, []).rollout.weight_sync == "object_store"
    gpus = ["rollout.engine=vllm", "rollout.gpus_per_actor=1", "train.gpus_per_worker=1"]
    if importlib.util.find_spec("vllm") is not None:
        assert load_config(None, gpus).rollout.weight_sync == "nccl"
        assert load_config(None, gpus + ["rollout.weight_sync=object_store"]).rollout.weight_sync == "object_store"
    with pytest.raises(ConfigError, match="rollout.weight_sync: expected object_store or auto when "
                                          "loop.checkpoint_every > 1"):
        load_config(None, ["rollout.weight_sync=folder", "loop.checkpoint_every=2"])


def test_config_and_the_loss_table_import_no_torch():
    """`loss.name` is validated against aftray/loss_table.py before anything heavy is imported."""
    import subprocess
    import sys

    code = "import sys, aftray.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
