"""HDF5 force datasets (ED forces for lattice configurations) and their resumable generation."""

from lattice_lab.data.h5io import ForceData, read_force_dataset, write_force_dataset

__all__ = ["ForceData", "read_force_dataset", "write_force_dataset"]
