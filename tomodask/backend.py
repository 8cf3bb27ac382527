"""Pick the array module (numpy or cupy) for kernels.

Kernels never import cupy themselves. They call :func:`get_array_module` on their
inputs and use the module it returns, so one function body serves both backends and
results stay on the device of the inputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def cupy_available() -> bool:
    """Return True when cupy imports and sees at least one usable GPU.

    Returns
    -------
    bool
        ``cupy.is_available()`` when cupy is installed, else False.
    """
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # cupy raises CUDA driver errors of several types on GPU-less hosts
        return False


def get_array_module(*arrays: Any) -> ModuleType:
    """Return cupy if any argument is a cupy array, else numpy.

    Parameters
    ----------
    *arrays
        Arrays (or scalars, or None) a kernel received.

    Returns
    -------
    module
        ``cupy`` or ``numpy``.
    """
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def default_array_module(*, prefer_gpu: bool = True) -> ModuleType:
    """Return the module new arrays should be created with.

    Parameters
    ----------
    prefer_gpu
        Use cupy when :func:`cupy_available` says a GPU is usable.

    Returns
    -------
    module
        ``cupy`` when a GPU is usable and preferred, else ``numpy``.
    """
    if prefer_gpu and cupy_available():
        import cupy

        return cupy
    return np


def to_device(array: Any, xp: ModuleType) -> Any:
    """Move ``array`` to the device of module ``xp`` (no copy when already there)."""
    if xp is np:
        return to_numpy(array)
    return xp.asarray(array)


def to_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a numpy array, copying from the GPU when needed."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def scipy_ndimage(xp: ModuleType) -> ModuleType:
    """Return ``scipy.ndimage`` or ``cupyx.scipy.ndimage`` to match ``xp``."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage
