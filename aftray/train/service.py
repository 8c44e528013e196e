"""A Ray Train run that lives as long as an aftray run and trains one stage per request.

Starting a Ray Train worker group (controller, placement group, processes, process group, `import deepspeed`)
costs more than a round's optimizer steps on the arith testbed (README, Benchmarks). So, as OpenRLHF and veRL
keep their actor groups, one `TorchTrainer.fit()` runs in a background thread for the whole run, and its
workers (`aftray.train.worker.serve`) take `StageJob`s from a `StageInbox` actor:

    driver: service.train(...) ── inbox.post(job) ──► workers: job(i) ─► run_stage ─► rank 0: finish(i, out)
            waits on inbox.result(i) ◄─────────────────────────────────────────────────────┘

The workers keep the policy (model and optimizer) from one stage to the next (`aftray.train.worker`). A failed
worker restarts the group (`max_failures`): it skips the finished stages and resumes the pending one from the
latest checkpoint in `storage` (its own mid-stage one, or the end state of the stage it continues). A re-run
after a driver crash resumes from the Ray Train run left under `storage` the same way; a stage whose
`<stage_dir>/train_result.json` exists is not redone. `storage` is what a multi-node run must share (NFS, or
`s3://`, as Ray Train's `storage_path`).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from aftray.cluster import scaling_config_kwargs
from aftray.config import LossConfig, TrainConfig
from aftray.train.stage import RESULT_FILE, StageJob, StageResult
from aftray.train.worker import serve

log = logging.getLogger("aftray")
POLL_S = 0.05  # how often the inbox's waiting calls look again: far below a stage's seconds


@ray.remote(num_cpus=0)
class StageInbox:
    """The stages posted by the driver (index -> job; None = stop) and the results rank 0 sends back. A job is
    dropped once finished and a result once the driver has it: a service that trains a comparison's dozens of
    runs holds only what is pending."""

    def __init__(self):
        self.jobs: dict[int, StageJob | None] = {}
        self.results: dict[int, dict] = {}
        self.posted = 0

    def post(self, job: StageJob | None) -> int:
        self.jobs[self.posted] = job
        self.posted += 1
        return self.posted - 1

    def first_unfinished(self) -> int:
        return min(self.jobs, default=self.posted)

    async def job(self, index: int) -> StageJob | None:
        while index not in self.jobs:
            await asyncio.sleep(POLL_S)
        return self.jobs[index]

    def finish(self, index: int, result: dict) -> None:
        del self.jobs[index]
        self.results[index] = result

    async def result(self, index: int) -> dict:
        while index not in self.results:
            await asyncio.sleep(POLL_S)
        return self.results.pop(index)

    def pending(self) -> int:
        """Jobs and results held (a test reads it)."""
        return len(self.jobs) + len(self.results)


class TrainService:
    """Ray Train workers for many stages. `train(...)` runs one stage (starting the workers on first use);
    `close()` stops them and removes `storage` (Ray Train's checkpoints). A context manager.

    train: the settings the workers are placed by (num_workers, cpus/gpus per worker, max_failures); every stage
    must ask for the same placement."""

    def __init__(self, train: TrainConfig, storage: str | Path, placement_strategy: str = "PACK"):
        self.storage = Path(storage).absolute()
        self.scaling = scaling_config_kwargs(train, placement_strategy)
        self.max_failures = train.max_failures
        self.cpus_per_worker = train.cpus_per_worker
        self.inbox = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self.inbox = StageInbox.remote()
        trainer = TorchTrainer(
            serve,
            train_loop_config={"inbox": self.inbox, "cpus_per_worker": self.cpus_per_worker},
            scaling_config=ScalingConfig(**self.scaling),
            run_config=RunConfig(name="train", storage_path=str(self.storage),
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="aftray-train", daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the driver's thread by `train`
            self.error = e

    def train(self, stage: str, groups, model_path: str | Path, stage_dir: str | Path, train: TrainConfig,
              loss: LossConfig, *, trust_remote_code: bool = False, name: str | None = None,
              **options) -> StageResult:
        """Train one stage (see `aftray.train.stage`; `options` are `StageJob`'s: init, after, schedule,
        save_weights, push_weights, mixed_or_reference). name: the stage's tag, unique among the runs this
        service trains (default `<stage>_<stage_dir's name>`). A finished stage (train_result.json present) is
        read back, not redone."""
        stage_dir = Path(stage_dir).absolute()
        if (stage_dir / RESULT_FILE).is_file():
            return StageResult.load(stage_dir)
        if scaling_config_kwargs(train, self.scaling["placement_strategy"]) != self.scaling:
            raise ValueError(f"stage {stage} at {stage_dir}: its workers' placement differs from this service's "
                             f"({self.scaling}); start a TrainService for it")
        if self.thread is None:
            self.start()
        job = StageJob.create(stage, name or f"{stage}_{stage_dir.name}", groups, model_path, stage_dir, train,
                              loss, trust_remote_code, on_ray=True, **options)
        start = time.perf_counter()
        index = ray.get(self.inbox.post.remote(job))
        result = self.inbox.result.remote(index)
        while not ray.wait([result], timeout=1.0)[0]:
            if not self.thread.is_alive():
                raise RuntimeError(f"the Ray Train workers stopped before stage {job.name} finished "
                                   f"(storage {self.storage})") from self.error
        out = StageResult.from_loop(stage_dir, ray.get(result), time.perf_counter() - start)
        out.save()
        return out

    def close(self, finished: bool = True, timeout_s: float = 60.0) -> None:
        """Let the workers return (fit ends), then drop Ray Train's run folder, unless not `finished` (after an
        error its checkpoints are what a re-run resumes from)."""
        if self.thread is not None and self.thread.is_alive():
            self.inbox.post.remote(None)
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                log.warning("train workers did not stop within %.0f s; leaving them to Ray's shutdown", timeout_s)
        if finished:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> TrainService:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(finished=exc_type is None)

