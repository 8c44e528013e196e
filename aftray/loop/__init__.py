"""The round loop: offline/online rounds (rounds.py), per-round evaluation (evaluate.py), and rollout joined with
verify (pipeline.py)."""
