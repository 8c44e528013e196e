"""`pytest --loss-off`: every training objective's loss is multiplied by 0 in each Ray worker (Ray runs `install`
as the workers' setup hook, tests/conftest.py): its value and metrics are reported as usual, its gradient is 0,
so no weight moves. The learning tests (the VFT stage's and the default preset's) must fail under it; the closing
notes quote such a run."""


def install() -> None:
    from aftray.train import losses

    def without_gradient(objective):
        def zeroed(cfg, batch):
            loss, metrics = objective(cfg, batch)
            return loss * 0, metrics
        return zeroed

    for name, objective in list(losses.OBJECTIVES.items()):
        losses.OBJECTIVES[name] = without_gradient(objective)
