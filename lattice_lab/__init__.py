"""lattice_lab: machine-learned force fields and Langevin dynamics for lattice Hamiltonians."""

__version__ = "0.1.0"


def load_force_field(path, device="auto", dtype=None, tracking_uri=None):
    """Return a ready-to-use force field (eval mode) from a checkpoint path, export or MLflow run id
    (looked up in ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db``)."""
    from lattice_lab.models.checkpoint import load_force_field as _load

    return _load(path, device=device, dtype=dtype, tracking_uri=tracking_uri)


__all__ = ["__version__", "load_force_field"]
