"""The beamline face: Bluesky callback, plans and the simulated BCDI beamline."""

from .adaptive import ExtremumSeekingOptimizer
from .callback import BCDIReconstructionCallback, ScanRecord
from .plans import ReconstructionAnalysis, closed_loop_scan, es_align, rocking_scan
from .publishers import (
    CallablePublisher,
    DerivedRunPublisher,
    Publisher,
    ResultConsumer,
    ResultFileWriter,
    as_publisher,
)
from .recommend import Recommendation, recommend
from .sim import BCDIDetector, HiddenCrystal, SimulatedBeamline

__all__ = [
    "BCDIDetector",
    "BCDIReconstructionCallback",
    "CallablePublisher",
    "DerivedRunPublisher",
    "ExtremumSeekingOptimizer",
    "HiddenCrystal",
    "Publisher",
    "Recommendation",
    "ReconstructionAnalysis",
    "ResultConsumer",
    "ResultFileWriter",
    "ScanRecord",
    "SimulatedBeamline",
    "as_publisher",
    "closed_loop_scan",
    "es_align",
    "recommend",
    "rocking_scan",
]
