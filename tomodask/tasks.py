"""Dask task functions: read inputs, call the kernels, write zarr, return a metrics record.

Each function takes one small frozen request (paths and settings as JSON, so it pickles
cheaply) and returns a plain dict of metrics that the coordinator stores in the database.
Arrays go to the session's results zarr (layout in :mod:`tomodask.session.layout`).
Errors propagate: the future fails and carries its exception to the session.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from tomodask.backend import default_array_module, to_device, to_numpy
from tomodask.io.movies import read_gain_reference, read_movie
from tomodask.io.omezarr import COMPRESSORS, write_ome_zarr
from tomodask.settings import SessionSettings


@dataclass(frozen=True)
class MovieRequest:
    """What :func:`process_movie` needs to process one movie."""

    movie_path: str
    movie: str
    tilt_series: str
    gain_path: str | None
    zarr_path: str
    tilt_angle_deg: float
    acquisition_index: int | None
    dose_e_per_angstrom2: float | None
    prior_dose_e_per_angstrom2: float | None
    settings_json: str


@dataclass(frozen=True)
class TiltSeriesRequest:
    """What :func:`process_tilt_series` needs to process one tilt-series."""

    tilt_series: str
    zarr_path: str
    tomogram_dir: str
    alignment_dir: str
    mdoc_path: str | None
    settings_json: str
    failed_movies: list[str] = field(default_factory=list)


def write_array(group: zarr.Group, name: str, data: np.ndarray, **attrs) -> None:
    """Write one array into a group (replacing it), compressed, with attributes."""
    data = np.ascontiguousarray(to_numpy(data))
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=_chunks(data.shape),
                             compressors=COMPRESSORS, overwrite=True)
    arr[...] = data
    if attrs:
        arr.attrs.update(attrs)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) <= 2:
        return tuple(min(s, 1024) for s in shape) or (1,)
    return (1,) + tuple(min(s, 1024) for s in shape[1:])


def _group(zarr_path: str, path: str) -> zarr.Group:
    root = zarr.open_group(LocalStore(zarr_path), mode="a")
    return root.require_group(path)


def _write_strip_spectra(group: zarr.Group, spectra) -> None:
    """Store a movie's ``StripSpectra`` as ``ctf_strip_spectra`` (read back by :class:`_StoredSpectra`)."""
    write_array(group, "ctf_strip_spectra", spectra.sums, tile_size_px=spectra.tile_size_px,
                strip_offsets_angstrom=spectra.strip_offsets_angstrom.tolist(),
                strip_tiles=spectra.strip_tiles.tolist(), pixel_size_angstrom=spectra.pixel_size_angstrom,
                resolution_range_angstrom=list(spectra.resolution_range_angstrom))


class _StoredSpectra:
    """Strip spectra of a tilt-series' movies, read on access (``spectra[i]``).

    Read from ``movies/<movie>/ctf_strip_spectra`` (:func:`_write_strip_spectra`); for movies
    processed before tomodask stored them, computed from their stored ``aligned_sum`` (at its
    stored pixel size) with the session's CTF settings.
    """

    def __init__(self, root: zarr.Group, movies: list[dict], s: SessionSettings, xp) -> None:
        self._root, self._movies, self._settings, self._xp = root, movies, s, xp

    def __len__(self) -> int:
        return len(self._movies)

    def __getitem__(self, i: int):
        from tomodask.kernels.ctf import StripSpectra, strip_spectra

        m = self._movies[i]
        group = self._root[f"movies/{m['movie']}"]
        if "ctf_strip_spectra" not in group:
            image = to_device(group["aligned_sum"][...], self._xp)
            return strip_spectra(image, tilt_angle_deg=m["tilt_angle_deg"],
                                 **_spectra_options(self._settings, pixel_size_angstrom=m["pixel_size_angstrom"],
                                                    shape_yx=image.shape))
        arr = group["ctf_strip_spectra"]
        a = arr.attrs
        return StripSpectra(sums=to_device(arr[...], self._xp),
                            strip_offsets_angstrom=np.asarray(a["strip_offsets_angstrom"], dtype=np.float64),
                            strip_tiles=np.asarray(a["strip_tiles"], dtype=np.int64),
                            tile_size_px=int(a["tile_size_px"]), pixel_size_angstrom=float(a["pixel_size_angstrom"]),
                            resolution_range_angstrom=tuple(float(r) for r in a["resolution_range_angstrom"]))


