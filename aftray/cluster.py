"""The Ray cluster: starting or joining it (`start_ray`), what the config asks of it, and a fast check that it
can hold that.

Rollout actors live for the whole run (weights are refreshed in place), and so do the Ray Train workers
(`aftray.train.service`), so both groups must fit *at the same time*. Sharing a GPU between the phases is
expressed with fractional requests (e.g. `rollout.resources_per_actor={GPU: 0.5}`,
`train.resources_per_worker={GPU: 0.5}`).

Without this check an impossible request does not fail: Ray keeps the actor or placement group pending and the
job hangs. `check_cluster_fits` compares the request with the alive nodes' totals (not what is free right now:
a busy cluster is worth waiting for, an impossible one is not) and raises `PlacementError` naming what is
missing. It only waits when an autoscaler that can launch nodes is running, and then at most `timeout_s`.

The rollout and train code take their Ray options from here (`actor_options`, `scaling_config_kwargs`), so the
check and the actual requests cannot drift apart.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aftray.config import Config, RolloutConfig, TrainConfig
from aftray.logs import ray_runtime_env

logger = logging.getLogger(__name__)

_EPS = 1e-9
_PACK_SEARCH_LIMIT = 200_000  # backtracking steps; past this the check gives the benefit of the doubt
# Bookkeeping resources Ray adds to every node; never part of a request, noise in messages.
_HIDDEN = ("memory", "object_store_memory")
_LIST_NODES = 12  # nodes named in an error message


class PlacementError(RuntimeError):
    """The cluster cannot hold the rollout actors and train workers the config asks for."""


@dataclass(frozen=True)
class BundleGroup:
    """`count` identical resource bundles, e.g. the rollout actors; `strategy` applies within the group."""
    name: str
    count: int
    bundle: dict[str, float]
    strategy: str = "PACK"


# What a cluster operator sets on the driver for the GPU collectives (interfaces, InfiniBand HCAs, debug level,
# P2P/IB switches). Ray's workers inherit the environment of `ray start` on their node, not the driver's, so
# these reach the train workers and vLLM engines only through the job's runtime environment.
NCCL_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "UCX_")
NCCL_ENV_NAMES = ("CUDA_DEVICE_MAX_CONNECTIONS",)


def nccl_env(environ: Mapping[str, str], already: Mapping[str, str] | None = None) -> dict[str, str]:
    """The NCCL_* (and TORCH_NCCL_*, UCX_*, CUDA_DEVICE_MAX_CONNECTIONS) variables of `environ`, less those in
    `already`: a submitted job's own runtime-env variables, which Ray passes anyway and refuses to see twice."""
    return {k: v for k, v in environ.items() if (k.startswith(NCCL_ENV_PREFIXES) or k in NCCL_ENV_NAMES)
            and k not in (already or {})}


def _job_env_vars() -> dict[str, str]:
    """env_vars of the runtime env `ray job submit` gave this driver (Ray merges ray.init's into it)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return dict(((json.loads(raw) or {}).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}
    except (ValueError, AttributeError):
        return {}


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now ("": every interface, for a rendezvous other nodes reach)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ray(cfg: Config):
    """Join the cluster named by cluster.address / RAY_ADDRESS (set by `ray job submit`), else start a local one.
    The driver's NCCL variables travel to every worker in the job's runtime env (`nccl_env`), and so does its log
    file, with the hook that routes each worker's lines (`aftray.logs.ray_runtime_env`)."""
    import ray

    if ray.is_initialized():
        return ray
    env = nccl_env(os.environ, _job_env_vars())
    runtime_env = ray_runtime_env()
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    runtime_env = runtime_env if runtime_env["env_vars"] else None
    if env:
        logger.info("passing %s to the workers", ", ".join(sorted(env)))
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(address="local", num_cpus=local_cpus(cfg), include_dashboard=False,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env)
    return ray


# ---------------------------------------------------------------------------------------------- Ray options
def _custom(resources: dict[str, float]) -> dict[str, float]:
    """The custom resources of a resources_per_* mapping (Ray takes CPUs and GPUs as their own arguments)."""
    return {k: v for k, v in resources.items() if v and k not in ("CPU", "GPU")}


