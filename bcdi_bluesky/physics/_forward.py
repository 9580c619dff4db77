"""Forward model: object -> centred diffraction intensity, photon counts and detector masks."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft

from ..backend import NUMPY, ArrayBackend, fft_workers
from ._validation import check_volume


def far_field(obj: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Centred complex far field ``fftshift(fftn(obj))`` (complex64; q = 0 at index N // 2)."""
    obj = np.asarray(obj, dtype=np.complex64)
    return scipy.fft.fftshift(scipy.fft.fftn(obj, workers=workers or fft_workers(obj.size)))


def intensity(obj: Any, *, backend: ArrayBackend = NUMPY) -> Any:
    """Centred diffraction intensity ``|fftshift(fftn(obj))|^2`` as float32.

    ``obj`` may be an array of ``backend`` (then so is the result).
    """
    f = backend.fftn(backend.asarray(obj, dtype=backend.xp.complex64))
    # Shifting the real power moves half the bytes of shifting the complex field.
    return backend.fftshift(backend.power(f))


def scale_to_photons(
    intensity_: np.ndarray, photons: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Scale an intensity so that its (valid) voxels hold ``photons`` in total."""
    if not np.isfinite(photons) or photons <= 0:
        raise ValueError(f"photons must be a positive number, got {photons!r}")
    valid = intensity_ if mask is None else intensity_ * mask
    total = float(valid.sum(dtype=np.float64))
    if total <= 0:
        raise ValueError("cannot scale an intensity with no signal")
    return (intensity_ * np.float32(photons / total)).astype(np.float32, copy=False)


def poisson_counts(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw photon counts from expected intensities (float32 of integer values)."""
    expected = check_volume(expected, "expected intensity", require_signal=False)
    return rng.poisson(expected.astype(np.float64)).astype(np.float32)


def beamstop_mask(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    """Mask (True = valid) hiding a ball of ``radius`` voxels around the Bragg peak."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum((g - s // 2) ** 2 for g, s in zip(grids, shape, strict=True))
    return np.asarray(r2 > radius * radius)


def detector_gap_mask(shape: tuple[int, int, int], axis: int, start: int, width: int) -> np.ndarray:
    """Mask (True = valid) hiding a gap of ``width`` voxels at ``start`` along a detector axis.

    The gap spans every frame of the rocking scan, like the seam between detector modules.
    """
    if axis not in (1, 2):
        raise ValueError(f"a detector gap lies along detector axis 1 or 2, got {axis}")
    mask = np.ones(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = slice(max(start, 0), max(start + width, 0))
    mask[tuple(index)] = False
    return mask


def simulate_counts(
    obj: np.ndarray, photons: float, rng: np.random.Generator, mask: np.ndarray | None = None
) -> np.ndarray:
    """Measured counts of ``obj`` with ``photons`` in total and Poisson noise; masked voxels 0."""
    counts = poisson_counts(scale_to_photons(intensity(obj), photons, mask), rng)
    if mask is not None:
        counts[~mask] = 0
    return counts
