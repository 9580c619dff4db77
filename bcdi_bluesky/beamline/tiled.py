"""Tiled as the source and the sink of runs: read rocking scans, write reconstructions back.

Runs written by bluesky-tiled-plugins' ``TiledWriter`` are containers keyed by their uid,
with the start and stop documents in ``metadata["start"]`` and ``metadata["stop"]`` and one
container per event stream. The frames are read from the stream's array node
(``run[stream][image_key]``): the server serves them, whether the events carried them or an
HDF5 file announced by a StreamResource holds them, so this host needs no access to the
detector's files. Reconstructions go back as derived runs (start metadata ``parent_uid``)
through the same ``TiledWriter``, one per source run (:class:`WriteBack`).

Live follow (:class:`RunFollower`, :class:`TiledRunSource`) listens to the server's WebSocket
stream of the root container: when ``TiledWriter`` adds the stop document to a run's
metadata, the run is complete and is read. The stream needs a server with a streaming cache
(``tiled serve ... --temp`` has one in memory; a deployed server is given ``--cache``);
against a server without one, :class:`TiledRunSource` asks the catalog for completed runs at
every server check instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from .callback import NotReconstructable, exception_text, scan_geometry, skipped_by_design
from .publishers import DERIVED_PLAN_NAME, DerivedRunPublisher
from .recommend import annotate_result
from .scaleout import ReconstructorSpec, reconstruct_volume

if TYPE_CHECKING:
    from ..settings import ReconstructionSettings

log = logging.getLogger(__name__)

#: Largest WebSocket message the live subscription accepts (a run's metadata update holds its
#: start and stop documents; tiled's own default, 1 MB, is near what a start with a
#: diffractometer record and sample notes can reach). A longer one ends tiled's
#: subscription for good; :class:`TiledRunSource` then subscribes again.
MAX_UPDATE_BYTES = 16 * 2**20

#: Seconds :func:`connect` waits for the server's host to accept a connection.
CONNECT_TIMEOUT_S = 10.0

#: The HTTP status of a write that the server refuses because the key exists.
HTTP_CONFLICT = 409

#: Seconds :class:`RunFollower` waits for the WebSocket connection to the server.
SUBSCRIBE_TIMEOUT_S = 30.0

#: Seconds between two tries to subscribe of :class:`TiledRunSource` after one failed (it
#: asks the catalog at every server check meanwhile).
SUBSCRIBE_RETRY_S = 60.0

#: Seconds between two questions of :func:`reprocess` to its ``lost`` while it awaits a
#: result.
LOST_CHECK_S = 1.0

#: Seconds before each new try at a run whose read failed on the way (the server busy or
#: restarting, the connection broken), in :class:`TiledRunSource`: three tries over 3 s.
READ_RETRY_DELAYS_S = (1.0, 2.0)

#: Seconds :class:`TiledRunSource` waits for a live run before it looks at its subscription
#: again; :meth:`TiledRunSource.stop` takes effect within about this long.
POLL_S = 0.5

#: Seconds between two questions of :class:`TiledRunSource` to the server (does it answer?),
#: while it answers and while it stays away alike.
SERVER_CHECK_S = 5.0

#: Seconds between two more tries at a run whose read still failed after
#: :data:`READ_RETRY_DELAYS_S`, and after how many seconds of failures it is given up.
PENDING_RETRY_S = 30.0
PENDING_GIVE_UP_S = 600.0

#: The runs that no subscription delivered (tiled ended it, the server went away or
#: restarted) are asked from the catalog by :class:`TiledRunSource`: at each server check
#: for ``CATCH_UP_WINDOW_S`` after each interruption it sees (tiled's own reconnection of a
#: subscription waits up to 45 s between its tries, ``TILED_RETRY_TIMEOUT``, and a run that
#: completes in that gap reaches no subscription), and every ``CATCH_UP_EVERY_S`` (an
#: interruption shorter than :data:`SERVER_CHECK_S` goes unseen). Asked: the runs whose
#: stop time is at most ``CATCH_UP_MARGIN_S`` before the previous question (the clocks of
#: the acquisition host and of this one may differ), the last ``CATCH_UP_MAX_RUNS`` of them.
CATCH_UP_WINDOW_S = 60.0
CATCH_UP_EVERY_S = 60.0
CATCH_UP_MARGIN_S = 60.0
CATCH_UP_MAX_RUNS = 100


class ReadFailure(DataError):
    """A run that could not be read on the way (the server or the connection): a later try
    may succeed, unlike a run that is not there or not a rocking curve."""


def connect(url: str, api_key: str | None = None) -> Any:
    """A Tiled client for ``url`` (numpy arrays, no dask).

    Raises
    ------
    DataError
        No server answered, or it refused the key.
    """
    import socket
    import urllib.parse

    from tiled.client import from_uri

    # The tiled client tries a refused connection again for tens of seconds: a wrong host or
    # port is told at once.
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http:// or https:// address")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot connect to Tiled at {url}: {exc}") from None
    try:
        return from_uri(url, api_key=api_key, remember_me=False)
    except Exception as exc:  # httpx and tiled raise several kinds; all mean "cannot use it"
        raise DataError(f"cannot connect to Tiled at {url}: {type(exc).__name__}: {exc}") from None


@dataclass
class TiledRun:
    """One rocking scan read from Tiled: the frames stacked in rocking-angle order."""

    uid: str
    start: dict
    volume: np.ndarray  # float32, (frames, rows, columns)
    thetas: np.ndarray
    stop: dict = field(default_factory=dict)
    #: The run's node in the client (its descriptors are read from it when wanted).
    node: Any = field(default=None, repr=False, compare=False)


def is_derived(start: dict) -> bool:
    """True for a run that is itself a reconstruction (it has a ``parent_uid``)."""
    return "parent_uid" in start


def recent_runs(
    client: Any, last: int, stream_name: str = "primary", image_key: str = "det_image"
) -> list[str]:
    """The uids of the ``last`` most recent completed raw runs with frames, oldest first.

    Derived runs (a ``parent_uid`` in their start), runs without a stop document or that did
    not end in success, and runs without ``image_key`` in ``stream_name`` are passed over.
    """
    uids: list[str] = []
    keys = client.keys()
    # A container lists its children in the order they were written: page back from the
    # end, so that a catalog of a million runs is not listed to find the last ten.
    end, page = len(keys), 4 * max(last, 1)
    while end > 0 and len(uids) < last:
        start = max(end - page, 0)
        for uid in reversed(list(keys[start:end])):
            run = client[uid]
            metadata = run.metadata
            stop = metadata.get("stop")
            if is_derived(metadata.get("start", {})) or not stop:
                continue
            if not _ended_in_success(stop):  # failed or aborted
                continue
            if stream_name in run and image_key in run[stream_name]:
                uids.append(uid)
                if len(uids) == last:
                    break
        end = start
    return uids[::-1]


def completed_runs(client: Any, since: float, last: int = CATCH_UP_MAX_RUNS) -> list[str]:
    """The uids of the runs completed at or after ``since`` (their stop document's ``time``,
    seconds since the epoch), in the order they completed; the ``last`` latest of them.

    Derived runs are passed over; a run that failed or was aborted is listed (the live
    follow sends it too, and the callback records it skipped).
    """
    from tiled.queries import Key

    found: list[tuple[float, str]] = []
    for uid, run in client.search(Key("stop.time") >= float(since)).items():
        metadata = run.metadata
        if is_derived(metadata.get("start", {})):
            continue
        found.append((float(metadata["stop"].get("time", since)), uid))
    found.sort()
    if len(found) > last:
        log.warning(
            "%d runs completed since %s; the %d oldest are left to bcdi-bluesky reprocess: %s",
            len(found),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
            len(found) - last,
            " ".join(uid for _, uid in found[: len(found) - last]),
        )
    return [uid for _, uid in found[-last:]] if last > 0 else []


def server_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a Tiled server at ``url`` answers ``GET /api/v1/`` within ``timeout`` seconds.

    Asked without the tiled client, which tries a refused connection again for up to 45 s.
    """
    import urllib.error
    import urllib.request

    base = url.rstrip("/")
    if not base.endswith("/api/v1"):
        base += "/api/v1"
    try:
        with urllib.request.urlopen(f"{base}/", timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:  # it answered: a refusal is still an answer
        return exc.code < 500
    except OSError:
        return False


def read_run(
    client: Any,
    uid: str,
    image_key: str = "det_image",
    motor_key: str = "theta",
    stream_name: str = "primary",
) -> TiledRun:
    """Read the frames and rocking angles of run ``uid`` through Tiled.

    Raises
    ------
    ReadFailure
        The server or the connection failed on the way (a later try may succeed).
    DataError
        No such run, no such stream or key, or frames and angles that do not match.
    """
    try:
        run = client[uid]
    except KeyError:
        raise DataError(f"no run {uid!r} in the Tiled catalog") from None
    except Exception as exc:  # the server gone, the connection broken: this run fails
        raise ReadFailure(f"run {uid}: cannot reach it ({type(exc).__name__}: {exc})") from None
    try:
        metadata = run.metadata
        start = dict(metadata.get("start", {}))
        stop = metadata.get("stop")
        if not _ended_in_success(stop):
            # As the live callback: a failed or aborted scan is not a rocking curve.
            raise NotReconstructable(f"run ended with exit_status {stop['exit_status']!r}")
        stream = run[stream_name]
        missing = [key for key in (image_key, motor_key) if key not in stream]
    except DataError:
        raise
    except KeyError:
        raise DataError(f"run {uid}: no stream {stream_name!r}") from None
    except Exception as exc:
        raise ReadFailure(f"run {uid}: cannot read it ({type(exc).__name__}: {exc})") from None
    if missing:
        raise DataError(f"run {uid}: stream {stream_name!r} has no {', '.join(missing)}")
    # The array nodes, not stream.read(): that goes through xarray, which trips on the
    # duplicated dimension names of the frames.
    try:
        frames = np.asarray(stream[image_key].read(), dtype=np.float32)
        thetas = np.asarray(stream[motor_key].read(), dtype=np.float64)
    except Exception as exc:  # the server could not read a file, the connection broke...
        raise ReadFailure(
            f"run {uid}: cannot read the frames: {type(exc).__name__}: {exc}"
        ) from None
    if frames.ndim != 3 or frames.shape[0] != thetas.shape[0] or frames.shape[0] == 0:
        raise DataError(
            f"run {uid}: {frames.shape[0] if frames.ndim else 0} frames of shape "
            f"{frames.shape[1:]} for {thetas.shape[0]} rocking angles"
        )
    order = np.argsort(thetas, kind="stable")
    return TiledRun(uid, start, frames[order], thetas[order], dict(stop), run)


def derived_run(client: Any, uid: str) -> str | None:
    """The uid of the latest reconstruction of run ``uid`` stored in the catalog, or None.

    A reconstruction is a derived run written by
    :class:`~bcdi_bluesky.beamline.DerivedRunPublisher` (start ``plan_name``
    :data:`~bcdi_bluesky.beamline.publishers.DERIVED_PLAN_NAME`, ``parent_uid`` ``uid``)
    that is complete (its stop document says success); runs derived by other tools, and a
    write-back cut off before its stop, do not count.
    """
    from tiled.queries import Key

    found = (
        client.search(Key("start.parent_uid") == uid)
        .search(Key("start.plan_name") == DERIVED_PLAN_NAME)
        .search(Key("stop.exit_status") == "success")
    )
    # A container lists its children in the order they were written: the last is the latest.
    keys = list(found.keys())
    return keys[-1] if keys else None


#: The namespace of :func:`derived_uid`'s name-based UUIDs (fixed: other code may derive them).
DERIVED_UID_NAMESPACE = uuid.UUID("5d0f3b1e-8a44-4c1b-9a43-6b1f0c2e7d90")

#: Seconds :class:`WriteBack` waits for the stop of a derived run that another process is
#: writing at the same moment (a run's four documents take well under a second to write).
WRITE_BACK_SETTLE_S = 10.0


def derived_uid(parent_uid: str) -> str:
    """The uid of the derived run that :class:`WriteBack` writes first for run ``parent_uid``
    (a name-based UUID: two processes writing back the same run choose the same one, and the
    server refuses the second)."""
    return str(uuid.uuid5(DERIVED_UID_NAMESPACE, f"{DERIVED_PLAN_NAME}:{parent_uid}"))


class WriteConflict(DataError):
    """A derived run with the uid :class:`WriteBack` would write is in the catalog, unfinished."""


class WriteBack:
    """Write each reconstruction into the Tiled server as a derived run, once per source run.

    The first derived run of a source run has the uid :func:`derived_uid`, so two processes
    that write back the same run at the same moment leave one derived run: the server refuses
    the second start document (HTTP 409), and the second process waits for the first's stop
    and reports that run as the one in the catalog.

    Parameters
    ----------
    client : tiled client
        The catalog holding the source runs (the derived runs go into it too).
    overwrite : bool
        Write a derived run also for a source run that has one already (:func:`derived_run`),
        with a new uid; the earlier ones stay in the catalog.
    settle_s : float
        Seconds to wait for the stop of a derived run that another process is writing.
    """

    def __init__(
        self, client: Any, overwrite: bool = False, settle_s: float = WRITE_BACK_SETTLE_S
    ) -> None:
        self.client = client
        self.overwrite = overwrite
        self.settle_s = float(settle_s)
        self._publish = DerivedRunPublisher(tiled_writer(client))

    def __call__(self, result: Any, start_doc: dict) -> tuple[str, bool]:
        """The uid of the derived run of ``start_doc``'s run, and whether it was written now
        (False: it was in the catalog already, and nothing was written).

        Raises
        ------
        WriteConflict
            The derived run of uid :func:`derived_uid` is in the catalog without its stop
            after ``settle_s`` (a write-back cut off, or one still writing): ``overwrite``
            writes another.
        """
        if self.overwrite:
            return self._publish(result, start_doc), True
        parent = start_doc["uid"]
        existing = derived_run(self.client, parent)
        if existing is not None:
            return existing, False
        uid = derived_uid(parent)
        try:
            with warnings.catch_warnings():
                # event-model's RunRouter warns before it passes on any error of a start
                # document (a hint for old callback factories); the refusal is expected here.
                warnings.filterwarnings(
                    "ignore", message=r"The callback .* RunRouter passed it", category=UserWarning
                )
                return self._publish(result, start_doc, uid=uid), True
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) != HTTP_CONFLICT:
                raise
        if self._settled(uid):
            return uid, False
        raise WriteConflict(
            f"derived run {uid} of this run is in the catalog but not complete after "
            f"{self.settle_s:g} s (a write-back cut off, or another still writing): "
            "--overwrite writes another"
        )

    def _settled(self, uid: str) -> bool:
        """Whether derived run ``uid``, written by another process, ends in success within
        ``settle_s``."""
        deadline = time.monotonic() + self.settle_s
        while True:
            try:
                stop = self.client[uid].metadata.get("stop")
            except Exception:  # not readable yet, or the server busy: look again
                stop = None
            if stop:
                return _ended_in_success(stop)
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))


