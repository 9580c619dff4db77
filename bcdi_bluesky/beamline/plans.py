"""Bluesky plans for BCDI."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


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
    for an odd ``num``, half a step lower at both ends for an even one.

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
        Extra start-document metadata; its ``"bcdi"`` mapping, if any, is merged into the one
        this plan writes (a key given both ways is refused).
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
    extra = dict(md or {})
    more = extra.pop("bcdi", None) or {}
    if not isinstance(more, dict):
        raise ValueError(f'md["bcdi"] must be a dict, got {type(more).__name__}')
    if twice := sorted(set(more) & set(bcdi)):
        raise ValueError(f'{", ".join(twice)} given both in md["bcdi"] and by rocking_scan')
    meta = {"plan_name": "rocking_scan", **extra, "bcdi": {**bcdi, **more}}
    return (yield from bp.scan([detector], motor, start, stop, num, md=meta))


class ReconstructionAnalysis(Device):
    """An ophyd face of the reconstruction callback, for plans.

    ``trigger()`` returns a Status that finishes when the callback has processed every scan
    so far, or after ``timeout`` seconds; the signals then hold the figures of the scan named
    by ``awaited_uid`` (empty: the latest scan that reached the callback's worker). A plan
    sets ``awaited_uid`` to its scan's uid, waits with ``bps.trigger(analysis, wait=True)``
    and reads with ``bps.rd``: only the plan moves devices.

    The Status never fails because of the analysis (an exception there would abort the
    experiment): when the scan has no recommendation (its frames could not be read, it did
    not rock, it was aborted or dropped...) ``usable`` is False, the figures are NaN and
    ``message`` says why; when its analysis (the reconstruction, or a slow publisher) is still
    running at ``timeout`` the recommendation (computed from the frames first) is usable,
    ``chi`` is NaN until the reconstruction has finished, and ``message`` says so.
    """

    awaited_uid = Cpt(Signal, value="", kind="config", doc="uid of the scan to report on")
    usable = Cpt(Signal, value=False, doc="the scan has a recommendation to steer by")
    message = Cpt(Signal, value="", doc="why not usable, or what is missing")
    scan_status = Cpt(Signal, value="", doc="the scan's ScanRecord.status")
    quality = Cpt(Signal, value="", doc="the reconstruction's verdict (good, fair, poor)")
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

    def _report(self) -> None:
        """Put the awaited (or latest) scan's figures into the signals."""
        finished = self.callback.wait(self.timeout)
        uid = self.awaited_uid.get()
        record = self.callback.records.get(uid) if uid else self.callback.latest()
        rec = None if record is None else record.recommendation
        figures = (record.figures if record is not None else None) or {}
        notes = []
        if record is None:
            notes.append(f"no record of scan {uid}" if uid else "no scan yet")
        elif rec is None:
            notes.append(f"scan {record.scan_id} {record.status}: {record.message}".rstrip(": "))
        if not finished:
            notes.append(f"analysis not finished within {self.timeout:g} s")
        nan = float("nan")
        self.usable.put(rec is not None)
        self.message.put("; ".join(notes))
        self.scan_status.put("" if record is None else record.status)
        self.quality.put(str(figures.get("quality", "")))
        self.theta_center.put(nan if rec is None else rec.theta_center)
        self.theta_range.put(nan if rec is None else rec.theta_range)
        self.exposure.put(nan if rec is None else rec.exposure)
        self.peak_inside.put(False if rec is None else rec.peak_inside)
        self.saturated.put(False if rec is None else rec.saturated)
        self.chi.put(float(figures.get("chi", nan)))
        self.scan_uid.put("" if record is None else record.uid)

    def trigger(self) -> DeviceStatus:
        """Finish when the callback is idle (or after ``timeout``), with the scan's figures in
        the signals."""
        status = DeviceStatus(self, timeout=self.timeout + 30)

        def report() -> None:
            try:
                self._report()
            except Exception as exc:  # only with BLUESKY_DEBUG_CALLBACKS (wait re-raises)
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=report, name="bcdi-analysis-trigger", daemon=True).start()
        return status


