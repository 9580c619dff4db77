"""The Bluesky callback: collect the frames of each rocking scan, reconstruct in a worker.

The RunEngine thread only does bookkeeping (an event-model ``RunRouter`` hands each run's
documents to a small collector that keeps a frame reference and the motor readback per
event); reading files, assembling and reconstructing happen in a worker thread, so a scan
never waits for the analysis, and a failing analysis never aborts a scan.

What the worker guarantees:

- Any exception in any step of a scan (reading frames, assembling, recommending, configuring,
  reconstructing, publishing) is caught: the scan is recorded ``failed`` with the step and the
  reason, the publishers' ``failure`` hooks are told, and the next scan proceeds. A volume
  without a Bragg peak (:class:`~bcdi_bluesky.errors.NoBraggPeakError`) is recorded ``skipped``.
- Queue policy: at most ``queue_size`` assembled volumes wait for the worker. When a new scan
  stops and the queue is full, the *oldest waiting* one is dropped (the live view favours the
  newest scan) and recorded in :attr:`BCDIReconstructionCallback.dropped` with a warning.
- A run whose stop document never comes (a proxy restart, a crashed RunEngine) is recorded
  ``incomplete`` once ``run_timeout`` seconds pass without a document of it, and its frames
  are freed.
- Memory stays bounded: every record keeps the scan's figures (``figures``: the result's
  ``summary()``) but only the last ``keep_results`` records keep the full result.
- With an ``executor`` (a thread pool, a Dask cluster through ``Client.get_executor()``...),
  the worker assembles and configures each scan and hands the reconstruction to the executor,
  up to ``max_in_flight`` at a time; a second thread takes the results in scan order and
  publishes them, so publishers and records see the scans in the order they stopped. A task
  that raised (after the executor's own retries), a lost worker the executor gives up on, or
  no answer within ``task_timeout`` seconds records the scan ``failed`` with the reason.

With bluesky's ``BLUESKY_DEBUG_CALLBACKS`` set, errors are not swallowed: a document that
cannot be handled raises into the caller (the RunEngine), and :meth:`wait` re-raises the first
exception the worker caught.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from event_model import (
    DocumentRouter,
    Filler,
    RunRouter,
    UnresolvableForeignKeyError,
    unpack_event_page,
)

from ..errors import DataError, NoBraggPeakError, one_line
from ..physics import AXIS_NAMES, Geometry, geometry_from_start
from ..preprocess import saturation_mask
from ..settings import ReconstructionSettings
from .handlers import DEFAULT_HANDLERS, read_stream_rows
from .publishers import Publisher, ResultConsumer, as_publisher
from .recommend import Recommendation, annotate_result, recommend
from .scaleout import ReconstructorSpec, reconstruct_volume

log = logging.getLogger(__name__)

#: What happened to a scan (:attr:`ScanRecord.status`).
ScanStatus = Literal[
    "collecting", "queued", "skipped", "dropped", "reconstructing", "done", "failed", "incomplete"
]


#: Records kept by a callback (the oldest finished ones are forgotten beyond).
MAX_RECORDS = 10_000
#: Runs collected at once at most: a start beyond it closes the run seen least recently as
#: ``incomplete`` (starts whose stops never come must not hold memory for ``run_timeout``).
MAX_OPEN_RUNS = 100
#: Statuses a record no longer leaves.
FINAL_STATUSES = ("skipped", "dropped", "done", "failed", "incomplete")


def _scan_id(value: Any) -> int | str | None:
    """A run's ``scan_id`` for the record: a whole number or None as given, else one short
    line of text."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return value
    return one_line(value, 40)


@dataclass
class ScanRecord:
    """What happened to one run (kept in :attr:`BCDIReconstructionCallback.records`)."""

    uid: str
    #: The run's ``scan_id``: a whole number as given, anything else as one short line of
    #: text (metadata from the network goes into log lines).
    scan_id: int | str | None
    status: ScanStatus
    message: str = ""
    frames: int = 0
    #: The full reconstruction, kept for the last ``keep_results`` scans only (else None).
    result: Any = None
    #: The reconstruction's ``summary()`` (chi, timings...), kept for every scan.
    figures: dict | None = None
    recommendation: Recommendation | None = None
    exposure: float | None = None  # from the detector's configuration in the descriptor
    events_without_motor: int = 0
    malformed_events: int = 0
    seconds_in_callback: float = 0.0
    queued_at: float | None = None
    finished_at: float | None = None


def _debug_callbacks() -> bool:
    """bluesky's switch for re-raising what callbacks would swallow."""
    return bool(os.environ.get("BLUESKY_DEBUG_CALLBACKS", False))


class _Cancelled(Exception):
    """Raised through the pipeline's progress hook when :meth:`close` runs out of time."""


class NotReconstructable(DataError):
    """The scan is not a rocking scan that can be reconstructed (frames at one angle, a run
    that failed or was aborted): recorded ``skipped`` with the reason, like a volume without
    a Bragg peak."""


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of an exception that stopped a scan's reconstruction."""
    # A task cancelled by the executor carries no text: say where such a cancellation comes
    # from (Dask cancels the tasks it holds when the client loses its scheduler).
    return f"{type(exc).__name__}: {str(exc) or 'no reason given (a lost worker or scheduler?)'}"


