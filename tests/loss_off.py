"""`pytest --loss-off`: every training objective's loss is multiplied by 0 (tests/conftest.py swaps them in before
the first test; a stage's job carries its objective from the driver to the train workers). The loss and metrics
are reported as usual, the gradient is 0, and no weight moves: the learning tests must fail under it."""
from dataclasses import dataclass


@dataclass(frozen=True)
class WithoutGradient:
    objective: object  # an aftray.train.losses.Objective

    @property
    def row(self):  # what the worker reads besides the call (the sequences the loss needs)
        return self.objective.row

    def __call__(self, cfg, batch):
        loss, metrics = self.objective(cfg, batch)
        return loss * 0, metrics


def install() -> None:
    import sys

    import ray.cloudpickle

    from aftray.train import losses

    # Ray's workers cannot import this file (tests/ is not a package on their path): ship the class by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    for name, objective in list(losses.OBJECTIVES.items()):
        losses.OBJECTIVES[name] = WithoutGradient(objective)
