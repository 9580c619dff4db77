"""Reconstructions on an executor: a warm Reconstructor per process, and Dask's executor.

Any :class:`concurrent.futures.Executor` can run :func:`reconstruct_volume`: a thread pool,
a Dask ``distributed`` cluster through ``Client.get_executor()`` (:func:`dask_executor`), or
a remote-function service with the same interface. The task takes the volume, the refinement
mode, the settings and a :class:`ReconstructorSpec` (which model, which providers), and finds
the :class:`~bcdi_bluesky.pipeline.Reconstructor` in a per-process cache: the model is loaded
once per worker process, not once per scan. :func:`dask_executor` registers a worker plugin
(:class:`~bcdi_bluesky.beamline.dask_plugin.WarmReconstructorPlugin`) that loads it when a
Dask worker starts, so that the first scan does not pay for it either.

Dask itself does the scheduling, the retries (``retries=1`` per task: a task that raised is
run once more) and the recovery from a lost worker (its tasks are run again elsewhere); this
module adds no queue of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..pipeline import ReconstructionResult, Reconstructor
    from ..settings import ReconstructionSettings

#: Runs of a Dask task after the first that raised (a worker lost mid-task is recovered by
#: Dask separately, up to its ``distributed.scheduler.allowed-failures``).
DASK_RETRIES = 1


@dataclass(frozen=True)
class ReconstructorSpec:
    """Which Reconstructor a worker process builds (picklable, hashable: the cache key).

    Parameters
    ----------
    model_path : str, optional
        ONNX model (default: the packaged one).
    providers : tuple of str, optional
        ONNX Runtime providers in order of preference (default: the Reconstructor's).
    threads : int, optional
        ONNX Runtime CPU threads.
    device : str
        Where the phase retrieval runs (``Reconstructor(device=...)``); ``"auto"``, the default,
        lets each worker take its GPU when it has one.
    """

    model_path: str | None = None
    providers: tuple[str, ...] | None = None
    threads: int | None = None
    device: str = "auto"

    @classmethod
    def of(cls, reconstructor: Reconstructor | None) -> ReconstructorSpec:
        """The spec that rebuilds ``reconstructor``'s model elsewhere (None: the default)."""
        from ..model.runtime import default_model_path

        path = getattr(getattr(reconstructor, "runtime", None), "path", None)
        # The packaged model stays None: a worker finds its own installed copy.
        if path is None or path == default_model_path():
            return cls()
        return cls(model_path=str(path))


_cache: dict[ReconstructorSpec, Reconstructor] = {}
_cache_lock = threading.Lock()


def warm_reconstructor(spec: ReconstructorSpec) -> Reconstructor:
    """This process's Reconstructor for ``spec``, built on first use."""
    with _cache_lock:
        reconstructor = _cache.get(spec)
        if reconstructor is None:
            from ..pipeline import Reconstructor

            reconstructor = Reconstructor(
                spec.model_path, providers=spec.providers, threads=spec.threads, device=spec.device
            )
            _cache[spec] = reconstructor
        return reconstructor


def worker_name() -> str:
    """``host:pid`` of this process (which worker made a result)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def reconstruct_volume(
    spec: ReconstructorSpec,
    volume: np.ndarray,
    refine: str,
    settings: ReconstructionSettings | None = None,
    mask: np.ndarray | None = None,
    **options: Any,
) -> ReconstructionResult:
    """The task an executor runs: reconstruct ``volume`` with this process's warm model.

    ``options`` go to :meth:`~bcdi_bluesky.pipeline.Reconstructor.reconstruct` (the scan's
    ``geometry``). The result's ``metadata["worker"]`` names the process that made it.
    Progress hooks do not cross process boundaries, so none is called.
    """
    result = warm_reconstructor(spec).reconstruct(
        volume, mask, refine=refine, settings=settings, **options
    )
    result.metadata["worker"] = worker_name()
    return result


def dask_executor(
    client: Any, spec: ReconstructorSpec | None = None, *, resources: dict[str, float] | None = None
) -> Executor:
    """A ``concurrent.futures`` executor on a Dask cluster, with warm workers.

    Parameters
    ----------
    client : distributed.Client
        Connected with ``set_as_default=False`` (otherwise every dask computation of the
        process, Tiled's array reads included, would run on the cluster).
    spec : ReconstructorSpec, optional
        The model the workers load now (default: the packaged one).
    resources : dict, optional
        Dask worker resources each reconstruction holds (``{"GPU": 1}``: only on workers
        started with ``--resources GPU=1``, one at a time per GPU).

    Returns
    -------
    concurrent.futures.Executor
        ``client.get_executor(retries=DASK_RETRIES, pure=False)``: every submitted task
        runs, even for equal inputs.
    """
    from .dask_plugin import WarmReconstructorPlugin  # distributed only when used

    client.register_plugin(WarmReconstructorPlugin(spec or ReconstructorSpec()))
    options = {} if resources is None else {"resources": dict(resources)}
    return client.get_executor(retries=DASK_RETRIES, pure=False, **options)


def check_scheduler_address(address: str) -> str:
    """``address`` when it is a Dask scheduler address (``[tcp://]HOST:PORT`` or another scheme
    Dask knows); checked without a connection.

    Raises
    ------
    ImportError
        ``distributed`` is not installed (extra ``distributed``).
    ValueError
        It is not one.
    """
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import backends

    try:
        scheme, location = parse_address(address)
        parse_host_port(location)
    except ValueError as exc:
        raise ValueError(f"not a scheduler address ([tcp://]HOST:PORT): {exc}") from None
    if scheme not in backends:
        raise ValueError(f"not a scheduler address: unknown scheme {scheme!r}")
    return address


def connect_dask(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` for the scheduler at ``address``, not the default scheduler.

    Parameters
    ----------
    address : str
        ``[tcp://]HOST:PORT`` of the scheduler.
    timeout : float, optional
        Seconds to find the scheduler, at start and again after losing it (the client's
        reconnect window, see :func:`client_closed`). Default: Dask's
        ``distributed.comm.timeouts.connect`` (30 s unless configured, for instance by
        ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=10s``).

    Raises
    ------
    ImportError
        ``distributed`` is not installed (extra ``distributed``).
    OSError
        No scheduler answered within ``timeout`` seconds.
    ValueError
        ``address`` is not a scheduler address (``[tcp://]HOST:PORT`` or another scheme Dask
        knows), checked before a client is made: a half-made one hangs a minute at exit.
    """
    from distributed import Client

    check_scheduler_address(address)
    # Without a timeout, the client takes Dask's configured one (one place to set it).
    options = {} if timeout is None else {"timeout": timeout}
    return Client(address, set_as_default=False, **options)


#: ``distributed.Client`` statuses in which submitted tasks may still run: connected, or
#: within the reconnect window after losing the scheduler (``connecting``).
LIVE_CLIENT_STATUSES = frozenset({"newly-created", "connecting", "running"})


def client_closed(client: Any) -> bool:
    """Whether a ``distributed.Client`` is closed for good.

    A client that loses its scheduler cancels the tasks it has there and tries to connect
    again for its ``timeout`` (:func:`connect_dask`); when that window passes without a
    scheduler it closes itself, and every later submission raises ``ClosedClientError``.
    """
    return str(client.status) not in LIVE_CLIENT_STATUSES


#: Why :class:`ClientWatch` counts a scheduler lost when the client closed itself.
CLOSED_REASON = "no answer within the client's reconnect window"

#: Seconds a scheduler may leave every question unanswered before :class:`ClientWatch`
#: counts it lost, and seconds between two questions (each waits at most that long). A
#: frozen scheduler process, or a network partition that keeps the TCP connection open,
#: leaves the client ``running`` and its tasks waiting for ever: only a question shows it.
SCHEDULER_SILENT_S = 60.0
SCHEDULER_ASK_S = 5.0


def scheduler_answers(client: Any, timeout: float) -> bool:
    """Whether the scheduler of a ``distributed.Client`` answers a question (its identity)
    within ``timeout`` seconds."""
    try:
        client.sync(client.scheduler.identity, callback_timeout=timeout)
    except Exception:  # a timeout, a broken connection, a closed client: no answer
        return False
    return True


class ClientWatch:
    """Call ``on_lost()`` once, from a daemon thread, when the scheduler of ``client`` is
    lost: the client is closed for good (:func:`client_closed`), or the scheduler answered
    no question for ``silent_s`` seconds (:func:`scheduler_answers`).

    Parameters
    ----------
    client : distributed.Client
        The client to watch.
    on_lost : callable
        Called without arguments from the watch's thread; must be quick and thread-safe (a
        dispatcher's ``stop``).
    interval : float
        Seconds between looks at the client's status.
    silent_s : float, optional
        Seconds without an answer from the scheduler after which it counts as lost (default
        :data:`SCHEDULER_SILENT_S`).
    ask_s : float, optional
        Seconds between two questions to the scheduler, and the limit of each (default
        :data:`SCHEDULER_ASK_S`).
    """

    def __init__(
        self,
        client: Any,
        on_lost: Callable[[], None],
        interval: float = 0.5,
        silent_s: float | None = None,
        ask_s: float | None = None,
    ):
        self.client = client
        self.on_lost = on_lost
        self.interval = float(interval)
        self.silent_s = SCHEDULER_SILENT_S if silent_s is None else float(silent_s)
        self.ask_s = SCHEDULER_ASK_S if ask_s is None else float(ask_s)
        #: Why the scheduler counts as lost (None while it does not): set before ``on_lost``.
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dask-client-watch", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """Whether the scheduler counts as lost (``on_lost`` was called)."""
        return self.reason is not None

    def lost_reason(self) -> str | None:
        """Why the scheduler is lost, now: the watch's finding, or the client closed for good
        since the watch last looked; None while neither."""
        if self.reason is None and client_closed(self.client):
            return CLOSED_REASON
        return self.reason

    def _watch(self) -> None:
        answered = time.monotonic()
        next_question = answered
        while not self._stop.wait(self.interval):
            if client_closed(self.client):
                self.reason = CLOSED_REASON
                break
            now = time.monotonic()
            if now < next_question:
                continue
            next_question = now + self.ask_s
            if scheduler_answers(self.client, self.ask_s):
                answered = time.monotonic()
            elif time.monotonic() - answered >= self.silent_s and not self._stop.is_set():
                self.reason = f"no answer to any question for {self.silent_s:g} s"
                break
        else:
            return
        self.on_lost()

    def stop(self) -> None:
        """Stop watching, and return once the watch's thread has ended (before closing the
        client on purpose, so that the close is not taken for a lost scheduler)."""
        self._stop.set()
        self._thread.join()
