"""A worker fault for tests/test_train.py, installed in every worker process of a Ray started with
`install` as its `worker_process_setup_hook` (the `worker_faults` fixture, tests/conftest.py): when the file
$AFTRAY_TEST_FAULT_FILE holds step s, the last rank deletes it (so it fires once) and dies without cleanup, as a
crashed worker would, instead of reporting step s's checkpoint. It waits first: Ray Train's controller collects
reports by polling the workers (every 2 s), and a checkpoint whose reports it has not collected yet is lost with
the worker."""
import os
import time
from pathlib import Path


def install() -> None:
    import ray.train
    import torch.distributed as dist

    report = ray.train.report

    def report_or_die(metrics, checkpoint=None, **kwargs):
        path = Path(os.environ["AFTRAY_TEST_FAULT_FILE"])
        last = dist.get_rank() == dist.get_world_size() - 1
        if checkpoint is not None and last and path.is_file() and path.read_text().strip() == str(metrics["step"]):
            path.unlink()
            time.sleep(6)
            os._exit(1)
        return report(metrics, checkpoint=checkpoint, **kwargs)

    ray.train.report = report_or_die
