"""Training: COT scores (`scores`), every loss and the objectives by name (`losses`), and the Ray Train loop.

Kept import-free so that `aftray.config` can read `aftray.train.losses.OBJECTIVES` without pulling in Ray or
DeepSpeed.
"""
