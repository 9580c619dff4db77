"""Read diffraction volumes and write reconstructions (npz, CXI-style HDF5).

Readers return ``(intensity, mask)``: a float32 3D array and a boolean mask (True = valid) or
None. Every problem is a :class:`DataError` naming the file and what is wrong with it.

Files are written atomically (:func:`atomic_write_bytes`): built in memory, written to a
temporary file in the target folder and renamed into place, so a full disk or a permission
problem leaves no partial file and raises one :class:`DataError`. HDF5 files are built with
h5py's in-memory ``core`` driver: h5py closing a file on a full disk can crash the process, and
in memory it never meets the disk.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError
from .physics import check_mask, check_volume

if TYPE_CHECKING:
    from .pipeline import ReconstructionResult

INTENSITY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".cxi", ".nxs", ".tif", ".tiff")
RESULT_SUFFIXES = (".npz", ".h5", ".hdf5", ".cxi")
#: Datasets tried, in order, in HDF5/NeXus/CXI files.
_H5_INTENSITY = ("entry_1/data_1/data", "entry/data/data", "entry_1/instrument_1/detector_1/data",
                 "intensity", "data")
_H5_MASK = ("entry_1/instrument_1/detector_1/mask", "entry_1/data_1/mask", "entry/data/mask",
            "mask")


def _read_h5(path: Path, dataset: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    with h5py.File(path, "r") as f:
        names = (dataset,) if dataset else _H5_INTENSITY
        for name in names:
            if name in f and isinstance(f[name], h5py.Dataset):
                data = f[name][()]
                break
        else:
            raise DataError(f"{path}: no intensity dataset (looked for {', '.join(names)})")
        mask = None
        for name in _H5_MASK:
            if name in f and isinstance(f[name], h5py.Dataset):
                raw = f[name][()]
                # CXI masks flag bad pixels with non-zero bits; a boolean mask marks valid ones.
                mask = raw if raw.dtype == bool else raw == 0
                if mask.ndim == 2 and np.ndim(data) == 3:
                    mask = np.broadcast_to(mask, np.shape(data))
                break
    return np.asarray(data), mask


def read_intensity(path: str | Path, dataset: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a 3D intensity and optional mask from ``.npy``, ``.npz``, HDF5/NeXus/CXI or TIFF.

    Parameters
    ----------
    path : path-like
        The file. ``.npz`` holds ``intensity`` (optional ``mask``, True = valid); a TIFF stack
        has one frame per rocking step.
    dataset : str, optional
        HDF5 dataset to read instead of the usual CXI/NeXus locations.

    Raises
    ------
    DataError
        Missing or unreadable file, no intensity in it, or an intensity or mask that fails
        the checks of :func:`bcdi_bluesky.physics.check_volume` (rank, NaN, negative, empty).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in INTENSITY_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use one of "
                        f"{', '.join(INTENSITY_SUFFIXES)})")
    try:
        mask = None
        if suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "intensity" not in z:
                    raise DataError(f"{p}: no 'intensity' array (found {', '.join(z.files)})")
                data = z["intensity"]
                mask = z["mask"] if "mask" in z else None
        elif suffix in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(p)
        else:
            data, mask = _read_h5(p, dataset)
    except DataError:
        raise
    except Exception as exc:  # numpy, h5py and tifffile raise many kinds
        raise DataError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from None
    try:
        data = check_volume(data)
        mask = check_mask(mask, data.shape)
    except ValueError as exc:
        raise DataError(f"{p}: {exc}") from None
    return data, mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: all of it or, on any failure, nothing.

    The bytes go to a temporary file in the target folder (same file system), are flushed to
    disk, and the file is renamed over ``path``. An existing file at ``path`` is replaced only
    once the new one is complete.

    Raises
    ------
    DataError
        The folder cannot be made or written, or the disk is full; no partial file is left.
    """
    p = Path(path)
    tmp: str | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise DataError(f"{p}: cannot write ({exc.strerror or exc}); nothing was written"
                        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


def _result_npz(result: ReconstructionResult, meta: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, object=result.object, support=result.support,
                        params=result.params, param_names=np.array(result.crystal_model.names),
                        summary=json.dumps(meta))
    return buffer.getvalue()


def _result_cxi(result: ReconstructionResult, meta: dict[str, Any]) -> bytes:
    import h5py

    names = np.array(result.crystal_model.names)
    # In memory, never backed by a file: the image is written out by atomic_write_bytes.
    with h5py.File(f"bcdi-{uuid.uuid4().hex}.cxi", "w", driver="core", backing_store=False) as f:
        f.attrs["creator"] = "bcdi-bluesky"
        f.create_dataset("cxi_version", data=150)
        entry = f.create_group("entry_1")
        entry.attrs["NX_class"] = "NXentry"
        image = entry.create_group("image_1")
        image.attrs["NX_class"] = "NXdata"
        image.create_dataset("data", data=result.object, compression="gzip")
        image.create_dataset("mask", data=result.support, compression="gzip")
        image.create_dataset("data_type", data="electron density")
        image.create_dataset("data_space", data="real")
        process = image.create_group("process_1")
        process.create_dataset("program", data="bcdi-bluesky")
        process.create_dataset("summary", data=json.dumps(meta))
        f.create_dataset("object", data=result.object, compression="gzip")
        f.create_dataset("support", data=result.support, compression="gzip")
        f.create_dataset("params", data=result.params)
        f.create_dataset("param_names", data=names.astype("S"))
        f.flush()
        return f.id.get_file_image()


def write_result(result: ReconstructionResult, path: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a reconstruction as ``.npz`` or CXI-style HDF5 (``.cxi``/``.h5``), atomically.

    Both hold ``object`` (complex64, input grid and convention), ``support``, ``params`` (with
    their names) and the run's figures (``summary``, JSON); the CXI layout puts the object at
    ``entry_1/image_1/data`` as PyNX and cohere users expect.

    Raises
    ------
    DataError
        An unsupported suffix, or the file cannot be written (no partial file is left).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise DataError(f"{p}: unsupported output type {suffix!r} (use one of "
                        f"{', '.join(RESULT_SUFFIXES)})")
    meta = {**result.summary(), **(extra or {})}
    data = _result_npz(result, meta) if suffix == ".npz" else _result_cxi(result, meta)
    return atomic_write_bytes(p, data)
