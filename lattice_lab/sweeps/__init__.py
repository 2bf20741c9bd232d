"""Hyperparameter sweeps: Optuna through Hydra multirun, one MLflow parent run per study."""