def _spectra_options(s: SessionSettings, *, pixel_size_angstrom: float, shape_yx: tuple[int, int]) -> dict:
    """``strip_spectra`` keyword arguments of a session for an image, except the tilt angle."""
    ctf_s = s.processing.ctf
    px = float(pixel_size_angstrom)
    return dict(pixel_size_angstrom=px, tilt_axis_angle_deg=s.microscope.tilt_axis_angle_deg,
                tile_size_px=int(min(ctf_s.tile_size_px, 2 ** int(np.log2(min(shape_yx))))),
                resolution_range_angstrom=(ctf_s.resolution_low_angstrom, max(ctf_s.resolution_high_angstrom, 2.1 * px)))


def _ctf_fit_options(s: SessionSettings) -> dict:
    """``estimate_ctf_from_spectra`` keyword arguments of a session."""
    mic, ctf_s = s.microscope, s.processing.ctf
    return dict(voltage_kv=mic.voltage_kv, spherical_aberration_mm=mic.spherical_aberration_mm,
                amplitude_contrast=mic.amplitude_contrast,
                defocus_search_range_angstrom=(ctf_s.defocus_min_angstrom, ctf_s.defocus_max_angstrom),
                fit_phase_shift=ctf_s.fit_phase_shift)


def process_movie(req: MovieRequest) -> dict:
    """Gain-correct, align frames, dose-weight and estimate the CTF of one movie.

    Writes ``movies/<movie>/`` arrays (aligned_sum, dose_weighted_sum, even_sum, odd_sum,
    shifts_px, ctf_spectrum, and ctf_strip_spectra for the series-level CTF refinement) and
    returns the movie's metrics.
    """
    from tomodask.kernels.ctf import estimate_ctf_from_spectra, strip_spectra
    from tomodask.kernels.fourier import fourier_crop
    from tomodask.kernels.gain import apply_gain, find_defect_pixels, replace_defect_pixels
    from tomodask.kernels.motion import align_frames

    t0 = time.perf_counter()
    s = SessionSettings.model_validate_json(req.settings_json)
    mic, fa = s.microscope, s.processing.frame_alignment
    xp = default_array_module()
    frames = to_device(read_movie(req.movie_path, eer_frames_per_fraction=fa.eer_frames_per_fraction),
                       xp).astype(xp.float32)
    if req.gain_path:
        gain = to_device(read_gain_reference(req.gain_path), xp)
        if gain.shape != frames.shape[1:] and gain.shape[::-1] != frames.shape[1:]:
            raise ValueError(f"{req.gain_path}: gain reference shape {gain.shape} does not match the movie "
                             f"{req.movie_path} frames {frames.shape[1:]}; check gain_reference.rotation_deg")
        frames = apply_gain(frames, gain, rotation_deg=s.gain_reference.rotation_deg, flip=s.gain_reference.flip)
    defects = find_defect_pixels(frames)
    frames = replace_defect_pixels(frames, defects)
    t_read = time.perf_counter()
    n_frames = frames.shape[0]
    dose = req.dose_e_per_angstrom2 or mic.dose_per_tilt_e_per_angstrom2
    prior = req.prior_dose_e_per_angstrom2
    if prior is None:
        prior = (req.acquisition_index or 0) * dose
    al = align_frames(frames, pixel_size_angstrom=mic.pixel_size_angstrom,
                      dose_per_frame_e_per_angstrom2=dose / n_frames, pre_exposure_e_per_angstrom2=prior,
                      bfactor_angstrom2=fa.bfactor_angstrom2, voltage_kv=mic.voltage_kv,
                      max_iterations=fa.max_iterations, max_total_motion_angstrom=fa.max_total_motion_angstrom,
                      patches_yx=tuple(fa.patches_yx) if fa.patches_yx else None)
    t_align = time.perf_counter()
    px = mic.pixel_size_angstrom
    sums = {"aligned_sum": al.aligned_sum, "dose_weighted_sum": al.dose_weighted_sum,
            "even_sum": al.even_sum, "odd_sum": al.odd_sum}
    out_px = fa.output_pixel_size_angstrom or px
    if out_px > px:
        ny, nx = al.aligned_sum.shape
        shape = (int(round(ny * px / out_px)) // 2 * 2, int(round(nx * px / out_px)) // 2 * 2)
        sums = {k: fourier_crop(v, shape) for k, v in sums.items()}
        out_px = px * ny / shape[0]
    g = _group(req.zarr_path, f"movies/{req.movie}")
    host = {name: to_numpy(arr) for name, arr in sums.items()}
    host["shifts_px"] = np.asarray(to_numpy(al.shifts_px), dtype=np.float32)
    # the sums are compressed and written in threads while the CTF is estimated (on the GPU when there is one)
    with ThreadPoolExecutor(max_workers=len(host)) as writers:
        written = [writers.submit(write_array, g, name, arr, pixel_size_angstrom=px if name == "shifts_px" else out_px)
                   for name, arr in host.items()]
        spectra = strip_spectra(al.aligned_sum, tilt_angle_deg=req.tilt_angle_deg,
                                **_spectra_options(s, pixel_size_angstrom=px, shape_yx=al.aligned_sum.shape))
        ctf = estimate_ctf_from_spectra(spectra, **_ctf_fit_options(s))
        t_ctf = time.perf_counter()
        for w in written:
            w.result()
    _write_strip_spectra(g, spectra)
    write_array(g, "ctf_spectrum", ctf.spectrum_yx,
                max_frequency_per_angstrom=ctf.spectrum_max_frequency_per_angstrom)
    write_array(g, "ctf_profile", np.stack([ctf.profile_frequency_per_angstrom, ctf.profile_data,
                                            ctf.profile_model]).astype(np.float32))
    return {
        "movie": req.movie,
        "tilt_series": req.tilt_series,
        "acquisition_index": req.acquisition_index,
        "tilt_angle_deg": req.tilt_angle_deg,
        "dose_e_per_angstrom2": dose,
        "prior_dose_e_per_angstrom2": prior,
        "n_frames": n_frames,
        "pixel_size_angstrom": out_px,
        "mean_e_per_px": float(host["aligned_sum"].mean()),  # Fourier cropping keeps the mean
        "n_defect_pixels": int(to_numpy(defects).sum()),
        "total_motion_px": float(al.total_motion_px),
        "early_motion_px": float(al.early_motion_px),
        "late_motion_px": float(al.late_motion_px),
        "motion_quality": str(al.quality),
        "defocus_u_angstrom": ctf.defocus_u_angstrom,
        "defocus_v_angstrom": ctf.defocus_v_angstrom,
        "defocus_angstrom": ctf.defocus_angstrom,
        "astigmatism_angstrom": ctf.astigmatism_angstrom,
        "astigmatism_angle_deg": ctf.astigmatism_angle_deg,
        "phase_shift_deg": ctf.phase_shift_deg,
        "ctf_score": ctf.score,
        "ctf_fit_resolution_angstrom": ctf.fit_resolution_angstrom,
        "seconds_read": t_read - t0,
        "seconds_motion": t_align - t_read,
        "seconds_ctf": t_ctf - t_align,
        "seconds": time.perf_counter() - t0,
        "backend": xp.__name__,
    }


def process_tilt_series(req: TiltSeriesRequest, *movies: dict) -> dict:
    """Exclude bad tilts, align, reconstruct, pick particles and make thumbnails.

    Parameters
    ----------
    req
        The tilt-series.
    *movies
        Metrics records of its successfully processed movies (results of
        :func:`process_movie`, passed as Dask futures by the coordinator).

    Returns
    -------
    dict
        Metrics of the tilt-series, including per-tilt lists.
    """
    from tomodask.io.imod import write_alignment
    from tomodask.io.mrc import write_mrc
    from tomodask.kernels.ctf_series import refine_series_ctf
    from tomodask.kernels.fourier import fourier_crop
    from tomodask.kernels.picking import overlay_picks, pick_particles
    from tomodask.kernels.reconstruct import reconstruct_tomogram
    from tomodask.kernels.thumbnails import tomogram_thumbnails
    from tomodask.kernels.tilt_align import align_tilt_series, apply_alignment

    t0 = time.perf_counter()
    s = SessionSettings.model_validate_json(req.settings_json)
    mic, p = s.microscope, s.processing
    if len(movies) < 3:
        raise ValueError(f"tilt-series {req.tilt_series} has {len(movies)} processed tilts; at least 3 are needed")
    movies = sorted(movies, key=lambda m: m["tilt_angle_deg"])
    root = zarr.open_group(LocalStore(req.zarr_path), mode="r")
    xp = default_array_module()
    sums = "dose_weighted_sum" if s.processing.frame_alignment.dose_weighting else "aligned_sum"
    with ThreadPoolExecutor(max_workers=min(16, len(movies))) as readers:  # decompression releases the GIL
        stack = xp.stack([to_device(a, xp) for a in readers.map(lambda m: root[f"movies/{m['movie']}/{sums}"][...],
                                                                  movies)])
    t_read = time.perf_counter()
    angles = np.array([m["tilt_angle_deg"] for m in movies])
    px = float(movies[0]["pixel_size_angstrom"])
    axis_nominal = mic.tilt_axis_angle_deg
    if req.mdoc_path and s.raw_data.use_mdoc:
        from tomodask.io.mdoc import read_mdoc

        axis_mdoc = read_mdoc(req.mdoc_path).tilt_axis_angle_deg
        axis_nominal = axis_mdoc if axis_mdoc is not None else axis_nominal
    ta = p.tilt_series_alignment
    rec = p.reconstruction
    user = tuple(i for i, m in enumerate(movies) if m.get("acquisition_index") in set(ta.exclude_tilt_indices))
    al = align_tilt_series(stack, angles, pixel_size_angstrom=px, tilt_axis_angle_deg=axis_nominal,
                           alignment_pixel_size_angstrom=ta.alignment_pixel_size_angstrom,
                           specimen_thickness_angstrom=rec.thickness_angstrom,
                           motion_px=np.array([m["total_motion_px"] for m in movies]),
                           ctf_fit_resolution_angstrom=np.array([m["ctf_fit_resolution_angstrom"] for m in movies]),
                           user_excluded=user, refine_tilt_axis=ta.refine_tilt_axis,
                           n_projection_matching_iterations=ta.refinement_iterations,
                           estimate_tilt_angle_offset=ta.refine_tilt_angle_offset)
    t_align = time.perf_counter()
    write_alignment(req.alignment_dir, req.tilt_series, shifts_px=al.shifts_px,
                    tilt_axis_angle_deg=al.tilt_axis_angle_deg, tilt_angles_deg=al.tilt_angles_deg,
                    tilt_angle_offset_deg=al.tilt_angle_offset_deg, excluded=al.excluded)
    shifts_full_px = np.asarray(al.shifts_px, dtype=float)
    # the series' astigmatism from its best tilts; weak tilts refitted with it
    series_ctf = refine_series_ctf(
        _StoredSpectra(root, movies, s, xp), angles,
        *(np.array([m[k] for m in movies], dtype=float) for k in
          ("defocus_u_angstrom", "defocus_v_angstrom", "astigmatism_angle_deg", "ctf_fit_resolution_angstrom")),
        fit_options=_ctf_fit_options(s))
    t_ctf = time.perf_counter()

    rec = p.reconstruction
    use = ~np.asarray(al.excluded)
    factor = max(rec.pixel_size_angstrom / px, 1.0)
    shape = tuple(int(round(n / factor)) // 2 * 2 for n in stack.shape[1:])
    rec_stack, rec_px = fourier_crop(stack, shape), px * stack.shape[1] / shape[0]
    aligned = apply_alignment(rec_stack[use], shifts_px=shifts_full_px[use] * px / rec_px,
                              tilt_axis_angle_deg=al.tilt_axis_angle_deg)
    defocus = series_ctf.defocus_angstrom[use] if rec.ctf_phase_flip else None
    dose = (np.array([m["prior_dose_e_per_angstrom2"] + m["dose_e_per_angstrom2"] / 2 for m in movies])[use]
            if rec.dose_weighting else None)
    thickness_px = int(round(rec.thickness_angstrom / rec_px)) // 2 * 2
    tomo = reconstruct_tomogram(aligned, np.asarray(al.tilt_angles_deg)[use], pixel_size_angstrom=rec_px,
                                thickness_px=thickness_px, weighting=rec.weighting,
                                sirt_like_iterations=rec.sirt_like_iterations, defocus_angstrom=defocus,
                                voltage_kv=mic.voltage_kv, spherical_aberration_mm=mic.spherical_aberration_mm,
                                amplitude_contrast=mic.amplitude_contrast, dose_e_per_angstrom2=dose)
    t_rec = time.perf_counter()
    tomo_np = to_numpy(tomo).astype(np.float32)
    Path(req.tomogram_dir).mkdir(parents=True, exist_ok=True)
    pk = p.picking
    picks = None
    with ThreadPoolExecutor(max_workers=2) as writers:  # the tomogram files are written while particles are picked
        files = [writers.submit(write_ome_zarr, Path(req.tomogram_dir) / f"{req.tilt_series}.ome.zarr", tomo_np,
                                pixel_size_angstrom=rec_px),
                 writers.submit(write_mrc, Path(req.tomogram_dir) / f"{req.tilt_series}.mrc", tomo_np,
                                pixel_size_angstrom=rec_px)]
        if pk.enabled:
            template = None
            if pk.method == "template":
                from tomodask.io.mrc import read_mrc

                template, _ = read_mrc(pk.template_path)
            picks = pick_particles(tomo, pixel_size_angstrom=rec_px,
                                   particle_radius_angstrom=pk.particle_radius_angstrom, method=pk.method,
                                   min_distance_angstrom=pk.min_distance_angstrom, threshold=pk.threshold,
                                   template_zyx=template, angular_step_deg=pk.angular_step_deg,
                                   slab_mask=pk.mask_outside_slab)
        t_pick = time.perf_counter()
        for f in files:
            f.result()
    thumbs = tomogram_thumbnails(tomo_np)
    g = _group(req.zarr_path, f"tilt_series/{req.tilt_series}")
    write_array(g, "aligned_stack", to_numpy(aligned), pixel_size_angstrom=rec_px)
    write_array(g, "thumbnail_xy", thumbs.xy)
    write_array(g, "thumbnail_xz", thumbs.xz)
    if picks is not None:
        write_array(g, "picks_zyx_px", np.asarray(picks.coordinates_zyx_px, dtype=np.float32).reshape(-1, 3),
                    pixel_size_angstrom=rec_px)
        write_array(g, "pick_scores", np.asarray(picks.scores, dtype=np.float32).reshape(-1))
        write_array(g, "thumbnail_picks_rgb", overlay_picks(tomo_np, picks))
    residual = np.asarray(al.residual_px, dtype=float)
    return {
        "tilt_series": req.tilt_series,
        "n_tilts": len(movies),
        "n_tilts_used": int(use.sum()),
        "failed_movies": list(req.failed_movies),
        "movies": [m["movie"] for m in movies],
        "tilt_angles_deg": [float(a) for a in al.tilt_angles_deg],
        "excluded": [bool(e) for e in al.excluded],
        "exclusion_reason": list(al.exclusion_reason),
        "shifts_px": np.nan_to_num(shifts_full_px).tolist(),
        "residual_px": np.nan_to_num(residual, nan=-1.0).tolist(),
        "mean_residual_px": float(np.nanmean(residual[use])) if use.any() else float("nan"),
        "tilt_axis_angle_deg": float(al.tilt_axis_angle_deg),
        "tilt_axis_angle_nominal_deg": float(axis_nominal),
        "tilt_angle_offset_deg": float(al.tilt_angle_offset_deg),
        "alignment_pixel_size_angstrom": float(al.alignment_pixel_size_angstrom),
        "specimen_z_offset_angstrom": float(al.specimen_z_offset_angstrom),
        "specimen_z_uncertainty_angstrom": (float(al.specimen_z_uncertainty_angstrom)
                                            if np.isfinite(al.specimen_z_uncertainty_angstrom) else None),
        "centring_warning": al.centring_warning,
        "alignment_warning": al.alignment_warning,
        "alignment_correlation": np.nan_to_num(np.asarray(al.correlation, dtype=float)).tolist(),
        "tomogram_pixel_size_angstrom": rec_px,
        "tomogram_shape_zyx": list(tomo_np.shape),
        "n_picks": 0 if picks is None else int(len(picks.scores)),
        "pick_threshold": None if picks is None else float(picks.threshold_used),
        "picks_xyz_angstrom": [] if picks is None else np.asarray(picks.coordinates_xyz_angstrom).tolist(),
        "mean_defocus_angstrom": float(np.mean(series_ctf.defocus_angstrom)),
        "ctf_defocus_u_angstrom": series_ctf.defocus_u_angstrom.tolist(),
        "ctf_defocus_v_angstrom": series_ctf.defocus_v_angstrom.tolist(),
        "ctf_astigmatism_angle_deg": series_ctf.astigmatism_angle_deg.tolist(),
        "ctf_fit_resolution_angstrom": series_ctf.fit_resolution_angstrom.tolist(),
        "ctf_reference_tilt": series_ctf.reference.tolist(),
        "ctf_refitted": series_ctf.refitted.tolist(),
        "ctf_series_astigmatism_angstrom": series_ctf.astigmatism_angstrom,
        "ctf_series_astigmatism_angle_deg": series_ctf.astigmatism_angle_deg_series,
        "ctf_reference_defocus_angstrom": series_ctf.reference_defocus_angstrom,
        "seconds_read": t_read - t0,
        "seconds_alignment": t_align - t_read,
        "seconds_ctf_refinement": t_ctf - t_align,
        "seconds_reconstruction": t_rec - t_ctf,
        "seconds_picking": t_pick - t_rec,
        "seconds": time.perf_counter() - t0,
        "backend": xp.__name__,
    }
