"""End-to-end on the arith preset (tiny model from scratch): the loop online and offline, with transformers or
vLLM samplers; a job submitted with `ray job submit`, killed with its node and resumed; a two-node cluster with
rollout and training on different nodes. Two reference runs (one per sampler engine) are made once and shared:
the killed-and-resumed job and the two-node run must each end exactly where one of them ends."""
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from aftray.config import load_config
from aftray.run.rundir import ROUND_KEYS, read_summary

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "arith_cpu.yaml"
# A small but complete arith run: VFT warm-up, then rounds of rollout -> verify -> train -> refresh -> eval.
SMALL = ["task.num_train=400", "task.num_test=30", "loop.questions_per_round=16",
         "train.vft.steps=30", "train.steps_per_stage=4", "rollout.k=4", "tracking.experiment=test"]

# the run the resume and two-node tests reproduce: 2 rounds, evaluated after round 0 and the last only
REFERENCE = ["loop.rounds=2", "loop.eval_every=2"]

pytestmark = pytest.mark.slow
needs_vllm = pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="vLLM is not installed")


def _cfg(tmp_path, *extra):
    return load_config(PRESET, [f"output_dir={tmp_path}", *SMALL, *extra])


@pytest.fixture(scope="module")
def trainer(ray_local, tmp_path_factory):
    """One Ray Train worker group for the module's in-process runs, as a comparison shares one across its arms:
    each run would otherwise start its own (worker processes, imports, process group: ~20-40 s on 2 cores)."""
    from aftray.train.service import TrainService

    service = TrainService(load_config(PRESET).train, tmp_path_factory.mktemp("train_state"))
    yield service
    if ray_local.is_initialized():  # the two-node test closes the service and ends the module's Ray
        service.close()


@pytest.fixture(scope="module")
def vllm_reference_run(tmp_path_factory, trainer):
    """The reference run with vLLM samplers: the submitted job that is killed and resumed must end exactly
    where it ends."""
    from aftray.loop.rounds import run_loop

    cfg = _cfg(tmp_path_factory.mktemp("vllm_reference"), *REFERENCE, "rollout.engine=vllm", "run_name=vllm")
    return cfg, run_loop(cfg, trainer=trainer)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, trainer):
    """The 2-round online run with transformers samplers, uninterrupted, on one node: its own test checks it,
    and the two-node run must end exactly where it ends."""
    from aftray.loop.rounds import run_loop

    cfg = _cfg(tmp_path_factory.mktemp("reference"), *REFERENCE, "run_name=online")
    return cfg, run_loop(cfg, trainer=trainer)


def _check_summary(run_dir: Path, rounds: int, mode: str) -> dict:
    summary = read_summary(run_dir / "summary.json")
    assert summary["mode"] == mode and summary["task"] == "arith"
    assert [r["round"] for r in summary["rounds"]] == list(range(rounds + 1))
    for rec in summary["rounds"]:
        assert set(ROUND_KEYS) <= set(rec)
        if rec["accuracy"] is None:  # a round loop.eval_every skips (never round 0 or the last)
            assert 0 < rec["round"] < rounds and rec["time_eval_s"] == 0.0
            continue
        assert 0.0 <= rec["accuracy"] <= 1.0
        # an accuracy carries its denominator and its binomial SE
        p, n = rec["accuracy"], rec["num_eval_questions"]
        assert n == 30 and rec["accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))
        # the greedy COTs behind it are kept, one per question, and give that accuracy
        greedy = pd.read_parquet(run_dir / "rounds" / str(rec["round"]) / "eval_greedy.parquet")
        correct = greedy["correct"].map(lambda c: len(c) > 0 and bool(c[0]))
        assert len(greedy) == n and correct.mean() == pytest.approx(p)
    for r in range(1, rounds + 1):
        rec = summary["rounds"][r]
        assert rec["num_samples"] > 0 and rec["time_train_s"] > 0 and rec["train_loss"] == rec["train_loss"]
        assert (run_dir / "rounds" / str(r) / "checkpoint" / "model.safetensors").is_file()
        assert (run_dir / "rounds" / str(r) / "samples.parquet").exists()
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"accuracy.png", "scores.png", "phase_times.png"}
    return summary


