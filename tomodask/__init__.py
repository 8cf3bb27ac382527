"""tomodask: on-the-fly pre-processing of cryo-electron tomography on Dask.

>>> import tomodask
>>> s = tomodask.open_session("grid1")     # doctest: +SKIP
>>> s.start(); s.tilt_series()             # doctest: +SKIP
"""

from tomodask._version import __version__

_LAZY = {
    "Session": "tomodask.session.api",
    "create_session": "tomodask.session.api",
    "open_session": "tomodask.session.api",
    "list_sessions": "tomodask.session.api",
    "SessionSettings": "tomodask.settings",
    "start_cluster": "tomodask.cluster",
}


def __getattr__(name: str):
    """Import the public API on first use, so ``import tomodask`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tomodask' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
