"""Experiment tracking (MLflow, the one module every entrypoint uses) and force-accuracy plots."""
