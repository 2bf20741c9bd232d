"""Coarsening analysis of lattice trajectories (DESIGN.md section 6).

Every function takes numpy arrays or torch tensors of periodic fields ``[..., L, L]`` (leading dims
are frames / replicas) and returns numpy arrays. Modules:

- :mod:`.correlation`: equal-time correlation C(r), normalised order-parameter correlation G(r),
  correlation length xi;
- :mod:`.order_parameter`: local CDW order parameter phi_i and domain-wall fraction;
- :mod:`.structure_factor`: S(k), CDW peak, domain size L(t), circular average S(|k - Q|);
- :mod:`.growth`: power-law fits L(t) ~ t^alpha with fit and replica errors;
- :mod:`.scaling`: dynamical-scaling collapse data and a collapse quality number;
- :mod:`.compare`: ED-vs-ML agreement statistic for per-replica curves;
- :mod:`.stats`: replica mean / standard error, jackknife;
- :mod:`lattice_lab.dynamics.trajectory` (not in this package): reading trajectory files frame by frame;
- :mod:`.plots`: matplotlib (Agg) PNG figures;
- :mod:`.pipeline`: ``analyze_trajectory`` and ``compare_trajectories`` (files + MLflow).
"""

from lattice_lab.analysis.compare import compare_curves
from lattice_lab.analysis.correlation import (
    correlation_function,
    correlation_length,
    distance_bins,
    normalized_correlation,
)
from lattice_lab.analysis.growth import PowerLawFit, fit_power_law, growth_exponent
from lattice_lab.analysis.order_parameter import cdw_order_parameter, domain_wall_fraction
from lattice_lab.analysis.stats import jackknife_error, leave_one_out_means, replica_mean_sem
from lattice_lab.analysis.structure_factor import (
    cdw_peak,
    circular_average,
    domain_size,
    structure_factor,
)


def analyze_trajectory(path, cfg=None, out_dir=None):
    """See :func:`lattice_lab.analysis.pipeline.analyze_trajectory` (imported lazily: matplotlib)."""
    from lattice_lab.analysis.pipeline import analyze_trajectory as _run

    return _run(path, cfg, out_dir=out_dir)


def compare_trajectories(ed_path, ml_path, steps=None, cfg=None, out_dir=None):
    """See :func:`lattice_lab.analysis.pipeline.compare_trajectories`."""
    from lattice_lab.analysis.pipeline import compare_trajectories as _run

    return _run(ed_path, ml_path, steps, cfg, out_dir=out_dir)


__all__ = [
    "PowerLawFit", "analyze_trajectory", "cdw_order_parameter", "cdw_peak", "circular_average",
    "compare_curves", "compare_trajectories", "correlation_function", "correlation_length",
    "distance_bins", "domain_size", "domain_wall_fraction", "fit_power_law", "growth_exponent",
    "jackknife_error", "leave_one_out_means", "normalized_correlation", "replica_mean_sem",
    "structure_factor",
]
