"""The contrast transfer function model shared by CTF estimation and the simulator.

Conventions (see :mod:`tomodask.kernels.geometry`): underfocus positive, U the larger
defocus, astigmatism angle of U counter-clockwise from the image X axis.

References
----------
.. [1] Rohou, A. & Grigorieff, N. (2015). CTFFIND4: Fast and accurate defocus
   estimation from electron micrographs. J. Struct. Biol. 192, 216-221.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.fourier import frequency_grid


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return float(12.2642598 / np.sqrt(v * (1.0 + 0.978459e-6 * v)))


def astigmatism_components(astigmatism_angstrom, angle_deg) -> tuple[np.ndarray, np.ndarray]:
    """Astigmatism as the vector ``(U - V) / 2 * (cos 2a, sin 2a)`` in Å (numpy, broadcasting).

    Linear in the lens' astigmatism, so a fit can step in it without a singularity at zero
    and a mean of such vectors averages amounts and angles consistently across ±90°.
    :func:`astigmatism_from_components` is the inverse.
    """
    half = 0.5 * np.asarray(astigmatism_angstrom, dtype=np.float64)
    two_a = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=np.float64))
    return half * np.cos(two_a), half * np.sin(two_a)


def astigmatism_from_components(hc: float, hs: float) -> tuple[float, float]:
    """``(U - V in Å, angle of U in (-90, 90] degrees)`` of an :func:`astigmatism_components` vector."""
    angle = 0.5 * float(np.rad2deg(np.arctan2(hs, hc)))
    return 2.0 * float(np.hypot(hc, hs)), angle + 180.0 if angle <= -90.0 else angle


def ctf_2d(
    shape_yx: tuple[int, int],
    *,
    pixel_size_angstrom: float,
    defocus_u_angstrom: float,
    defocus_v_angstrom: float,
    astigmatism_angle_deg: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
    phase_shift_deg: float = 0.0,
    rfft: bool = True,
    xp: ModuleType = np,
) -> np.ndarray:
    """Evaluate the CTF on a 2D frequency grid.

    Parameters
    ----------
    shape_yx
        Real-space image shape ``(ny, nx)``.
    pixel_size_angstrom
        Pixel size.
    defocus_u_angstrom, defocus_v_angstrom
        Defoci along the U and V directions (underfocus positive).
    astigmatism_angle_deg
        Angle of U counter-clockwise from X.
    voltage_kv, spherical_aberration_mm, amplitude_contrast
        Microscope constants.
    phase_shift_deg
        Additional phase shift (phase plate).
    rfft
        Half-spectrum layout when True.
    xp
        Array module.

    Returns
    -------
    ndarray
        ``-sin(chi + arcsin(amplitude_contrast))``, float32, unshifted FFT layout.
    """
    fy, fx = frequency_grid(shape_yx, xp=xp, rfft=rfft)
    fy = fy / pixel_size_angstrom
    fx = fx / pixel_size_angstrom
    k2 = fx**2 + fy**2
    angle = xp.arctan2(fy, fx)
    return ctf_from_polar(
        k2,
        angle,
        defocus_u_angstrom=defocus_u_angstrom,
        defocus_v_angstrom=defocus_v_angstrom,
        astigmatism_angle_deg=astigmatism_angle_deg,
        voltage_kv=voltage_kv,
        spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=phase_shift_deg,
    )


def ctf_from_polar(
    k2_per_angstrom2: np.ndarray,
    angle_rad: np.ndarray,
    *,
    defocus_u_angstrom,
    defocus_v_angstrom,
    astigmatism_angle_deg,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
    phase_shift_deg=0.0,
) -> np.ndarray:
    """CTF at given squared spatial frequencies (1/Å²) and directions (radians from X).

    Defocus parameters may be arrays that broadcast against the grids (a batch of
    candidate models at once).

    Returns
    -------
    ndarray
        CTF values, same backend as ``k2_per_angstrom2``.
    """
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = spherical_aberration_mm * 1e7
    ast = np.deg2rad(astigmatism_angle_deg)
    mean = 0.5 * (defocus_u_angstrom + defocus_v_angstrom)
    half = 0.5 * (defocus_u_angstrom - defocus_v_angstrom)
    xp = get_array_module(k2_per_angstrom2, angle_rad)
    defocus = mean + half * xp.cos(2.0 * (angle_rad - ast))
    chi = np.pi * lam * defocus * k2_per_angstrom2 - 0.5 * np.pi * cs * lam**3 * k2_per_angstrom2**2
    chi = chi + np.deg2rad(phase_shift_deg) + np.arcsin(amplitude_contrast)
    return (-xp.sin(chi)).astype(xp.float32)