def actor_gpus(cfg: RolloutConfig) -> float:
    """GPUs one rollout actor holds: its engine's, all of them (a tensor-parallel vLLM engine runs its
    rollout.vllm.tensor_parallel_size workers inside the actor's GPUs; the config refuses fewer GPUs in
    rollout.resources_per_actor)."""
    tp = cfg.vllm.tensor_parallel_size
    return max(cfg.gpus_per_actor, float(tp)) if tp > 1 \
        else cfg.gpus_per_actor


def actor_options(cfg: RolloutConfig) -> dict:
    """Resource kwargs for one rollout actor: `map_batches(..., **actor_options(cfg))`, `.options(**...)`."""
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": actor_gpus(cfg),
            "resources": _custom(cfg.resources_per_actor)}


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """`ScalingConfig(resources_per_worker=...)` for one train worker."""
    out = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker, **_custom(cfg.resources_per_worker)}
    return {k: v for k, v in out.items() if v}


def scaling_config_kwargs(cfg: TrainConfig, strategy: str = "PACK") -> dict:
    """Everything `ray.train.ScalingConfig` needs; `use_gpu` must agree with the GPU count or Ray refuses."""
    return {"num_workers": cfg.num_workers, "use_gpu": cfg.gpus_per_worker > 0,
            "resources_per_worker": worker_resources(cfg), "placement_strategy": strategy}


def coordinator_resources() -> dict[str, float]:
    """The trainer's coordinator: Ray Train v2 (the default) pins its controller to the driver's node with
    num_cpus=0; the legacy v1 trainer actor takes one CPU."""
    # Same rule as ray.train.v2._internal.constants.is_v2_enabled, without importing Ray Train (seconds).
    v2 = os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() in ("1", "true")
    return {} if v2 else {"CPU": 1.0}


def bundle_groups(cfg: Config) -> list[BundleGroup]:
    r, t = cfg.rollout, cfg.train
    rollout = {"CPU": r.cpus_per_actor, "GPU": actor_gpus(r), **_custom(r.resources_per_actor)}
    strategy = cfg.cluster.placement_strategy  # Ray Train's placement group; Ray Data places actors singly
    groups = [BundleGroup("rollout actors", r.num_actors, {k: v for k, v in rollout.items() if v}),
              BundleGroup("train workers", t.num_workers, worker_resources(t), strategy)]
    coord = coordinator_resources()
    if coord:
        groups.append(BundleGroup("train coordinator", 1, coord))
    return [g for g in groups if g.bundle]  # a zero-resource actor fits anywhere


