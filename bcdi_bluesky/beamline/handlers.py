"""Readers for detector frames that arrive by reference (Resource/Datum, StreamResource).

A handler is built from a Resource document (``spec``, ``root``, ``resource_path``,
``resource_kwargs``) and called with a Datum's ``datum_kwargs``; it returns the frame(s).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


class NpyFrameHandler:
    """``BCDI_NPY_FRAME``: one ``<resource_path>_<index>.npy`` file per frame (the simulated
    file-backed detector; also ophyd.sim's ``NPY_SEQ``)."""

    specs = ("BCDI_NPY_FRAME", "NPY_SEQ")

    def __init__(self, resource_path: str, root: str = "", **kwargs) -> None:
        self.stem = os.path.join(root, resource_path)

    def __call__(self, index: int) -> np.ndarray:
        return np.load(f"{self.stem}_{index}.npy", allow_pickle=False)


class AreaDetectorHDF5Handler:
    """``AD_HDF5``: areaDetector's HDF5 plugin, frames stacked in ``/entry/data/data``."""

    specs = ("AD_HDF5",)

    def __init__(
        self, resource_path: str, root: str = "", frame_per_point: int = 1, **kwargs
    ) -> None:
        self.path = os.path.join(root, resource_path)
        self.frame_per_point = int(frame_per_point)

    def __call__(self, point_number: int) -> np.ndarray:
        import h5py

        n = self.frame_per_point
        with h5py.File(self.path, "r") as f:
            data = f["entry/data/data"][point_number * n : (point_number + 1) * n]
        return data[0] if n == 1 else data.sum(axis=0)


DEFAULT_HANDLERS = {
    spec: cls for cls in (NpyFrameHandler, AreaDetectorHDF5Handler) for spec in cls.specs
}


def read_stream_rows(uri: str, dataset: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an HDF5 dataset named by a StreamResource (``file://`` URI)."""
    import h5py

    parsed = urlparse(uri)
    path = Path(parsed.path) if parsed.scheme in ("file", "") else None
    if path is None:
        raise ValueError(f"cannot read stream resource {uri!r}: only file:// URIs are supported")
    with h5py.File(path, "r") as f:
        return f[dataset.lstrip("/")][start:stop]