def tiled_writer(client: Any) -> Callable[[str, dict], None]:
    """An ``emit(name, doc)`` that writes runs into ``client`` with ``TiledWriter`` (derived
    runs of :class:`~bcdi_bluesky.beamline.DerivedRunPublisher`, or a RunEngine's runs)."""
    from bluesky_tiled_plugins import TiledWriter

    return TiledWriter(client)


@dataclass
class Outcome:
    """What became of one run in :func:`reprocess`: a result, or the reason there is none
    (``skipped``: not reconstructed by design, as the live callback skips such a scan)."""

    uid: str
    start: dict
    result: Any = None
    error: str = ""
    skipped: bool = False


def reprocess(
    client: Any,
    uids: Sequence[str],
    executor: Executor,
    spec: ReconstructorSpec | None = None,
    *,
    refine: str = "full",
    settings: ReconstructionSettings | None = None,
    image_key: str = "det_image",
    motor_key: str = "theta",
    stream_name: str = "primary",
    window: int = 4,
    timeout: float | None = 3600.0,
    lost: Callable[[], str | None] | None = None,
) -> Iterator[Outcome]:
    """Reconstruct Tiled runs on ``executor``; yield one :class:`Outcome` per uid, in order.

    A run whose start document carries its geometry (hklpy2's record or ``bcdi.geometry``)
    gets its results in the lab frame, as the live callback gives them.

    Up to ``window`` runs are read and in the executor's hands at once (memory stays bounded
    on a long list; the executor decides where they run). A run that cannot be read or
    submitted, a task that raised (after the executor's retries) or that gave no answer
    within ``timeout`` seconds gives an outcome with ``error`` set; the others go on.

    ``lost``, asked before each run is read and every :data:`LOST_CHECK_S` while a result is
    awaited, returns why the executor can take no more runs (a Dask scheduler lost:
    :meth:`~bcdi_bluesky.beamline.scaleout.ClientWatch.lost_reason`), or None; from then on
    the run awaited and each run left get an outcome with that error, the latter unread.
    """
    spec = spec or ReconstructorSpec()
    # (uid, start, future or None, the error that stopped it before, its deadline)
    pending: list[tuple[str, dict, Future | None, DataError | None, float]] = []
    why_lost: str | None = None

    def settle(
        uid: str, start: dict, future: Future | None, error: DataError | None, deadline: float
    ) -> Outcome:
        if future is None:
            return Outcome(uid, start, error=str(error), skipped=skipped_by_design(error))
        nonlocal why_lost
        while True:
            left = None if timeout is None else max(deadline - time.monotonic(), 0.0)
            try:
                result = future.result(
                    timeout=LOST_CHECK_S if left is None else min(left, LOST_CHECK_S)
                )
            except FutureTimeout:
                if left is not None and left <= LOST_CHECK_S:
                    future.cancel()
                    return Outcome(
                        uid, start, error=f"no result within {timeout:g} s of its submission"
                    )
                if why_lost is None and lost is not None:
                    why_lost = lost()
                if why_lost is not None:  # its result would never come
                    future.cancel()
                    return Outcome(uid, start, error=why_lost)
                continue
            except Exception as exc:
                return Outcome(
                    uid, start, error=exception_text(exc), skipped=skipped_by_design(exc)
                )
            annotate_result(result, start)
            return Outcome(uid, start, result)

    for uid in uids:
        deadline = time.monotonic() + (timeout or 0.0)
        if why_lost is None and lost is not None:
            why_lost = lost()
        try:
            if why_lost is not None:  # no run left would be reconstructed: none is read
                raise DataError(why_lost)
            run = read_run(client, uid, image_key, motor_key, stream_name)
        except DataError as exc:
            pending.append((uid, _stored_start(client, uid), None, exc, deadline))
        else:
            geometry = scan_geometry(run.start, run.thetas, run.start.get("scan_id", uid))
            options = {} if geometry is None else {"geometry": geometry}
            try:
                future = executor.submit(
                    reconstruct_volume, spec, run.volume, refine, settings, **options
                )
            except Exception as exc:  # a closed client, a shut-down pool: this run fails
                error = DataError(f"not submitted: {exception_text(exc)}")
                pending.append((uid, run.start, None, error, deadline))
            else:
                pending.append((uid, run.start, future, None, deadline))
        while len(pending) >= max(window, 1):
            yield settle(*pending.pop(0))
    while pending:
        yield settle(*pending.pop(0))


