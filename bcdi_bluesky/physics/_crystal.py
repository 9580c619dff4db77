"""The low-dimensional crystal model: parameters -> complex voxel object.

A crystal is ``o(r) = s(r) rho(r) exp(i phi(r))`` centred on the grid (index ``N // 2``):

* ``s``: a star-shaped body whose surface is ``R(n) = r0 (1 + sqrt(4 pi) sum_{l>=2} c_lm Y_lm(n))``
  with a one-voxel linear (anti-aliased) edge, so the object changes smoothly with the
  parameters. ``l = 0`` is the mean radius ``r0``; ``l = 1`` is left out because to first order
  it only translates the crystal, which no intensity measurement can see.
* ``rho``: uniform density plus Gaussian radial basis functions (voids when the amplitude is
  negative, ramps when a broad one sits off centre), clipped at zero.
* ``phi``: the projected lattice displacement as a polynomial of degree 2..``phase_order`` in
  ``u = r / r0``; the constant (global phase) and linear (a shift of the Bragg peak) terms are
  unobservable and left out.

Lengths are relative to the grid (``radius`` is ``r0 / N``) or to ``r0`` (RBF centres and
widths, the phase coordinates), so one parameter vector renders the same crystal on any ``N``.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..backend import NUMPY, ArrayBackend
from ._forward import intensity
from ._harmonics import check_lmax, fibonacci_directions, grid_table, real_sph_harm

_SQRT_4PI = float(np.sqrt(4.0 * np.pi))
_MIN_RELATIVE_RADIUS = 0.2  # the surface never comes closer to the centre than 0.2 r0
_AXES = "zyx"


@dataclass(frozen=True)
class Rendered:
    """A crystal rendered on the voxels it can reach (see :meth:`CrystalModel.render`).

    The arrays belong to :attr:`backend` (numpy arrays for the default CPU backend).
    """

    n: int
    flat_index: Any  # (K,) indices into the raveled N^3 grid
    shape: Any  # (K,) soft support in [0, 1]
    density: Any  # (K,) density (>= 0)
    phase: Any  # (K,) phase in radians
    parity: Any  # (K,) (-1)^(i+j+k) of each voxel
    backend: ArrayBackend = NUMPY
    #: Every voxel of :attr:`flat_index` lies closer than this to the grid centre (voxels).
    reach: float = math.inf

    def box(self) -> tuple[slice, ...]:
        """The cube about the grid centre (``N // 2``) that holds every rendered voxel."""
        half = min(math.ceil(self.reach), self.n // 2)
        centre = self.n // 2
        return (slice(centre - half, min(centre + half + 1, self.n)),) * 3

    def values(self) -> Any:
        """Complex64 values of the object on :attr:`flat_index`."""
        return (self.shape * self.density) * self.backend.xp.exp(1j * self.phase)

    def to_object(self) -> Any:
        """The complex64 ``N^3`` object."""
        obj = self.backend.zeros(self.n**3, self.backend.xp.complex64)
        obj[self.flat_index] = self.values()
        return self.backend.xp.reshape(obj, (self.n,) * 3)


_buffers = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread complex64 ``n^3`` work array: reusing it spares the page faults of a fresh
    2 MB allocation per forward model (a third of the time at 64^3)."""
    store = getattr(_buffers, "arrays", None)
    if store is None:
        store = _buffers.arrays = {}
    if n not in store:
        store[n] = np.empty((n, n, n), dtype=np.complex64)
    return store[n]


@dataclass(frozen=True)
class CrystalModel:
    """Layout, bounds and rendering of the crystal parameter vector.

    Parameters
    ----------
    n : int
        Grid size ``N`` of the rendered object (``N^3`` voxels).
    lmax : int
        Largest spherical-harmonic degree of the surface (coefficients for ``l = 2..lmax``).
    n_rbf : int
        Number of Gaussian radial basis functions in the density.
    phase_order : int
        Largest polynomial degree of the phase field (terms of degree 2..phase_order).
    """

    n: int = 64
    lmax: int = 4
    n_rbf: int = 3
    phase_order: int = 3
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        check_lmax(self.lmax)
        if self.lmax < 2:
            raise ValueError(f"lmax must be at least 2 (l = 0, 1 carry no shape), got {self.lmax}")
        if not isinstance(self.n, (int, np.integer)) or self.n < 16:
            raise ValueError(f"grid size n must be an integer >= 16, got {self.n!r}")
        if not 0 <= self.n_rbf <= 16:
            raise ValueError(f"n_rbf must be in [0, 16], got {self.n_rbf}")
        if not 1 <= self.phase_order <= 5:
            raise ValueError(
                f"phase_order must be in [1, 5] (1: no phase field), got {self.phase_order}"
            )

    # ----------------------------------------------------------------- layout
    @cached_property
    def sh_degrees(self) -> np.ndarray:
        """Degree ``l`` of each surface coefficient, in vector order."""
        return np.array([l for l in range(2, self.lmax + 1) for _ in range(2 * l + 1)])

    @cached_property
    def phase_exponents(self) -> list[tuple[int, int, int]]:
        """Exponents ``(a, b, c)`` of each phase monomial ``u_z^a u_y^b u_x^c``."""
        out = []
        for degree in range(2, self.phase_order + 1):
            for combo in itertools.combinations_with_replacement(range(3), degree):
                out.append(tuple(combo.count(k) for k in range(3)))
        return out

    @cached_property
    def slices(self) -> dict[str, slice]:
        """Where each group of parameters sits in the flat vector."""
        sizes = {
            "radius": 1,
            "sh": len(self.sh_degrees),
            "rbf_centre": 3 * self.n_rbf,
            "rbf_amplitude": self.n_rbf,
            "rbf_width": self.n_rbf,
            "phase": len(self.phase_exponents),
        }
        out, start = {}, 0
        for name, size in sizes.items():
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def size(self) -> int:
        """Length of the parameter vector."""
        return self.slices["phase"].stop

    @cached_property
    def names(self) -> list[str]:
        """Parameter names, in vector order."""
        names = ["radius"]
        for l in range(2, self.lmax + 1):
            names += [f"sh_l{l}_m{m}" for m in range(-l, l + 1)]
        names += [f"rbf{k}_c{a}" for k in range(self.n_rbf) for a in _AXES]
        names += [f"rbf{k}_amplitude" for k in range(self.n_rbf)]
        names += [f"rbf{k}_width" for k in range(self.n_rbf)]
        names += [
            "phase_" + "".join(a * e for a, e in zip(_AXES, ex, strict=True))
            for ex in self.phase_exponents
        ]
        return names

    @cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of every parameter (physical units)."""
        hi = np.empty(self.size)
        s = self.slices
        hi[s["radius"]] = 0.25
        hi[s["sh"]] = np.select([self.sh_degrees == 2, self.sh_degrees == 3], [0.35, 0.2], 0.15)
        hi[s["rbf_centre"]] = 0.8
        hi[s["rbf_amplitude"]] = 1.0
        hi[s["rbf_width"]] = 0.8
        degree = np.array([sum(e) for e in self.phase_exponents])
        hi[s["phase"]] = np.where(degree == 2, 3.0, 2.0)
        lo = -hi
        lo[s["radius"]] = 0.07
        lo[s["rbf_width"]] = 0.15
        for arr in (lo, hi):
            arr.setflags(write=False)
        return lo, hi

    @cached_property
    def twin_signs(self) -> np.ndarray:
        """Signs that map a parameter vector to its twin ``conj(o(-r))``.

        ``c_lm -> (-1)^l c_lm``, RBF centres ``-> -c``, phase terms of even degree change sign
        (``phi'(r) = -phi(-r)``). The flipped parameters have bounds symmetric about zero, so the
        same signs apply to the normalised vector.
        """
        signs = np.ones(self.size)
        s = self.slices
        signs[s["sh"]] = (-1.0) ** self.sh_degrees
        signs[s["rbf_centre"]] = -1.0
        degree = np.array([sum(e) for e in self.phase_exponents])
        signs[s["phase"]] = -((-1.0) ** degree)
        signs.setflags(write=False)
        return signs

    def reflection_signs(self, axis: int) -> np.ndarray:
        """Signs that map a parameter vector to the crystal mirrored along ``axis`` (0 = z).

        The mirrored object ``o(r')`` (``r'`` = ``r`` with coordinate ``axis`` negated) has the
        intensity mirrored the same way, and the priors are mirror-symmetric, so
        ``(signs * params, mirrored intensity)`` is another valid sample: the training uses
        it to see each simulated crystal more than once. Every parameter maps to +- itself:
        a real harmonic is even or odd under a mirror, so is a phase monomial (by the power of
        that coordinate), and an RBF centre flips its own coordinate.
        """
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        signs = np.sign(np.diag(self.symmetry_matrix((0, 1, 2), (axis,))))
        signs.setflags(write=False)
        return signs

    def symmetry_matrix(self, permutation: tuple[int, ...], flips: tuple[int, ...]) -> np.ndarray:
        """Matrix that maps a parameter vector to the crystal under a symmetry of the cube.

        The symmetry is the one :func:`bcdi_bluesky.physics.cube_symmetry` applies to a
        volume: mirror the axes in ``flips`` about index ``N // 2``, then transpose the axes
        to ``permutation``. It maps a crystal of the model to another one (the surface
        harmonics of each degree mix among themselves, RBF centres and phase monomials move
        with the coordinates), acts on the normalised vector alike (the bounds are the same
        within each mixed group), and the priors are invariant under it.

        Returns
        -------
        ndarray
            ``(P, P)``, orthogonal; ``params' = matrix @ params``.
        """
        permutation, flips = tuple(int(a) for a in permutation), tuple(sorted(set(flips)))
        if sorted(permutation) != [0, 1, 2] or not set(flips) <= {0, 1, 2}:
            raise ValueError(
                f"permutation must order (0, 1, 2) and flips name axes 0-2, got "
                f"{permutation!r}, {flips!r}"
            )
        key = ("symmetry", permutation, flips)
        if key not in self._cache:
            # r'_k = sigma_{perm[k]} r_{perm[k]}: the point that lands at r came from G^-1 r.
            g = np.zeros((3, 3))
            for k, a in enumerate(permutation):
                g[k, a] = -1.0 if a in flips else 1.0
            matrix = np.eye(self.size)
            s = self.slices
            d = fibonacci_directions()
            y, y_from = (real_sph_harm(self.lmax, v)[4:] for v in (d, d @ g))  # d @ g = G^-1 d
            matrix[s["sh"], s["sh"]] = np.linalg.lstsq(y.T, y_from.T, rcond=None)[0]
            for k in range(self.n_rbf):
                block = slice(s["rbf_centre"].start + 3 * k, s["rbf_centre"].start + 3 * k + 3)
                matrix[block, block] = g
            u = np.random.default_rng(0).normal(size=(200, 3))

            def monomials(points: np.ndarray) -> np.ndarray:
                return np.stack(
                    [np.prod(points ** np.array(ex), axis=1) for ex in self.phase_exponents]
                )

            phase = np.linalg.lstsq(monomials(u).T, monomials(u @ g).T, rcond=None)[0]
            matrix[s["phase"], s["phase"]] = phase
            matrix[np.abs(matrix) < 1e-9] = 0.0
            matrix.setflags(write=False)
            self._cache[key] = matrix
        return self._cache[key]

    # ---------------------------------------------------------- conversions
    def check_vector(self, params: np.ndarray) -> np.ndarray:
        """Return ``params`` as a float64 vector, or raise ``ValueError``."""
        p = np.asarray(params, dtype=np.float64)
        if p.shape != (self.size,):
            raise ValueError(f"parameter vector must have shape ({self.size},), got {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError("parameter vector contains NaN or inf")
        return p

    def normalise(self, params: np.ndarray) -> np.ndarray:
        """Map physical parameters to [-1, 1] (bounds to -1 and +1)."""
        lo, hi = self.bounds
        return 2.0 * (self.check_vector(params) - lo) / (hi - lo) - 1.0

    def denormalise(self, normalised: np.ndarray) -> np.ndarray:
        """Map [-1, 1] back to physical parameters (values outside are clipped)."""
        lo, hi = self.bounds
        p = np.clip(self.check_vector(normalised), -1.0, 1.0)
        return lo + (p + 1.0) * 0.5 * (hi - lo)

    def clip(self, params: np.ndarray) -> np.ndarray:
        """Clip physical parameters into their bounds."""
        lo, hi = self.bounds
        return np.clip(self.check_vector(params), lo, hi)

    def twin(self, params: np.ndarray) -> np.ndarray:
        """The parameters of the twin crystal ``conj(o(-r))`` (same intensity)."""
        return self.check_vector(params) * self.twin_signs

    def structured(self, params: np.ndarray) -> dict[str, np.ndarray | float]:
        """A readable view: radius, SH coefficients by degree, RBFs, phase terms."""
        p = self.check_vector(params)
        s = self.slices
        return {
            "radius": float(p[s["radius"]][0]),
            "sh": {l: p[s["sh"]][self.sh_degrees == l] for l in range(2, self.lmax + 1)},
            "rbf_centre": p[s["rbf_centre"]].reshape(self.n_rbf, 3),
            "rbf_amplitude": p[s["rbf_amplitude"]],
            "rbf_width": p[s["rbf_width"]],
            "phase": dict(zip(self.names[s["phase"]], p[s["phase"]], strict=True)),
        }

    def with_grid(self, n: int) -> CrystalModel:
        """The same model rendered on an ``n^3`` grid."""
        return CrystalModel(n=n, lmax=self.lmax, n_rbf=self.n_rbf, phase_order=self.phase_order)

    def to_dict(self) -> dict:
        """JSON-able description of the layout (for model cards and result files)."""
        lo, hi = self.bounds
        return {
            "n": self.n,
            "lmax": self.lmax,
            "n_rbf": self.n_rbf,
            "phase_order": self.phase_order,
            "names": self.names,
            "lower": lo.tolist(),
            "upper": hi.tolist(),
            "twin_signs": self.twin_signs.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CrystalModel:
        """Inverse of :meth:`to_dict` (checks that names match)."""
        model = cls(
            n=int(d["n"]),
            lmax=int(d["lmax"]),
            n_rbf=int(d["n_rbf"]),
            phase_order=int(d["phase_order"]),
        )
        if "names" in d and list(d["names"]) != model.names:
            raise ValueError("parameter names in the description do not match the model layout")
        return model

    # -------------------------------------------------------------- rendering
    def surface_radius(self, params: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Surface distance from the centre (voxels) along unit ``directions`` (..., 3)."""
        p = self.check_vector(params)
        y = real_sph_harm(self.lmax, directions)[4:]
        return self._surface(p, np.tensordot(p[self.slices["sh"]], y, axes=1), NUMPY.xp)

    def _surface(self, p: np.ndarray, sh_sum: Any, xp: Any) -> Any:
        r0 = float(p[0]) * self.n
        r = r0 * xp.clip(1.0 + _SQRT_4PI * sh_sum, min=_MIN_RELATIVE_RADIUS)
        return xp.clip(r, max=self.n // 2 - 2.5)

    def _max_extent(self, p: np.ndarray) -> float:
        key = ("fib", self.lmax)
        if key not in self._cache:
            self._cache[key] = real_sph_harm(self.lmax, fibonacci_directions())[4:]
        sh_sum = np.einsum("i,ij->j", p[self.slices["sh"]], self._cache[key])
        return float(self._surface(p, sh_sum, NUMPY.xp).max())

    def render(self, params: np.ndarray, backend: ArrayBackend = NUMPY) -> Rendered:
        """Evaluate shape, density and phase on the voxels the crystal can reach.

        Parameters
        ----------
        params : ndarray
            Physical parameters (host numpy).
        backend : ArrayBackend
            Where the voxels are evaluated (the grid tables move there once).
        """
        p = self.check_vector(params)
        s = self.slices
        xp = backend.xp
        table = grid_table(self.n, self.lmax)
        flat_index, radius, coords, harmonics, parity = backend.cached(
            ("grid_table", self.n, self.lmax),
            lambda: tuple(
                backend.asarray(a)
                for a in (
                    table.flat_index,
                    table.radius,
                    table.coords,
                    table.harmonics[4:],
                    table.parity,
                )
            ),
        )
        r0 = float(p[0] * self.n)
        # A Fibonacci-sampled maximum plus a margin bounds the surface; only voxels closer
        # than that are evaluated (a prefix of the radius-sorted table).
        reach = self._max_extent(p) * 1.03 + 1.5
        k = table.prefix(reach)
        sh_sum = backend.matvec(p[s["sh"]], harmonics[:, :k])
        shape = xp.clip(self._surface(p, sh_sum, xp) - radius[:k] + 0.5, min=0.0, max=1.0)
        flat_index, coords, parity = flat_index[:k], coords[:, :k], parity[:k]
        inside = None
        if backend.is_numpy:
            # On the host, leaving out the empty voxels saves the work below; on a device,
            # finding them would wait for it (a sync per forward model), so there the empty
            # voxels of the prefix stay, with shape 0.
            inside = backend.flatnonzero(shape > 0)
            shape, flat_index, coords, parity = (
                shape[inside],
                flat_index[inside],
                coords[:, inside],
                parity[inside],
            )
        u = coords / r0

        density = xp.ones_like(shape)
        centres = p[s["rbf_centre"]].reshape(self.n_rbf, 3)
        for c, a, w in zip(centres, p[s["rbf_amplitude"]], p[s["rbf_width"]], strict=True):
            if a != 0.0:
                d2 = (u[0] - float(c[0])) ** 2 + (u[1] - float(c[1])) ** 2
                d2 += (u[2] - float(c[2])) ** 2
                density += float(a) * xp.exp(d2 * float(-0.5 / (w * w)))
        density = xp.clip(density, min=0.0)

        # sum_e c_e u^e = sum_e (c_e / r0^|e|) coords^e: one product with a table of the
        # coordinates' monomials (a loop over the terms costs more than the FFT at 32^3).
        coefficients = p[s["phase"]]
        if np.any(coefficients):
            monomials = backend.cached(
                ("phase_monomials", self.n, self.lmax, self.phase_order),
                lambda: backend.asarray(self._phase_monomials(table.coords)),
            )
            phase = backend.matvec(coefficients / r0**self.phase_degrees, monomials[:, :k])
            if inside is not None:
                phase = phase[inside]
        else:
            phase = xp.zeros_like(shape)
        return Rendered(self.n, flat_index, shape, density, phase, parity, backend, reach)

    @cached_property
    def phase_degrees(self) -> np.ndarray:
        """Degree of each phase monomial, in vector order."""
        return np.array([sum(e) for e in self.phase_exponents], dtype=np.float64)

    def _phase_monomials(self, coords: np.ndarray) -> np.ndarray:
        """``coords_z^a coords_y^b coords_x^c`` of every phase term (rows) at ``coords``
        (voxels from the centre, float32: exact for these integers)."""
        return np.stack(
            [
                coords[0] ** ez * coords[1] ** ey * coords[2] ** ex
                for ez, ey, ex in self.phase_exponents
            ]
        ).astype(np.float32)

    def voxelise(self, params: np.ndarray, backend: ArrayBackend = NUMPY) -> Any:
        """Render the complex64 ``N^3`` object of a parameter vector (an array of ``backend``)."""
        return self.render(params, backend).to_object()

    def intensity(self, params: np.ndarray, backend: ArrayBackend = NUMPY) -> Any:
        """Centred intensity ``|fftshift(fftn(voxelise(params)))|^2`` (float32), fast.

        The forward model is the inner loop of refinement. For even ``N`` the object is
        multiplied by ``(-1)^(i+j+k)`` while it is scattered into a zeroed buffer, which makes
        the FFT come out centred (no ``fftshift``), and the FFT runs in place (on numpy into a
        reused per-thread buffer).
        """
        rendered = self.render(params, backend)
        if self.n % 2:
            return intensity(rendered.to_object(), backend=backend)
        if backend.is_numpy:
            flat = _scratch(self.n).reshape(-1)
            flat.fill(0)
        else:
            flat = backend.zeros(self.n**3, backend.xp.complex64)
        flat[rendered.flat_index] = rendered.values() * rendered.parity
        volume = backend.xp.reshape(flat, (self.n,) * 3)
        # The crystal sits in a cube about the centre: the FFT skips the lines outside it
        # (numpy: the whole transform's result to the bit, 0.6x its time at 32^3).
        box = rendered.box()
        if backend.prunes(volume.shape, box):
            return backend.power(backend.fftn_within(volume, box))
        return backend.power(backend.fftn(volume, overwrite=True))
