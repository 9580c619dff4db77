"""The beamline face: Bluesky callback, plans and the simulated BCDI beamline."""

from .callback import BCDIReconstructionCallback, ScanRecord
from .plans import rocking_scan
from .sim import BCDIDetector, HiddenCrystal, SimulatedBeamline

__all__ = ["BCDIDetector", "BCDIReconstructionCallback", "HiddenCrystal", "ScanRecord",
           "SimulatedBeamline", "rocking_scan"]
