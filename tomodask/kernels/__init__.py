"""Pure numerical kernels (numpy or cupy, taken from the inputs).

Public entry points: :func:`align_frames`, :func:`estimate_ctf`, :func:`align_tilt_series`,
:func:`reconstruct_tomogram` and :func:`pick_particles`. Kernels import nothing from the
rest of tomodask except :mod:`tomodask.backend`; geometry conventions are in
:mod:`tomodask.kernels.geometry`.
"""

from tomodask.kernels.ctf import estimate_ctf
from tomodask.kernels.motion import align_frames
from tomodask.kernels.picking import pick_particles
from tomodask.kernels.reconstruct import reconstruct_tomogram
from tomodask.kernels.tilt_align import align_tilt_series

__all__ = ["align_frames", "align_tilt_series", "estimate_ctf", "pick_particles", "reconstruct_tomogram"]
