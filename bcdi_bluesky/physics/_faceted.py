"""Crystals from outside the CNN's family: faceted polyhedra with analytical displacement fields.

The crystal model (:mod:`._crystal`) describes smooth star-shaped bodies with a low-order phase
polynomial; measured nanocrystals are faceted, may sit cut on a substrate, hold voids, and carry
inclusions and dislocations. This generator renders such crystals directly on the voxel grid,
from a handful of readable numbers, without any use of the training prior, so that a benchmark
drawn from it tests the pipeline on what it was never shown.

* Shape: the intersection of half-spaces ``m . u <= d`` (Wulff-like) over the {100} (6 faces),
  {111} (8) and {110} (12) families, each family at its own distance (truncations), each face
  jittered by a few per cent, stretched along the crystal axes (platelets, rods) and turned
  to a random orientation; a substrate cut adds one flat face through the lower part. The edge
  is anti-aliased over one voxel from the exact signed distance to the nearest face.
* Density: uniform, with spherical voids, or with a linear amplitude ramp.
* Phase ``g . u(r)`` (radians) of a displacement field: a polynomial of degree 2-3; the
  elastic field of a spherical inclusion (Eshelby: linear inside, ``1/r^2`` outside,
  compressive or tensile); a screw dislocation (phase ``s theta`` about the line, one full
  ``2 pi`` winding for ``g . b = s = +-1``); an edge dislocation (the isotropic Volterra field,
  Hirth and Lothe eq. 3-45, Poisson ratio 0.3: the same ``2 pi`` winding plus its
  ``sin 2 theta`` and ``log r`` terms).
* Measurement: noise-free (the intensity scaled to :data:`NOISE_FREE_PHOTONS`, not whole
  numbers, so nothing treats it as counts) or Poisson counts of 1e5-1e7 photons; a share with
  a detector-gap stripe (:func:`~bcdi_bluesky.physics.detector_gap_mask`).

:func:`out_of_family_crystal` draws crystal ``index`` of a seed: index ``i`` takes shape kind
``i % 8`` and displacement kind ``(i // 8) % 5``, so any 40 consecutive indices hold every
combination once. :data:`BENCHMARK_SEED` is the benchmark's; tuning and experiments use
:data:`DEV_SEED` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._forward import detector_gap_mask, intensity, scale_to_photons, simulate_counts

#: Seed of the out-of-family benchmark set (never used for tuning or training).
BENCHMARK_SEED = 1313
#: Seed of the crystals used while developing and tuning (disjoint from the benchmark's).
DEV_SEED = 7
SHAPE_KINDS = (
    "octahedron",
    "cube",
    "cuboctahedron",
    "truncated octahedron",
    "wulff",
    "platelet",
    "rod",
    "substrate-cut",
)
DISPLACEMENT_KINDS = ("none", "polynomial", "inclusion", "screw dislocation", "edge dislocation")
DENSITY_KINDS = ("uniform", "voids", "ramp")
#: Total of a noise-free intensity (any scale would do; this one is count-like).
NOISE_FREE_PHOTONS = 1e9
#: Range of total photons of the noisy crystals (log-uniform).
PHOTON_RANGE = (1e5, 1e7)
#: Share of noise-free crystals and of crystals with a detector gap.
NOISE_FREE_SHARE, GAP_SHARE = 0.25, 0.2
#: Largest extent of a crystal along any grid axis, as a fraction of the grid.
MAX_EXTENT = 0.45
#: Poisson ratio of the edge dislocation's field.
POISSON_RATIO = 0.3

_FAMILIES = {
    "100": np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float),
    "111": np.array([[a, b, c] for a in (1, -1) for b in (1, -1) for c in (1, -1)], float)
    / np.sqrt(3.0),
    "110": np.array(
        [
            v
            for v in ([1, 1, 0], [1, -1, 0], [0, 1, 1], [0, 1, -1], [1, 0, 1], [1, 0, -1])
            for v in (v, [-x for x in v])
        ],
        float,
    )
    / np.sqrt(2.0),
}
# Facet distances per shape kind, relative to the {100} distance (inf: family absent). A cube
# of half-width 1 has its corners at sqrt(3) along <111> and its edges at sqrt(2) along <110>,
# so a family truncates only below those.
_SHAPE_DISTANCES = {
    "octahedron": {"111": 1.0},
    "cube": {"100": 1.0},
    "cuboctahedron": {"100": 1.0, "111": 2.0 / np.sqrt(3.0)},
    "truncated octahedron": {"100": 1.0, "111": 1.3},
    "wulff": {"100": 1.0, "111": 1.25, "110": 1.2},
    "platelet": {"100": 1.0, "111": 1.35},
    "rod": {"100": 1.0, "110": 1.25},
    "substrate-cut": {"100": 1.0, "111": 1.3, "110": 1.3},
}


@dataclass(frozen=True)
class OutOfFamilyCrystal:
    """One out-of-family crystal and its measurement.

    ``object`` is the complex truth, centred on the grid; ``measured`` the intensity
    (``|fftshift(fftn(object))|^2`` scaled to ``photons``, Poisson counts unless noise-free),
    with masked voxels zero; ``mask`` is True for valid voxels (None without a gap).
    """

    seed: int
    index: int
    n: int
    shape_kind: str
    displacement_kind: str
    density_kind: str
    photons: float
    noise_free: bool
    object: np.ndarray = field(repr=False)
    measured: np.ndarray = field(repr=False)
    mask: np.ndarray | None = field(repr=False)

    @property
    def labels(self) -> list[str]:
        """Shape, displacement, density and measurement kind (for per-kind tables)."""
        return [
            self.shape_kind,
            self.displacement_kind,
            self.density_kind,
            "noise-free" if self.noise_free else "counts",
            *(["gap"] if self.mask is not None else []),
        ]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed 3x3 rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _coordinates(n: int) -> np.ndarray:
    """``(3, n, n, n)`` voxel coordinates relative to the grid centre ``n // 2``."""
    axis = np.arange(n, dtype=np.float64) - n // 2
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))