#: What :func:`closed_loop_scan` reads from the analysis after each scan.
_ANALYSIS_FIGURES = (
    "usable",
    "message",
    "scan_status",
    "quality",
    "theta_center",
    "theta_range",
    "exposure",
    "peak_inside",
    "saturated",
    "chi",
    "scan_uid",
)


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
    ``max_iterations`` scans, following the sample). It also stops, with a logged warning,
    after a scan the analysis has no recommendation for (``usable`` False: the frames could
    not be read, the motor did not rock...): it never steers by another scan's figures.

    The range stays ``width`` unless ``adjust_range``: the rocking step sets the q sampling
    along the rocking axis, which the reconstruction expects unchanged.

    With ``geometry`` every scan records it (see :func:`rocking_scan`), and the
    reconstructions come in nm with displacement and strain.

    Returns
    -------
    list of dict
        Per iteration: the scan's centre, then the analysis' figures (``usable``,
        ``message``, ``scan_status``, ``quality``, recommended ``theta_center``,
        ``theta_range`` and ``exposure``, ``peak_inside``, ``saturated``, ``chi``,
        ``scan_uid``) and whether it ``converged``.
    """
    history = []
    step = width / (num - 1)
    for i in range(max_iterations):
        uid = yield from rocking_scan(
            detector,
            motor,
            centre,
            width,
            num,
            md={"closed_loop_iteration": i, **(md or {})},
            geometry=geometry,
        )
        yield from bps.abs_set(analysis.awaited_uid, uid or "", wait=True)
        yield from bps.trigger(analysis, wait=True)
        rec = {}
        for name in _ANALYSIS_FIGURES:
            rec[name] = yield from bps.rd(getattr(analysis, name))
        history.append({"iteration": i, "centre": centre, **rec})
        if not rec["usable"]:
            # Nothing to steer by: stop rather than move devices on another scan's figures.
            history[-1]["converged"] = False
            log.warning("closed loop stopped after scan %d: %s", i + 1, rec["message"])
            break
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
    than the ES step bound. At the end the motors go to the best point measured, judged by
    the median of each measurement and its two neighbours in time (ES moves in small steps,
    so they are neighbours in position too): one spike (a cosmic ray, a zinger) cannot pick
    the end point.

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
        ``best_positions``, ``best_objective`` (the three-point median there),
        ``objectives`` (per step, as measured).
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
    values: list[float] = []
    visited: list[list[float]] = []
    best: dict[str, Any] = {}
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
            visited.append([float(x) for x in positions])
            cost = -np.log1p(max(value, 0.0)) if log_objective else -value
            es.tell(cost)
        best.update(_robust_best(values, visited, list(start)))
        args = [a for m, x in zip(motors, best["positions"], strict=True) for a in (m, x)]
        yield from bps.mv(*args)

    yield from inner()
    return {
        "best_positions": best["positions"],
        "best_objective": best["objective"],
        "objectives": values,
    }


def _robust_best(
    values: list[float], positions: list[list[float]], start: list[float]
) -> dict[str, Any]:
    """The measurement whose median with its two neighbours in time (the two after the
    first, before the last) is highest, NaNs left out of each median; ``start`` with objective
    -inf when nothing finite was measured."""
    v = np.asarray(values, dtype=float)
    smoothed = np.full(v.size, -np.inf)
    for k in range(v.size):
        first = min(max(k - 1, 0), max(v.size - 3, 0))  # three long at the ends too
        window = v[first : first + 3]
        window = window[np.isfinite(window)]
        if np.isfinite(v[k]) and window.size:
            smoothed[k] = float(np.median(window))
    if not np.isfinite(smoothed).any():
        return {"objective": -np.inf, "positions": start}
    k = int(np.argmax(smoothed))
    return {"objective": float(smoothed[k]), "positions": positions[k]}
