"""Training: COT scores (`scores`), every loss and the objectives by name (`losses`), one stage's job and result
(`stage`), the train loop every worker runs (`worker`) and the Ray Train workers kept for a run (`service`).
Import-free, so that `aftray.train.losses` loads without Ray or DeepSpeed."""