def _ended_in_success(stop: dict | None) -> bool:
    """A stop document's exit status is success (a run without one says nothing else)."""
    return (stop or {}).get("exit_status", "success") == "success"


def _stored_start(client: Any, uid: str) -> dict:
    """The run's start document where the server has it (its scan id names the failure),
    else just the uid."""
    try:
        start = dict(client[uid].metadata["start"])
    except Exception:  # a missing run, no start in its metadata, the server gone
        return {"uid": uid}
    return {**start, "uid": uid}


class SubscriptionFailed(DataError):
    """The Tiled server's WebSocket stream could not be followed (refused, or no connection
    within :data:`SUBSCRIBE_TIMEOUT_S`)."""


class RunFollower:
    """Call ``on_run(uid)`` for every run that completes on a Tiled server, live.

    It subscribes to the root container's WebSocket stream; ``TiledWriter`` adds the stop
    document to a run's metadata when the run ends, which arrives here as a metadata update.
    Derived runs are passed over. Use as a context manager, or call :meth:`close`.

    Raises
    ------
    SubscriptionFailed
        The server refused the stream (one without a streaming cache answers HTTP 500), or
        gave no connection within ``timeout`` seconds.
    """

    def __init__(
        self,
        client: Any,
        on_run: Callable[[str], None],
        max_update_bytes: int = MAX_UPDATE_BYTES,
        timeout: float | None = None,
    ) -> None:
        self.on_run = on_run
        self._seen: set[str] = set()  # a run's metadata may be updated after its stop
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self.subscription = client.subscribe()
        self.subscription.child_metadata_updated.add_callback(self._updated)
        # Not tiled's start_in_thread: it waits without a limit for a connection that its
        # thread may never make (when the handshake is refused that thread just ends).
        self._thread = threading.Thread(
            target=self._listen, args=(int(max_update_bytes),), daemon=True, name="tiled-follow"
        )
        self._thread.start()
        self._wait_connected(SUBSCRIBE_TIMEOUT_S if timeout is None else float(timeout))

    def _listen(self, max_size: int) -> None:
        try:
            self.subscription.start(max_size=max_size)
        except Exception as exc:  # a refused handshake, or retries spent: kept for the error
            self._failure = exc

    def _wait_connected(self, timeout: float) -> None:
        # tiled sets this event once the WebSocket handshake succeeds; it has no public one.
        connected = getattr(self.subscription, "_connected_event", None)
        if connected is None:
            return
        deadline = time.monotonic() + timeout
        while not connected.wait(0.05):
            if not self._thread.is_alive():
                failure = self._failure
                why = f"{type(failure).__name__}: {failure}" if failure else "the stream ended"
                raise SubscriptionFailed(
                    f"the Tiled server refused its WebSocket stream ({why}); a server "
                    "streams updates only when it has a streaming cache"
                )
            if time.monotonic() >= deadline:
                self.close(wait=False)
                raise SubscriptionFailed(
                    f"no WebSocket connection to the Tiled server within {timeout:g} s"
                )

    @property
    def alive(self) -> bool:
        """Whether the subscription still listens (tiled ends it for good, with one log line,
        on a message longer than ``max_update_bytes``)."""
        return self._thread.is_alive()

    def _updated(self, update: Any) -> None:
        metadata = update.metadata or {}
        if not metadata.get("stop") or is_derived(metadata.get("start", {})):
            return
        with self._lock:
            if update.key in self._seen:
                return
            self._seen.add(update.key)
        try:
            self.on_run(update.key)
        except Exception:  # a failing consumer must not end the subscription
            log.exception("handling run %s failed", update.key)

    def close(self, wait: bool = True) -> None:
        """Stop listening; ``wait``: until the subscription's thread has ended (while the
        server is away, that thread may be in tiled's pause between two reconnection tries,
        up to 45 s)."""
        self.subscription.disconnect(wait=False)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> RunFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_documents(
    client: Any,
    uid: str,
    image_key: str = "det_image",
    motor_key: str = "theta",
    stream_name: str = "primary",
) -> Iterator[tuple[str, dict]]:
    """The documents of a stored run, with the frames read through Tiled inside the events.

    Start and stop are the stored ones; the descriptor is the stored one of ``stream_name``
    (detector configuration included) with the frames marked as carried by the events; one
    event per frame, in the stored order. A callback consumes them like a live run.
    """
    data = read_run(client, uid, image_key, motor_key, stream_name)
    stop = data.stop
    try:
        descriptors = data.node.descriptors
        stored = [dict(d) for d in descriptors if d.get("name", "primary") == stream_name]
    except Exception as exc:  # read a moment ago: the server or the connection failed since
        raise ReadFailure(
            f"run {uid}: cannot read its descriptors: {type(exc).__name__}: {exc}"
        ) from None
    descriptor = (
        dict(stored[0]) if stored else {"configuration": {}, "hints": {}, "object_keys": {}}
    )
    keys = dict(descriptor.get("data_keys", {}))
    keys[image_key] = {
        "source": "tiled",
        "dtype": "array",
        "dtype_numpy": "<f4",
        "shape": list(data.volume.shape[1:]),
    }
    keys[motor_key] = dict(keys.get(motor_key, {"source": "tiled", "dtype": "number", "shape": []}))
    descriptor.update(
        uid=f"{uid}-{stream_name}-replay",
        run_start=uid,
        name=stream_name,
        time=descriptor.get("time", time.time()),
        data_keys={image_key: keys[image_key], motor_key: keys[motor_key]},
    )
    yield "start", data.start
    yield "descriptor", descriptor
    for k, (frame, theta) in enumerate(zip(data.volume, data.thetas, strict=True)):
        now = time.time()
        yield (
            "event",
            {
                "uid": f"{descriptor['uid']}-{k + 1}",
                "descriptor": descriptor["uid"],
                "seq_num": k + 1,
                "time": now,
                "filled": {},
                "data": {image_key: frame, motor_key: float(theta)},
                "timestamps": {image_key: now, motor_key: now},
            },
        )
    yield "stop", stop