def skipped_by_design(exc: BaseException | None) -> bool:
    """Whether ``exc`` means the scan is not reconstructed by design (``skipped``), not that
    something went wrong (``failed``)."""
    return isinstance(exc, (NoBraggPeakError, NotReconstructable))


#: A rocking scan whose readbacks' median step is below this fraction of the planned step did
#: not rock: its frames are not a 3D diffraction volume.
MIN_STEP_FRACTION = 0.5


def readback_step(thetas: np.ndarray) -> float:
    """The rocking step the readbacks show: the median step between them in increasing order
    (0 for fewer than two)."""
    return float(np.median(np.diff(np.sort(thetas)))) if thetas.size > 1 else 0.0


def rocking_problem(thetas: np.ndarray, start: dict) -> str | None:
    """Why the readbacks ``thetas`` are not a usable rocking scan, or None.

    The motor must have moved: the median step between sorted readbacks is at least
    :data:`MIN_STEP_FRACTION` of the planned ``start["bcdi"]["rocking_step"]`` when the plan
    recorded one, and above zero otherwise (a stuck or disconnected motor reports one angle
    for every frame).
    """
    if thetas.size < 2:
        return f"{thetas.size} frame: a rocking scan needs at least 2"
    step = readback_step(thetas)
    bcdi = start.get("bcdi")
    planned = bcdi.get("rocking_step") if isinstance(bcdi, dict) else None
    if isinstance(planned, (int, float)) and not isinstance(planned, bool) and planned != 0:
        if step < MIN_STEP_FRACTION * abs(planned):
            return (
                f"the rocking motor did not follow the plan: readbacks {thetas.min():g} .. "
                f"{thetas.max():g}, median step {step:g} against the planned {abs(planned):g}"
            )
    elif step <= 0:
        return f"the rocking motor did not move: every frame at {thetas[0]:g}"
    return None


def planned_frames_note(frames: int, start: dict) -> str:
    """A note when the run holds fewer frames than its plan's ``num_points`` (a scan stopped
    early with ``RE.stop()`` ends with exit status success): "" otherwise."""
    planned = start.get("num_points")
    if isinstance(planned, int) and not isinstance(planned, bool) and 0 < frames < planned:
        return f"; {frames} of the {planned} planned frames (the scan stopped early)"
    return ""


class _FillOnStop(DocumentRouter):
    """The RunRouter's filler: it passes documents through unfilled. Frames written to files
    are read by an event-model ``Filler`` in the worker after the run stops (area detectors
    close their files at unstage, and reading in the RunEngine's thread would slow the scan)."""

    def __init__(
        self, handler_registry: dict, *, root_map: dict | None = None, inplace: bool = False
    ) -> None:
        super().__init__()

    def event_page(self, doc: dict) -> dict:
        return doc


