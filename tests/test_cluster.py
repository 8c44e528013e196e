"""Cluster files and the placement pre-check.

- every launcher YAML in cluster/ passes Ray's own cluster-config validation (the code `ray up` runs first);
- the KubeRay RayJob has the fields KubeRay needs, with GPU limits on the worker groups;
- secure defaults: loopback dashboard/MLflow, token auth everywhere, no inline credentials;
- the pre-check on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, nodes carrying `rollout` and
  `trainer`): a feasible placement passes and lands where it should, impossible ones fail fast and say why.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from aftray.config import ClusterConfig, Config, ConfigError, RolloutConfig, TrainConfig, VllmConfig
from aftray import cluster as P
from aftray.cluster import BundleGroup, Node, PlacementError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
RAYJOB = CLUSTER / "rayjob.yaml"
ROLES = {"rollout", "trainer"}  # the custom resources the cluster files advertise and the configs request


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cfg(rollout: dict | None = None, train: dict | None = None, cluster: dict | None = None) -> Config:
    # Built directly (no load_config) so these tests do not depend on other packages' validation.
    return Config(rollout=RolloutConfig(**(rollout or {})), train=TrainConfig(**(train or {})),
                  cluster=ClusterConfig(**(cluster or {})))


def walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


# -------------------------------------------------------------------------------------------- launcher YAML
def test_cluster_dir_has_the_three_files():
    assert {p.name for p in LAUNCHERS} == {"aws-gpu.yaml", "local.yaml"}
    assert RAYJOB.is_file()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_schema(path):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before touching the cloud: merge the provider defaults, then validate.
    validate_config(prepare_config(load(path)))


def test_ray_validator_is_not_a_rubber_stamp():
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = load(CLUSTER / "aws-gpu.yaml")
    bad["available_node_types"]["rollout_gpu"]["resources"] = {"rollout": 0.5}  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_aws_worker_types_carry_role_resources_and_bounds():
    c = load(CLUSTER / "aws-gpu.yaml")
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0}  # no work on the head
    workers = {n: t for n, t in types.items() if n != c["head_node_type"]}
    assert {k for t in workers.values() for k in t["resources"]} == ROLES
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= c["max_workers"]
    assert any("[vllm]" in cmd for cmd in c["setup_commands"])


def test_local_hosts_declare_roles_through_ray_start():
    c = load(CLUSTER / "local.yaml")
    # the local provider has one node type, so each host passes its own --resources
    for cmd in c["head_start_ray_commands"][-1:] + c["worker_start_ray_commands"][-1:]:
        assert "--resources=" in cmd and "ray_resources.json" in cmd
    assert any("[vllm]" in cmd for cmd in c["setup_commands"])


# ------------------------------------------------------------------------------------------ secure defaults
SECRETISH = re.compile(r"secret|passw|token|access_key|api_key|credential|private_key", re.IGNORECASE)


def _inline_credentials(doc: dict) -> list[str]:
    found = []
    for path, key, value in walk(doc):
        if path[:1] == ("file_mounts",):  # remote path -> local path: paths, not values
            continue
        if SECRETISH.search(str(key)) and isinstance(value, str) and not value.startswith(("~", "/")):
            found.append(f"{'.'.join(map(str, path + (key,)))}={value!r}")
    text = yaml.safe_dump(doc)
    found += re.findall(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", text)
    return found


@pytest.mark.parametrize("path", LAUNCHERS + [RAYJOB], ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    assert _inline_credentials(load(path)) == []


def test_credential_scan_catches_inline_secrets():
    assert _inline_credentials({"env": [{"name": "X", "aws_secret_access_key": "abc"}]})
    assert _inline_credentials({"setup_commands": ["export KEY=AKIAABCDEFGHIJKLMNOP"]})


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_secure_defaults(path):
    c = load(path)
    starts = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    ray_starts = [cmd for cmd in starts if "ray start" in cmd]
    assert len(ray_starts) == 2
    for cmd in ray_starts:  # every Ray process runs with token auth
        assert "RAY_AUTH_MODE=token" in cmd
    head = next(cmd for cmd in c["head_start_ray_commands"] if "ray start" in cmd)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in yaml.safe_dump(c)
    mlflow = [cmd for cmd in c["head_start_ray_commands"] if "mlflow server" in cmd]
    assert mlflow and all("--host 127.0.0.1" in cmd for cmd in mlflow)
    # the token travels as a file, identical on every node
    assert "~/.ray/auth_token" in c["file_mounts"]
    assert any("RAY_AUTH_MODE=token" in cmd for cmd in c["setup_commands"])  # CLIs on the nodes too


def test_aws_opens_only_ssh_and_uses_an_instance_profile():
    c = load(CLUSTER / "aws-gpu.yaml")
    rules = c["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
    head = c["available_node_types"][c["head_node_type"]]["node_config"]
    assert "IamInstanceProfile" in head


# --------------------------------------------------------------------------------------------------- RayJob
def test_rayjob_has_the_fields_kuberay_needs():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # a DNS-1123 label
    spec = job["spec"]
    assert "jobs/aft_gsm8k.py --config configs/gsm8k_gpu.yaml" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the manifest
    assert "working_dir" in runtime_env or "image_uri" in runtime_env
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0

    rc = spec["rayClusterSpec"]
    head = rc["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = rc["workerGroupSpecs"]
    advertised = set()
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())  # map[string]string in the CRD
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        ray_container = g["template"]["spec"]["containers"][0]
        assert ray_container["image"]
        assert int(ray_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        # KubeRay passes the value to `ray start --resources=...`: a quoted JSON string
        advertised |= set(json.loads(json.loads(g["rayStartParams"]["resources"])))
    assert advertised == ROLES


def test_rayjob_secure_defaults():
    job = load(RAYJOB)
    rc = job["spec"]["rayClusterSpec"]
    assert rc["authOptions"]["mode"] == "token"
    assert rc["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer/NodePort
    for path, key, value in walk(job):
        if key == "env":
            for e in value:  # secret-ish env vars come from a Secret, never a literal
                if SECRETISH.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    head_containers = rc["headGroupSpec"]["template"]["spec"]["containers"]
    mlflow = [c for c in head_containers if "mlflow server" in " ".join(c.get("command", []))]
    assert mlflow and "--host 127.0.0.1" in " ".join(mlflow[0]["command"])


# vCPUs and GPUs of the instance types in aws-gpu.yaml (the launcher detects them; the YAML doesn't say)
AWS_TYPES = {"m6i.2xlarge": (8, 0), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4)}


def gpu_preset(name: str = "gsm8k_gpu") -> Config:
    preset = ROOT / "configs" / f"{name}.yaml"
    if not preset.is_file():
        pytest.skip(f"configs/{name}.yaml not written yet")
    data = load(preset)
    rollout = {**data["rollout"], "vllm": VllmConfig(**data["rollout"].get("vllm", {}))}
    return cfg(rollout, data.get("train"), data.get("cluster"))


def aws_nodes_at_start() -> list[Node]:
    c = load(CLUSTER / "aws-gpu.yaml")
    nodes = []
    for name, t in c["available_node_types"].items():
        cpus, gpus = AWS_TYPES[t["node_config"]["InstanceType"]]
        count = 1 if name == c["head_node_type"] else t["min_workers"]
        nodes += [Node(f"{name}-{i}", {"CPU": cpus, "GPU": gpus, **t["resources"]}) for i in range(count)]
    return nodes


def rayjob_nodes() -> list[Node]:
    rc = load(RAYJOB)["spec"]["rayClusterSpec"]
    nodes = [Node("head", {"CPU": float(rc["headGroupSpec"]["rayStartParams"].get("num-cpus", 1))})]
    for g in rc["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        nodes += [Node(f"{g['groupName']}-{i}", {"CPU": float(limits["cpu"]),
                                                  "GPU": float(limits["nvidia.com/gpu"]), **custom})
                  for i in range(g["replicas"])]
    return nodes


@pytest.mark.parametrize("name", ["gsm8k_gpu", "gsm8k_offline"])
@pytest.mark.parametrize("nodes", [aws_nodes_at_start, rayjob_nodes], ids=["aws-gpu", "rayjob"])
def test_cluster_files_hold_the_gpu_preset_from_the_start(nodes, name):
    # The pre-check run against the cluster each file brings up (before any autoscaling).
    preset = gpu_preset(name)
    assert preset.rollout.gpus_per_actor >= 1 and preset.train.gpus_per_worker >= 1  # both on GPUs
    assert P.find_misfit(P.bundle_groups(preset), nodes()) is None


# ----------------------------------------------------------------------------------------- placement (pure)
def test_required_resources_sums_actors_and_workers():
    c = cfg({"num_actors": 2, "resources_per_actor": {"GPU": 1.0, "rollout": 1.0}},
            {"num_workers": 3, "resources_per_worker": {"CPU": 2.0, "GPU": 0.5, "trainer": 1.0}})
    req = P.required_resources(c)
    coord = P.coordinator_resources().get("CPU", 0.0)  # 0 under Ray Train v2
    assert req == {"CPU": 2 * 1.0 + 3 * 2.0 + coord, "GPU": 2 + 1.5, "rollout": 2, "trainer": 3}


def test_coordinator_follows_ray_train_version(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    assert P.coordinator_resources() == {"CPU": 1.0}
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    assert P.coordinator_resources() == {}


def test_a_local_ray_leaves_ray_data_a_cpu(monkeypatch):
    """A locally started Ray: the CPUs the long-lived actors and workers hold, one more for Ray Data's tasks, at
    least the machine's cores."""
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    monkeypatch.setattr(P.os, "cpu_count", lambda: 2)
    words_cpu = cfg({"resources_per_actor": {"CPU": 2.0}}, {"resources_per_worker": {"CPU": 2.0}})
    assert (P.local_cpus(words_cpu), P.local_cpus(cfg())) == (5, 3)
    assert P.local_cpus(cfg({"num_actors": 3, "resources_per_actor": {"CPU": 0.5}})) == 4  # 2.5 held: 3, + 1
    monkeypatch.setattr(P.os, "cpu_count", lambda: 16)
    assert P.local_cpus(words_cpu) == 16


