"""Read diffraction volumes and write reconstructions (npz, CXI-style HDF5).

Readers return ``(intensity, mask)``: a float32 3D array and a boolean mask (True = valid) or
None. Every problem is a :class:`DataError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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


class DataError(ValueError):
    """A data file is missing, unreadable, or holds no usable intensity."""


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


def write_result(result: ReconstructionResult, path: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a reconstruction as ``.npz`` or CXI-style HDF5 (``.cxi``/``.h5``).

    Both hold ``object`` (complex64, input grid and convention), ``support``, ``params`` (with
    their names) and the run's figures; the CXI layout puts the object at
    ``entry_1/image_1/data`` as PyNX and cohere users expect.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise DataError(f"{p}: unsupported output type {suffix!r} (use one of "
                        f"{', '.join(RESULT_SUFFIXES)})")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {**result.summary(), **(extra or {})}
    names = np.array(result.crystal_model.names)
    if suffix == ".npz":
        np.savez_compressed(p, object=result.object, support=result.support,
                            params=result.params, param_names=names,
                            summary=json.dumps(meta))
        return p
    import h5py

    with h5py.File(p, "w") as f:
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
    return p
