"""Bluesky plans for BCDI."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus

from ..physics import Geometry
from ..tuning import ExtremumSeeker
from .callback import BCDIReconstructionCallback


def rocking_scan(
    detector: Any,
    motor: Any,
    centre: float,
    width: float,
    num: int,
    *,
    md: dict | None = None,
    geometry: Geometry | dict | None = None,
    **bcdi_metadata: Any,
):
    """A rocking curve: ``num`` frames with ``motor`` ``width / (num - 1)`` apart, frame
    ``num // 2`` (the stored volume's central frame) at ``centre``, with the metadata the
    reconstruction callback records. The range is ``centre - width/2`` to ``centre + width/2``
    for an odd ``num``, one step lower at both ends for an even one.

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
    geometry : Geometry or dict, optional
        The diffraction geometry (keys of :class:`~bcdi_bluesky.physics.Geometry`), stored as
        ``md["bcdi"]["geometry"]`` with this scan's centre as the rocking circle's angle and
        its step as ``rocking_step_deg``: the reconstruction is then reported in nm, with
        displacement and strain.
    **bcdi_metadata
        More metadata stored under ``md["bcdi"]`` (sample name, hkl...).
    """
    if num < 2:
        raise ValueError(f"a rocking scan needs at least 2 frames, got {num}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    step = width / (num - 1)
    start = centre - step * (num // 2)
    stop = start + step * (num - 1)
    bcdi = {
        "rocking_motor": motor.name,
        "detector": detector.name,
        "rocking_step": step,
        "rocking_centre": centre,
        **bcdi_metadata,
    }
    if geometry is not None:
        g = geometry.to_dict() if isinstance(geometry, Geometry) else dict(geometry)
        g["sample_angles_deg"] = {
            **g.get("sample_angles_deg", {}),
            g.get("rocking_axis", "theta"): centre,
        }
        g["rocking_step_deg"] = step
        bcdi["geometry"] = Geometry.from_dict(g).to_dict()  # a bad geometry fails here, early
    meta = {"plan_name": "rocking_scan", "bcdi": bcdi, **(md or {})}
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

    def __init__(
        self,
        *args: Any,
        callback: BCDIReconstructionCallback,
        timeout: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.callback = callback
        self.timeout = timeout

    def trigger(self) -> DeviceStatus:
        """Finish when the callback is idle, with the latest scan's figures in the signals."""
        status = DeviceStatus(self, timeout=self.timeout + 5)

        def wait() -> None:
            if not self.callback.wait(self.timeout):
                status.set_exception(
                    TimeoutError(f"reconstruction not finished within {self.timeout} s")
                )
                return
            record = self.callback.latest()
            rec = record.recommendation if record is not None else None
            if rec is None:
                status.set_exception(
                    RuntimeError(
                        "no recommendation: " + (record.message if record else "no scan yet")
                    )
                )
                return
            self.theta_center.put(rec.theta_center)
            self.theta_range.put(rec.theta_range)
            self.exposure.put(rec.exposure)
            self.peak_inside.put(rec.peak_inside)
            self.saturated.put(rec.saturated)
            figures = record.figures or {}
            self.chi.put(float(figures.get("chi", float("nan"))))
            self.scan_uid.put(record.uid)
            status.set_finished()

        threading.Thread(target=wait, name="bcdi-analysis-trigger", daemon=True).start()
        return status


def closed_loop_scan(
    detector: Any,
    motor: Any,
    analysis: ReconstructionAnalysis,
    centre: float,
    width: float,
    num: int,
    *,
    max_iterations: int = 4,
    tolerance_steps: float = 2.0,
    adjust_range: bool = False,
    until_converged: bool = True,
    md: dict | None = None,
    geometry: Geometry | dict | None = None,
):
    """Scan, wait for the analysis, re-centre (and re-expose), until the scan is right.

    Each iteration runs :func:`rocking_scan`, waits for the reconstruction through
    ``analysis``, then moves the next scan's centre to the recommended one and sets the
    detector's exposure to the recommended one (``detector.exposure``). It stops when the
    Bragg peak is inside the range, nothing saturated, and the centre moved by at most
    ``tolerance_steps`` rocking steps (or, with ``until_converged=False``, goes on for
    ``max_iterations`` scans, following the sample).

    The range stays ``width`` unless ``adjust_range``: the rocking step sets the q sampling
    along the rocking axis, which the reconstruction expects unchanged.

    With ``geometry`` every scan records it (see :func:`rocking_scan`), and the
    reconstructions come in nm with displacement and strain.

    Returns
    -------
    list of dict
        Per iteration: the scan's centre, then the analysis' figures (recommended
        ``theta_center``, ``theta_range`` and ``exposure``, ``peak_inside``, ``saturated``,
        ``chi``, ``scan_uid``) and whether it ``converged``.
    """
    history = []
    step = width / (num - 1)
    for i in range(max_iterations):
        yield from rocking_scan(
            detector,
            motor,
            centre,
            width,
            num,
            md={"closed_loop_iteration": i, **(md or {})},
            geometry=geometry,
        )
        yield from bps.trigger(analysis, wait=True)
        rec = {}
        for name in (
            "theta_center",
            "theta_range",
            "exposure",
            "peak_inside",
            "saturated",
            "chi",
            "scan_uid",
        ):
            rec[name] = yield from bps.rd(getattr(analysis, name))
        history.append({"iteration": i, "centre": centre, **rec})
        converged = (
            rec["peak_inside"]
            and not rec["saturated"]
            and abs(rec["theta_center"] - centre) <= tolerance_steps * step
        )
        history[-1]["converged"] = bool(converged)
        if converged and until_converged:
            break
        centre = float(rec["theta_center"])
        if adjust_range and np.isfinite(rec["theta_range"]):
            width = float(rec["theta_range"])
            step = width / (num - 1)
        if np.isfinite(rec["exposure"]):
            yield from bps.mv(detector.exposure, float(rec["exposure"]))
    return history