def test_ray_options_come_from_the_config():
    c = cfg({"resources_per_actor": {"CPU": 2.0, "GPU": 1.0, "rollout": 1.0}},
            {"num_workers": 2, "resources_per_worker": {"GPU": 1.0, "trainer": 1.0}},
            {"placement_strategy": "SPREAD"})
    assert P.actor_options(c.rollout) == {"num_cpus": 2.0, "num_gpus": 1.0, "resources": {"rollout": 1.0}}
    kw = P.scaling_config_kwargs(c.train, c.cluster.placement_strategy)
    assert kw == {"num_workers": 2, "use_gpu": True, "placement_strategy": "SPREAD",
                  "resources_per_worker": {"CPU": 1.0, "GPU": 1.0, "trainer": 1.0}}
    assert P.scaling_config_kwargs(cfg().train)["use_gpu"] is False


def test_scaling_kwargs_are_accepted_by_ray_train():
    from ray.train import ScalingConfig

    for gpus in (0.0, 1.0):
        sc = ScalingConfig(**P.scaling_config_kwargs(cfg(train={"resources_per_worker": {"GPU": gpus}}).train))
        assert sc.num_workers == 1


def test_resource_counts_are_numbers_at_least_zero():
    from aftray.config import load_config

    for bad, message in ((["rollout.resources_per_actor={GPU: -1}"], "rollout.resources_per_actor.GPU: expected a "
                                                                     "count >= 0"),
                         (["train.resources_per_worker={CPU: two}"], "train.resources_per_worker.CPU: expected float")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)
    absent = load_config(None, ["rollout.resources_per_actor={GPU: 1}"]).rollout  # CPU 1 where absent
    assert P.actor_options(absent) == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {}}


