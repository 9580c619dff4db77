"""Bluesky plans for BCDI."""

from __future__ import annotations

import threading
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus

from .callback import BCDIReconstructionCallback


def rocking_scan(detector: Any, motor: Any, centre: float, width: float, num: int, *,
                 md: dict | None = None, **bcdi_metadata: Any):
    """A rocking curve: ``num`` frames with ``motor`` from ``centre - width/2`` to
    ``centre + width/2``, with the metadata the reconstruction callback records.

    Parameters
    ----------
    detector : ophyd device
        The area detector (its image key is ``<name>_image``).
    motor : ophyd positioner
        The rocking motor.
    centre, width : float
        Rocking range (motor units, degrees for an angle).
    num : int
        Number of frames.
    md : dict, optional
        Extra start-document metadata.
    **bcdi_metadata
        Geometry when known (``energy_kev``, ``detector_distance_m``, ``pixel_size_m``,
        ``bragg_angle_deg``, ``hkl``...), stored under ``md["bcdi"]``.
    """
    if num < 2:
        raise ValueError(f"a rocking scan needs at least 2 frames, got {num}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    step = width / (num - 1)
    start = centre - step * (num // 2)
    stop = start + step * (num - 1)
    meta = {"plan_name": "rocking_scan",
            "bcdi": {"rocking_motor": motor.name, "detector": detector.name,
                     "rocking_step": step, "rocking_centre": centre, **bcdi_metadata},
            **(md or {})}
    return (yield from bp.scan([detector], motor, start, stop, num, md=meta))


class ReconstructionAnalysis(Device):
    """An ophyd face of the reconstruction callback, for plans.

    ``trigger()`` returns a Status that finishes when the callback has processed every scan
    so far; the signals then hold the latest scan's recommendation and chi. A plan waits on it
    with ``bps.trigger(analysis, wait=True)`` and reads it with ``bps.rd``: only the plan moves
    devices.
    """

    theta_center = Cpt(Signal, value=float("nan"))
    theta_range = Cpt(Signal, value=float("nan"))
    exposure = Cpt(Signal, value=float("nan"))
    peak_inside = Cpt(Signal, value=False)
    saturated = Cpt(Signal, value=False)
    chi = Cpt(Signal, value=float("nan"))
    scan_uid = Cpt(Signal, value="")

    def __init__(self, *args: Any, callback: BCDIReconstructionCallback,
                 timeout: float = 300.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback = callback
        self.timeout = timeout

    def trigger(self) -> DeviceStatus:
        """Finish when the callback is idle, with the latest scan's figures in the signals."""
        status = DeviceStatus(self, timeout=self.timeout + 5)

        def wait() -> None:
            if not self.callback.wait(self.timeout):
                status.set_exception(TimeoutError(
                    f"reconstruction not finished within {self.timeout} s"))
                return
            record = self.callback.latest()
            rec = record.recommendation if record is not None else None
            if rec is None:
                status.set_exception(RuntimeError(
                    "no recommendation: " + (record.message if record else "no scan yet")))
                return
            self.theta_center.put(rec.theta_center)
            self.theta_range.put(rec.theta_range)
            self.exposure.put(rec.exposure)
            self.peak_inside.put(rec.peak_inside)
            self.saturated.put(rec.saturated)
            self.chi.put(float(record.result.chi) if record.result is not None else float("nan"))
            self.scan_uid.put(record.uid)
            status.set_finished()

        threading.Thread(target=wait, name="bcdi-analysis-trigger", daemon=True).start()
        return status


def closed_loop_scan(detector: Any, motor: Any, analysis: ReconstructionAnalysis,
                     centre: float, width: float, num: int, *, max_iterations: int = 4,
                     tolerance_steps: float = 2.0, adjust_range: bool = False,
                     md: dict | None = None):
    """Scan, wait for the analysis, re-centre (and re-expose), until the scan is right.

    Each iteration runs :func:`rocking_scan`, waits for the reconstruction through
    ``analysis``, then moves the next scan's centre to the recommended one and sets the
    detector's exposure to the recommended one (``detector.exposure``). It stops when the
    Bragg peak is inside the range, nothing saturated, and the centre moved by at most
    ``tolerance_steps`` rocking steps.

    The range stays ``width`` unless ``adjust_range``: the rocking step sets the q sampling
    along the rocking axis, which the reconstruction expects unchanged.

    Returns
    -------
    list of dict
        Per iteration: scan uid, centre, exposure, peak_inside, saturated, chi.
    """
    history = []
    step = width / (num - 1)
    for i in range(max_iterations):
        exposure = yield from bps.rd(detector.exposure)
        yield from rocking_scan(detector, motor, centre, width, num,
                                md={"closed_loop_iteration": i, **(md or {})})
        yield from bps.trigger(analysis, wait=True)
        rec = {}
        for name in ("theta_center", "theta_range", "exposure", "peak_inside", "saturated",
                     "chi", "scan_uid"):
            rec[name] = yield from bps.rd(getattr(analysis, name))
        history.append({"iteration": i, "centre": centre, "exposure": exposure, **rec})
        converged = (rec["peak_inside"] and not rec["saturated"]
                     and abs(rec["theta_center"] - centre) <= tolerance_steps * step)
        if converged:
            break
        centre = float(rec["theta_center"])
        if adjust_range and np.isfinite(rec["theta_range"]):
            width = float(rec["theta_range"])
            step = width / (num - 1)
        if np.isfinite(rec["exposure"]):
            yield from bps.mv(detector.exposure, float(rec["exposure"]))
    return history
