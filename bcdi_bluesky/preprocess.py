"""Measured volume -> the CNN's input: centre on the Bragg peak, fit to the model grid, log-scale.

The same functions prepare the training data, so that simulated and measured volumes reach the
network identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from .physics import PRIOR_PHOTONS, check_mask, check_volume


def peak_position(
    intensity: np.ndarray,
    mask: np.ndarray | None = None,
    smooth: float = 1.0,
    *,
    hot_pixels_masked: bool = False,
) -> tuple[int, int, int]:
    """Index of the Bragg peak: the maximum after hot-pixel removal and a light smoothing.

    Hot pixels (see :func:`remove_hot_pixels`) and masked voxels are ignored; the smoothing
    keeps a noisy background voxel from being taken for the peak. ``hot_pixels_masked``: the
    ``mask`` already leaves them out (from :func:`remove_hot_pixels`), so they are not looked
    for again (0.5 s at 256^3).
    """
    valid = mask if hot_pixels_masked else remove_hot_pixels(intensity, mask)
    data = intensity if valid is None else np.where(valid, intensity, 0.0)
    if smooth > 0:
        data = scipy.ndimage.gaussian_filter(data.astype(np.float32), smooth, mode="wrap")
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(data)), data.shape))


def centre_shift(
    intensity: np.ndarray, mask: np.ndarray | None = None, *, hot_pixels_masked: bool = False
) -> tuple[int, int, int]:
    """Circular shift that brings the Bragg peak to index ``N // 2`` on every axis
    (:func:`peak_position`)."""
    peak = peak_position(intensity, mask, hot_pixels_masked=hot_pixels_masked)
    return tuple(s // 2 - p for s, p in zip(intensity.shape, peak, strict=True))


def saturation_mask(volume: np.ndarray, max_count: float | None = None) -> np.ndarray | None:
    """Mask (True = valid) without the voxels at the detector's saturation count, or None
    when none is saturated: a saturated count is a lower bound, not a measurement, and a fit
    to it flattens the Bragg peak. ``max_count`` defaults, for unsigned integer data, to the
    type's largest value (a 16-bit frame's 65535); other data without it are never judged.
    """
    if max_count is None:
        if not np.issubdtype(np.asarray(volume).dtype, np.unsignedinteger):
            return None
        max_count = np.iinfo(np.asarray(volume).dtype).max
    saturated = np.asarray(volume) >= max_count
    return ~saturated if saturated.any() else None


def remove_hot_pixels(
    intensity: np.ndarray, mask: np.ndarray | None = None, factor: float = 20.0
) -> np.ndarray:
    """Mask (True = valid) that also excludes isolated hot voxels.

    A voxel is hot when it exceeds ``factor`` times the largest of its 26 neighbours plus one
    count: a diffraction pattern is smooth on the speckle scale, a hot pixel is not.
    """
    footprint = np.ones((3, 3, 3), dtype=bool)
    footprint[1, 1, 1] = False
    neighbours = scipy.ndimage.maximum_filter(intensity, footprint=footprint, mode="nearest")
    hot = intensity > factor * (neighbours + 1.0)
    valid = ~hot if mask is None else (mask & ~hot)
    return valid


@dataclass(frozen=True)
class Prepared:
    """A measured volume brought onto the model's grid.

    ``intensity`` and ``mask`` are centred ``n^3`` arrays; ``shift`` is the circular shift that
    centred the input, ``crop`` the per-axis start of the ``n^3`` window in the shifted input.
    """

    intensity: np.ndarray
    mask: np.ndarray | None
    shift: tuple[int, int, int]
    crop: tuple[int, int, int]


def fit_to_grid(
    intensity: np.ndarray,
    n: int,
    mask: np.ndarray | None = None,
    *,
    hot_pixels_masked: bool = False,
) -> Prepared:
    """Centre a volume on its Bragg peak and bring it to an ``n^3`` grid.

    Larger axes are cropped around the peak (which keeps the real-space field of view and so
    the oversampling); smaller axes are zero-padded (and masked). ``hot_pixels_masked``: see
    :func:`peak_position`.
    """
    intensity = check_volume(intensity)
    mask = check_mask(mask, intensity.shape)
    shift = centre_shift(intensity, mask, hot_pixels_masked=hot_pixels_masked)
    data = np.roll(intensity, shift, axis=(0, 1, 2))
    m = None if mask is None else np.roll(mask, shift, axis=(0, 1, 2))
    out = np.zeros((n, n, n), dtype=np.float32)
    out_mask = np.zeros((n, n, n), dtype=bool)
    src, dst, crop = [], [], []
    for size in data.shape:
        start = size // 2 - n // 2
        lo, hi = max(start, 0), min(start + n, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
        crop.append(start)
    out[tuple(dst)] = data[tuple(src)]
    out_mask[tuple(dst)] = True if m is None else m[tuple(src)]
    padded = any(s < n for s in data.shape)
    final_mask = out_mask if (m is not None or padded) else None
    return Prepared(out, final_mask, shift, tuple(crop))


def at_photon_level(
    intensity: np.ndarray, mask: np.ndarray | None = None, counts: bool = True
) -> np.ndarray:
    """The intensity as the network should see it.

    ``log(1 + I)`` depends on the intensity's scale: photon counts are shown as they are, but
    data that are not counts (noise-free simulations, corrected or normalised intensities,
    whose scale is arbitrary) are scaled so that their total over the valid voxels lies in
    the photon range the network was trained on (:data:`~bcdi_bluesky.physics.PRIOR_PHOTONS`):
    data normalised to a maximum of 1 would otherwise reach the network as a nearly linear
    map (measured on 16 development crystals, noise-free: CNN-only median IoU 0.53 at
    maximum 1 against 0.75 at 1e8 photons). Data already in that range are returned as they
    are.
    """
    if counts:
        return intensity
    total = float(np.sum(intensity if mask is None else np.where(mask, intensity, 0.0)))
    low, high = PRIOR_PHOTONS
    # Within the range to a part per million: a total of 1e9 summed in another order stays.
    if total <= 0 or low * (1 - 1e-6) <= total <= high * (1 + 1e-6):
        return intensity
    return intensity * np.float32(min(max(total, low), high) / total)


def network_input(intensity: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``log(1 + I)`` scaled to [0, 1] (masked voxels 0): the CNN's input convention.

    The volume must already be centred on its peak (see :func:`fit_to_grid`).
    """
    # log(1 + I), not log1p: numpy's float32 log is vectorised and 5x faster, and for
    # intensities (I >= 0) the two differ by at most 2.4e-7 after the scaling below.
    x = np.log(np.asarray(intensity, dtype=np.float32) + np.float32(1.0))
    if mask is not None:
        x = np.where(mask, x, np.float32(0.0))
    top = float(x.max())
    if top <= 0:
        raise ValueError("intensity has no signal in the valid voxels")
    return (x / np.float32(top)).astype(np.float32, copy=False)