def polyhedron_distance(u: np.ndarray, normals: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside) to the intersection of half-spaces ``m . u <= d``.

    Parameters
    ----------
    u : ndarray
        ``(3, ...)`` coordinates.
    normals : ndarray
        ``(F, 3)`` unit outward normals.
    distances : ndarray
        ``(F,)`` distances of the faces from the origin.

    Returns
    -------
    ndarray
        ``min_f (d_f - m_f . u)``: exact inside, a lower bound of the distance outside.
    """
    out = np.full(u.shape[1:], np.inf)
    for m, d in zip(normals, distances, strict=True):
        np.minimum(out, d - np.tensordot(m, u, axes=1), out=out)
    return out


def _faces(
    rng: np.random.Generator, kind: str, half_width: float, stretch: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals and distances of the faces in the crystal frame (stretched by ``stretch``)."""
    normals, distances = [], []
    for family, relative in _SHAPE_DISTANCES[kind].items():
        base = _FAMILIES[family]
        d = relative * half_width * rng.uniform(0.95, 1.05, size=len(base))
        # Stretching the body by S maps the face m . u <= d to (S^-1 m) . u <= d.
        scaled = base / stretch
        norm = np.linalg.norm(scaled, axis=1)
        normals.append(scaled / norm[:, None])
        distances.append(d / norm)
    return np.concatenate(normals), np.concatenate(distances)