TWO_NODES = [Node("10.0.0.1 (aaaaaa)", {"CPU": 8, "GPU": 1, "rollout": 1, "memory": 1e10}),
             Node("10.0.0.2 (bbbbbb)", {"CPU": 8, "GPU": 1, "trainer": 1})]


def groups(r=1, r_gpu=1.0, t=1, t_gpu=1.0, r_res=None, t_res=None, strategy="PACK"):
    r_res = {"rollout": 1.0} if r_res is None else r_res
    t_res = {"trainer": 1.0} if t_res is None else t_res
    return [BundleGroup("rollout actors", r, {"CPU": 1.0, "GPU": r_gpu, **r_res}),
            BundleGroup("train workers", t, {"CPU": 1.0, "GPU": t_gpu, **t_res}, strategy)]


def test_misfit_feasible():
    assert P.find_misfit(groups(), TWO_NODES) is None


def test_misfit_names_the_missing_custom_resource():
    msg = P.find_misfit(groups(t_res={"h100": 1.0}), TWO_NODES)
    assert "train workers need 1 x {CPU: 1, GPU: 1, h100: 1}" in msg and "the cluster has h100: 0" in msg
    assert "10.0.0.1 (aaaaaa) {CPU: 8, GPU: 1, rollout: 1}" in msg  # nodes listed, bookkeeping hidden