def required_resources(cfg: Config) -> dict[str, float]:
    """Total resources the run holds at once: rollout actors + train workers (+ the v1 coordinator)."""
    total: dict[str, float] = {}
    for g in bundle_groups(cfg):
        for k, v in g.bundle.items():
            total[k] = total.get(k, 0.0) + v * g.count
    return total


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of a locally started Ray: those the rollout actors and train workers hold for the whole run,
    plus one for Ray Data's read and verify tasks, and never fewer than the machine's cores. More logical CPUs
    than cores where the actors ask for them all: the long-lived actors must not starve Ray Data's tasks."""
    held = required_resources(cfg).get("CPU", 0.0)
    return max(math.ceil(held - _EPS) + 1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class Node:
    name: str  # "ip (id prefix)" for messages
    resources: dict[str, float]  # totals


def cluster_nodes() -> list[Node]:
    """Alive nodes of the connected Ray cluster with their total resources."""
    import ray

    nodes = []
    for n in ray.nodes():
        if n.get("Alive", n.get("alive")):
            name = f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:6]})"
            res = {k: float(v) for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
            nodes.append(Node(name, res))
    return nodes


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _fmt(res: dict[str, float], needed: frozenset[str] = frozenset()) -> str:
    """{CPU: 8, GPU: 1, rollout: 1}; Ray's bookkeeping resources only when the config asks for them."""
    order = sorted(res, key=lambda k: (k != "CPU", k != "GPU", k))
    keep = [k for k in order if k in needed or not (k in _HIDDEN or k.startswith("accelerator_type:"))]
    return "{" + ", ".join(f"{k}: {_num(res[k])}" for k in keep) + "}"


def _fits(bundle: dict[str, float], cap: dict[str, float]) -> bool:
    return all(cap.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def find_misfit(groups: list[BundleGroup], nodes: list[Node]) -> str | None:
    """Why `groups` cannot be placed on `nodes` all at once, or None when they can. Pure (no Ray)."""
    needed = frozenset(k for g in groups for k in g.bundle)
    listed = [f"{n.name} {_fmt(n.resources, needed)}" for n in nodes[:_LIST_NODES]]
    more = f"; +{len(nodes) - _LIST_NODES} more" if len(nodes) > _LIST_NODES else ""
    where = "(nodes: " + ("; ".join(listed) or "none") + more + ")"
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.resources.items():
            totals[k] = totals.get(k, 0.0) + v

    def need(g: BundleGroup) -> str:
        return f"{g.name} need {g.count} x {_fmt(g.bundle)}"

    # 1. every resource the config names must exist somewhere (typo'd or unlabelled custom resources)
    for g in groups:
        missing = [k for k in g.bundle if totals.get(k, 0.0) <= _EPS]
        if missing:
            has = ", ".join(f"{k}: 0" for k in missing)
            return f"{need(g)}; the cluster has {has} {where}"
    # 2. each single bundle must fit on one node (a 2-GPU worker needs a node with 2 GPUs)
    for g in groups:
        if not any(_fits(g.bundle, n.resources) for n in nodes):
            return f"{need(g)}; no single node can hold one {_fmt(g.bundle)} {where}"
    # 3. the totals must fit
    want = {k: sum(g.bundle.get(k, 0.0) * g.count for g in groups) for k in needed}
    short = sorted(k for k in needed if want[k] > totals.get(k, 0.0) + _EPS)
    if short:
        involved = " and ".join(need(g) for g in groups if set(g.bundle) & set(short))
        return (f"{involved}: {_fmt({k: want[k] for k in short}, needed)} in all; the cluster has "
                f"{_fmt({k: totals.get(k, 0.0) for k in short}, needed)} {where}")
    # 4. and they must pack onto the nodes together (bins, not one pool)
    if not _packs(groups, [dict(n.resources) for n in nodes]):
        strict = "".join(f" ({g.name} use {g.strategy})" for g in groups if g.strategy.startswith("STRICT"))
        return (f"{' and '.join(need(g) for g in groups)}{strict}: enough in total, but they do not fit onto "
                f"the nodes together {where}")
    return None


def _packs(groups: list[BundleGroup], caps: list[dict[str, float]]) -> bool:
    """Exact backtracking bin packing with symmetry pruning; True when a placement exists (or the search is
    too large to finish, so we never reject what we cannot prove impossible)."""
    items: list[tuple[int, dict[str, float]]] = []
    spread: set[int] = set()
    for gi, g in enumerate(groups):
        if g.strategy == "STRICT_PACK":  # one node must hold the whole group
            items.append((gi, {k: v * g.count for k, v in g.bundle.items()}))
            continue
        if g.strategy == "STRICT_SPREAD":
            spread.add(gi)
        items += [(gi, g.bundle)] * g.count
    # biggest first (GPUs are the scarce dimension), identical items adjacent for the symmetry rule below
    items.sort(key=lambda it: (-it[1].get("GPU", 0.0), -sum(it[1].values()), it[0]))
    used: list[set[int]] = [set() for _ in caps]  # groups present on each node (STRICT_SPREAD)
    steps = 0

    def place(i: int, prev_node: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > _PACK_SEARCH_LIMIT:
            raise TimeoutError
        if i == len(items):
            return True
        gi, b = items[i]
        same_as_prev = i > 0 and items[i - 1] == items[i]
        start = (prev_node + (gi in spread)) if same_as_prev else 0  # identical items: non-decreasing nodes
        seen = set()
        for n in range(start, len(caps)):
            state = (tuple(sorted(caps[n].items())), frozenset(used[n]))
            if state in seen or (gi in spread and gi in used[n]) or not _fits(b, caps[n]):
                continue
            seen.add(state)  # an identical node would give the same subtree
            for k, v in b.items():
                caps[n][k] = caps[n].get(k, 0.0) - v
            had = gi in used[n]
            used[n].add(gi)
            ok = place(i + 1, n)
            for k, v in b.items():
                caps[n][k] += v
            if not had:
                used[n].discard(gi)
            if ok:
                return True
        return False

    try:
        return place(0, 0)
    except TimeoutError:
        return True


def _autoscaler_can_add_nodes() -> bool:
    """True when an autoscaler with launchable node types runs (cluster launcher, KubeRay). A plain
    `ray start`/`ray.init()` cluster runs a read-only autoscaler whose node types are named `node_<id>`."""
    import ray

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            types = [n.ray_node_type_name for n in status.active_nodes + status.idle_nodes]
        else:
            from ray.experimental.internal_kv import _internal_kv_get

            raw = _internal_kv_get("__autoscaling_status")
            types = list(json.loads(raw)["autoscaler_report"]["node_type_mapping"].values()) if raw else []
        return any(t and not t.startswith("node_") for t in types)
    except Exception as e:  # noqa: BLE001 -- status formats are internal to Ray: unknown = "don't wait"
        logger.debug("autoscaler detection failed: %s", e)
        return False


def no_spare_cpu(cfg: Config, nodes: list[Node]) -> str | None:
    """Why the run would hang, or None: Ray Data's read and verify tasks take a CPU each, outside the rollout
    actors and train workers, which hold theirs for the whole run; with none left they would wait for ever."""
    held = required_resources(cfg).get("CPU", 0.0)
    total = sum(n.resources.get("CPU", 0.0) for n in nodes)
    if total - held >= 1 - _EPS:
        return None
    return (f"the rollout actors and train workers hold {_num(held)} of the cluster's {_num(total)} CPUs, and Ray "
            "Data's read and verify tasks need one more (a locally started Ray gets it: aftray.cluster.local_cpus)")


def check_cluster_fits(cfg: Config, timeout_s: float | None = None) -> dict[str, float]:
    """Raise `PlacementError` unless the connected cluster can hold every rollout actor and train worker.

    Returns the required totals. Answers at once on a fixed-size cluster; with an autoscaler that can launch
    nodes it asks for the bundles (`request_resources`) and re-checks for up to `timeout_s`
    (default `cluster.precheck_timeout_s`; GPU nodes take minutes to boot, so raise it to scale from zero).
    """
    groups = bundle_groups(cfg)

    def problem_on(nodes: list[Node]) -> str | None:
        return find_misfit(groups, nodes) or no_spare_cpu(cfg, nodes)

    problem = problem_on(cluster_nodes())
    if problem is None:
        return required_resources(cfg)
    timeout = cfg.cluster.precheck_timeout_s if timeout_s is None else timeout_s
    if timeout > 0 and _autoscaler_can_add_nodes():
        from ray.autoscaler.sdk import request_resources

        bundles = [dict(g.bundle) for g in groups for _ in range(g.count)] + [{"CPU": 1.0}]  # + Ray Data's
        logger.info("placement: waiting up to %.0f s for the autoscaler: %s", timeout, problem)
        request_resources(bundles=bundles)
        try:
            deadline = time.monotonic() + timeout
            while problem is not None and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                problem = problem_on(cluster_nodes())
        finally:
            request_resources(bundles=[])  # the actors hold the nodes from here; don't pin them after the job
        if problem is None:
            return required_resources(cfg)
        problem += f" [waited {timeout:.0f} s for the autoscaler; raise cluster.precheck_timeout_s]"
    raise PlacementError(f"cluster cannot hold this run: {problem}. Lower rollout.num_actors / "
                         "train.num_workers or their per-actor resources, or add nodes that carry them "
                         "(see docs/cluster.md).")


__all__ = [
    "BundleGroup",
    "Node",
    "PlacementError",
    "actor_gpus",
    "actor_options",
    "bundle_groups",
    "check_cluster_fits",
    "cluster_nodes",
    "coordinator_resources",
    "find_misfit",
    "no_spare_cpu",
    "free_port",
    "local_cpus",
    "nccl_env",
    "required_resources",
    "scaling_config_kwargs",
    "start_ray",
    "worker_resources",
]
