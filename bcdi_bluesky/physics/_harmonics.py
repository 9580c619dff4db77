"""Real, orthonormal spherical harmonics and the grid tables built from them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Largest degree supported: beyond it the shape model has more coefficients than a 64^3
#: diffraction volume constrains and the recurrence tables grow for nothing.
LMAX_LIMIT = 12


def check_lmax(lmax: int) -> int:
    """Return ``lmax`` as an int, or raise ``ValueError`` when it is out of range."""
    if isinstance(lmax, bool) or not isinstance(lmax, (int, np.integer)):
        raise ValueError(f"lmax must be an integer, got {lmax!r}")
    if not 0 <= int(lmax) <= LMAX_LIMIT:
        raise ValueError(f"lmax must be in [0, {LMAX_LIMIT}], got {lmax}")
    return int(lmax)


def sh_index(l: int, m: int) -> int:
    """Flat index of the real harmonic ``Y_lm`` in the order ``l^2 + l + m``."""
    return l * l + l + m


def real_sph_harm(lmax: int, directions: np.ndarray) -> np.ndarray:
    """Evaluate the real orthonormal spherical harmonics up to ``lmax``.

    Parameters
    ----------
    lmax : int
        Largest degree.
    directions : ndarray, shape (..., 3)
        Vectors ``(z, y, x)``; they are normalised here (a zero vector is taken as +z).

    Returns
    -------
    ndarray, shape ((lmax + 1)**2, ...)
        ``Y[l*l + l + m]``: for ``m > 0`` ``sqrt(2) P_l^m cos(m phi)``, for ``m < 0``
        ``sqrt(2) P_l^|m| sin(|m| phi)``, with ``P`` the fully normalised associated Legendre
        function without the Condon-Shortley phase, ``theta`` measured from the z axis
        (axis 0 of the volume) and ``phi`` in the (y, x) plane. The integral of
        ``Y_lm Y_l'm'`` over the sphere is the Kronecker delta.
    """
    lmax = check_lmax(lmax)
    d = np.asarray(directions, dtype=np.float64)
    if d.shape[-1] != 3:
        raise ValueError(f"directions must have a last axis of length 3, got shape {d.shape}")
    norm = np.linalg.norm(d, axis=-1)
    safe = np.where(norm > 0, norm, 1.0)
    z = np.where(norm > 0, d[..., 0] / safe, 1.0)
    y = d[..., 1] / safe
    x = d[..., 2] / safe
    sin_t = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = np.arctan2(y, x)

    out = np.empty(((lmax + 1) ** 2, *z.shape))
    # Fully normalised associated Legendre functions by the standard stable recurrences.
    p_mm = np.full(z.shape, np.sqrt(1.0 / (4.0 * np.pi)))
    for m in range(lmax + 1):
        if m > 0:
            p_mm = np.sqrt((2.0 * m + 1.0) / (2.0 * m)) * sin_t * p_mm
        p_prev2 = None
        p_prev = p_mm
        for l in range(m, lmax + 1):
            if l == m:
                p_l = p_mm
            elif l == m + 1:
                p_l = np.sqrt(2.0 * m + 3.0) * z * p_mm
            else:
                a = np.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
                b = np.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
                p_l = a * (z * p_prev - b * p_prev2)
            if l > m:
                p_prev2, p_prev = p_prev, p_l
            if m == 0:
                out[sh_index(l, 0)] = p_l
            else:
                out[sh_index(l, m)] = np.sqrt(2.0) * p_l * np.cos(m * phi)
                out[sh_index(l, -m)] = np.sqrt(2.0) * p_l * np.sin(m * phi)
    return out


@dataclass(frozen=True)
class GridTable:
    """Precomputed geometry of an ``N^3`` grid for voxelising star-shaped crystals.

    Voxels inside the inscribed ball are listed in order of increasing distance from the
    grid centre (``N // 2`` on every axis), so that "every voxel closer than r" is a prefix
    of the list: voxelisation then touches only the voxels a crystal can reach.
    """

    n: int
    lmax: int
    flat_index: np.ndarray  # (V,) int64, index into the raveled N^3 grid
    radius: np.ndarray  # (V,) float32, distance from the centre in voxels
    coords: np.ndarray  # (3, V) float32, (z, y, x) offsets from the centre in voxels
    harmonics: np.ndarray  # ((lmax+1)^2, V) float32, Y_lm at each voxel's direction
    parity: np.ndarray  # (V,) float32, (-1)^(i+j+k): multiplying by it centres the FFT

    def prefix(self, r_max: float) -> int:
        """Number of listed voxels whose distance from the centre is below ``r_max``."""
        return int(np.searchsorted(self.radius, r_max, side="left"))


@lru_cache(maxsize=8)
def grid_table(n: int, lmax: int) -> GridTable:
    """Return the cached :class:`GridTable` for an ``n^3`` grid and degree ``lmax``."""
    lmax = check_lmax(lmax)
    if n < 8:
        raise ValueError(f"grid size N must be at least 8, got {n}")
    c = n // 2
    axis = np.arange(n, dtype=np.float32) - c
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(zz * zz + yy * yy + xx * xx)
    inside = r < (n // 2 - 1)
    flat = np.flatnonzero(inside.ravel())
    radius = r.ravel()[flat]
    order = np.argsort(radius, kind="stable")
    flat = flat[order]
    radius = radius[order].astype(np.float32)
    coords = np.stack([zz.ravel()[flat], yy.ravel()[flat], xx.ravel()[flat]]).astype(np.float32)
    harmonics = real_sph_harm(lmax, coords.T).astype(np.float32)
    parity = (1 - 2 * (np.sum(np.unravel_index(flat, (n, n, n)), axis=0) % 2)).astype(np.float32)
    for arr in (flat, radius, coords, harmonics, parity):
        arr.setflags(write=False)
    return GridTable(n, lmax, flat, radius, coords, harmonics, parity)


@lru_cache(maxsize=8)
def fibonacci_directions(count: int = 2000) -> np.ndarray:
    """Nearly uniform unit vectors ``(z, y, x)`` on the sphere (a Fibonacci lattice)."""
    i = np.arange(count) + 0.5
    z = 1.0 - 2.0 * i / count
    rho = np.sqrt(1.0 - z * z)
    phi = np.pi * (1.0 + 5.0**0.5) * i
    out = np.stack([z, rho * np.sin(phi), rho * np.cos(phi)], axis=-1)
    out.setflags(write=False)
    return out
