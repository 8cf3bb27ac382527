"""``tomodask demo``: a simulated microscope streams tilt-series while a session processes them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from tomodask.settings import SessionSettings
from tomodask.simulate.microscope import AcquisitionSpec
from tomodask.simulate.writer import SIZE_PRESETS, write_session


def settings_for_simulation(location: Path, *, size: str = "tiny", name: str = "demo",
                            transfer_method: str = "move", **spec_fields) -> SessionSettings:
    """Session settings that match a simulated acquisition (pixel size, tilts, gain, optics).

    Parameters
    ----------
    location
        The simulated microscope folder (``raw_data.location``).
    size
        Size preset of the simulation (:data:`tomodask.simulate.writer.SIZE_PRESETS`).
    name
        Session name.
    transfer_method
        ``move``, ``copy`` or ``link``.
    **spec_fields
        The same :class:`~tomodask.simulate.AcquisitionSpec` overrides given to the simulator.

    Returns
    -------
    SessionSettings
    """
    spec = AcquisitionSpec(**{**SIZE_PRESETS[size], **spec_fields})
    s = SessionSettings()
    s.session.name = name
    s.raw_data.location = Path(location)
    s.gain_reference.path = Path(location) / "gain.mrc"
    s.microscope.pixel_size_angstrom = spec.pixel_size_angstrom
    s.microscope.voltage_kv = int(spec.voltage_kv)
    s.microscope.spherical_aberration_mm = spec.spherical_aberration_mm
    s.microscope.amplitude_contrast = spec.amplitude_contrast
    s.microscope.tilt_axis_angle_deg = spec.recorded_tilt_axis_angle_deg
    s.microscope.dose_per_tilt_e_per_angstrom2 = spec.dose_per_tilt_e_per_angstrom2
    s.collection.tilts_per_tilt_series = len(spec.nominal_tilt_angles_deg)
    s.collection.transfer_method = transfer_method
    s.collection.file_stable_s = 1.0
    field_of_view_angstrom = min(spec.shape_yx) * spec.pixel_size_angstrom
    s.processing.tilt_series_alignment.alignment_pixel_size_angstrom = max(
        spec.pixel_size_angstrom, field_of_view_angstrom / 128)
    s.processing.reconstruction.pixel_size_angstrom = max(spec.pixel_size_angstrom, field_of_view_angstrom / 128)
    s.processing.reconstruction.thickness_angstrom = spec.thickness_angstrom * 1.5
    s.processing.picking.particle_radius_angstrom = spec.particle_radius_angstrom
    s.processing.ctf.tile_size_px = 256 if min(spec.shape_yx) < 1024 else 512
    return s


def run_demo(data_root: Path, *, n_tilt_series: int = 2, size: str = "tiny", seconds_per_tilt: float = 0.5,
             transfer_method: str = "move", timeout_s: float = 1800.0, name: str = "demo") -> dict:
    """Stream a simulated session into a folder while a tomodask session processes it.

    Returns
    -------
    dict
        Progress counts and, per tilt-series, the recovered tilt axis against the truth.
    """
    from tomodask.session.api import create_session, list_sessions, open_session
    from tomodask.session.store import Store

    store = Store(data_root)
    microscope = store.data_root / f"{name}-microscope"
    microscope.mkdir(parents=True, exist_ok=True)
    if name in list_sessions(store):
        open_session(name, store=store).delete()
    session = create_session(settings_for_simulation(microscope, size=size, name=name,
                                                     transfer_method=transfer_method), store=store)
    writer = threading.Thread(target=write_session, args=(microscope,),
                              kwargs=dict(n_tilt_series=n_tilt_series, size=size, seconds_per_tilt=seconds_per_tilt),
                              daemon=True)
    writer.start()
    ok = session.run(expected_tilt_series=n_tilt_series, timeout_s=timeout_s)
    writer.join(timeout=5)
    report = {"ok": ok, "session": name, "folder": str(session.layout.root), **session.progress(), "tilt_series": {}}
    for ts in session.tilt_series().itertuples():
        truth = json.loads((microscope / "truth" / f"{ts.name}.json").read_text())
        m = session.tilt_series_metrics(ts.name)
        report["tilt_series"][ts.name] = {
            "state": ts.state,
            "tilt_axis_angle_deg": m.get("tilt_axis_angle_deg"),
            "true_tilt_axis_angle_deg": truth["spec"]["tilt_axis_angle_deg"],
            "mean_residual_px": m.get("mean_residual_px"),
            "n_picks": m.get("n_picks"),
            "true_particles": len(truth["phantom"]["particle_centers_xyz_angstrom"]),
            "defocus_error_angstrom_median": _defocus_error(session, truth),
            "seconds": m.get("seconds"),
        }
    return report


def _defocus_error(session, truth: dict) -> float | None:
    movies = session.movies()
    if "defocus_angstrom" not in movies:
        return None
    true = {Path(t["movie"]).stem: 0.5 * (t["defocus_u_angstrom"] + t["defocus_v_angstrom"]) for t in truth["tilts"]}
    err = [abs(r.defocus_angstrom - true[r.name]) for r in movies.itertuples() if r.name in true
           and r.defocus_angstrom == r.defocus_angstrom]
    return float(np.median(err)) if err else None
