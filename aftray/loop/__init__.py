"""The round loop: offline/online rounds, evaluation, run directory, MLflow tracking, placement."""