def test_online_aft_bc_two_rounds(reference_run):
    import mlflow

    cfg, summary = reference_run
    assert cfg.loss.name == "aft_bc"
    _check_summary(cfg.run_dir, 2, "online")
    # the VFT stage learns (30 steps from random weights): the reference COTs' NLL per token falls from ~log(vocab)
    # (measured 4.57 -> 1.86); `pytest --loss-off` (no gradient) leaves it where it starts and fails here
    vft = [step["vft"] for step in json.loads((cfg.run_dir / "rounds" / "0" / "train_result.json").read_text())
           ["history"]]
    assert vft[-1] < 0.6 * vft[0], vft
    assert summary["rounds"][2]["weights_version"] == 2
    # the trainer scores the sampled COTs as the HF sampler did (same weights, fp32): drift ~0 per token
    for r in (1, 2):
        assert summary["rounds"][r]["train_logp_drift_tokens"] > 0
        assert summary["rounds"][r]["train_logp_drift_max"] < 1e-3
    # the samplers took each round's weights: round 1 was sampled by version 0, round 2 by version 1
    from aftray.run.rundir import read_parquet_rows
    for r in (1, 2):  # round 1 sampled by the VFT weights (version 0), not the base model (-1)
        samples = read_parquet_rows(cfg.run_dir / "rounds" / str(r) / "samples.parquet")
        assert {row["weights_version"] for row in samples} == {r - 1}
    # one train worker group for the whole run: the VFT stage and both rounds' stages ran in the same process,
    # which kept the policy (round 1: the VFT weights with a new optimizer; round 2: model and optimizer), and
    # the run left no trainer state in its folder (the service it trained on holds it)
    stages = {r: json.loads((cfg.run_dir / "rounds" / str(r) / "train_result.json").read_text())["metrics"]
              for r in (0, 1, 2)}
    assert stages[0]["worker_pids"] == stages[1]["worker_pids"] == stages[2]["worker_pids"]
    assert [stages[r]["policy"] for r in (0, 1, 2)] == ["loaded", "new_optimizer", "kept"]
    assert "train_setup_start_s" in summary["rounds"][2] and not (cfg.run_dir / "train_state").exists()
    # loop.eval_every=2: round 1 trains but is not evaluated; round 0 and the last are
    assert summary["rounds"][1]["accuracy"] is None and summary["rounds"][1]["train_loss"] > 0
    assert summary["rounds"][0]["accuracy"] is not None and summary["rounds"][2]["accuracy"] is not None
    # MLflow: one run, every round metric at step = round, the artifacts
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cfg.run_dir.parent / 'mlflow.db'}")
    run_id = (cfg.run_dir / "mlflow_run_id").read_text()
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [0, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "plots"} <= artifacts


def test_offline_single_round(tmp_path, trainer):
    from aftray.loop.rounds import run_loop

    cfg = _cfg(tmp_path, "loop.mode=offline", "loop.rounds=1", "task.num_train=48", "run_name=offline")
    run_loop(cfg, trainer=trainer)
    summary = _check_summary(cfg.run_dir, 1, "offline")
    assert (cfg.run_dir / "rounds" / "0" / "checkpoint" / "model.safetensors").is_file()  # the VFT stage
    assert summary["rounds"][1]["num_questions"] == 48  # offline: every training question is sampled


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


