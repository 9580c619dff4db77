"""Publishers: where a reconstruction goes after the worker made it.

A publisher is given to :class:`~bcdi_bluesky.beamline.BCDIReconstructionCallback`. The
callback calls its hooks from the worker thread (``collecting`` from the RunEngine's thread),
in this order for each run:

``collecting(start_doc)``
    A run with frames started (keep it quick: it runs in the RunEngine's thread).
``configure(settings, start_doc) -> settings | None``
    Before reconstructing: return the settings for this scan (the ones given, or a changed
    copy from ``settings.replace(...)``), or None to skip the scan. Publishers are asked in
    order, each given what the previous one returned.
``progress(stage, info, start_doc)``
    Live stages of the pipeline (many calls during refinement: keep it cheap).
``skipped(message, start_doc)``
    The scan was not reconstructed by design: no usable Bragg peak, a motor that did not
    rock, no frames, an aborted run, or reconstruction disabled (by default the same as
    ``failure``).
``failure(message, start_doc)``
    The scan was not reconstructed because something went wrong: a step failed, the run
    never ended, or the queue was full.
``__call__(result, start_doc)``
    The reconstruction.

Subclass :class:`Publisher` and override the hooks you need; a plain callable
``publisher(result, start_doc)`` (:class:`ResultConsumer`) is wrapped by :func:`as_publisher`.
Exceptions in a hook never reach the experiment: the callback records them in the scan's
record and the next scan proceeds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from event_model import compose_run

from ..physics import central_slices

if TYPE_CHECKING:
    from ..pipeline import ReconstructionResult
    from ..settings import ReconstructionSettings

#: The hooks of a publisher, in the order the callback calls them.
HOOKS = ("collecting", "configure", "progress", "skipped", "failure", "__call__")


@runtime_checkable
class ResultConsumer(Protocol):
    """The smallest publisher: a callable that takes each reconstruction."""

    def __call__(self, result: ReconstructionResult, start_doc: dict) -> Any:
        """Take the reconstruction of the run that ``start_doc`` opened."""


class Publisher:
    """Base class of publishers: every hook does nothing; override those you need.

    Examples
    --------
    >>> class ChiLog(Publisher):
    ...     def __init__(self):
    ...         self.lines = []
    ...     def __call__(self, result, start_doc):
    ...         self.lines.append(f"scan {start_doc.get('scan_id')}: chi {result.chi:.3f}")
    ...     def failure(self, message, start_doc):
    ...         self.lines.append(f"scan {start_doc.get('scan_id')}: {message}")
    """

    def collecting(self, start_doc: dict) -> None:
        """A run started (called in the RunEngine's thread: return quickly)."""

    def configure(
        self, settings: ReconstructionSettings, start_doc: dict
    ) -> ReconstructionSettings | None:
        """The settings for this scan (default: unchanged); None skips the scan."""
        return settings

    def progress(self, stage: str, info: dict, start_doc: dict) -> None:
        """A stage of the pipeline finished (``stage`` and ``info`` as the pipeline's
        progress hook gives them)."""

    def skipped(self, message: str, start_doc: dict) -> None:
        """The scan was not reconstructed by design (``message`` says why); by default
        handled as a :meth:`failure`."""
        self.failure(message, start_doc)

    def failure(self, message: str, start_doc: dict) -> None:
        """The scan was not reconstructed because something went wrong; ``message`` says why."""

    def __call__(self, result: ReconstructionResult, start_doc: dict) -> Any:
        """Take the reconstruction."""


class CallablePublisher(Publisher):
    """A plain ``consumer(result, start_doc)`` as a :class:`Publisher` (no other hooks)."""

    def __init__(self, consumer: ResultConsumer) -> None:
        self.consumer = consumer

    def __call__(self, result: ReconstructionResult, start_doc: dict) -> Any:
        """Hand the reconstruction to the consumer."""
        return self.consumer(result, start_doc)

    def __repr__(self) -> str:
        return f"CallablePublisher({self.consumer!r})"


def as_publisher(obj: Any) -> Publisher:
    """A :class:`Publisher` for ``obj``.

    A :class:`Publisher` is returned as it is, and so is an object that defines every hook
    of :data:`HOOKS` itself (a publisher written without the base class); a callable without
    any hook is wrapped in :class:`CallablePublisher`.

    Raises
    ------
    TypeError
        ``obj`` is not callable, or defines some hooks but not all (subclass
        :class:`Publisher` to get no-op defaults for the others).
    """
    if isinstance(obj, Publisher):
        return obj
    if not isinstance(obj, ResultConsumer):
        raise TypeError(
            f"a publisher must be callable as publisher(result, start_doc), got {obj!r}"
        )
    present = [hook for hook in HOOKS[:-1] if callable(getattr(obj, hook, None))]
    if not present:
        return CallablePublisher(obj)
    if len(present) == len(HOOKS) - 1:
        return obj
    missing = sorted(set(HOOKS[:-1]) - set(present))
    raise TypeError(
        f"{type(obj).__name__} defines the publisher hooks {present} but not "
        f"{missing}: subclass bcdi_bluesky.beamline.Publisher"
    )


#: A document consumer, ``emit(name, doc)`` (a RunEngine dispatcher, a databroker/tiled
#: writer, a 0MQ publisher...).
Emit = Callable[[str, dict], None]

#: The plan name in the start document of every derived run.
DERIVED_PLAN_NAME = "bcdi_reconstruction"


#: What may not be in an event-model data key (its schema: ``^([^./]+)$``), and what makes
#: a key awkward to type in a catalog query.
_DATA_KEY_UNSAFE = re.compile(r"[^0-9A-Za-z_]+")


def schema_figures(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The figures of a result's summary as event data, named by the result schema
    (:data:`~bcdi_bluesky.pipeline.RESULT_SCHEMA`), and their units.

    Nested figures become ``key_sub`` (``timings_s_total``, ``stage_chi_cnn``), with every run
    of characters other than letters, digits and ``_`` in ``sub`` made one ``_`` (a data key
    may hold no ``.`` or ``/``: the polish run "model ER/HIO" gives
    ``polish_attempts_model_ER_HIO``); lists of text are joined by "; "; flags become 0 or 1;
    missing figures (None) are left out; the settings go to the start document instead.
    """
    from ..pipeline import RESULT_SCHEMA

    data: dict[str, Any] = {}
    units: dict[str, str] = {}

    def add(name: str, value: Any, unit: str) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = "; ".join(value)
        elif isinstance(value, (bool, np.bool_)):
            value = int(value)
        elif isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        elif not isinstance(value, str):
            value = float(value)
        data[name], units[name] = value, unit

    for key, value in summary.items():
        if key == "settings":
            continue
        unit = RESULT_SCHEMA[key].units
        if isinstance(value, dict):
            for sub, item in value.items():
                add(f"{key}_{_DATA_KEY_UNSAFE.sub('_', str(sub)).strip('_')}", item, unit)
        else:
            add(key, value, unit)
    return data, units


class DerivedRunPublisher(Publisher):
    """Emit each reconstruction as a derived Bluesky run whose start carries ``parent_uid``.

    The run has one event in stream ``primary`` with every figure of the result schema
    (:func:`schema_figures`: ``chi``, ``stage_chi_cnn``, ``timings_s_total``, ``quality``,
    ``quality_reasons`` joined by "; ", and with the scan's geometry ``crystal_volume_nm3``,
    ``strain_rms``...; units in the descriptor), the parameter vector and the three central
    amplitude and phase slices; its start document names the model and the provider and
    carries the verdict and the settings too, so that a search of the catalog finds the
    doubtful reconstructions without reading events.

    Parameters
    ----------
    emit : callable
        Receives ``(name, doc)`` for every document of the derived run.
    """

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def __repr__(self) -> str:
        return f"DerivedRunPublisher({self.emit!r})"

    def __call__(self, result, start_doc: dict, uid: str | None = None) -> str:
        """Emit the derived run; returns its uid (``uid`` when given, else a new one)."""
        bundle = compose_run(
            uid=uid,
            metadata={
                "parent_uid": start_doc["uid"],
                "parent_scan_id": start_doc.get("scan_id"),
                "plan_name": DERIVED_PLAN_NAME,
                "model": result.model_name,
                "provider": result.provider,
                "refine": result.refine,
                "parameter_names": list(result.crystal_model.names),
                "quality": result.quality,
                "quality_reasons": list(result.quality_reasons),
                "settings": result.settings.as_dict(),
            },
        )
        amp = central_slices(np.abs(result.object))
        phase = central_slices(np.where(result.support, np.angle(result.object), 0.0))
        data, units = schema_figures(result.summary())
        data.update(
            {
                "params": np.asarray(result.params, dtype=np.float64).tolist(),
                **{f"amp_{k}": v.astype(np.float32).tolist() for k, v in amp.items()},
                **{f"phase_{k}": v.astype(np.float32).tolist() for k, v in phase.items()},
            }
        )
        keys = {}
        for key, value in data.items():
            shape = list(np.shape(value))
            dtype = "string" if isinstance(value, str) else "array" if shape else "number"
            keys[key] = {"source": "bcdi-bluesky", "dtype": dtype, "shape": shape}
            if units.get(key):
                keys[key]["units"] = units[key]
        # Every document is composed (and validated) before the first is emitted: a run that
        # cannot be made reaches no consumer as an orphan start.
        desc = bundle.compose_descriptor(name="primary", data_keys=keys)
        now = time.time()
        event = desc.compose_event(data=data, timestamps=dict.fromkeys(data, now))
        stop = bundle.compose_stop()
        for name, doc in (
            ("start", bundle.start_doc),
            ("descriptor", desc.descriptor_doc),
            ("event", event),
            ("stop", stop),
        ):
            self.emit(name, doc)
        return bundle.start_doc["uid"]


class ResultFileWriter(Publisher):
    """Write each reconstruction to ``<folder>/scan_<scan_id>_<uid8>.cxi`` (CXI-style HDF5)."""

    def __init__(self, folder: str | Path, suffix: str = ".cxi") -> None:
        self.folder = Path(folder)
        self.suffix = suffix
        self.written: list[Path] = []

    def __repr__(self) -> str:
        return f"ResultFileWriter({str(self.folder)!r}, suffix={self.suffix!r})"

    def __call__(self, result, start_doc: dict) -> Path:
        """Write the file; returns its path."""
        from ..io import write_result

        name = f"scan_{start_doc.get('scan_id', 'x')}_{start_doc['uid'][:8]}{self.suffix}"
        path = write_result(result, self.folder / name, {"parent_uid": start_doc["uid"]})
        self.written.append(path)
        return path
