"""Image formation of the synthetic microscope: projection, CTF, dose damage, absorption.

A tilt image is formed as a weak-phase object: the projected phase (exact projections of
the phantom's spheres plus an amorphous-ice texture) is filtered by the CTF at the local
defocus of the tilted specimen's mid-plane (:func:`tomodask.kernels.geometry.local_defocus_angstrom`),
by a B-factor envelope and by radiation damage for the dose already received (Grant &
Grigorieff critical exposure), and multiplied by the amplitude transmitted through ice and gold.

References
----------
.. [1] Grant, T. & Grigorieff, N. (2015). Measuring the optimal exposure for single
   particle cryo-EM using a 2.6 Å reconstruction of rotavirus VP6. eLife 4, e06980.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tomodask.kernels.ctf_model import ctf_2d
from tomodask.kernels.fourier import critical_exposure_e_per_angstrom2, frequency_grid
from tomodask.kernels.geometry import local_defocus_angstrom, specimen_to_image
from tomodask.simulate.phantom import ICE_MEAN_FREE_PATH_ANGSTROM, Phantom

#: Standard deviation of the amorphous-ice phase texture per Å of ice, per pixel of 1 Å².
ICE_PHASE_STD_PER_SQRT_ANGSTROM = 0.008
#: Spacing of the defocus planes between which the CTF of a tilted image is interpolated.
DEFOCUS_PLANE_SPACING_ANGSTROM = 50.0
#: Most defocus planes per image (full-size, high-tilt images use a coarser spacing).
MAX_DEFOCUS_PLANES = 32


@dataclass(frozen=True)
class Optics:
    """Microscope optics and imaging constants of one tilt image."""

    pixel_size_angstrom: float
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor_angstrom2: float = 60.0


def project_phantom(
    phantom: Phantom,
    *,
    shape_yx: tuple[int, int],
    pixel_size_angstrom: float,
    tilt_angle_deg: float,
    tilt_axis_angle_deg: float,
    shift_yx_px: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Exact projections of every sphere of the phantom into one tilted image.

    Parameters
    ----------
    phantom
        The specimen.
    shape_yx
        Image shape.
    pixel_size_angstrom
        Image pixel size.
    tilt_angle_deg, tilt_axis_angle_deg
        Geometry of this tilt.
    shift_yx_px
        Displacement of the image content (see the geometry conventions).

    Returns
    -------
    phase, absorption
        ``(y, x)`` projected phase (rad) and projected amplitude attenuation exponent.
    """
    ny, nx = shape_yx
    phase = np.zeros(shape_yx, dtype=np.float64)
    absorb = np.zeros(shape_yx, dtype=np.float64)
    cy, cx = (ny - 1) / 2 + shift_yx_px[0], (nx - 1) / 2 + shift_yx_px[1]
    for centres, radius, phase_per_a, absorb_per_a in phantom.spheres:
        x, y, _ = specimen_to_image(centres, tilt_angle_deg, tilt_axis_angle_deg)
        r_px = radius / pixel_size_angstrom
        for px, py in zip(x / pixel_size_angstrom + cx, y / pixel_size_angstrom + cy):
            y0, y1 = max(int(np.floor(py - r_px)), 0), min(int(np.ceil(py + r_px)) + 1, ny)
            x0, x1 = max(int(np.floor(px - r_px)), 0), min(int(np.ceil(px + r_px)) + 1, nx)
            if y0 >= y1 or x0 >= x1:
                continue
            d2 = (np.arange(y0, y1)[:, None] - py) ** 2 + (np.arange(x0, x1)[None, :] - px) ** 2
            chord = 2.0 * np.sqrt(np.clip(r_px**2 - d2, 0.0, None)) * pixel_size_angstrom
            phase[y0:y1, x0:x1] += phase_per_a * chord
            if absorb_per_a:
                absorb[y0:y1, x0:x1] += absorb_per_a * chord
    return phase, absorb