@needs_vllm
def test_vllm_samplers_match_the_trainer(vllm_reference_run):
    """The reference run sampled by vLLM (its CPU build) instead of transformers: the trainer scores the sampled
    COTs as vLLM did, and `aftray eval` runs on vLLM too."""
    from aftray.commands import evaluate_checkpoint
    from aftray.run.rundir import read_parquet_rows

    cfg, summary = vllm_reference_run
    _check_summary(cfg.run_dir, 2, "online")
    for r in (1, 2):
        # vLLM (fp32) and the DeepSpeed trainer (fp32): different kernels, the same numbers up to rounding
        # (measured 2.5e-7 mean, 1.9e-6 max per token)
        assert summary["rounds"][r]["train_logp_drift_tokens"] > 0
        assert summary["rounds"][r]["train_logp_drift_mean"] < 1e-3
        samples = read_parquet_rows(cfg.run_dir / "rounds" / str(r) / "samples.parquet")
        assert {row["weights_version"] for row in samples} == {r - 1}
        assert all(len(t) == len(c) for row in samples for t, c in zip(row["sample_token_logp"], row["cot_ids"]))
    result = evaluate_checkpoint(cfg, summary["final"]["checkpoint"])
    assert result["num_questions"] == 30 and 0 <= result["accuracy"] <= 1 and "pass_at_k" in result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = Path(sys.executable).parent / "ray"


@contextlib.contextmanager
def _head_node(tmp_path: Path):
    """A Ray head node of its own (`ray start --head`), with token authentication on as in cluster/*.yaml
    (docs/cluster.md), on ports the suite's local Ray does not hold; yields its job server's address, the
    environment its clients need, and its process (the session leader of every process of the node)."""
    import secrets

    tmp_path.mkdir(parents=True, exist_ok=True)
    port, dash, agent, agent_grpc, metrics, env_agent = (_free_port() for _ in range(6))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 240
        while subprocess.run([str(RAY), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline, "the head node's job server did not come up"
            time.sleep(2)
        yield address, env, head
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)


def _submit(address: str, env: dict, job: list[str], *flags: str) -> str:
    """`ray job submit` of `job` with the repository as its working dir; returns its output (client and job)."""
    cmd = [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO), *flags, "--", *job]
    for _ in range(20):  # the job server answers before the node's job agent is up: Ray says to retry
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        logs = out.stdout + out.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(3)
    assert out.returncode == 0, logs[-3000:]
    return logs


def _kill_driver(run_name: str) -> None:
    """SIGKILL the driver of the job whose command names `run_name`, with its process group (the job supervisor
    starts it as a session of its own)."""
    import psutil

    groups = {os.getpgid(p.pid) for p in psutil.process_iter(["cmdline"])
              if f"run_name={run_name}" in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()}
    assert groups, "the job's driver is not running"
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