def test_misfit_bundle_bigger_than_any_node():
    msg = P.find_misfit(groups(t_gpu=2.0), TWO_NODES)
    assert "no single node can hold one {CPU: 1, GPU: 2, trainer: 1}" in msg


def test_misfit_totals():
    msg = P.find_misfit(groups(r=2), TWO_NODES)
    assert "rollout actors need 2 x {CPU: 1, GPU: 1, rollout: 1}" in msg
    assert "{GPU: 3, rollout: 2} in all; the cluster has {GPU: 2, rollout: 1}" in msg


def test_misfit_packing_and_strict_strategies():
    plain = [Node(n, {"CPU": 8, "GPU": 1}) for n in "abc"]

    def g(**kw):  # plain CPU/GPU bundles, no custom resources
        return groups(r_res={}, t_res={}, **kw)

    # 3 x 0.6 GPU fit in 3 GPUs in total, but not two on one 1-GPU node
    assert "do not fit onto the nodes together" in P.find_misfit(g(r_gpu=0.6, t=2, t_gpu=0.6), plain[:2])
    assert P.find_misfit(g(r_gpu=0.5, t=2, t_gpu=0.5), plain[:2]) is None  # fractional sharing packs
    assert "STRICT_PACK" in P.find_misfit(g(t=2, strategy="STRICT_PACK"), plain)
    assert P.find_misfit(g(t=2, strategy="STRICT_SPREAD"), plain) is None
    two_gpu = [Node("a", {"CPU": 8, "GPU": 2}), Node("b", {"CPU": 8, "GPU": 1})]
    assert P.find_misfit(g(r=1, t=2, strategy="STRICT_PACK"), two_gpu) is None
    assert P.find_misfit(g(r=0, t=2, strategy="STRICT_SPREAD", t_gpu=1.5), two_gpu) is not None


def one_each() -> Config:
    return cfg({"resources_per_actor": {"GPU": 1.0, "rollout": 1.0}},
               {"resources_per_worker": {"GPU": 1.0, "trainer": 1.0}})


