"""Publishers: where a reconstruction goes after the worker made it.

Each is a callable ``publisher(result, start_doc)`` for
:class:`~bcdi_bluesky.beamline.BCDIReconstructionCallback`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from event_model import compose_run

from ..plotting import central_slices

#: A document consumer, ``emit(name, doc)`` (a RunEngine dispatcher, a databroker/tiled
#: writer, a 0MQ publisher...).
Emit = Callable[[str, dict], None]


class DerivedRunPublisher:
    """Emit each reconstruction as a derived Bluesky run whose start carries ``parent_uid``.

    The run has one event in stream ``primary`` with ``chi``, ``chi_cnn``, the quality verdict
    (``quality``: good, fair or poor, and ``quality_reasons`` joined by "; "), the parameter
    vector, the support size, the timings and the three central amplitude and phase slices;
    its start document names the model and the provider and carries the verdict too, so that
    a search of the catalog finds the doubtful reconstructions without reading events.

    Parameters
    ----------
    emit : callable
        Receives ``(name, doc)`` for every document of the derived run.
    """

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def __call__(self, result, start_doc: dict) -> str:
        """Emit the derived run; returns its uid."""
        bundle = compose_run(metadata={
            "parent_uid": start_doc["uid"],
            "parent_scan_id": start_doc.get("scan_id"),
            "plan_name": "bcdi_reconstruction",
            "model": result.model_name,
            "provider": result.provider,
            "refine": result.refine,
            "parameter_names": list(result.crystal_model.names),
            "quality": result.quality,
            "quality_reasons": list(result.quality_reasons),
        })
        self.emit("start", bundle.start_doc)
        amp = central_slices(np.abs(result.object))
        phase = central_slices(np.where(result.support, np.angle(result.object), 0.0))
        data = {
            "chi": float(result.chi),
            "chi_cnn": float(result.chi_cnn),
            "quality": result.quality,
            "quality_reasons": "; ".join(result.quality_reasons),
            "params": np.asarray(result.params, dtype=np.float64).tolist(),
            "support_voxels": int(result.support.sum()),
            "latent_distance": float(result.latent_distance if result.latent_distance
                                     is not None else np.nan),
            "out_of_distribution": int(result.out_of_distribution),
            **{f"time_{k}": float(v) for k, v in result.timings.items()},
            **{f"amp_{k}": v.astype(np.float32).tolist() for k, v in amp.items()},
            **{f"phase_{k}": v.astype(np.float32).tolist() for k, v in phase.items()},
        }
        keys = {}
        for key, value in data.items():
            shape = list(np.shape(value))
            dtype = "string" if isinstance(value, str) else "array" if shape else "number"
            keys[key] = {"source": "bcdi-bluesky", "dtype": dtype, "shape": shape}
        desc = bundle.compose_descriptor(name="primary", data_keys=keys)
        self.emit("descriptor", desc.descriptor_doc)
        now = time.time()
        self.emit("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, now)))
        self.emit("stop", bundle.compose_stop())
        return bundle.start_doc["uid"]


class ResultFileWriter:
    """Write each reconstruction to ``<folder>/scan_<scan_id>_<uid8>.cxi`` (CXI-style HDF5)."""

    def __init__(self, folder: str | Path, suffix: str = ".cxi") -> None:
        self.folder = Path(folder)
        self.suffix = suffix
        self.written: list[Path] = []

    def __call__(self, result, start_doc: dict) -> Path:
        """Write the file; returns its path."""
        from ..io import write_result

        name = f"scan_{start_doc.get('scan_id', 'x')}_{start_doc['uid'][:8]}{self.suffix}"
        path = write_result(result, self.folder / name, {"parent_uid": start_doc["uid"]})
        self.written.append(path)
        return path
