"""tomodask: on-the-fly pre-processing of cryo-electron tomography on Dask."""
from tomodask._version import __version__

__all__ = ["__version__"]