def test_waits_for_an_autoscaler_then_passes(monkeypatch):
    from ray.autoscaler import sdk

    requests = []
    monkeypatch.setattr(sdk, "request_resources", lambda **kw: requests.append(kw))
    monkeypatch.setattr(P, "_autoscaler_can_add_nodes", lambda: True)
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    arrivals = iter([TWO_NODES[:1], TWO_NODES[:1]])  # the trainer node boots on the third look
    monkeypatch.setattr(P, "cluster_nodes", lambda: next(arrivals, TWO_NODES))
    c = one_each()
    assert P.check_cluster_fits(c, timeout_s=30)["trainer"] == 1.0
    assert len(requests[0]["bundles"]) == 3 and requests[-1] == {"bundles": []}  # asked (+ a CPU for Ray Data), then released


def test_gives_up_on_the_autoscaler_after_the_timeout(monkeypatch):
    from ray.autoscaler import sdk

    monkeypatch.setattr(sdk, "request_resources", lambda **kw: None)
    monkeypatch.setattr(P, "_autoscaler_can_add_nodes", lambda: True)
    monkeypatch.setattr(P, "cluster_nodes", lambda: TWO_NODES[:1])
    c = one_each()
    c.cluster.precheck_timeout_s = 0.2  # the default wait, from the config
    with pytest.raises(PlacementError, match=r"trainer: 0 .*waited 0 s for the autoscaler"):
        P.check_cluster_fits(c)