@needs_vllm
def test_submitted_job_killed_with_its_node_resumes(tmp_path, vllm_reference_run):
    """`ray job submit` to a local head node; the job samples with vLLM. After round 1 its driver and the head
    node, with every sampler and train worker on it, are SIGKILLed. The same job, submitted to a new head node,
    resumes after round 1, restores the trainer's model and optimizer from round 1's end state, and ends exactly
    where the uninterrupted run ends: the same samples, losses, accuracies and final weights."""
    job = [sys.executable, "jobs/aft_gsm8k.py", "--config", "configs/arith_cpu.yaml", f"output_dir={tmp_path}",
           *SMALL, *REFERENCE, "rollout.engine=vllm", "run_name=submitted"]
    run_dir = tmp_path / "submitted"
    with _head_node(tmp_path / "first_head") as (address, env, head):
        _submit(address, env, job, "--no-wait")
        deadline = time.time() + 900
        while not (run_dir / "rounds" / "1" / "metrics.json").is_file():
            assert head.poll() is None, "the head node died before round 1 finished"
            assert time.time() < deadline, "round 1 did not finish in time"
            time.sleep(0.5)
        _kill_driver("submitted")
        os.killpg(head.pid, signal.SIGKILL)  # GCS, raylet, the samplers' and train workers' processes
        head.wait()
    assert not (run_dir / "summary.json").exists()
    round1 = (run_dir / "rounds" / "1" / "metrics.json").stat().st_mtime_ns
    with _head_node(tmp_path / "second_head") as (address, env, _):
        logs = _submit(address, env, job)
    assert "succeeded" in logs and "resuming" in logs and "after round 1" in logs and "round 2/2 done" in logs
    assert "Running Dataset" not in logs and "\r" not in logs  # no Ray Data progress blocks, no redraws
    assert (run_dir / "rounds" / "1" / "metrics.json").stat().st_mtime_ns == round1  # not redone
    resumed = _check_summary(run_dir, 2, "online")
    stage2 = json.loads((run_dir / "rounds" / "2" / "train_result.json").read_text())["metrics"]
    assert stage2["policy"] == "restored"  # from round 1's end state, in the run's train_state/

    whole, uninterrupted = vllm_reference_run
    for key in ("accuracy", "train_loss", "num_positive", "assessment_accuracy"):
        assert [r[key] for r in resumed["rounds"]] == [r[key] for r in uninterrupted["rounds"]], key
    assert _samples(run_dir, 2) == _samples(whole.run_dir, 2)
    a, b = _weights(run_dir / "rounds" / "2" / "checkpoint"), _weights(whole.run_dir / "rounds" / "2" / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _samples(run_dir: Path, r: int) -> dict:
    from aftray.run.rundir import read_parquet_rows

    return {row["id"]: row["cot_ids"] for row in read_parquet_rows(run_dir / "rounds" / str(r) / "samples.parquet")}


def test_two_nodes_need_no_shared_checkpoint_folder(tmp_path, monkeypatch, reference_run, trainer):
    """Rollout actors on the node with the `rollout` resource, train workers on the `trainer` node; round 1
    writes no checkpoint folder, and every folder a round does write is moved away before the samplers take the
    new weights: the weights reach them through the object store and the trainer keeps its policy, so the run
    reads none of those folders and matches the same run on one node exactly (samples, accuracies).
    Last in the module: it ends the module's Ray to start a cluster of its own."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from aftray.loop.rounds import run_loop
    from aftray.rollout.pool import RolloutPool

    one_node, one = reference_run
    # the module's workers stop first: a Ray Train run whose Ray is shut down under it leaves its driver thread
    # spinning in ray.get, a whole core, for the rest of the test session
    trainer.close()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    rollout_node = cluster.add_node(num_cpus=2, resources={"rollout": 1})
    trainer_node = cluster.add_node(num_cpus=2, resources={"trainer": 1})
    moved = []
    refresh = RolloutPool.refresh

    def refresh_after_moving_the_folders(self, weights, version):
        for folder in (tmp_path / "two_node" / "rounds").glob("*/checkpoint"):
            folder.rename(tmp_path / f"moved_{folder.parent.name}")
            moved.append(folder)
        return refresh(self, weights, version)

    try:
        ray.init(address=cluster.address)
        monkeypatch.setattr(RolloutPool, "refresh", refresh_after_moving_the_folders)
        # round 1 writes no folder at all (loop.checkpoint_every=2); round 0's VFT stage and the last round do
        cfg = _cfg(tmp_path, *REFERENCE, "loop.checkpoint_every=2", "rollout.weight_sync=object_store",
                   f"cluster.address={cluster.address}", "run_name=two_node", "rollout.resources_per_actor={rollout: 1}",
                   "train.resources_per_worker={trainer: 1}")
        two = run_loop(cfg)
        assert [r["round"] for r in two["rounds"]] == [0, 1, 2] and two["rounds"][2]["weights_version"] == 2
        assert sorted(f.parent.name for f in moved) == ["0", "2"]  # none was read after it was written
        assert [r["accuracy"] for r in two["rounds"]] == [r["accuracy"] for r in one["rounds"]]
        for r in (1, 2):
            assert _samples(cfg.run_dir, r) == _samples(one_node.run_dir, r)
        actors = list_actors(detail=True, limit=1000)
        engines = {a.node_id for a in actors if a.class_name == "EngineActor" and a.state == "ALIVE"}
        assert {a.node_id for a in actors if a.class_name == "EngineActor"} == {rollout_node.node_id}
        assert {a.node_id for a in actors if a.class_name == "RayTrainWorker"} == {trainer_node.node_id}
        assert not engines  # every pool shut down
    finally:
        ray.shutdown()
        cluster.shutdown()
