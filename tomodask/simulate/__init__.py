"""The synthetic microscope: data with known ground truth, written as a microscope writes it."""

from tomodask.simulate.microscope import (
    AcquisitionSpec,
    Detector,
    SimulatedTilt,
    SimulatedTiltSeries,
    TiltSeriesAcquisition,
    TiltTruth,
    dose_symmetric_order,
    simulate_single_tilt,
    simulate_tilt_series,
)
from tomodask.simulate.phantom import Phantom, make_phantom

__all__ = [
    "AcquisitionSpec",
    "Detector",
    "Phantom",
    "SimulatedTilt",
    "SimulatedTiltSeries",
    "TiltSeriesAcquisition",
    "TiltTruth",
    "dose_symmetric_order",
    "make_phantom",
    "simulate_single_tilt",
    "simulate_tilt_series",
]
