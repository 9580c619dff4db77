"""Sampling of q: the central region of q (a coarser grid of the same field of view), every
other q (the same resolution in a smaller field of view: the crystal folded), and the moves
between a grid and the full one.

Conventions: centred intensities (q = 0 at index ``n // 2``), objects in real space with the
crystal near the centre.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import NUMPY, ArrayBackend
from ..settings import SUBSAMPLING_MARGIN

if TYPE_CHECKING:
    from ..physics import Rendered


def central_slices(shape: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the central ``sizes`` region of a centred volume of ``shape`` (q = 0 at index
    ``s // 2`` stays at index ``n // 2``)."""
    return tuple(
        slice(s // 2 - n // 2, s // 2 - n // 2 + n) for s, n in zip(shape, sizes, strict=True)
    )


def coarse_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """The grid of the central ``1 / factor`` of q in each direction."""
    return tuple(s // factor for s in shape)


def crop_frequencies(obj: Any, factor: int, backend: ArrayBackend = NUMPY) -> Any:
    """The object seen through the central ``1 / factor`` of q in each direction: the same
    field of view in ``factor`` times coarser voxels (its intensity is the central region of
    the object's, :func:`~bcdi_bluesky.tuning.central_slices`)."""
    f = backend.fftshift(backend.fftn(backend.asarray(obj, dtype=backend.xp.complex64)))
    window = central_slices(f.shape, coarse_shape(f.shape, factor))
    return backend.ifftn(backend.ifftshift(f[window]))


def pad_frequencies(obj: Any, shape: tuple[int, ...], backend: ArrayBackend = NUMPY) -> Any:
    """A coarse object on the finer grid ``shape``: its q values put in the centre of that
    grid's, zero elsewhere (band-limited interpolation; the inverse of
    :func:`crop_frequencies`)."""
    xp = backend.xp
    f = backend.fftshift(backend.fftn(backend.asarray(obj, dtype=xp.complex64)))
    full = backend.zeros(tuple(shape), xp.complex64)
    full[central_slices(tuple(shape), tuple(f.shape))] = f
    return backend.ifftn(backend.ifftshift(full))


def circular_extent(occupied: np.ndarray) -> int:
    """Length of the shortest arc of a ring that holds every True entry of ``occupied`` (1D):
    the span of an object on a periodic axis, wherever the wrap cuts it."""
    where = np.flatnonzero(occupied)
    if where.size == 0:
        return 0
    gaps = np.diff(np.concatenate([where, [where[0] + occupied.size]]))
    return int(occupied.size - (gaps.max() - 1))


def subsampling_factors(support: np.ndarray, margin: int = SUBSAMPLING_MARGIN) -> tuple[int, ...]:
    """Per axis, 2 where every other q holds the whole crystal: the axis has an even length
    and ``support`` spans at most half of it less ``margin`` voxels; else 1."""
    factors = []
    for axis, n in enumerate(support.shape):
        others = tuple(a for a in range(support.ndim) if a != axis)
        span = circular_extent(np.asarray(support).any(axis=others))
        factors.append(2 if n % 2 == 0 and span + margin <= n // 2 else 1)
    return tuple(factors)


def fits_every_other_q(support: np.ndarray) -> tuple[int, ...] | None:
    """The factors of :func:`subsampling_factors` where ``support`` fits
    in half the field of view along every axis, else None.

    Every axis, not some: the flat sphere has the crystal's volume, and along a thin axis
    folded alone it fills the smaller field of view (measured on the dislocated ellipsoid of
    the strain benchmark, folded along its 15-voxel rocking axis only: the starts ended at chi
    0.035 against 0.011 on every q, and the dislocation was lost)."""
    factors = subsampling_factors(support)
    return factors if min(factors) > 1 else None


def subsample(data: Any, factors: tuple[int, ...]) -> Any:
    """Every ``factors[a]``-th q along axis ``a`` through q = 0 (centred intensity, q = 0 at
    index ``n // 2``): the intensity of the crystal folded into a field of view ``factors``
    times smaller (:func:`fold`), exactly, with the same resolution. Axis lengths must be
    multiples of their factors."""
    window = []
    for n, k in zip(data.shape, factors, strict=True):
        if n % k:
            raise ValueError(f"an axis of {n} voxels cannot be subsampled by {k}")
        window.append(slice((n // 2) % k, None, k))
    return data[tuple(window)]


def fold(obj: Any, factors: tuple[int, ...], backend: ArrayBackend = NUMPY) -> Any:
    """The object on the grid of :func:`subsample`: summed over the copies of its field of view
    divided by ``factors`` (the sampling at every other q aliases the object modulo that field),
    then centred. For a crystal within the smaller field of view this is the crystal itself.
    An array of ``backend``, of ``obj``'s dtype (a boolean mask folds to their union)."""
    xp = backend.xp
    obj = backend.asarray(obj)
    small = tuple(n // k for n, k in zip(obj.shape, factors, strict=True))
    # Each axis of n = k * m voxels split as (k, m): index c * m + i is copy c's voxel i.
    split = tuple(size for pair in zip(factors, small, strict=True) for size in pair)
    out = xp.sum(xp.reshape(obj, split), axis=tuple(range(0, 2 * obj.ndim, 2)))
    if out.dtype != obj.dtype:
        out = xp.astype(out, obj.dtype)
    return xp.roll(out, tuple(m // 2 for m in small), axis=tuple(range(out.ndim)))


def fold_rendered(
    rendered: Rendered, factors: tuple[int, ...], backend: ArrayBackend = NUMPY
) -> Any:
    """:func:`fold` of ``rendered.to_object()``, the same array to the bit, made without the
    full grid on the numpy backend where the cube that holds the crystal
    (:meth:`~bcdi_bluesky.physics.Rendered.box`) fits in the smaller field of view: each
    rendered voxel goes straight to its cell, as no two share one (at 64^3, 1.0 ms against
    1.75 ms with the full grid, in the fine ES steps' forward model)."""
    n = rendered.n
    small = tuple(n // k for k in factors)
    box = rendered.box()
    if not backend.is_numpy or any(b.stop - b.start > m for b, m in zip(box, small, strict=True)):
        return fold(rendered.to_object(), factors, backend)
    cells = np.unravel_index(rendered.flat_index, (n,) * len(factors))
    # fold's cell of index i along an axis of m cells: i modulo m, then rolled by m // 2.
    index = np.ravel_multi_index(
        tuple((c % m + m // 2) % m for c, m in zip(cells, small, strict=True)), small
    )
    out = np.zeros(math.prod(small), dtype=np.complex64)
    out[index] = rendered.values()
    return out.reshape(small)


def unfold(obj: Any, shape: tuple[int, ...], backend: ArrayBackend = NUMPY) -> Any:
    """An object of :func:`subsample`'s grid on the full grid ``shape``: centred on its
    (circular) centre of mass and placed in the middle, zero elsewhere; the inverse of
    :func:`fold` for a crystal within the smaller field of view."""
    xp = backend.xp
    host = backend.to_numpy(obj)
    power = np.abs(host) ** 2
    shifts = []
    for axis, m in enumerate(host.shape):
        profile = power.sum(axis=tuple(a for a in range(host.ndim) if a != axis))
        turn = np.angle(np.sum(profile * np.exp(2j * np.pi * np.arange(m) / m)))
        shifts.append(m // 2 - round(turn / (2 * np.pi) * m))
    centred = np.roll(host, shifts, axis=tuple(range(host.ndim)))
    full = np.zeros(tuple(shape), dtype=host.dtype)
    full[
        tuple(
            slice(n // 2 - m // 2, n // 2 - m // 2 + m)
            for n, m in zip(shape, host.shape, strict=True)
        )
    ] = centred
    return backend.asarray(full, dtype=xp.complex64)
