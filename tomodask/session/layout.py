"""Where a session keeps its files.

::

    SESSION/
      settings.yaml              the session's settings, saved at every change
      raw/                       transferred movies, copies of the mdoc files, the gain reference
      results.zarr/              zarr v3 group
        movies/<movie>/          aligned_sum (y, x), dose_weighted_sum, even_sum, odd_sum,
                                 shifts_px (t, 2), ctf_spectrum (diagnostic image),
                                 ctf_strip_spectra (strips, y, x) tile power spectra
        tilt_series/<ts>/        aligned_stack (t, y, x) at the alignment pixel size,
                                 thumbnail_xy, thumbnail_xz (uint8), picks_zyx_px (n, 3),
                                 pick_scores (n,), thumbnail_picks_rgb (h, w, 3) uint8
                                 (picks drawn on the central slab)
      tomograms/<ts>.ome.zarr    the tomogram as OME-Zarr (multiscale)
      tomograms/<ts>.mrc         the same as MRC
      alignment/<ts>.xf, .tlt    IMOD alignment files
      exports/                   STAR and other exports

Arrays are float32 unless said otherwise; array attributes carry the pixel size in Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr
from zarr.storage import LocalStore


@dataclass(frozen=True)
class SessionLayout:
    """Paths of one session folder (see the module docstring)."""

    root: Path

    @property
    def settings_path(self) -> Path:
        """The saved settings."""
        return self.root / "settings.yaml"

    @property
    def raw_dir(self) -> Path:
        """Transferred raw data."""
        return self.root / "raw"

    @property
    def zarr_path(self) -> Path:
        """The results zarr group."""
        return self.root / "results.zarr"

    @property
    def tomogram_dir(self) -> Path:
        """Tomograms (OME-Zarr and MRC)."""
        return self.root / "tomograms"

    @property
    def alignment_dir(self) -> Path:
        """IMOD alignment files."""
        return self.root / "alignment"

    @property
    def export_dir(self) -> Path:
        """Exports."""
        return self.root / "exports"

    def movie_group(self, movie: str) -> str:
        """Path of a movie's group inside the results zarr."""
        return f"movies/{movie}"

    def tilt_series_group(self, tilt_series: str) -> str:
        """Path of a tilt-series' group inside the results zarr."""
        return f"tilt_series/{tilt_series}"

    def tomogram_zarr(self, tilt_series: str) -> Path:
        """OME-Zarr tomogram of a tilt-series."""
        return self.tomogram_dir / f"{tilt_series}.ome.zarr"

    def tomogram_mrc(self, tilt_series: str) -> Path:
        """MRC tomogram of a tilt-series."""
        return self.tomogram_dir / f"{tilt_series}.mrc"

    def create(self) -> None:
        """Make the folders and the top-level zarr groups (before any task writes into them)."""
        for d in (self.raw_dir, self.tomogram_dir, self.alignment_dir, self.export_dir):
            d.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(LocalStore(self.zarr_path), mode="a")
        root.require_group("movies")
        root.require_group("tilt_series")

    def results(self, *, mode: str = "r") -> zarr.Group:
        """Open the results zarr group."""
        return zarr.open_group(LocalStore(self.zarr_path, read_only=mode == "r"), mode=mode)
