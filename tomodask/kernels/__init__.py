"""Pure numerical kernels (numpy or cupy, taken from the inputs).

Public entry points: :func:`align_frames`, :func:`estimate_ctf`, :func:`align_tilt_series`,
:func:`reconstruct_tomogram` and :func:`pick_particles`. Kernels import nothing from the
rest of tomodask except :mod:`tomodask.backend`; geometry conventions are in
:mod:`tomodask.kernels.geometry`.
"""

_ENTRY_POINTS = {
    "align_frames": "tomodask.kernels.motion",
    "estimate_ctf": "tomodask.kernels.ctf",
    "align_tilt_series": "tomodask.kernels.tilt_align",
    "reconstruct_tomogram": "tomodask.kernels.reconstruct",
    "pick_particles": "tomodask.kernels.picking",
}


def __getattr__(name: str):
    """Import an entry point's module on first use."""
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'tomodask.kernels' has no attribute {name!r}")


__all__ = list(_ENTRY_POINTS)