def form_image(
    phase: np.ndarray,
    absorption: np.ndarray,
    *,
    optics: Optics,
    defocus_u_angstrom: float,
    defocus_v_angstrom: float,
    astigmatism_angle_deg: float,
    tilt_angle_deg: float,
    tilt_axis_angle_deg: float,
    thickness_angstrom: float,
    prior_dose_e_per_angstrom2: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Turn projected phase and absorption into an intensity image (1 = no specimen).

    Parameters
    ----------
    phase, absorption
        ``(y, x)`` from :func:`project_phantom`.
    optics
        Pixel size and microscope constants.
    defocus_u_angstrom, defocus_v_angstrom, astigmatism_angle_deg
        Defocus at the image centre, specimen mid-plane.
    tilt_angle_deg, tilt_axis_angle_deg
        Geometry, for the defocus gradient and the path length through the ice.
    thickness_angstrom
        Ice thickness.
    prior_dose_e_per_angstrom2
        Exposure received before (and during half of) this image, for radiation damage.
    rng
        Random generator for the amorphous-ice texture.

    Returns
    -------
    ndarray
        ``(y, x)`` float64 relative intensity.
    """
    ny, nx = phase.shape
    px = optics.pixel_size_angstrom
    cos_t = max(np.cos(np.deg2rad(tilt_angle_deg)), 0.05)
    path = thickness_angstrom / cos_t
    ice_std = ICE_PHASE_STD_PER_SQRT_ANGSTROM * np.sqrt(path) / px
    spec = np.fft.rfft2(phase + rng.normal(0.0, ice_std, size=phase.shape))
    fy, fx = frequency_grid((ny, nx), xp=np, rfft=True)
    k = np.sqrt(fy.astype(np.float64) ** 2 + fx.astype(np.float64) ** 2) / px
    spec *= np.exp(-optics.bfactor_angstrom2 * k**2 / 4.0)
    spec *= np.exp(-prior_dose_e_per_angstrom2 / (2.0 * critical_exposure_e_per_angstrom2(k, voltage_kv=optics.voltage_kv)))

    yy = np.arange(ny)[:, None] - (ny - 1) / 2
    xx = np.arange(nx)[None, :] - (nx - 1) / 2
    mean_df = 0.5 * (defocus_u_angstrom + defocus_v_angstrom)
    half_astig = 0.5 * (defocus_u_angstrom - defocus_v_angstrom)
    local = local_defocus_angstrom(mean_df, xx, yy, pixel_size_angstrom=px,
                                   tilt_angle_deg=tilt_angle_deg, tilt_axis_angle_deg=tilt_axis_angle_deg)
    local = np.broadcast_to(local, (ny, nx))
    lo, hi = float(local.min()), float(local.max())
    n_planes = min(max(2, int(np.ceil((hi - lo) / DEFOCUS_PLANE_SPACING_ANGSTROM)) + 1), MAX_DEFOCUS_PLANES)
    planes = np.linspace(lo, hi, n_planes) if hi > lo else np.array([lo, lo + 1.0])
    contrast = np.zeros((ny, nx))
    step = planes[1] - planes[0]
    pos = np.clip((local - planes[0]) / step, 0, len(planes) - 1 - 1e-9)
    idx = pos.astype(int)
    frac = pos - idx
    for i, df in enumerate(planes):
        w = np.where(idx == i, 1.0 - frac, 0.0) + np.where(idx == i - 1, frac, 0.0)
        if not w.any():
            continue
        ctf = ctf_2d((ny, nx), pixel_size_angstrom=px, defocus_u_angstrom=df + half_astig,
                     defocus_v_angstrom=df - half_astig, astigmatism_angle_deg=astigmatism_angle_deg,
                     voltage_kv=optics.voltage_kv, spherical_aberration_mm=optics.spherical_aberration_mm,
                     amplitude_contrast=optics.amplitude_contrast)
        contrast += w * np.fft.irfft2(spec * ctf, s=(ny, nx))
    transmitted = np.exp(-path / ICE_MEAN_FREE_PATH_ANGSTROM - absorption)
    return transmitted * np.clip(1.0 + 2.0 * contrast, 0.0, None)