def es_align(
    motors: Sequence[Any],
    bounds: Sequence[tuple[float, float]],
    objective: str,
    detectors: Sequence[Any],
    *,
    iterations: int = 300,
    gain: float = 4.0,
    dither: float = 0.05,
    decay: float = 0.999,
    log_objective: bool = True,
    seed: int = 0,
    md: dict | None = None,
):
    """Align by extremum seeking: move ``motors`` to maximise a measured ``objective``.

    One ES step is one measurement: the plan moves the motors to the optimiser's next point,
    triggers and reads ``detectors`` (one event each), and tells the optimiser the objective.
    Whatever the measurement does (noise, a spike, a NaN), a step never moves a motor by more
    than the ES step bound. At the end the motors go to the best point measured.

    Parameters
    ----------
    motors : sequence of ophyd positioners
        What to move.
    bounds : sequence of (low, high)
        Soft limits per motor; the optimiser never leaves them.
    objective : str
        Data key to maximise (for example ``"det_total"``).
    detectors : sequence of ophyd readables
        What to read at each step (must provide ``objective``).
    iterations : int
        Measurements.
    gain, dither, decay : float
        ES gain (on the log objective by default), dither amplitude (normalised units) and
        its decay per step.
    log_objective : bool
        Maximise ``log(1 + objective)``: scale-free, so one gain suits any count rate.
    seed : int
        Seeds the dither frequency assignment.

    Returns
    -------
    dict
        ``best_positions``, ``best_objective``, ``objectives`` (per step).
    """
    lo = np.array([b[0] for b in bounds], dtype=float)
    hi = np.array([b[1] for b in bounds], dtype=float)
    if len(motors) != len(bounds) or np.any(hi <= lo):
        raise ValueError("give one (low, high) bound with low < high per motor")
    start = []
    for m in motors:
        start.append((yield from bps.rd(m)))
    p0 = 2 * (np.clip(start, lo, hi) - lo) / (hi - lo) - 1
    # Maximising: the ES minimises the cost, so the cost is minus the (log) objective.
    es = ExtremumSeeker(p0, gain=gain, dither=dither, decay=decay, normalise_cost=False, seed=seed)
    best = {"objective": -np.inf, "positions": list(start)}
    values: list[float] = []
    meta = {
        "plan_name": "es_align",
        "motors": [m.name for m in motors],
        "objective": objective,
        "es": {"gain": gain, "dither": dither, "decay": decay, "iterations": iterations},
        **(md or {}),
    }

    # Staged for the whole run, as a scan plan does: a file-backed detector opens its file at
    # stage and refuses a trigger before it.
    @bpp.stage_decorator([*detectors, *motors])
    @bpp.run_decorator(md=meta)
    def inner():
        for _ in range(iterations):
            positions = lo + (es.ask() + 1) * 0.5 * (hi - lo)
            args = [a for m, x in zip(motors, positions, strict=True) for a in (m, float(x))]
            yield from bps.mv(*args)
            reading = yield from bps.trigger_and_read([*detectors, *motors])
            value = float(reading[objective]["value"]) if objective in reading else np.nan
            values.append(value)
            if np.isfinite(value) and value > best["objective"]:
                best.update(objective=value, positions=[float(x) for x in positions])
            cost = -np.log1p(max(value, 0.0)) if log_objective else -value
            es.tell(cost)
        args = [a for m, x in zip(motors, best["positions"], strict=True) for a in (m, x)]
        yield from bps.mv(*args)

    yield from inner()
    return {
        "best_positions": best["positions"],
        "best_objective": best["objective"],
        "objectives": values,
    }
