"""The Bluesky callback: collect the frames of each rocking scan, reconstruct in a worker.

The RunEngine thread only does bookkeeping (copy a frame reference and the motor readback per
event); assembling and reconstructing happen in a worker thread, so a scan never waits for the
analysis, and a failing analysis never aborts a scan.

Queue policy: at most ``queue_size`` assembled volumes wait for the worker. When a new scan
stops and the queue is full, the *oldest waiting* volume is dropped (the live view favours the
newest scan) and recorded in :attr:`BCDIReconstructionCallback.dropped` with a warning; nothing
is dropped silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from event_model import DocumentRouter

from .handlers import DEFAULT_HANDLERS, read_stream_rows
from .recommend import Recommendation, recommend, voxel_size_nm

log = logging.getLogger(__name__)

#: ``publisher(result, start_doc)``; exceptions are logged, never raised into the experiment.
#: A publisher may also have ``collecting(start_doc)`` (a run started), ``configure(settings,
#: start_doc) -> settings | None`` (before reconstructing; None skips the scan),
#: ``progress(stage, info, start_doc)`` (live pipeline stages) and ``failure(message, start_doc)``.
Publisher = Callable[[Any, dict], None]


@dataclass
class ScanRecord:
    """What happened to one run (kept in :attr:`BCDIReconstructionCallback.records`)."""

    uid: str
    scan_id: int | None
    status: str  # collecting, queued, skipped, dropped, reconstructing, done, failed
    message: str = ""
    frames: int = 0
    result: Any = None
    recommendation: Recommendation | None = None
    exposure: float | None = None  # from the detector's configuration in the descriptor
    seconds_in_callback: float = 0.0
    queued_at: float | None = None
    finished_at: float | None = None


@dataclass
class _Run:
    start: dict
    record: ScanRecord
    descriptors: set[str] = field(default_factory=set)
    # (motor readback, seq_num, frame | datum id | None when it comes by StreamDatum)
    frames: list[tuple[float, int, Any]] = field(default_factory=list)
    resources: dict[str, dict] = field(default_factory=dict)
    datums: dict[str, dict] = field(default_factory=dict)
    stream_resources: dict[str, dict] = field(default_factory=dict)
    stream_datums: list[dict] = field(default_factory=list)
    exposure: float | None = None
    max_count: float | None = None


_STOP = object()


class BCDIReconstructionCallback(DocumentRouter):
    """Reconstruct every rocking scan of a RunEngine in a background worker.

    Which runs: those whose ``stream_name`` stream has both ``image_key`` and ``motor_key``,
    unless the start document says ``bcdi_reconstruct=False``.

    Parameters
    ----------
    image_key : str
        Data key of the detector frames (``<detector name>_image`` for the simulated beamline).
    motor_key : str
        Data key of the rocking motor's readback; frames are stacked in its order.
    on_result : callable, optional
        ``on_result(result, start_doc)``, called from the worker for each reconstruction.
    publishers : sequence of callables
        More ``publisher(result, start_doc)`` to feed (IOC, result files, derived runs).
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
    """

    def __init__(self, image_key: str = "det_image", motor_key: str = "theta",
                 on_result: Publisher | None = None, publishers: Sequence[Publisher] = (),
                 reconstructor: Any = None, *, refine: str = "full", queue_size: int = 2,
                 reconstruct_failed: bool = False, stream_name: str = "primary",
                 handler_registry: dict | None = None) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.image_key = image_key
        self.motor_key = motor_key
        self.publishers: list[Publisher] = list(publishers)
        if on_result is not None:
            self.publishers.append(on_result)
        self.reconstructor = reconstructor
        self.refine = refine
        self.reconstruct_failed = reconstruct_failed
        self.stream_name = stream_name
        self.handlers = {**DEFAULT_HANDLERS, **(handler_registry or {})}
        self.records: dict[str, ScanRecord] = {}
        self.dropped: list[ScanRecord] = []
        self._runs: dict[str, _Run] = {}
        self._descriptor_run: dict[str, str] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending = 0
        self._idle = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="bcdi-reconstruction",
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ RunEngine thread
    def __call__(self, name: str, doc: dict, validate: bool = False):
        """Route a document; an error here is logged, never raised into the RunEngine."""
        try:
            return super().__call__(name, doc, validate)
        except Exception:
            log.exception("BCDI callback could not handle a %r document; analysis of that run "
                          "may be incomplete, the experiment goes on", name)
            return name, doc

    def start(self, doc: dict) -> None:
        record = ScanRecord(doc["uid"], doc.get("scan_id"), "collecting")
        self.records[doc["uid"]] = record
        if doc.get("bcdi_reconstruct", True) is False:
            # The plan opted out in its metadata (an alignment scan, a dark series...).
            record.status, record.message = "skipped", "start metadata bcdi_reconstruct=False"
            return
        self._runs[doc["uid"]] = _Run(doc, record)
        self._notify("collecting", doc)

    def _notify(self, hook: str, *args: Any) -> Any:
        """Call ``hook`` on every publisher that has it; errors are logged. Returns False if
        any returned False (a publisher may veto a reconstruction)."""
        verdict = True
        for publisher in self.publishers:
            method = getattr(publisher, hook, None)
            if method is None:
                continue
            try:
                if method(*args) is False:
                    verdict = False
            except Exception:
                log.exception("publisher hook %s failed", hook)
        return verdict

    def _configure(self, start_doc: dict) -> tuple[bool, Any]:
        """``(go, settings)`` for this scan: the reconstructor's settings passed through every
        publisher's ``configure(settings, start_doc)``; ``go`` is False when one of them
        returned None (skip the scan)."""
        settings = getattr(self.reconstructor, "settings", None)
        for publisher in self.publishers:
            method = getattr(publisher, "configure", None)
            if method is None:
                continue
            try:
                configured = method(settings, start_doc)
            except Exception:
                log.exception("publisher hook configure failed")
                continue
            if configured is None:
                return False, settings
            settings = configured
        return True, settings

    def descriptor(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start"))
        if run is None or doc.get("name", "primary") != self.stream_name:
            return
        keys = doc.get("data_keys", {})
        if self.image_key in keys and self.motor_key in keys:
            run.descriptors.add(doc["uid"])
            self._descriptor_run[doc["uid"]] = doc["run_start"]
            # The detector's configuration (read once per stream) gives exposure and saturation.
            device = self.image_key.removesuffix("_image")
            config = doc.get("configuration", {}).get(device, {}).get("data", {})
            run.exposure = config.get(f"{device}_exposure", run.exposure)
            run.max_count = config.get(f"{device}_max_count", run.max_count)

    def resource(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start"))
        if run is not None:
            run.resources[doc["uid"]] = doc

    def datum(self, doc: dict) -> None:
        resource = doc["resource"]
        for run in self._runs.values():
            if resource in run.resources:
                run.datums[doc["datum_id"]] = doc
                return

    def stream_resource(self, doc: dict) -> None:
        run = self._runs.get(doc.get("run_start"))
        if run is not None and doc.get("data_key") == self.image_key:
            run.stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: dict) -> None:
        for run in self._runs.values():
            if doc["stream_resource"] in run.stream_resources:
                run.stream_datums.append(doc)
                return

    def event(self, doc: dict) -> None:
        started = time.perf_counter()
        run_uid = self._descriptor_run.get(doc["descriptor"])
        if run_uid is None:
            return
        run = self._runs[run_uid]
        data = doc["data"]
        # Keep a reference only (an array, a datum id, or None when a StreamDatum carries the
        # frame): the worker reads and stacks. Copying frames here would put the analysis'
        # cost into the scan.
        run.frames.append((float(data[self.motor_key]), int(doc.get("seq_num", 0)),
                           data.get(self.image_key)))
        run.record.seconds_in_callback += time.perf_counter() - started

    def stop(self, doc: dict) -> None:
        started = time.perf_counter()
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            return
        for uid in run.descriptors:
            self._descriptor_run.pop(uid, None)
        record = run.record
        record.frames = len(run.frames)
        record.exposure = run.exposure
        exit_status = doc.get("exit_status", "success")
        if exit_status != "success" and not self.reconstruct_failed:
            record.status, record.message = "skipped", f"run ended with exit_status {exit_status!r}"
            log.info("scan %s not reconstructed: %s", record.scan_id, record.message)
        elif not run.frames:
            record.status = "skipped"
            record.message = (f"no frames with keys {self.image_key!r} and {self.motor_key!r} "
                              f"in stream {self.stream_name!r}")
        else:
            self._enqueue(run)
        record.seconds_in_callback += time.perf_counter() - started

    def _enqueue(self, run: _Run) -> None:
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
                old.record.status = "dropped"
                old.record.message = "a newer scan arrived while the reconstruction queue was full"
                self.dropped.append(old.record)
                log.warning("scan %s dropped from the reconstruction queue (newer scan %s)",
                            old.record.scan_id, run.record.scan_id)
                self._queue.task_done()
                self._done()
        run.record.status = "queued"
        run.record.queued_at = time.time()

    # --------------------------------------------------------------- worker thread
    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _work(self) -> None:
        while True:
            run = self._queue.get()
            if run is _STOP:
                self._queue.task_done()
                return
            try:
                self._reconstruct(run)
            finally:
                self._queue.task_done()
                self._done()

    def _frame(self, run: _Run, value: Any, seq_num: int, streamed: dict[int, np.ndarray]):
        if value is None:
            if seq_num not in streamed:
                raise ValueError(f"no frame for event {seq_num}: neither in the event nor in "
                                 "a StreamDatum")
            return streamed[seq_num]
        if isinstance(value, str):  # a datum id: the frame is in a file
            datum = run.datums.get(value)
            if datum is None:
                raise ValueError(f"no datum document for {value!r}")
            resource = run.resources[datum["resource"]]
            handler_class = self.handlers.get(resource["spec"])
            if handler_class is None:
                raise ValueError(f"no handler for resource spec {resource['spec']!r}")
            handler = handler_class(resource["resource_path"], root=resource.get("root", ""),
                                    **resource.get("resource_kwargs", {}))
            return handler(**datum["datum_kwargs"])
        return value

    def _streamed(self, run: _Run) -> dict[int, np.ndarray]:
        frames: dict[int, np.ndarray] = {}
        for datum in run.stream_datums:
            resource = run.stream_resources[datum["stream_resource"]]
            idx, seq = datum["indices"], datum["seq_nums"]
            rows = read_stream_rows(resource["uri"], resource["parameters"]["dataset"],
                                    idx["start"], idx["stop"])
            for k, row in enumerate(rows):
                frames[seq["start"] + k] = row
        return frames

    def _volume(self, run: _Run) -> tuple[np.ndarray, np.ndarray]:
        frames = sorted(run.frames, key=lambda f: (f[0], f[1]))
        streamed = self._streamed(run) if run.stream_datums else {}
        return (np.stack([np.asarray(self._frame(run, f[2], f[1], streamed), dtype=np.float32)
                          for f in frames]),
                np.array([f[0] for f in frames]))

    def latest(self) -> ScanRecord | None:
        """The record of the most recent run that reached the worker (done or failed)."""
        finished = [r for r in self.records.values() if r.status in ("done", "failed")]
        return finished[-1] if finished else None

    def _reconstruct(self, run: _Run) -> None:
        record = run.record
        record.status = "reconstructing"
        try:
            volume, thetas = self._volume(run)
            try:
                record.recommendation = recommend(volume, thetas, run.exposure, run.max_count)
            except ValueError as exc:
                log.warning("no recommendation for scan %s: %s", record.scan_id, exc)
            if self.reconstructor is None:
                from ..pipeline import Reconstructor

                self.reconstructor = Reconstructor()
            go, settings = self._configure(run.start)
            if not go:
                record.status, record.message = "skipped", "a publisher disabled reconstruction"
                return
            result = self.reconstructor.reconstruct(
                volume, refine=self.refine, settings=settings,
                progress=lambda stage, info: self._notify("progress", stage, info, run.start))
        except Exception as exc:
            record.status, record.message = "failed", f"{type(exc).__name__}: {exc}"
            record.finished_at = time.time()
            log.error("reconstruction of scan %s failed: %s", record.scan_id, record.message)
            self._notify("failure", record.message, run.start)
            return
        if hasattr(result, "metadata"):
            voxel = voxel_size_nm(run.start.get("bcdi", {}), result.object.shape)
            result.metadata.update(
                uid=record.uid, scan_id=record.scan_id,
                recommendation=(record.recommendation.as_dict() if record.recommendation
                                else None),
                voxel_size_nm=None if voxel is None else voxel.tolist())
        record.result = result
        record.status = "done"
        record.finished_at = time.time()
        for publish in self.publishers:
            try:
                publish(result, run.start)
            except Exception:
                log.exception("a publisher failed on scan %s", record.scan_id)

    # -------------------------------------------------------------------- control
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued reconstruction has finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued work and stop the worker thread."""
        self._queue.put(_STOP)
        self._worker.join(timeout)
