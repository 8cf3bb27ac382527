"""Fiducial-less tilt-series alignment: shifts, tilt axis, tilt-angle offset, specimen height.

Steps of :func:`align_tilt_series`, all on a stack Fourier-binned to the alignment pixel
size (about 1/128 of the field of view):

1. **Exclusion.** :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts` drops dark,
   blank, drifting and CTF-failed tilts and those the user excluded. The fall of the
   median intensity with tilt gives the ice thickness and the tilt-angle offset that
   makes it symmetric (:func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`);
   all later steps use the offset angles.
2. **Coarse shifts** (:func:`coarse_align_shifts`, :mod:`.correlate`). Outwards from the
   tilt nearest 0°, each tilt is cross-correlated with the sum of its nearest
   already-aligned neighbours, each stretched by ``cos(theta_j) / cos(theta_i)``
   perpendicular to the axis and moved by its shift (IMOD ``tiltxcorr``'s cumulative
   correlation [1]_). The peak is searched in a disc around the neighbour's shift whose
   radius grows with ``|sin(theta)|``; a peak not clearly above the next best one (peak
   ratio) or a weak correlation marks the tilt as unreliable: it is not used as a
   reference. This chain follows the strongest layer of the specimen (gold on one
   surface), so its rotation centre sits on that layer.
3. **Tilt axis.** Common lines (:func:`refine_tilt_axis_angle`, :mod:`.axis`) bring the
   nominal axis within a degree or two; then the 3D-feature model
   (:func:`refine_with_features`, :mod:`.features`, step 5) measures the residual rotation
   from how strong features of the reconstruction move along the axis with their position
   across it ("local common lines"), iterated with secant steps (the coarse shifts are
   redone when the axis has moved). When the common-line score is highest at the edge of
   its search (it still rises there: the maximum is not bracketed, and on a thick
   specimen with few beads it can fall towards the true axis), steps 2-7 run again from
   three starting axes across the search range (the nominal one and half the range either
   side, the feature model alone refining each), and the alignment whose usable tilts
   correlate best (median) with their leave-one-out reprojections is kept.
4. **Neighbour pass and second chance.** Every reliable tilt is correlated once more with
   its two aligned neighbours; a tilt the chain could not place is correlated with the
   reprojection, at its angle, of the weighted back-projection of all aligned tilts
   (which holds a thick specimen's parallax), searched around its neighbours' shifts, and
   excluded with reason ``"alignment failed (...)"`` if that peak is ambiguous or weak.
   With gold, such a tilt is searched once more against the reprojection of the balls
   around the beads of that reconstruction (where beads of the two surfaces cross, the
   layers' peaks compete in the other references); a clear peak places it
   (:func:`~tomodask.kernels.tilt_align.placement._placed_by_beads`). Before that, the two
   sides of the tilt range are put at one height (:mod:`.sides`): near 0° the layers of a
   thick specimen merge, and each side's chain may lock onto a different layer further
   out, which leaves one side off by ``dz sin(theta)`` (tens of pixels) with low
   residuals; the energies of the two one-sided reconstructions, correlated along z, give
   ``dz``.
5. **Global consistency** (:func:`refine_with_features`). Strong 3D features of the
   reconstruction (gold beads, compact particles; streaks of gold rejected) are followed
   through the tilts and fitted, like IMOD ``tiltalign``'s fiducials, with a shift per
   tilt, a position per feature and the axis. This corrects what neighbour correlations
   cannot see, e.g. a chain that follows gold on one side of the series and other
   structure on the other. It only looks a few pixels around each feature, so with gold
   (found when the specimen was first centred) each tilt is then placed once more by the
   beads alone (:func:`.checks._feature_placements`): the reprojection of balls around
   the strongest features of the reconstruction, searched as widely as the chain's links.
   With gold on both surfaces of a thick specimen the chain can lock onto the other bead
   layer where beads of the two layers cross (their separation across the axis changes
   by ``dz (sin theta_i - sin theta_j)`` between tilts), and every tilt beyond follows
   that layer, off by tens of pixels but consistent with its neighbours. Such tilts are
   moved to where the beads put them, the tilts beyond take the move extrapolated in
   ``sin(theta)``, and the passes run again; a tilt still far off after the last round
   is excluded as ``"alignment failed (...)"``. A single wrong link (the true place beyond
   the link's and the beads' search, or their peaks not clear) leaves one tilt or a few
   tens of pixels off between right neighbours; with gold such a tilt correlates with its
   leave-one-out reprojection far below its neighbours, and is searched again in the
   reprojection of the others (:mod:`.weak_tilts`): moved where it correlates much better
   when its neighbours' correlations rise too, in rounds until none moves; tilts still
   moving after the last round are reported (the alignment is broken elsewhere).
6. **Specimen geometry** (:func:`specimen_geometry`, :mod:`.specimen`). A thick
   reconstruction gives the specimen's mid-plane: halfway between gold beads on both
   surfaces (their heights from the parallax between opposite tilts); with beads on one
   surface, that surface (bead layer plus the bead radius measured on a projection) and
   half the Beer-Lambert thickness; else where the structure is. The shifts change by
   ``z0 sin(theta)`` across the axis, which puts the rotation centre on the mid-plane; the
   tilt nearest 0° keeps zero displacement (the field the operator chose).
7. **Residuals and failure detection.** Leave-one-out reprojections
   (:func:`leave_one_out_reprojections`, :mod:`.reprojection`) give each tilt's
   correlation (and judge the tilts placed in step 4); ``residual_px`` is each tilt's
   distance from the 3D-feature model after the final pass. Without gold, each tilt's link
   to its neighbour towards 0° is checked once more: a weak one (low correlation, or a
   marginal one with an ambiguous peak) excludes that tilt and all beyond it, which were
   placed through it and which nothing else constrains across the axis. The tilts excluded
   as failed are then checked outwards, innermost first, against the reprojection at their
   angle of the kept tilts (low-passed twice as much: a thick specimen's parallax between
   tilts 3° apart keeps only coarse detail); one whose clear peak confirms its position is
   kept again, the first that fails ends the walk. A confident link to the wrong layer
   passes that check and the tilts beyond it follow it: when the 3D-feature model of the
   kept tilts moves one of them by more than about an alignment pixel, its corrections
   re-place the kept tilts, round after round (one still that far off after the last round
   is excluded). Then the 3D-feature model measures the axis once more on the kept tilts
   only (the global passes saw the excluded runs), taken beyond sqrt(2) standard errors
   (where taking an unbiased estimate starts to help more than it hurts). When the kept
   tilts correlate only weakly with their leave-one-out reprojections, none of these
   checks can see a tilt on the wrong layer, nor the axis off: ``alignment_warning`` says
   so and names the high tilts. With gold, kept tilts the beads still put elsewhere (judged
   again at the final centre when it took the other side of a single bead layer), and kept
   tilts far from the 3D-feature model, are named there too.

Shifts follow :mod:`tomodask.kernels.geometry`: *displacements* ``(dy, dx)`` of each
image's content, in input pixels. :func:`apply_alignment` undoes them and rotates the
axis onto Y in one interpolation.

Modules, one job each: :mod:`.pipeline` runs the steps in order (:func:`align_tilt_series`) on
the state of :mod:`.state` (made by step 1; centring, gauge and the 3D-feature model on it),
through the stages of :mod:`.placement` (steps 2-6) and :mod:`.failures` (step 7).
:mod:`.warp` warps images (:func:`apply_alignment`); :mod:`.correlate` band-passes and
correlates them and builds the coarse chain; :mod:`.axis` scores tilt axes by common lines;
:mod:`.features` fits the 3D-feature model; :mod:`.reprojection` back-projects and reprojects;
:mod:`.specimen` finds the specimen slab; :mod:`.checks` holds the failure checks and
re-placements the stages use; :mod:`.result` the result and its gauge-free error.

References
----------
.. [1] Mastronarde, D. N. & Held, S. R. (2017). Automated tilt series alignment and
   tomographic reconstruction in IMOD. J. Struct. Biol. 197, 102-113.
.. [2] Zheng, S. et al. (2022). AreTomo: an integrated software package for automated
   marker-free, motion-corrected cryo-electron tomographic alignment and reconstruction.
   J. Struct. Biol. X 6, 100068 (projection matching, common-line axis search).
.. [3] Dengler, J. (1989). A multi-resolution approach to the 3D reconstruction from an
   electron microscope tilt series solving the alignment problem without gold particles.
   Ultramicroscopy 30, 337-348.
"""

from tomodask.kernels.tilt_align.axis import AxisSearch, common_line_score, refine_tilt_axis_angle
from tomodask.kernels.tilt_align.correlate import coarse_align_shifts
from tomodask.kernels.tilt_align.features import FeatureFit, refine_with_features
from tomodask.kernels.tilt_align.pipeline import align_tilt_series
from tomodask.kernels.tilt_align.reprojection import leave_one_out_reprojections
from tomodask.kernels.tilt_align.result import (
    TiltSeriesAlignment,
    gauge_free_residuals_px,
    gauge_free_shift_error_px,
)
from tomodask.kernels.tilt_align.specimen import SpecimenGeometry, specimen_geometry
from tomodask.kernels.tilt_align.warp import FILLS, apply_alignment

__all__ = [
    "FILLS",
    "AxisSearch",
    "FeatureFit",
    "SpecimenGeometry",
    "TiltSeriesAlignment",
    "align_tilt_series",
    "apply_alignment",
    "coarse_align_shifts",
    "common_line_score",
    "gauge_free_residuals_px",
    "gauge_free_shift_error_px",
    "leave_one_out_reprojections",
    "refine_tilt_axis_angle",
    "refine_with_features",
    "specimen_geometry",
]
