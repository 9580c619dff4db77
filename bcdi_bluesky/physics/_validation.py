"""Checks of user-supplied arrays: one clear :class:`~bcdi_bluesky.errors.DataError` (a
``ValueError``) naming the problem."""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def check_volume(
    array: object,
    name: str = "intensity",
    *,
    allow_negative: bool = False,
    allow_complex: bool = False,
    require_signal: bool = True,
) -> np.ndarray:
    """Validate a 3D volume and return it as a native-endian array.

    Parameters
    ----------
    array : array_like
        The volume.
    name : str
        What it is, for the error message.
    allow_negative : bool
        Accept negative values (off for intensities).
    allow_complex : bool
        Accept complex values (objects); otherwise the result is float32.
    require_signal : bool
        Reject an all-zero volume.

    Raises
    ------
    DataError
        Wrong rank, empty or too small, non-numeric, NaN/inf, values beyond float32's range,
        negative or all-zero values.
    """
    try:
        arr = np.asarray(array)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{name} is not an array: {exc}") from None
    if arr.ndim != 3:
        raise DataError(f"{name} must be a 3D volume, got {arr.ndim}D with shape {arr.shape}")
    if min(arr.shape) < 2:
        raise DataError(f"{name} has shape {arr.shape}: every axis needs at least 2 samples")
    if np.iscomplexobj(arr):
        if not allow_complex:
            raise DataError(f"{name} must be real, got complex dtype {arr.dtype}")
        arr = arr.astype(np.complex64, copy=False)
    elif arr.dtype.kind in "biuf":
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
            # Checked before the cast, which would turn such values into inf.
            with np.errstate(invalid="ignore"):
                big = np.isfinite(arr) & (np.abs(arr) > np.finfo(np.float32).max)
            if big.any():
                raise DataError(
                    f"{name} holds {int(big.sum())} values beyond float32's range "
                    f"(largest {float(np.abs(arr[big]).max()):.3g}); rescale it"
                )
        arr = arr.astype(np.float32, copy=False)
    else:
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    # Big-endian arrays (from EPICS clients, some HDF5 files) silently break ONNX Runtime.
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise DataError(f"{name} contains {bad} NaN or inf values")
    if not allow_negative and not np.iscomplexobj(arr) and arr.min() < 0:
        raise DataError(
            f"{name} contains negative values (min {float(arr.min()):.4g}); "
            "subtract the background without going below zero"
        )
    if require_signal and not np.any(arr):
        raise DataError(f"{name} is empty (all values are zero)")
    return arr


def check_mask(mask: object, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    """Validate a boolean mask (True = valid voxel) against a volume's shape; a 2D mask of
    a detector frame (the volume's last two axes) applies to every frame."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 2 and len(shape) == 3 and m.shape == tuple(shape[1:]):
        m = np.array(np.broadcast_to(m, tuple(shape)))  # a copy: callers may edit it
    if m.shape != tuple(shape):
        raise DataError(f"{name} has shape {m.shape} but the volume has shape {tuple(shape)}")
    if m.dtype != bool:
        if m.dtype.kind not in "biu" or not np.isin(m, (0, 1)).all():
            raise DataError(f"{name} must be boolean (True = valid), got dtype {m.dtype}")
        m = m.astype(bool)
    if not m.any():
        raise DataError(f"{name} marks every voxel invalid")
    return m
