"""Shared test setup: offline hub, caches inside the repo, one local Ray per test session."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AFTRAY_CACHE_DIR", str(REPO / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--loss-off", action="store_true",
                     help="switch the loss's gradient off (tests/loss_off.py): the learning tests must then fail")


def pytest_configure(config):
    if config.getoption("--loss-off"):
        import loss_off

        loss_off.install()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from aftray.tasks.base import default_data_dir

    path = default_data_dir()
    if not (path / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {path} (set AFTRAY_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def _ray_shutdown_at_exit():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_shutdown_at_exit, request):
    """A local Ray with more logical CPUs than cores, so Ray Data tasks are not starved by long-lived actors.
    Started once and shared; started again for a module if a test (a multi-node one) shut it down."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    return ray


def start_local_ray(runtime_env: dict | None = None) -> None:
    import ray

    ray.init(address="local", num_cpus=5, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)


@pytest.fixture
def worker_faults(ray_local, tmp_path):
    """Ray restarted so that every worker process runs tests/fault_worker.py's `install` first (a job-level
    `worker_process_setup_hook`, as a run installs `aftray.logs.worker_setup`); yields the file that tells a
    Ray Train worker at which step to die. The plain local Ray is back afterwards."""
    fault_file = tmp_path / "fail_at_step"
    tests = str(Path(__file__).parent)  # where the workers import fault_worker from
    ray_local.shutdown()
    start_local_ray({"worker_process_setup_hook": "fault_worker.install",
                     "env_vars": {"AFTRAY_TEST_FAULT_FILE": str(fault_file),
                                  "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}})
    yield fault_file
    ray_local.shutdown()
    start_local_ray()


@pytest.fixture(scope="session")
def tiny_model_path():
    from aftray.config import ModelConfig, TinyModelConfig
    from aftray.models import resolve_model_path

    return resolve_model_path(ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(
        hidden_size=64, num_layers=2, seed=0)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only contend with the other processes of a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