def _stretch(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Aspect ratios along the crystal axes (platelet: one short, rod: one long)."""
    if kind == "platelet":
        return np.array([rng.uniform(0.35, 0.55), 1.0, rng.uniform(0.9, 1.1)])
    if kind == "rod":
        return np.array([rng.uniform(1.8, 2.4), 1.0, rng.uniform(0.9, 1.1)])
    return rng.uniform(0.85, 1.15, size=3)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def displacement_phase(
    rng: np.random.Generator, kind: str, r: np.ndarray, size: float
) -> np.ndarray:
    """Phase ``g . u(r)`` in radians of a displacement field of ``kind``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Draws the field's position, orientation and strength.
    kind : str
        One of :data:`DISPLACEMENT_KINDS`.
    r : ndarray
        ``(3, ...)`` coordinates (voxels) relative to the crystal's centre.
    size : float
        The crystal's half-width (voxels): positions and strengths scale with it.
    """
    if kind == "none":
        return np.zeros(r.shape[1:])
    if kind == "polynomial":
        x = r / size
        phase = np.zeros(r.shape[1:])
        for degree, scale in ((2, 1.2), (3, 0.6)):
            for _ in range(3):
                axes = rng.integers(0, 3, size=degree)
                phase += rng.normal(0.0, scale) * np.prod(x[axes], axis=0)
        return phase
    if kind == "inclusion":
        # Eshelby's spherical inclusion of misfit eps: u = eps (r - c) inside,
        # eps a^3 (r - c) / |r - c|^3 outside; g . u in radians, g = q g_hat.
        centre = rng.uniform(-0.4, 0.4, size=3) * size
        a = rng.uniform(0.2, 0.35) * size
        d = r - centre[:, None, None, None]
        dist = np.maximum(np.sqrt(np.sum(d * d, axis=0)), 1e-9)
        g = _unit(rng)
        strength = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.5) / a  # radians at |d| = a
        factor = np.where(dist <= a, 1.0, (a / dist) ** 3)
        return strength * factor * np.tensordot(g, d, axes=1)
    if kind in ("screw dislocation", "edge dislocation"):
        # The line passes near the centre along t; (e1, e2, t) is a right-handed frame.
        t = _unit(rng)
        e1 = np.cross(t, _unit(rng))
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(t, e1)
        point = rng.uniform(-0.3, 0.3, size=3) * size
        d = r - point[:, None, None, None]
        x1, x2 = np.tensordot(e1, d, axes=1), np.tensordot(e2, d, axes=1)
        theta = np.arctan2(x2, x1)
        sign = rng.choice([-1.0, 1.0])  # g . b = +-1: one 2 pi winding
        if kind == "screw dislocation":
            return sign * theta
        # Volterra edge dislocation, b along e1 (Hirth and Lothe): u1 gives the winding;
        # g has a component along e2 too, which adds the log r and cos 2 theta terms.
        nu = POISSON_RATIO
        rho2 = np.maximum(x1 * x1 + x2 * x2, 1e-9)
        u1 = theta + x1 * x2 / (2 * (1 - nu) * rho2)
        u2 = -(
            (1 - 2 * nu) / (4 * (1 - nu)) * np.log(rho2 / size**2)
            + (x1 * x1 - x2 * x2) / (4 * (1 - nu) * rho2)
        )
        return sign * u1 + rng.uniform(-0.5, 0.5) * u2
    raise ValueError(f"unknown displacement kind {kind!r}; expected one of {DISPLACEMENT_KINDS}")


def out_of_family_object(
    rng: np.random.Generator, n: int, shape_kind: str, displacement_kind: str, density_kind: str
) -> np.ndarray:
    """Render one faceted crystal (complex64, centred on the ``n^3`` grid).

    The largest extent stays within :data:`MAX_EXTENT` of the grid (oversampling above 2 on
    every axis).
    """
    if shape_kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape kind {shape_kind!r}; expected one of {SHAPE_KINDS}")
    if density_kind not in DENSITY_KINDS:
        raise ValueError(f"unknown density kind {density_kind!r}; expected one of {DENSITY_KINDS}")
    rotation = random_rotation(rng)
    stretch = _stretch(rng, shape_kind)
    # Half-width of the {100} faces in voxels, before the size check below.
    half_width = rng.uniform(0.10, 0.14) * n / max(1.0, float(stretch.max()) / 1.4)
    normals, distances = _faces(rng, shape_kind, half_width, stretch)
    cut = rng.uniform(0.3, 0.55) * half_width * stretch[0]
    r = _coordinates(n)
    u = np.tensordot(rotation.T, r, axes=1)  # crystal frame

    def body(scale: float) -> np.ndarray:
        signed = polyhedron_distance(u, normals, scale * distances)
        if shape_kind == "substrate-cut":
            # A flat contact face a third to a half of the way down one crystal axis.
            signed = np.minimum(signed, u[0] + scale * cut)
        return np.clip(signed + 0.5, 0.0, 1.0)

    shape = body(1.0)
    # Oversampling >= 2 on every axis: the extent must stay below MAX_EXTENT of the grid.
    idx = np.argwhere(shape > 0)
    extent = float((idx.max(axis=0) - idx.min(axis=0) + 1).max())
    if extent > MAX_EXTENT * n:
        scale = (MAX_EXTENT * n - 1) / extent
        shape, half_width = body(scale), half_width * scale
    inside = shape > 0
    centroid = (r[:, inside] * shape[inside]).sum(axis=1) / shape[inside].sum()
    rc = r - centroid[:, None, None, None]
    density = np.ones_like(shape)
    if density_kind == "voids":
        for _ in range(int(rng.integers(1, 3))):
            centre = rng.uniform(-0.35, 0.35, size=3) * half_width
            radius = rng.uniform(0.2, 0.3) * half_width
            dist = np.sqrt(np.sum((rc - centre[:, None, None, None]) ** 2, axis=0))
            density *= np.clip(dist - radius + 0.5, 0.0, 1.0)
    elif density_kind == "ramp":
        # Amplitude from 1 down to 0.5-0.8 across the crystal along a random direction.
        drop = rng.uniform(0.2, 0.5)
        along = np.tensordot(_unit(rng), rc, axes=1) / (2 * half_width)
        density = np.clip(1.0 - drop * (along + 0.5), 0.2, 1.0)
    phase = displacement_phase(rng, displacement_kind, rc, half_width)
    return (shape * density * np.exp(1j * phase)).astype(np.complex64)


def out_of_family_crystal(seed: int, index: int, n: int = 64) -> OutOfFamilyCrystal:
    """Crystal ``index`` of ``seed``: the same arguments give the same crystal and measurement.

    Parameters
    ----------
    seed : int
        :data:`BENCHMARK_SEED` for the benchmark, :data:`DEV_SEED` for development.
    index : int
        Position in the set: shape kind ``index % 8``, displacement kind ``(index // 8) % 5``.
    n : int
        Grid size (64 or 128 in the benchmark).
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, n, index])
    shape_kind = SHAPE_KINDS[index % len(SHAPE_KINDS)]
    displacement_kind = DISPLACEMENT_KINDS[(index // len(SHAPE_KINDS)) % len(DISPLACEMENT_KINDS)]
    density_kind = DENSITY_KINDS[int(rng.integers(len(DENSITY_KINDS)))]
    obj = out_of_family_object(rng, n, shape_kind, displacement_kind, density_kind)
    noise_free = bool(rng.uniform() < NOISE_FREE_SHARE)
    mask = None
    if rng.uniform() < GAP_SHARE:
        # A stripe a few voxels wide a few voxels off the peak, as a module seam often is.
        width = int(rng.integers(2, 4)) * n // 64
        start = n // 2 + int(rng.integers(3, 9)) * n // 64 * int(rng.choice([-1, 1]))
        mask = detector_gap_mask((n, n, n), int(rng.integers(1, 3)), start, width)
    if noise_free:
        photons = NOISE_FREE_PHOTONS
        measured = scale_to_photons(intensity(obj), photons, mask)
        if mask is not None:
            measured[~mask] = 0
    else:
        photons = float(np.exp(rng.uniform(*np.log(PHOTON_RANGE))))
        measured = simulate_counts(obj, photons, rng, mask)
    return OutOfFamilyCrystal(
        seed,
        index,
        n,
        shape_kind,
        displacement_kind,
        density_kind,
        photons,
        noise_free,
        obj,
        measured,
        mask,
    )