def _positive_number(value: Any) -> bool:
    """A finite real number above zero (not a flag, not text)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
        and value > 0
    )


class _RunCollector(DocumentRouter):
    """The documents of one run that the reconstruction needs (RunEngine thread)."""

    def __init__(self, owner: BCDIReconstructionCallback, start: dict, record: ScanRecord) -> None:
        super().__init__()
        self.owner = owner
        self.start_doc = start
        self.record = record
        self.descriptors: dict[str, dict] = {}
        # (motor readback, seq_num, frame | datum id | None when a StreamDatum carries it,
        #  (event page, index) when the frame is in a file)
        self.frames: list[tuple[float, int, Any, tuple[dict, int] | None]] = []
        self.resources: list[dict] = []
        self.datums: list[dict] = []
        self.stream_resources: dict[str, dict] = {}
        self.stream_datums: list[dict] = []
        self.exposure: float | None = None
        self.max_count: float | None = None
        #: Why a value of the detector's configuration was not used.
        self.config_notes: list[str] = []
        self.last_seen = time.monotonic()
        #: Why the run was closed without its stop ("" while it was not).
        self.expired = ""
        #: Errors of the publishers' ``collecting`` hooks, for the scan's message.
        self.hook_errors: list[str] = []

    def __call__(self, name: str, doc: dict, validate: bool = False):
        started = time.perf_counter()
        self.last_seen = time.monotonic()
        try:
            return super().__call__(name, doc, validate)
        finally:
            self.record.seconds_in_callback += time.perf_counter() - started

    def free(self) -> None:
        """Drop every frame reference and document (the volume is assembled or abandoned)."""
        self.frames, self.resources, self.datums = [], [], []
        self.stream_resources, self.stream_datums = {}, []

    def descriptor(self, doc: dict) -> None:
        owner = self.owner
        if doc.get("name", "primary") != owner.stream_name:
            return
        keys = doc.get("data_keys", {})
        if owner.image_key in keys and owner.motor_key in keys:
            self.descriptors[doc["uid"]] = doc
            # The detector's configuration (read once per stream) gives exposure and saturation.
            device = owner.image_key.removesuffix("_image")
            config = doc.get("configuration", {}).get(device, {}).get("data", {})
            for attribute in ("exposure", "max_count"):
                key = f"{device}_{attribute}"
                if key not in config:
                    continue
                value = config[key]
                if _positive_number(value):
                    setattr(self, attribute, float(value))
                else:  # the scan goes on without it (no saturation mask, no exposure advice)
                    self.config_notes.append(
                        f"detector configuration {key} {one_line(repr(value), 40)} is not a "
                        "positive number: not used"
                    )

    def resource(self, doc: dict) -> None:
        self.resources.append(doc)

    def datum(self, doc: dict) -> None:
        self.datums.append(doc)

    def stream_resource(self, doc: dict) -> None:
        if doc.get("data_key") == self.owner.image_key:
            self.stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: dict) -> None:
        if doc["stream_resource"] in self.stream_resources:
            self.stream_datums.append(doc)

    def event_page(self, doc: dict) -> None:
        # The RunRouter hands events over as pages; reading the columns directly spares
        # unpacking each page into events in the RunEngine's thread.
        if doc["descriptor"] not in self.descriptors:
            return
        data = doc["data"]
        thetas = data.get(self.owner.motor_key)
        images = data.get(self.owner.image_key)
        for k, seq_num in enumerate(doc["seq_num"]):
            try:
                theta = float(thetas[k])
            except (TypeError, ValueError, IndexError):
                theta = float("nan")
            if not np.isfinite(theta):
                self.record.events_without_motor += 1
                continue
            try:
                seq_num = int(seq_num)
            except (TypeError, ValueError):  # a malformed event: counted, said once per run
                self.record.malformed_events += 1
                continue
            # Keep a reference only (an array, a datum id, or None when a StreamDatum carries
            # the frame): the worker reads and stacks. Copying frames here would put the
            # analysis' cost into the scan.
            value = None if images is None else images[k]
            self.frames.append(
                (theta, seq_num, value, (doc, k) if isinstance(value, str) else None)
            )

    def stop(self, doc: dict) -> None:
        self.owner._finish(self, doc)


def scan_geometry(start: dict, thetas: np.ndarray, scan_id: Any) -> Geometry | None:
    """The run's geometry (hklpy2's record or ``bcdi.geometry``) for the volume as stacked here:
    frames along axis 0 in increasing readback, so the rocking step is the readbacks' median
    step; None, with a warning, when it is unusable."""
    try:
        geometry = geometry_from_start(start)
        if geometry is not None:
            data = {**geometry.to_dict(), "axes": list(AXIS_NAMES)}
            step = readback_step(thetas)
            if step > 0:
                data["rocking_step_deg"] = step
            geometry = Geometry.from_dict(data)
    except (ValueError, TypeError) as exc:  # metadata never fails a scan
        log.warning("scan %s: geometry ignored (%s); results in voxels", scan_id, exc)
        return None
    return geometry


class BCDIReconstructionCallback(DocumentRouter):
    """Reconstruct every rocking scan of a RunEngine in a background worker.

    Which runs: those whose ``stream_name`` stream has both ``image_key`` and ``motor_key``,
    unless the start document says ``bcdi_reconstruct=False``.

    Parameters
    ----------
    image_key : str
        Data key of the detector frames (``<detector name>_image`` for the simulated beamline).
    motor_key : str
        Data key of the rocking motor's readback; frames are stacked in its order. Events
        without a finite readback are left out and counted in the record's message.
    on_result : callable, optional
        ``on_result(result, start_doc)``, called from the worker for each reconstruction.
    publishers : sequence
        More publishers: :class:`~bcdi_bluesky.beamline.Publisher` objects (IOC, result files,
        derived runs) or plain ``publisher(result, start_doc)`` callables.
    reconstructor : Reconstructor, optional
        Default: ``Reconstructor()`` with the packaged model, created in the worker on first use
        (loading ONNX Runtime never delays the RunEngine).
    refine : {"none", "es", "full"}
        Passed to :meth:`Reconstructor.reconstruct`.
    queue_size : int
        Assembled volumes allowed to wait (see the module's queue policy).
    reconstruct_failed : bool
        Also reconstruct runs that did not end with ``exit_status == "success"``.
    stream_name : str
        Event stream holding the frames.
    handler_registry : dict, optional
        Resource ``spec`` -> handler class, for frames written to files (Resource/Datum); adds
        to the built-in ``BCDI_NPY_FRAME``, ``NPY_SEQ`` and ``AD_HDF5``. Frames announced by
        StreamResource/StreamDatum are read from the HDF5 file named by ``uri`` and
        ``parameters["dataset"]``. Files are read in the worker after the run stops (area
        detectors close their files at unstage), and the documents are never modified.
    root_map : dict, optional
        ``{root as written by the acquisition host: root where this host sees it}``, for a
        service that reads files over a different mount (event-model's ``Filler`` applies it to
        Resource roots; a StreamResource ``uri`` path starting with a key is mapped the same).
    run_timeout : float or None
        Seconds without any document of an open run after which it is recorded
        ``incomplete`` and its frames are freed (None: wait forever).
    keep_results : int
        Records that keep their full result (the most recent ones).
    executor : concurrent.futures.Executor, optional
        Where reconstructions run (default: inline in the worker thread). The task is
        :func:`~bcdi_bluesky.beamline.scaleout.reconstruct_volume`: each executor process
        keeps a warm Reconstructor of the same model as ``reconstructor`` (the packaged one
        by default). Progress hooks are not called during a reconstruction that runs there,
        and ``track`` follows the previous scan of the same worker process.
    max_in_flight : int
        Reconstructions in the executor's hands at once (more wait in the queue).
    task_timeout : float
        Seconds to wait for one reconstruction from the executor before recording it failed.
    """

    def __init__(
        self,
        image_key: str = "det_image",
        motor_key: str = "theta",
        on_result: ResultConsumer | None = None,
        publishers: Sequence[Publisher | ResultConsumer] = (),
        reconstructor: Any = None,
        *,
        refine: str = "full",
        queue_size: int = 2,
        reconstruct_failed: bool = False,
        stream_name: str = "primary",
        handler_registry: dict | None = None,
        root_map: dict | None = None,
        run_timeout: float | None = 3600.0,
        keep_results: int = 3,
        executor: Executor | None = None,
        max_in_flight: int = 4,
        task_timeout: float = 3600.0,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if keep_results < 1:
            raise ValueError(f"keep_results must be at least 1, got {keep_results}")
        if run_timeout is not None and not run_timeout > 0:
            raise ValueError(f"run_timeout must be positive or None, got {run_timeout}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.image_key = image_key
        self.motor_key = motor_key
        self.publishers: list[Publisher] = [as_publisher(p) for p in publishers]
        if on_result is not None:
            self.publishers.append(as_publisher(on_result))
        self.reconstructor = reconstructor
        self.refine = refine
        self.reconstruct_failed = reconstruct_failed
        self.stream_name = stream_name
        self.handlers = {**DEFAULT_HANDLERS, **(handler_registry or {})}
        self.root_map = dict(root_map or {})
        self.run_timeout = run_timeout
        self.keep_results = int(keep_results)
        self.records: dict[str, ScanRecord] = {}
        #: The scans dropped from a full queue, the latest :data:`MAX_RECORDS` of them.
        self.dropped: deque[ScanRecord] = deque(maxlen=MAX_RECORDS)
        #: Documents of runs whose start this callback never saw (ignored).
        self.unrouted = 0
        self._router = RunRouter([self._factory], filler_class=_FillOnStop)
        self._open: dict[str, _RunCollector] = {}
        # Runs opted out (bcdi_reconstruct=False) whose stop has not come: uid -> monotonic
        # time of their start. The router holds their start until a stop, real or ours.
        self._passed_over: dict[str, float] = {}
        self._lock = threading.RLock()  # the router is fed by the RunEngine and the sweeper
        self._with_results: deque[ScanRecord] = deque()
        self._debug_errors: list[BaseException] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending = 0
        self._idle = threading.Condition()
        self._closing = threading.Event()
        self._cancel = threading.Event()
        self.executor = executor
        self.task_timeout = float(task_timeout)
        self._spec = ReconstructorSpec.of(reconstructor)
        self._slots = threading.Semaphore(max_in_flight)
        # (run, future, notes, step) in scan order: what the results thread finishes
        self._in_flight: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="bcdi-reconstruction", daemon=True)
        self._worker.start()
        self._collector = None
        if executor is not None:
            self._collector = threading.Thread(
                target=self._collect, name="bcdi-results", daemon=True
            )
            self._collector.start()

    # ------------------------------------------------------------ RunEngine thread
    def __call__(self, name: str, doc: dict, validate: bool = False):
        """Route a document; an error here is logged, never raised into the RunEngine (unless
        ``BLUESKY_DEBUG_CALLBACKS`` is set)."""
        if self._closing.is_set():
            return name, doc
        if name == "start" and not (isinstance(doc, dict) and isinstance(doc.get("uid"), str)):
            # A run is known by its uid: without one nothing of it can be routed or reported.
            uid = doc.get("uid") if isinstance(doc, dict) else None
            log.warning("ignoring a start document whose uid is %r, not a string", uid)
            return name, doc
        overflow: list[_RunCollector] = []
        try:
            with self._lock:
                if name == "stop" and isinstance(doc, dict):
                    uid = doc.get("run_start")
                    if self._passed_over.pop(uid, None) is None and self._closed_by_us(uid):
                        log.info("the stop of run %s came after it was closed: ignored", uid)
                        return name, doc
                if name == "start" and len(self._passed_over) >= MAX_OPEN_RUNS:
                    self._forget_passed_over([next(iter(self._passed_over))])
                if name == "start" and len(self._open) >= MAX_OPEN_RUNS:
                    # Starts without stops (a flood, or a source that never sends them): the
                    # run seen least recently is closed now, not after run_timeout.
                    oldest = min(self._open.values(), key=lambda run: run.last_seen)
                    overflow = self._close_unstopped(
                        [oldest], f"more than {MAX_OPEN_RUNS} runs open at once"
                    )
                self._router(name, doc)
        except (KeyError, UnresolvableForeignKeyError) as exc:
            if name in ("start", "stop") or _debug_callbacks():
                self._swallow(name)
            else:
                # A document of a run whose start this callback did not see (subscribed or
                # restarted mid-run): nothing to do with it, one line per run.
                self.unrouted += 1
                if name == "descriptor":
                    log.warning(
                        "ignoring run %s: its start document was not seen (%s)",
                        doc.get("run_start"),
                        exc,
                    )
                else:
                    log.debug("ignoring a %s document of an unseen run (%s)", name, exc)
        except Exception:
            self._swallow(name)
        for run in overflow:
            self._tell_not_reconstructed(run.record, run.start_doc)
        return name, doc

    def _swallow(self, name: str) -> None:
        if _debug_callbacks():
            raise
        log.exception(
            "BCDI callback could not handle a %r document; analysis of that run "
            "may be incomplete, the experiment goes on",
            name,
        )

    def _factory(self, name: str, start: dict):
        """RunRouter factory: one collector per run that may be reconstructed."""
        record = ScanRecord(start["uid"], _scan_id(start.get("scan_id")), "collecting")
        self.records[start["uid"]] = record
        self._forget_old_records()
        if start.get("bcdi_reconstruct", True) is False:
            # The plan opted out in its metadata (an alignment scan, a dark series...).
            record.status, record.message = "skipped", "start metadata bcdi_reconstruct=False"
            self._passed_over[start["uid"]] = time.monotonic()
            return [], []
        collector = _RunCollector(self, start, record)
        self._open[start["uid"]] = collector
        collector.hook_errors = self._hooks("collecting", start)
        return [collector], []

    def _finish(self, run: _RunCollector, doc: dict) -> None:
        """A run's stop document came (or the sweeper gave up waiting for it)."""
        self._open.pop(run.start_doc["uid"], None)
        record = run.record
        record.frames = len(run.frames)
        record.exposure = run.exposure
        exit_status = doc.get("exit_status", "success")
        notes = self._frame_notes(record) + planned_frames_note(record.frames, run.start_doc)
        notes += "".join(f"; {note}" for note in [*run.config_notes, *run.hook_errors])
        if run.expired:
            record.status = "incomplete"
            record.message = f"{run.expired}; {record.frames} frames freed" + notes
            run.free()
            log.warning("scan %s incomplete: %s", record.scan_id, record.message)
            return  # whoever closed it tells the publishers, outside the lock
        elif exit_status != "success" and not self.reconstruct_failed:
            record.status = "skipped"
            record.message = f"run ended with exit_status {exit_status!r}" + notes
            run.free()
            log.info("scan %s skipped: %s", record.scan_id, record.message)
        elif not run.frames:
            record.status = "skipped"
            record.message = (
                f"no frames with keys {self.image_key!r} and {self.motor_key!r} "
                f"in stream {self.stream_name!r}" + notes
            )
            # Often a wrong image or motor key: say so where the operator looks.
            log.warning("scan %s skipped: %s", record.scan_id, record.message)
        else:
            record.message = notes.removeprefix("; ")
            self._enqueue(run)
            return
        # Not reconstructed: the publishers told "collecting" hear why (the IOC leaves its
        # Collecting state, the service prints its line).
        self._tell_not_reconstructed(record, run.start_doc)

    def _forget_old_records(self) -> None:
        """Keep at most :data:`MAX_RECORDS` records: the oldest finished ones go first (a
        service runs for weeks; a flood of start documents must not grow it without end)."""
        excess = len(self.records) - MAX_RECORDS
        if excess <= 0:
            return
        finished = (uid for uid, r in self.records.items() if r.status in FINAL_STATUSES)
        for uid in list(itertools.islice(finished, excess)):
            del self.records[uid]

    def _frame_notes(self, record: ScanRecord) -> str:
        notes = ""
        if record.events_without_motor:
            notes += (
                f"; {record.events_without_motor} events without a finite "
                f"{self.motor_key!r} readback left out"
            )
        if record.malformed_events:
            notes += f"; {record.malformed_events} events with a malformed seq_num left out"
        return notes

    def _enqueue(self, run: _RunCollector) -> None:
        with self._idle:
            self._pending += 1
        while True:
            try:
                self._queue.put_nowait(run)
                break
            except queue.Full:
                try:
                    old = self._queue.get_nowait()
                except queue.Empty:
                    continue
                old.free()
                old.record.status = "dropped"
                old.record.message = "a newer scan arrived while the reconstruction queue was full"
                self.dropped.append(old.record)
                log.warning(
                    "scan %s dropped from the reconstruction queue (newer scan %s)",
                    old.record.scan_id,
                    run.record.scan_id,
                )
                self._tell_not_reconstructed(old.record, old.start_doc)
                self._done()
        run.record.status = "queued"
        run.record.queued_at = time.time()

    # --------------------------------------------------------------- worker thread
    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _work(self) -> None:
        # Short enough for close() to see the worker stop promptly, long enough to cost nothing.
        tick = 0.1 if self.run_timeout is None else min(0.1, self.run_timeout / 4)
        while True:
            try:
                run = (
                    self._queue.get_nowait()
                    if self._closing.is_set()
                    else self._queue.get(timeout=tick)
                )
            except queue.Empty:
                if self._closing.is_set():
                    return
                self._expire_runs()
                continue
            if self._cancel.is_set():
                run.record.status = "dropped"
                run.record.message = "the callback was closed before this scan's turn"
                log.warning("scan %s not reconstructed: %s", run.record.scan_id, run.record.message)
                self._tell_not_reconstructed(run.record, run.start_doc)
                run.free()
                self._done()
                continue
            handed_off = False
            try:
                handed_off = self._reconstruct(run)
            except BaseException as exc:  # a bug in this class: the next scan still comes
                log.exception("worker error on scan %s", run.record.scan_id)
                self._caught(exc)
            finally:
                run.free()
                if not handed_off:
                    self._done()

    def _collect(self) -> None:
        """Results thread (with an executor): finish the scans in the order they stopped."""
        while True:
            try:
                # As the worker's tick: close() sees this thread stop promptly.
                run, future, notes, step = self._in_flight.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set() and not self._worker.is_alive():
                    return
                continue
            record, start = run.record, run.start_doc
            try:
                result = self._result(future)
                self._annotate(record, start, result)
            except BaseException as exc:  # the task's, passed on by its future: even SystemExit
                self._not_reconstructed(record, start, exc, step, notes)
            else:
                self._publish(record, start, result, notes)
            finally:
                self._slots.release()
                self._done()

    def _result(self, future: Future) -> Any:
        """The executor's answer; cancelled by :meth:`close` or after ``task_timeout``."""
        deadline = time.monotonic() + self.task_timeout
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if self._cancel.is_set():
                    future.cancel()
                    raise _Cancelled(
                        "the callback was closed before the reconstruction finished"
                    ) from None
                if time.monotonic() > deadline:
                    future.cancel()
                    raise TimeoutError(f"no result within {self.task_timeout:g} s") from None

    def _expire_runs(self) -> None:
        """Close the runs that saw no document for ``run_timeout`` seconds."""
        if self.run_timeout is None:
            return
        now = time.monotonic()
        with self._lock:
            self._forget_passed_over(
                [uid for uid, since in self._passed_over.items() if now - since > self.run_timeout]
            )
            stale = [run for run in self._open.values() if now - run.last_seen > self.run_timeout]
            stale = self._close_unstopped(
                stale, f"no stop document within {self.run_timeout:g} s of the last document"
            )
        for run in stale:
            self._tell_not_reconstructed(run.record, run.start_doc)

    def _close_unstopped(self, runs: list[_RunCollector], why: str) -> list[_RunCollector]:
        """Close ``runs`` as incomplete (``why`` their stop never came) through the router,
        so that it forgets them as after a real stop; the caller holds the lock and then
        tells their publishers."""
        for run in runs:
            run.expired = why
            self._stop_in_router(run.start_doc["uid"])
        return runs

    def _closed_by_us(self, uid: Any) -> bool:
        """Run ``uid`` was closed without its stop (incomplete, or opted out and forgotten):
        the router no longer knows it."""
        record = self.records.get(uid) if isinstance(uid, str) else None
        return record is not None and uid not in self._open and record.status in FINAL_STATUSES

    def _forget_passed_over(self, uids: list[str]) -> None:
        """Opted-out runs whose stop never came: the router forgets them (the caller holds
        the lock); their records say ``skipped`` already."""
        for uid in uids:
            del self._passed_over[uid]
            self._stop_in_router(uid)

    def _stop_in_router(self, uid: str) -> None:
        """A stop document of ours for run ``uid``, through the router, which then forgets
        the run as after a real stop."""
        self._router(
            "stop",
            {
                "run_start": uid,
                "uid": str(uuid.uuid4()),
                "time": time.time(),
                "exit_status": "abort",
                "reason": "no stop document",
                "num_events": {},
            },
        )

    def _tell_not_reconstructed(self, record: ScanRecord, start: dict) -> None:
        """The publishers' ``skipped`` (a ``skipped`` record) or ``failure`` hooks, told
        ``record.message``; a hook that raises is added to the record's message."""
        hook = "skipped" if record.status == "skipped" else "failure"
        errors = self._hooks(hook, record.message, start)
        if errors:
            record.message = "; ".join(filter(None, [record.message, *errors]))

    def _caught(self, exc: BaseException) -> None:
        if _debug_callbacks():
            self._debug_errors.append(exc)

    def _hooks(self, hook: str, *args: Any, seen: set | None = None) -> list[str]:
        """Call ``hook`` on every publisher; failures are logged and returned as messages.

        With ``seen``, a failure of the same publisher with the same exception type is
        reported once (a progress hook runs hundreds of times per scan).
        """
        errors = []
        for publisher in self.publishers:
            try:
                getattr(publisher, hook)(*args)
            except Exception as exc:
                if seen is not None:
                    key = (id(publisher), type(exc))
                    if key in seen:
                        continue
                    seen.add(key)
                errors.append(f"{hook} of {publisher!r} failed: {type(exc).__name__}: {exc}")
                log.warning("publisher hook error: %s", errors[-1], exc_info=_debug_callbacks())
                self._caught(exc)
        return errors

    def _mapped(self, uri: str) -> str:
        """A StreamResource file path with ``root_map`` applied (longest root first)."""
        parsed = urlparse(uri)
        if parsed.scheme not in ("file", ""):
            return uri
        path = parsed.path
        for root in sorted(self.root_map, key=len, reverse=True):
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return str(Path(self.root_map[root]) / Path(path).relative_to(root))
        return path

    def _streamed(self, run: _RunCollector) -> dict[int, np.ndarray]:
        frames: dict[int, np.ndarray] = {}
        for datum in run.stream_datums:
            resource = run.stream_resources[datum["stream_resource"]]
            idx, seq = datum["indices"], datum["seq_nums"]
            rows = read_stream_rows(
                self._mapped(resource["uri"]),
                resource["parameters"]["dataset"],
                idx["start"],
                idx["stop"],
            )
            for k, row in enumerate(rows):
                frames[seq["start"] + k] = row
        return frames

    def _volume(self, run: _RunCollector) -> tuple[np.ndarray, np.ndarray]:
        frames = sorted(run.frames, key=lambda f: (f[0], f[1]))
        streamed = self._streamed(run) if run.stream_datums else {}
        filler = None
        if any(f[3] is not None for f in frames):
            filler = Filler(self.handlers, root_map=self.root_map, inplace=False)
            for descriptor in run.descriptors.values():
                filler.descriptor(descriptor)
            for resource in run.resources:
                filler.resource(resource)
            for datum in run.datums:
                filler.datum(datum)
        try:
            stack = []
            events: dict[int, list[dict]] = {}  # id(page) -> its events, unpacked once
            for theta, seq_num, value, in_file in frames:
                if in_file is not None:
                    page, k = in_file
                    if id(page) not in events:
                        events[id(page)] = list(unpack_event_page(page))
                    value = filler.fill_event(
                        events[id(page)][k], include=[self.image_key], inplace=False
                    )["data"][self.image_key]
                elif value is None:
                    if seq_num not in streamed:
                        raise ValueError(
                            f"no frame for event {seq_num} at {theta}: neither in "
                            "the event nor in a StreamDatum"
                        )
                    value = streamed[seq_num]
                stack.append(np.asarray(value, dtype=np.float32))
        finally:
            if filler is not None:
                filler.close()
        shapes = {frame.shape for frame in stack}
        if len(shapes) != 1:
            raise ValueError(f"frames of different shapes {sorted(shapes)}")
        return np.stack(stack), np.array([f[0] for f in frames])

    def latest(self) -> ScanRecord | None:
        """The record of the most recent run that reached the worker (done or failed, or
        skipped there for want of a Bragg peak: its recommendation still moves the loop)."""
        finished = [
            r
            for r in self.records.values()
            if r.status in ("done", "failed")
            or (r.status == "skipped" and r.recommendation is not None)
        ]
        return finished[-1] if finished else None

    def _reconstruction_settings(self, start: dict) -> Any:
        """Ask each publisher in turn; None when one skips the scan."""
        settings = (
            ReconstructionSettings() if self.reconstructor is None else self.reconstructor.settings
        )
        for publisher in self.publishers:
            settings = publisher.configure(settings, start)
            if settings is None:
                return None
        return settings

    def _reconstruct(self, run: _RunCollector) -> bool:
        """Assemble, configure and reconstruct one scan, or hand it to the executor.

        Returns True when the executor has it (the results thread finishes it).
        """
        record, start = run.record, run.start_doc
        record.status = "reconstructing"
        step = "assembly"
        notes = [record.message] if record.message else []
        progress_errors: set = set()

        def progress(stage: str, info: dict) -> None:
            if self._cancel.is_set():  # close() ran out of time: stop at this step
                raise _Cancelled("the callback was closed before the reconstruction finished")
            notes.extend(self._hooks("progress", stage, info, start, seen=progress_errors))

        try:
            volume, thetas = self._volume(run)
            run.free()
            problem = rocking_problem(thetas, start)
            if problem is not None:
                raise NotReconstructable(problem)
            step = "recommendation"
            try:
                record.recommendation = recommend(volume, thetas, run.exposure, run.max_count)
            except ValueError as exc:
                notes.append(f"no recommendation: {exc}")
                log.warning("no recommendation for scan %s: %s", record.scan_id, exc)
            step = "model loading"
            if self.reconstructor is None and self.executor is None:
                from ..pipeline import Reconstructor

                self.reconstructor = Reconstructor()
            step = "configure"
            settings = self._reconstruction_settings(start)
            if settings is None:
                record.status = "skipped"
                record.message = "; ".join(["a publisher disabled reconstruction", *notes])
                record.finished_at = time.time()
                self._tell_not_reconstructed(record, start)
                return False
            step = "reconstruction"
            geometry = scan_geometry(start, thetas, record.scan_id)
            # Only when known: a reconstructor of the user's may not take the keyword.
            extra: dict[str, Any] = {"geometry": geometry} if geometry is not None else {}
            unsaturated = saturation_mask(volume, run.max_count) if run.max_count else None
            if unsaturated is not None:
                extra["mask"] = unsaturated
                notes.append(
                    f"{int(np.count_nonzero(~unsaturated))} voxels at the detector's "
                    f"max_count {run.max_count:g} (saturated) masked"
                )
            if self.executor is not None:
                self._slots.acquire()
                try:
                    future = self.executor.submit(
                        reconstruct_volume, self._spec, volume, self.refine, settings, **extra
                    )
                except BaseException:
                    self._slots.release()
                    raise
                self._in_flight.put((run, future, notes, step))
                return True
            result = self.reconstructor.reconstruct(
                volume, refine=self.refine, progress=progress, settings=settings, **extra
            )
            del volume
            step = "metadata"
            self._annotate(record, start, result)
        # Even SystemExit or KeyboardInterrupt from a reconstructor (in this thread they come
        # from its code, not from a signal) fails its scan alone: the worker must go on.
        except BaseException as exc:
            if self.executor is not None:
                # Reported by the results thread, after the scans that stopped before it.
                failed: Future = Future()
                failed.set_exception(exc)
                self._slots.acquire()
                self._in_flight.put((run, failed, notes, step))
                return True
            self._not_reconstructed(record, start, exc, step, notes)
            return False
        self._publish(record, start, result, notes)
        return False

    def _annotate(self, record: ScanRecord, start: dict, result: Any) -> None:
        """The scan's identity, recommendation and voxel size in ``result.metadata``; its
        figures in the record."""
        if hasattr(result, "metadata"):
            annotate_result(result, start, record.recommendation)
        if hasattr(result, "summary"):
            record.figures = result.summary()

    def _not_reconstructed(
        self, record: ScanRecord, start: dict, exc: BaseException, step: str, notes: list[str]
    ) -> None:
        """Record why a scan has no reconstruction and tell the publishers."""
        if skipped_by_design(exc):
            record.status, record.message = "skipped", "; ".join([str(exc), *notes])
            log.warning("scan %s skipped: %s", record.scan_id, exc)
        else:
            record.status = "failed"
            # A cancellation is ours, not an error of the step: no exception name in the line.
            why = (
                f"{step} cancelled: {exc}"
                if isinstance(exc, _Cancelled)
                else f"{step} failed: {exception_text(exc)}"
            )
            record.message = "; ".join([why, *notes])
            log.error(
                "scan %s failed: %s", record.scan_id, record.message, exc_info=_debug_callbacks()
            )
            self._caught(exc)
        record.finished_at = time.time()
        self._tell_not_reconstructed(record, start)

    def _publish(self, record: ScanRecord, start: dict, result: Any, notes: list[str]) -> None:
        """Keep the result and hand it to every publisher."""
        self._keep(record, result)
        errors = self._hooks("__call__", result, start)
        record.finished_at = time.time()
        record.status = "failed" if errors else "done"
        record.message = "; ".join([*notes, *errors])

    def _keep(self, record: ScanRecord, result: Any) -> None:
        """Keep the full result on the newest ``keep_results`` records only."""
        record.result = result
        self._with_results.append(record)
        while len(self._with_results) > self.keep_results:
            self._with_results.popleft().result = None

    # -------------------------------------------------------------------- control
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued reconstruction has finished; False on timeout.

        With ``BLUESKY_DEBUG_CALLBACKS`` set, re-raises the first exception the worker caught.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        if self._debug_errors:
            error, self._debug_errors = self._debug_errors[0], []
            raise error
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking documents, finish the queued work within ``timeout`` s, stop the worker.

        Never blocks longer than ``timeout``. In its last quarter (at most 1 s) the scan being
        reconstructed is cancelled at the pipeline's next step and recorded ``failed``, and the
        scans still queued are recorded ``dropped``, each with a ``failure`` hook call. A
        reconstruction that reaches no step in time is abandoned to the worker, a daemon
        thread. With an executor, the results still awaited then are cancelled the same way
        (``Future.cancel``). Returns True when the worker (and the results thread) stopped.
        """
        self._closing.set()
        grace = 0.0 if timeout is None else min(1.0, timeout / 4)
        end = None if timeout is None else time.monotonic() + timeout
        threads = [t for t in (self._worker, self._collector) if t is not None]

        def join_until(moment: float | None) -> None:
            for thread in threads:
                thread.join(None if moment is None else max(moment - time.monotonic(), 0.0))

        join_until(None if end is None else end - grace)
        if any(thread.is_alive() for thread in threads):
            self._cancel.set()
            join_until(end)
        if not any(thread.is_alive() for thread in threads):
            return True
        left = [r for r in self.records.values() if r.status in ("queued", "reconstructing")]
        log.warning(
            "closing with %d scans unfinished: %s",
            len(left),
            ", ".join(f"{r.scan_id} ({r.status})" for r in left),
        )
        return False
