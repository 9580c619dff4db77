"""The crystal in physical units: the object on an orthogonal lab grid, displacement and strain.

Convention: the reconstructed phase is ``phi = Q . u`` (the object is ``rho exp(i Q . u)``),
so the displacement along Q is ``u_Q = phi / |Q|`` (nm) and the strain component along Q is
``eps = d u_Q / d s`` with ``s`` the lab coordinate along ``Q / |Q|``. A measurement does not
resolve the twin (``phi -> -phi`` with the object mirrored), a global phase, nor a uniform
strain (the Bragg peak's position defines the reference lattice): the phase ramp and offset
are removed, so the displacement averages to zero and the strain to about zero over the
crystal. The displacement is defined modulo the lattice-plane spacing ``2 pi / |Q|``; around
a dislocation it winds by one spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage

from ._geometry import Geometry

#: Most points of a lab grid (a 96^3 cube): beyond, the spacing grows to fit, so that a
#: support filling a large input grid costs seconds, not minutes.
MAX_LAB_VOXELS = 96**3


def lab_positions(shape: tuple[int, ...], basis: np.ndarray) -> np.ndarray:
    """Lab position (nm) of every voxel of an input grid, shape ``(3, *shape)``.

    Voxel ``n`` sits at ``basis @ (n - shape // 2)``: the grid's centre (the Bragg peak's
    conjugate origin in this project's convention) is at the lab origin.
    """
    idx = np.indices(shape, dtype=np.float64)
    idx -= np.array([s // 2 for s in shape], dtype=np.float64).reshape(3, 1, 1, 1)
    return np.einsum("ij,j...->i...", basis, idx)


def _bounding_box(
    support: np.ndarray, basis: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lab bounding box of the support's voxels (their parallelepipeds), plus ``margin``."""
    idx = np.argwhere(support)
    if idx.size == 0:
        idx = np.array([[s // 2 for s in support.shape]])
    centre = np.array([s // 2 for s in support.shape])
    # The extremes of a linear map over the voxel centres sit at extremes of the indices along
    # each lab axis: the positions of the centres, then half a voxel's extent either side.
    pts = (idx - centre).astype(np.float64) @ basis.T
    half = 0.5 * np.abs(basis).sum(axis=1)
    return pts.min(axis=0) - half - margin, pts.max(axis=0) + half + margin


def to_lab_grid(
    obj: np.ndarray,
    basis: np.ndarray,
    region: np.ndarray,
    spacing_nm: float | None = None,
    margin_voxels: int = 2,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resample an object from its (sheared) input grid onto an orthogonal lab grid.

    Trilinear interpolation of the real and imaginary parts at each lab grid point's position
    in the input grid's index space (``basis^-1 r``); points outside the input grid are 0.

    Parameters
    ----------
    obj : ndarray
        Complex object on the input grid.
    basis : ndarray
        Voxel basis (nm), column j = one step along input axis j.
    region : ndarray of bool
        Input-grid voxels the lab grid must cover (the support).
    spacing_nm : float, optional
        Lab grid spacing; default the shortest basis column (no loss of resolution), larger
        when the grid would exceed :data:`MAX_LAB_VOXELS` points.
    margin_voxels : int
        Empty lab voxels kept around the region.

    Returns
    -------
    object_lab : ndarray
        Complex64, indexed ``[ix, iy, iz]`` along the lab axes x, y, z.
    origin_nm : ndarray
        Lab position of ``object_lab[0, 0, 0]``.
    spacing_nm : float
    """
    basis = np.asarray(basis, dtype=np.float64)
    if spacing_nm is None:
        spacing_nm = float(np.linalg.norm(basis, axis=0).min())
    lo, hi = _bounding_box(region, basis, margin_voxels * spacing_nm)
    n = np.maximum(np.ceil((hi - lo) / spacing_nm).astype(int) + 1, 1)
    if np.prod(n.astype(float)) > MAX_LAB_VOXELS:
        # A support that fills a large input grid: coarser, so the analysis stays seconds.
        spacing_nm *= float((np.prod(n.astype(float)) / MAX_LAB_VOXELS) ** (1 / 3))
        lo, hi = _bounding_box(region, basis, margin_voxels * spacing_nm)
        n = np.maximum(np.ceil((hi - lo) / spacing_nm).astype(int) + 1, 1)
    axes = [lo[k] + spacing_nm * np.arange(n[k]) for k in range(3)]
    r = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    centre = np.array([s // 2 for s in obj.shape], dtype=np.float64)[:, None]
    coords = np.linalg.solve(basis, r) + centre
    out = np.empty(r.shape[1], dtype=np.complex64)
    out.real = scipy.ndimage.map_coordinates(
        obj.real.astype(np.float64), coords, order=1, mode="constant", cval=0.0
    )
    out.imag = scipy.ndimage.map_coordinates(
        obj.imag.astype(np.float64), coords, order=1, mode="constant", cval=0.0
    )
    return out.reshape(tuple(n)), lo, float(spacing_nm)


def _wrap(x: np.ndarray) -> np.ndarray:
    return (x + np.pi) % (2 * np.pi) - np.pi


def _pair_differences(
    obj: np.ndarray, support: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Wrapped phase difference to the next voxel along ``axis`` and where both are in the
    support (the last plane has no next voxel)."""
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    d = np.angle(obj[tuple(hi)] * np.conj(obj[tuple(lo)]))
    both = support[tuple(hi)] & support[tuple(lo)]
    return d, both


def remove_ramp(
    obj: np.ndarray, support: np.ndarray, spacing: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Remove the linear phase ramp and the phase offset of an object on its support.

    The ramp is the amplitude-weighted mean of the wrapped neighbour phase differences, so a
    phase that winds around a dislocation (no single-valued unwrapping) does not bias it; the
    offset is the phase of the amplitude-weighted mean of the de-ramped object.

    Returns
    -------
    object : ndarray
        ``obj * exp(-i (g . r + c))``, ``r`` the voxel position in ``spacing`` units.
    gradient : ndarray
        ``g`` (radians per unit of ``spacing``), one value per axis.
    offset : float
        ``c`` (radians).
    """
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    amp = np.abs(obj)
    g = np.zeros(3)
    for axis in range(3):
        d, both = _pair_differences(obj, support, axis)
        lo = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        w = np.where(both, amp[tuple(lo)], 0.0)
        if w.sum() > 0:
            g[axis] = float(np.sum(w * d) / w.sum()) / spacing[axis]
    r = [np.arange(s) * spacing[k] for k, s in enumerate(obj.shape)]
    ramp = g[0] * r[0][:, None, None] + g[1] * r[1][None, :, None] + g[2] * r[2][None, None, :]
    flat = obj * np.exp(-1j * ramp)
    c = float(np.angle(np.sum(np.where(support, flat, 0))))
    return (flat * np.exp(-1j * c)).astype(np.complex64), g, c


def unwrap_phase(obj: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Reliability-guided unwrapping of the phase on the support (NaN elsewhere).

    Neighbouring support voxels are joined along the tree that keeps the brightest links (the
    minimum spanning tree of ``max - min(|o_i|, |o_j|)``, as quality-guided path following
    from the brightest voxel would), each voxel taking its tree neighbour's phase plus the
    wrapped difference; each connected part of the support is anchored at its brightest voxel.
    The unwrapped phase equals the wrapped one modulo 2 pi everywhere; where the phase is not
    integrable (a dislocation line, whose core is dark) the 2 pi jump falls across the darkest
    links. The result is shifted by a multiple of 2 pi so that its amplitude-weighted mean is
    closest to zero. Sparse graph and solver (scipy): about a second per million voxels.
    """
    import scipy.sparse
    import scipy.sparse.csgraph
    import scipy.sparse.linalg

    support = np.asarray(support, dtype=bool)
    out = np.full(obj.shape, np.nan)
    m = int(support.sum())
    if m == 0:
        return out
    amp = np.abs(obj)[support].astype(np.float64)
    phase = np.angle(obj)[support].astype(np.float64)
    index = np.full(obj.shape, -1, dtype=np.int64)
    index[support] = np.arange(m)
    rows, cols = [], []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        a, b = index[tuple(lo)], index[tuple(hi)]
        both = (a >= 0) & (b >= 0)
        rows.append(a[both])
        cols.append(b[both])
    i, j = np.concatenate(rows), np.concatenate(cols)
    top = float(amp.max()) or 1.0
    # Positive weights (a zero would read as no link): dark links are the expensive ones.
    weight = top - np.minimum(amp[i], amp[j]) + 1e-6 * top
    graph = scipy.sparse.coo_matrix((weight, (i, j)), shape=(m, m)).tocsr()
    tree = scipy.sparse.csgraph.minimum_spanning_tree(graph).tocoo()
    _, labels = scipy.sparse.csgraph.connected_components(tree, directed=False)
    order = np.lexsort((-amp, labels))
    roots = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    # One equation per tree link (x_j - x_i = wrapped difference) and per root (its phase).
    n_links, n_roots = tree.row.size, roots.size
    eq = np.arange(n_links)
    system = scipy.sparse.coo_matrix(
        (
            np.concatenate([np.ones(n_links), -np.ones(n_links), np.ones(n_roots)]),
            (
                np.concatenate([eq, eq, n_links + np.arange(n_roots)]),
                np.concatenate([tree.col, tree.row, roots]),
            ),
        ),
        shape=(m, m),
    ).tocsc()
    rhs = np.concatenate([_wrap(phase[tree.col] - phase[tree.row]), phase[roots]])
    unwrapped = np.atleast_1d(scipy.sparse.linalg.spsolve(system, rhs))
    mean = float(np.sum(amp * unwrapped) / amp.sum()) if amp.sum() > 0 else 0.0
    out[support] = unwrapped - 2 * np.pi * round(mean / (2 * np.pi))
    return out


def phase_gradient(obj: np.ndarray, support: np.ndarray, spacing: float) -> np.ndarray:
    """Gradient of the phase (radians per nm, shape ``(3, *obj.shape)``) on the support.

    From wrapped neighbour differences (insensitive to 2 pi jumps and to where an unwrapping
    put its cut): central where both neighbours are in the support, one-sided where only one
    is. Where neither is (a part of the support one voxel thin along that axis), the mean of
    the component over the voxel's 26 neighbours that have it, spread on through the support
    from the nearest voxels that do; NaN off the support and on a part of it where no voxel
    has the component.
    """
    grad = np.full((3, *obj.shape), np.nan)
    for axis in range(3):
        d, both = _pair_differences(obj, support, axis)
        fwd = np.full(obj.shape, np.nan)
        bwd = np.full(obj.shape, np.nan)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        fwd[tuple(lo)] = np.where(both, d, np.nan)
        bwd[tuple(hi)] = np.where(both, d, np.nan)
        both_sides = np.isfinite(fwd) & np.isfinite(bwd)
        g = np.where(
            both_sides,
            0.5 * (np.nan_to_num(fwd) + np.nan_to_num(bwd)),
            np.where(np.isfinite(fwd), fwd, bwd),
        )
        grad[axis] = np.where(support, g / spacing, np.nan)
        _fill_from_neighbours(grad[axis], support)
    return grad


def _fill_from_neighbours(values: np.ndarray, support: np.ndarray) -> None:
    """In place: each support voxel where ``values`` is NaN takes the mean of the finite
    values among its 26 neighbours, repeated until the filled voxels reach every one they
    can through the support (left NaN where no finite value is connected)."""
    missing = support & ~np.isfinite(values)
    while missing.any():
        known = np.isfinite(values)
        total = scipy.ndimage.uniform_filter(np.where(known, values, 0.0), 3, mode="constant")
        count = scipy.ndimage.uniform_filter(known.astype(np.float64), 3, mode="constant")
        # uniform_filter's means share the factor 1/27: their ratio is the neighbours' mean.
        reached = missing & (count > 1e-9)
        if not reached.any():
            return
        values[reached] = total[reached] / count[reached]
        missing &= ~reached


def principal_extents(positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extents of a crystal along its principal axes (nm), largest first.

    The diameters of the ellipsoid with the same second moments as the support, each voxel
    counted as a uniform parallelepiped: ``2 sqrt(5 lambda_k)``, ``lambda_k`` the eigenvalues
    of the covariance of the voxel centres plus ``cell cell^T / 12``. Exact for an ellipsoid
    (a box of length L gives 1.29 L); unlike the span of the support (max - min), a thin
    protrusion or a stray voxel at the support's threshold barely moves it.

    Parameters
    ----------
    positions : ndarray
        ``(M, 3)`` lab positions (nm) of the support's voxel centres.
    cell : ndarray
        The voxel's basis (nm, columns).

    Returns
    -------
    extents : ndarray
        The three diameters (nm).
    axes : ndarray
        The principal axes (columns), in the same order.
    """
    pts = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64)
    cov = cell @ cell.T / 12.0
    if pts.shape[0] >= 2:
        centred = pts - pts.mean(axis=0)
        cov = cov + centred.T @ centred / pts.shape[0]
    values, vecs = np.linalg.eigh(cov)
    order = np.argsort(-values)
    return 2.0 * np.sqrt(5.0 * np.maximum(values[order], 0.0)), vecs[:, order]


@dataclass
class PhysicalResult:
    """A reconstruction in physical units (see :func:`physical_result`).

    Lab-grid arrays are indexed ``[ix, iy, iz]`` along the lab axes (x, y up, z along the
    beam); ``object_lab[i, j, k]`` sits at ``origin_nm + voxel_size_nm * (i, j, k)``.
    """

    geometry: Geometry
    #: Column j: the lab vector (nm) of one step along input axis j.
    voxel_basis_nm: np.ndarray
    #: Q of the Bragg peak in the lab frame (1/nm).
    q_bragg_inv_nm: np.ndarray
    #: Lab grid spacing along x, y, z (nm).
    voxel_size_nm: np.ndarray
    origin_nm: np.ndarray
    object_lab: np.ndarray
    support_lab: np.ndarray
    #: Displacement along Q (nm), NaN off the support.
    displacement_nm: np.ndarray
    #: Strain along Q (dimensionless), NaN off the support.
    strain: np.ndarray
    #: The support's voxels on the input grid times the voxel's volume (nm^3): counted where
    #: the support was decided, before any interpolation.
    crystal_volume_nm3: float

    @property
    def q_unit(self) -> np.ndarray:
        """Unit vector along Q."""
        return self.q_bragg_inv_nm / np.linalg.norm(self.q_bragg_inv_nm)

    def crystal_extents_nm(self) -> np.ndarray:
        """Principal extents of the support on the lab grid (nm), largest first."""
        idx = np.argwhere(self.support_lab).astype(np.float64)
        return principal_extents(
            self.origin_nm + idx * self.voxel_size_nm, np.diag(self.voxel_size_nm)
        )[0]

    def summary(self) -> dict[str, Any]:
        """``crystal_volume_nm3``, ``crystal_extents_nm``, ``strain_rms``,
        ``displacement_rms_nm`` (RMS over the support) and the geometry's figures."""
        s = self.support_lab
        strain = self.strain[s & np.isfinite(self.strain)]
        disp = self.displacement_nm[s & np.isfinite(self.displacement_nm)]
        return {
            "crystal_volume_nm3": self.crystal_volume_nm3,
            "crystal_extents_nm": [float(v) for v in self.crystal_extents_nm()],
            "strain_rms": float(np.sqrt(np.mean(strain**2))) if strain.size else float("nan"),
            "displacement_rms_nm": (
                float(np.sqrt(np.mean(disp**2))) if disp.size else float("nan")
            ),
            "q_bragg_inv_nm": [float(v) for v in self.q_bragg_inv_nm],
            "voxel_size_nm": [float(v) for v in self.voxel_size_nm],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a result file holds, under their file keys."""
        return {
            "voxel_basis_nm": self.voxel_basis_nm.astype(np.float64),
            "object_lab": self.object_lab.astype(np.complex64),
            "support_lab": self.support_lab.astype(bool),
            "voxel_size_nm": self.voxel_size_nm.astype(np.float64),
            "lab_origin_nm": self.origin_nm.astype(np.float64),
            "displacement_nm": self.displacement_nm.astype(np.float32),
            "strain": self.strain.astype(np.float32),
            "q_bragg_inv_nm": self.q_bragg_inv_nm.astype(np.float64),
        }


def displacement_and_strain(
    object_lab: np.ndarray, support_lab: np.ndarray, spacing_nm: float, q_inv_nm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Displacement along Q (nm) and strain along Q on an orthogonal grid of ``spacing_nm``.

    Returns the de-ramped object, the displacement and the strain (NaN off the support).
    """
    flat, _, _ = remove_ramp(object_lab, support_lab, spacing_nm)
    q = np.asarray(q_inv_nm, dtype=np.float64)
    q_norm = float(np.linalg.norm(q))
    displacement = unwrap_phase(flat, support_lab) / q_norm
    grad = phase_gradient(flat, support_lab, spacing_nm)
    strain = np.einsum("i,i...->...", q / q_norm, grad) / q_norm
    return flat, displacement.astype(np.float32), strain.astype(np.float32)


def physical_result(
    obj: np.ndarray, geometry: Geometry, support_threshold: float, spacing_nm: float | None = None
) -> PhysicalResult:
    """The object of a reconstruction (input grid) in the lab frame, with displacement and
    strain along Q.

    Parameters
    ----------
    obj : ndarray
        Complex object on the input grid (``|fftshift(fftn(obj))|^2`` ~ the intensity).
    geometry : Geometry
        The scan's geometry; its ``axes`` name the axes of ``obj``.
    support_threshold : float
        Fraction of the maximum amplitude that defines the support, on both grids (the
        reconstruction's ``support_threshold`` setting).
    spacing_nm : float, optional
        Lab grid spacing (default: the shortest voxel basis column).
    """
    obj = np.asarray(obj)
    if obj.ndim != 3:
        raise ValueError(f"the object must be 3D, got shape {obj.shape}")
    basis = geometry.voxel_basis_nm(obj.shape)
    amp = np.abs(obj)
    if not amp.max() > 0:
        raise ValueError("the object is empty: no crystal to place in the lab frame")
    region = amp >= support_threshold * amp.max()
    # The ramp of a Bragg peak off the grid's centre (up to pi per voxel) goes first: linear
    # interpolation of a phase that turns fast between voxels would add a false strain.
    obj, _, _ = remove_ramp(obj, region)
    object_lab, origin, h = to_lab_grid(obj, basis, region, spacing_nm)
    amp_lab = np.abs(object_lab)
    support_lab = amp_lab >= support_threshold * amp_lab.max()
    q = geometry.q_bragg_inv_nm
    flat, displacement, strain = displacement_and_strain(object_lab, support_lab, h, q)
    return PhysicalResult(
        geometry=geometry,
        voxel_basis_nm=basis,
        q_bragg_inv_nm=q,
        voxel_size_nm=np.full(3, h),
        origin_nm=origin,
        object_lab=flat,
        support_lab=support_lab,
        displacement_nm=displacement,
        strain=strain,
        crystal_volume_nm3=float(region.sum() * abs(np.linalg.det(basis))),
    )


def _corner(array: np.ndarray, a: int, b: int, da: int, db: int) -> np.ndarray:
    """The corner ``(da, db)`` of every grid square in the plane of axes ``a`` and ``b``."""
    sl = [slice(None)] * 3
    sl[a] = slice(da, array.shape[a] - 1 + da)
    sl[b] = slice(db, array.shape[b] - 1 + db)
    return array[tuple(sl)]


def phase_vortices(obj: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Where the phase winds by 2 pi around a grid plaquette: the trace of dislocation lines.

    Around each square of four neighbouring voxels (in the three grid planes), all in the
    support, the wrapped phase differences sum to a multiple of 2 pi; a non-zero sum marks a
    dislocation line crossing that square.

    Returns
    -------
    ndarray
        ``(M, 3)`` grid coordinates (fractional indices) of the centres of the squares where
        the phase winds.
    """
    found = []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        c00, c10 = _corner(obj, a, b, 0, 0), _corner(obj, a, b, 1, 0)
        c11, c01 = _corner(obj, a, b, 1, 1), _corner(obj, a, b, 0, 1)
        inside = (
            _corner(support, a, b, 0, 0)
            & _corner(support, a, b, 1, 0)
            & _corner(support, a, b, 1, 1)
            & _corner(support, a, b, 0, 1)
        )
        winding = (
            np.angle(c10 * np.conj(c00))
            + np.angle(c11 * np.conj(c10))
            + np.angle(c01 * np.conj(c11))
            + np.angle(c00 * np.conj(c01))
        )
        hits = np.argwhere(inside & (np.abs(winding) > np.pi)).astype(np.float64)
        hits[:, a] += 0.5
        hits[:, b] += 0.5
        found.append(hits)
    return np.concatenate(found, axis=0)