# ------------------------------------------------------------------------------------------ placement (Ray)
@pytest.fixture(scope="module")
def two_node_ray():
    """A real Ray cluster of two nodes: one carries `rollout`, the other `trainer` (1 fake GPU each)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 1, "resources": {"rollout": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"trainer": 1})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield ray
    ray.shutdown()
    cluster.shutdown()


def feasible():
    return cfg({"num_actors": 1, "resources_per_actor": {"CPU": 0.5, "GPU": 1.0, "rollout": 1.0}},
               {"num_workers": 1, "resources_per_worker": {"CPU": 0.5, "GPU": 1.0, "trainer": 1.0}})


def test_feasible_placement_passes_and_lands_on_the_right_nodes(two_node_ray):
    ray = two_node_ray
    c = feasible()
    assert P.check_cluster_fits(c) == {"CPU": 1.0, "GPU": 2.0, "rollout": 1.0, "trainer": 1.0}

    @ray.remote
    def where():
        return ray.get_runtime_context().get_node_id()

    rollout_node = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("rollout"))
    trainer_node = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("trainer"))
    r = where.options(**P.actor_options(c.rollout)).remote()
    kw = P.scaling_config_kwargs(c.train)
    t = where.options(num_cpus=kw["resources_per_worker"]["CPU"], num_gpus=kw["resources_per_worker"]["GPU"],
                      resources={"trainer": 1.0}).remote()
    assert ray.get([r, t], timeout=60) == [rollout_node, trainer_node]


@pytest.mark.parametrize("change, expect", [
    ({"rollout.num_actors": 2}, ["rollout actors need 2 x {CPU: 0.5, GPU: 1, rollout: 1}",
                                 "the cluster has {GPU: 2, rollout: 1}"]),
    ({"train.resources_per_worker": {"CPU": 0.5, "GPU": 2.0, "trainer": 1.0}}, ["no single node can hold one {CPU: 0.5, GPU: 2, trainer: 1}"]),
    ({"rollout.resources_per_actor": {"CPU": 0.5, "GPU": 1.0, "rollout_a100": 1.0}}, ["the cluster has rollout_a100: 0"]),
])
def test_impossible_placement_fails_fast_and_says_what_is_missing(two_node_ray, change, expect):
    c = feasible()
    for key, value in change.items():
        section, field = key.split(".")
        setattr(getattr(c, section), field, value)
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        P.check_cluster_fits(c, timeout_s=20)  # no autoscaler here: must not wait the 20 s
    took = time.monotonic() - start
    assert took < 5, f"pre-check took {took:.1f} s"  # the requirement is < 30 s
    for text in expect:
        assert text in str(err.value)
    assert "nodes:" in str(err.value)


def test_plain_cluster_is_not_mistaken_for_an_autoscaling_one(two_node_ray):
    assert P._autoscaler_can_add_nodes() is False


# ----------------------------------------------------------------------------------------- GPU path (pure)
def test_nccl_env_passes_the_operators_collective_settings_and_nothing_else():
    driver = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0", "NCCL_DEBUG": "INFO", "NCCL_P2P_DISABLE": "1",
              "NCCL_IB_DISABLE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "UCX_TLS": "rc,cuda_copy",
              "CUDA_DEVICE_MAX_CONNECTIONS": "1", "CUDA_VISIBLE_DEVICES": "0", "PATH": "/usr/bin", "HOME": "/root",
              "RAY_ADDRESS": "auto", "MY_NCCL_NOTE": "x", "nccl_debug": "INFO"}
    want = {k: v for k, v in driver.items() if k.startswith(("NCCL_", "TORCH_NCCL_", "UCX_"))
            or k == "CUDA_DEVICE_MAX_CONNECTIONS"}
    assert P.nccl_env(driver) == want and len(want) == 8
    # a submitted job's own runtime-env variables are passed by Ray already; naming them again is a conflict
    assert P.nccl_env(driver, {"NCCL_DEBUG": "WARN"}) == {k: v for k, v in want.items() if k != "NCCL_DEBUG"}
    assert P.nccl_env({"PATH": "/bin"}) == {}


def test_start_ray_hands_the_nccl_env_to_ray_init(monkeypatch):
    import ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens5")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"NCCL_DEBUG": "INFO"}}}))
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # the job's runtime env put it here: not passed twice
    P.start_ray(cfg())
    assert seen["address"] == "10.0.0.1:6379" and seen["runtime_env"]["env_vars"]["NCCL_SOCKET_IFNAME"] == "ens5"
    assert "NCCL_DEBUG" not in seen["runtime_env"]["env_vars"]


def test_tensor_parallel_actor_asks_for_its_engines_gpus():
    c = cfg({"engine": "vllm", "resources_per_actor": {"GPU": 2.0, "rollout": 2.0},
             "vllm": VllmConfig(tensor_parallel_size=2)})
    assert P.actor_options(c.rollout)["num_gpus"] == 2.0
    assert P.bundle_groups(c)[0].bundle["GPU"] == 2.0
    assert P.actor_options(cfg({"resources_per_actor": {"GPU": 0.5}}).rollout)["num_gpus"] == 0.5  # TP 1: as configured


def test_tensor_parallel_needs_vllm_and_the_gpus():
    from aftray.config import load_config

    for bad in (["rollout.vllm.tensor_parallel_size=2", "rollout.resources_per_actor={GPU: 2}"],  # hf engine
                ["rollout.vllm.tensor_parallel_size=2", "rollout.engine=vllm", "rollout.resources_per_actor={GPU: 1}"],
                ["rollout.vllm.tensor_parallel_size=0"]):
        with pytest.raises(ConfigError, match="^rollout.vllm.tensor_parallel_size: expected"):
            load_config(None, bad)


def test_a_cluster_the_actors_fill_is_refused_not_left_to_hang():
    """Ray Data's read and verify tasks need a CPU beside the actors and workers, which hold theirs all run."""
    from aftray.config import load_config

    words = load_config(Path(__file__).parents[1] / "configs" / "words_cpu.yaml")  # 2 + 2 CPUs held
    assert P.no_spare_cpu(words, [Node("n", {"CPU": 5})]) is None
    msg = P.no_spare_cpu(words, [Node("a", {"CPU": 2}), Node("b", {"CPU": 2})])
    assert msg.startswith("the rollout actors and train workers hold 4 of the cluster's 4 CPUs"), msg
    assert P.local_cpus(words) >= 5