def _start_and_stop(client: Any, uid: str) -> list[tuple[str, dict]]:
    """A stored run's start and stop documents (none when the server cannot give them)."""
    try:
        metadata = client[uid].metadata
        return [("start", dict(metadata["start"])), ("stop", dict(metadata["stop"]))]
    except Exception:  # the server gone, a run without a stop: nothing to tell
        return []


@dataclass
class _Watch:
    """What :meth:`TiledRunSource.start` knows of its server between two checks (times from
    ``time.monotonic`` unless said otherwise)."""

    url: str
    #: Wall clock of the start: the catalog is never asked for runs completed before it.
    started: float
    #: Wall clock of the last question the catalog answered.
    asked: float
    #: Since when the server does not answer (None while it answers).
    away_since: float | None = None
    next_check: float = 0.0
    next_catch_up: float = 0.0
    #: The catalog is asked at every check until then (after an interruption).
    catch_up_until: float = 0.0
    #: The last try to subscribe failed (its line is written once); the catalog is asked at
    #: every check until a try succeeds.
    refused: bool = False
    next_subscribe: float = 0.0


class TiledRunSource:
    """Runs completed on a Tiled server as documents, live: a document source for
    :class:`~bcdi_bluesky.beamline.BCDIReconstructionCallback` with the interface of
    bluesky's ``RemoteDispatcher`` (``subscribe``, a blocking ``start``, ``stop``).

    Each run is sent once its stop document reaches the server (:class:`RunFollower`), with
    its frames read through Tiled (:func:`run_documents`), each run once, one run at a time,
    from the thread that called :meth:`start`.

    A read that fails on the way (the server or the connection: :class:`ReadFailure`) is
    tried again after :data:`READ_RETRY_DELAYS_S`; a run still unread is kept pending and
    tried every :data:`PENDING_RETRY_S` while the server answers. After
    :data:`PENDING_GIVE_UP_S` of failures it is sent as its start and stop only, or, when
    not even those can be read, logged with its uid for ``bcdi-bluesky reprocess``. A run
    whose frames cannot be read (it failed or was aborted, has no frames, a file is missing)
    is logged and sent as its start and stop only, so the callback records it and tells its
    publishers.

    The server is asked every :data:`SERVER_CHECK_S` whether it answers. While it stays
    away, :meth:`start` goes on asking (one warning per outage) and tiled's subscription
    tries to reconnect by itself. Where the server refuses the subscription (no streaming
    cache) or gives no connection within :data:`SUBSCRIBE_TIMEOUT_S`, one warning says so,
    the catalog is asked for completed runs at every check, and subscribing is tried again
    every :data:`SUBSCRIBE_RETRY_S`. A subscription that tiled ends (an update longer than
    ``max_update_bytes``, or the server closing the stream) is made again with one warning,
    counted in :attr:`resubscriptions`, as soon as the server answers. The runs that no
    subscription delivered are asked from the catalog (:func:`completed_runs`) at each
    check for :data:`CATCH_UP_WINDOW_S` after each such interruption and every
    :data:`CATCH_UP_EVERY_S`, bounded by
    :data:`CATCH_UP_MARGIN_S` and :data:`CATCH_UP_MAX_RUNS`, and those not sent yet are
    sent in the order they completed. Runs that completed before :meth:`start` are not sent
    (``bcdi-bluesky reprocess`` reads them).

    :meth:`stop` makes :meth:`start` return within about :data:`POLL_S` once the run in
    hand is sent; the runs still pending or queued are dropped with one warning naming
    them.
    """

    def __init__(
        self,
        client: Any,
        image_key: str = "det_image",
        motor_key: str = "theta",
        stream_name: str = "primary",
        max_update_bytes: int = MAX_UPDATE_BYTES,
    ) -> None:
        self.client = client
        self.keys = (image_key, motor_key, stream_name)
        self.max_update_bytes = int(max_update_bytes)
        self.resubscriptions = 0
        #: The live follower (None before :meth:`start`, and while the server stays away
        #: after tiled ended the subscription).
        self.follower: RunFollower | None = None
        self._consumers: list[Callable[[str, dict], Any]] = []
        self._stop = threading.Event()
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Runs sent or in hand: the live follow, the catch-up and the pending retries meet
        # here, all in the thread of start().
        self._sent: set[str] = set()
        # uid -> (monotonic time of the first failure, of the next try)
        self._pending: dict[str, tuple[float, float]] = {}

    def subscribe(self, func: Callable[[str, dict], Any]) -> None:
        """Send every document to ``func(name, doc)``."""
        self._consumers.append(func)

    def _documents(self, uid: str) -> list[tuple[str, dict]]:
        """The run's documents, tried again after :data:`READ_RETRY_DELAYS_S` while its read
        fails on the way (:class:`ReadFailure`; not after :meth:`stop`)."""
        delays = list(READ_RETRY_DELAYS_S)
        while True:
            try:
                return list(run_documents(self.client, uid, *self.keys))
            except ReadFailure as exc:
                if not delays or self._stop.is_set():
                    raise
                delay = delays.pop(0)
                log.warning("%s; trying again in %.1f s", exc, delay)
                self._stop.wait(delay)

    def _emit(self, documents: list[tuple[str, dict]]) -> None:
        for name, doc in documents:
            for consumer in self._consumers:
                consumer(name, doc)

    def _send(self, uid: str) -> None:
        self._sent.add(uid)
        try:
            documents = self._documents(uid)
        except ReadFailure as exc:
            now = time.monotonic()
            self._pending[uid] = (now, now + PENDING_RETRY_S)
            log.warning(
                "%s; trying again every %g s for %g s", exc, PENDING_RETRY_S, PENDING_GIVE_UP_S
            )
            return
        except DataError as exc:
            self._send_ends(uid, str(exc))
            return
        self._emit(documents)

    def _send_ends(self, uid: str, why: str) -> None:
        """The run's start and stop alone: the callback records the scan (skipped: it ended
        badly, has no frames, or could not be read) and tells the publishers, as for a live
        run; when not even those can be read, one line names the run for ``reprocess``."""
        documents = _start_and_stop(self.client, uid)
        if documents:
            log.warning("frames not sent: %s", why)
            self._emit(documents)
        else:
            log.error("run %s not sent: %s; bcdi-bluesky reprocess reads it", uid, why)

    def _retry_pending(self) -> None:
        for uid, (first, due) in list(self._pending.items()):
            now = time.monotonic()
            if now < due or self._stop.is_set():
                continue
            try:
                documents = list(run_documents(self.client, uid, *self.keys))
            except ReadFailure as exc:
                if now - first < PENDING_GIVE_UP_S:
                    self._pending[uid] = (first, now + PENDING_RETRY_S)
                    continue
                del self._pending[uid]
                self._send_ends(uid, f"unread for {PENDING_GIVE_UP_S:g} s ({exc})")
                continue
            except DataError as exc:
                del self._pending[uid]
                self._send_ends(uid, str(exc))
                continue
            del self._pending[uid]
            self._emit(documents)

    def _catch_up(self, since: float) -> bool:
        """Send the runs completed since ``since`` that are not sent yet; False when the
        catalog could not be asked."""
        try:
            uids = completed_runs(self.client, since, CATCH_UP_MAX_RUNS)
        except Exception as exc:  # the server gone again: the next check asks again
            log.warning(
                "cannot list the runs completed since %s: %s: %s",
                time.strftime("%H:%M:%S", time.localtime(since)),
                type(exc).__name__,
                exc,
            )
            return False
        for uid in uids:
            if self._stop.is_set():
                break
            if uid not in self._sent:
                log.info("run %s: its stop did not come through the subscription", uid)
                self._send(uid)
        return True

    def _server_answers(self, watch: _Watch, now: float) -> bool:
        """Ask the server; one line when it stops answering and one when it answers again,
        which opens a catch-up window."""
        if not server_answers(watch.url):
            if watch.away_since is None:
                watch.away_since = now
                log.warning(
                    "the Tiled server at %s does not answer: asking again every %g s; the "
                    "runs completed meanwhile are sent when it answers",
                    watch.url,
                    SERVER_CHECK_S,
                )
            return False
        if watch.away_since is not None:
            log.warning("the Tiled server answers again after %.0f s", now - watch.away_since)
            watch.away_since, watch.catch_up_until = None, now + CATCH_UP_WINDOW_S
        return True

    def _subscribed(self, watch: _Watch, now: float, ended: bool) -> bool:
        """A live follower, made again when tiled ended the last one (which opens a catch-up
        window); False when subscribing fails (tried again after :data:`SUBSCRIBE_RETRY_S`;
        the catalog is asked at every check meanwhile)."""
        if ended:
            self.resubscriptions += 1
            log.warning(
                "the Tiled subscription ended (an update longer than %d bytes?): subscribing again",
                self.max_update_bytes,
            )
            self.follower.close()
            self.follower, watch.catch_up_until = None, now + CATCH_UP_WINDOW_S
        if self.follower is None:
            if watch.refused and now < watch.next_subscribe:
                return False
            try:
                self.follower = RunFollower(self.client, self._queue.put, self.max_update_bytes)
            except Exception as exc:  # tried again after SUBSCRIBE_RETRY_S
                watch.next_subscribe = now + SUBSCRIBE_RETRY_S
                if not watch.refused:
                    log.warning(
                        "cannot subscribe to the Tiled server (%s: %s): asking its catalog for "
                        "completed runs every %g s, and subscribing again every %g s",
                        type(exc).__name__,
                        exc,
                        SERVER_CHECK_S,
                        SUBSCRIBE_RETRY_S,
                    )
                watch.refused = True
                return False
            if watch.refused:  # the runs completed since the last question, once more
                log.warning("subscribed to the Tiled server")
                watch.catch_up_until = now + CATCH_UP_WINDOW_S
            watch.refused = False
        return True

    def _catch_up_if_due(self, watch: _Watch, now: float) -> None:
        if watch.refused or now >= watch.next_catch_up or now < watch.catch_up_until:
            watch.next_catch_up = now + CATCH_UP_EVERY_S
            asking = time.time()
            if self._catch_up(max(watch.asked - CATCH_UP_MARGIN_S, watch.started)):
                watch.asked = asking

    def _send_next_live(self) -> None:
        """The next run the subscription delivered, waiting at most :data:`POLL_S`."""
        try:
            uid = self._queue.get(timeout=POLL_S)
        except queue.Empty:
            return
        if uid not in self._sent and not self._stop.is_set():
            self._send(uid)

    def _close(self, watch: _Watch) -> None:
        """End the follower (without waiting out tiled's reconnection pause while the server
        is away) and name the runs left unsent."""
        if self.follower is not None:
            self.follower.close(wait=watch.away_since is None)
        left = list(self._pending)
        while True:
            try:
                uid = self._queue.get_nowait()
            except queue.Empty:
                break
            if uid not in self._sent:
                left.append(uid)
        if left:
            log.warning(
                "stopped with %d runs not sent (bcdi-bluesky reprocess reads them): %s",
                len(left),
                " ".join(dict.fromkeys(left)),
            )

    def start(self) -> None:
        """Follow the server until :meth:`stop` (safe to call from a signal handler)."""
        now = time.time()
        watch = _Watch(str(self.client.context.api_uri), started=now, asked=now)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                ended = self.follower is not None and not self.follower.alive
                if ended or now >= watch.next_check:
                    watch.next_check = now + SERVER_CHECK_S
                    if self._server_answers(watch, now):
                        # Without a subscription the catalog is asked at every check.
                        self._subscribed(watch, now, ended)
                        self._catch_up_if_due(watch, now)
                        self._retry_pending()
                self._send_next_live()
        finally:
            self._close(watch)

    def stop(self) -> None:
        """Make :meth:`start` return."""
        self._stop.set()


def wait_for_server(url: str, timeout: float = 30.0) -> None:
    """Block until a Tiled server at ``url`` answers ``GET /api/v1/`` (no key needed).

    Raises
    ------
    DataError
        It did not answer within ``timeout`` seconds.
    """
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/", timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DataError(f"no Tiled server at {url} after {timeout:g} s: {exc}") from None
            time.sleep(0.2)
