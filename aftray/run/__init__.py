"""A run's records: the run directory and summary.json, round metrics, MLflow tracking, plots."""
