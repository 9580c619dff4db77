"""Figures a beamline scientist reads at a glance (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import save_figure
from .physics import central_slices

if TYPE_CHECKING:
    from .physics import PhysicalResult
    from .pipeline import ReconstructionResult

PLANES = (("XY", 0), ("XZ", 1), ("YZ", 2))  # plane name, axis cut through its centre


def support_centre(support: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of a support (the grid centre when it is empty)."""
    idx = np.argwhere(support)
    if idx.size == 0:
        return tuple(s // 2 for s in support.shape)
    return tuple(round(float(v)) for v in idx.mean(axis=0))


def _window(support: np.ndarray, margin: int = 6) -> tuple[slice, slice, slice]:
    """Bounding box of the support plus a margin (the whole grid when it is empty)."""
    idx = np.argwhere(support)
    if idx.size == 0:
        return tuple(slice(None) for _ in support.shape)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, support.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


#: Lab-frame planes: name, the axis cut through the support's centre, the (horizontal,
#: vertical) axes shown.
LAB_PLANES = (("XY", 2, (0, 1)), ("XZ", 1, (0, 2)), ("YZ", 0, (1, 2)))


def lab_slices(
    physical: PhysicalResult, volume: np.ndarray
) -> dict[str, tuple[np.ndarray, list[float]]]:
    """Planes of a lab-grid volume through the support's centre, as ``imshow`` wants them
    (rows = the vertical axis) with their extent in nm."""
    centre = support_centre(physical.support_lab)
    out = {}
    for name, cut, (h, v) in LAB_PLANES:
        index = [slice(None)] * 3
        index[cut] = centre[cut]
        plane = volume[tuple(index)]  # axes (h, v) in increasing order
        lo = physical.origin_nm - physical.voxel_size_nm / 2
        hi = lo + physical.voxel_size_nm * np.array(volume.shape)
        out[name] = (plane.T, [lo[h], hi[h], lo[v], hi[v]])
    return out


def _lab_rows(fig, grid, physical: PhysicalResult) -> None:
    """Amplitude, displacement (nm) and strain in three lab planes, axes in nm."""
    amp = np.abs(physical.object_lab)
    disp = physical.displacement_nm
    strain = physical.strain
    dmax = float(np.nanmax(np.abs(disp))) if np.isfinite(disp).any() else 1.0
    smax = float(np.nanpercentile(np.abs(strain), 99)) if np.isfinite(strain).any() else 1e-3
    rows = (
        ("amplitude", amp, "gray", 0.0, float(amp.max()) or 1.0),
        ("displacement along Q (nm)", disp, "RdBu_r", -dmax, dmax),
        ("strain along Q", strain, "RdBu_r", -smax, smax),
    )
    axis_names = "xyz"
    for row, (label, volume, cmap, lo, hi) in enumerate(rows):
        for col, (name, (plane, extent)) in enumerate(lab_slices(physical, volume).items()):
            _, _, (h, v) = LAB_PLANES[col]
            ax = fig.add_subplot(grid[row, col])
            im = ax.imshow(plane, cmap=cmap, vmin=lo, vmax=hi, origin="lower", extent=extent)
            ax.set_title(f"{label}, {name}", fontsize=9)
            ax.set_xlabel(f"{axis_names[h]} (nm)", fontsize=8)
            ax.set_ylabel(f"{axis_names[v]} (nm)", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)


def plot_reconstruction(result: ReconstructionResult, path: str | Path, title: str = "") -> Path:
    """Amplitude and phase in three central planes, and the convergence of ES and polish.

    With the geometry (``result.physical``) the planes are those of the lab frame (x, y up, z
    along the beam) with axes in nm, and show amplitude, displacement and strain along Q.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    physical = getattr(result, "physical", None)
    if physical is not None:
        fig = plt.figure(figsize=(12, 10), layout="constrained")
        grid = fig.add_gridspec(4, 3, height_ratios=[1, 1, 1, 0.8])
        _lab_rows(fig, grid, physical)
        bottom = 3
    else:
        # Zoom on the crystal: at oversampling >= 2 it fills less than half of each axis.
        window = _window(result.support)
        obj = result.object[window]
        sup = result.support[window]
        centre = support_centre(sup)
        amp = central_slices(np.abs(obj), centre)
        phase = central_slices(np.where(sup, np.angle(obj), np.nan), centre)
        fig = plt.figure(figsize=(12, 7.5), layout="constrained")
        grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.8])
        vmax = float(np.abs(obj).max()) or 1.0
        for col, (name, _) in enumerate(PLANES):
            ax = fig.add_subplot(grid[0, col])
            im = ax.imshow(amp[name], cmap="gray", vmin=0, vmax=vmax, origin="lower")
            ax.set_title(f"amplitude, {name} plane (voxels)")
            fig.colorbar(im, ax=ax, shrink=0.8)
            ax = fig.add_subplot(grid[1, col])
            im = ax.imshow(phase[name], cmap="twilight", vmin=-np.pi, vmax=np.pi, origin="lower")
            ax.set_title(f"phase (rad), {name} plane")
            fig.colorbar(im, ax=ax, shrink=0.8)
        bottom = 2
    ax = fig.add_subplot(grid[bottom, :2])
    if result.es_costs:
        ax.plot(result.es_costs, lw=1, label="extremum seeking: chi per step")
    if result.polish_errors:
        start = len(result.es_costs)
        ax.plot(
            range(start, start + len(result.polish_errors)),
            result.polish_errors,
            lw=1,
            label="ER/HIO polish: Fourier error",
        )
    ax.axhline(result.chi_cnn, color="gray", ls=":", label=f"CNN estimate chi {result.chi_cnn:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("chi / error")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("convergence")
    ax = fig.add_subplot(grid[bottom, 2])
    ax.axis("off")
    t = result.timings
    lines = [f"chi (final): {result.chi:.4f}", f"support: {int(result.support.sum())} voxels"]
    if physical is not None:
        figures = physical.summary()
        lines += [
            f"volume: {figures['crystal_volume_nm3'] / 1e9:.3g} um^3",
            "extents: " + " x ".join(f"{v:.0f}" for v in figures["crystal_extents_nm"]) + " nm",
            f"strain RMS: {figures['strain_rms']:.2e}",
            f"displacement RMS: {figures['displacement_rms_nm']:.3f} nm",
        ]
    ax.text(
        0,
        1,
        "\n".join(
            [
                *lines,
                f"model: {result.model_name} on {result.provider}",
                "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()),
            ]
        ),
        va="top",
        fontsize=9,
        family="monospace",
        wrap=True,
    )
    if title:
        fig.suptitle(title)
    try:
        return save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)


def plot_latent_map(
    latent_map,
    path: str | Path,
    scans: list[tuple[str, tuple[float, float], bool]] = (),
    pairs: list[tuple[tuple[float, float], tuple[float, float]]] = (),
    title: str = "CNN latent map",
) -> Path:
    """The training distribution on the model card's 2D map, with scans and true/predicted pairs.

    Parameters
    ----------
    latent_map : LatentMap
        From the model card.
    scans : list of (label, (x, y), out_of_distribution)
        Positions to mark (red when out of distribution).
    pairs : list of ((x, y) true, (x, y) predicted)
        Simulated crystals: a line joins each truth to the CNN's prediction.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    pts = latent_map.points
    ax.scatter(pts[:, 0], pts[:, 1], s=6, c="lightgray", label="training distribution (prior)")
    for k, (truth, pred) in enumerate(pairs):
        ax.plot([truth[0], pred[0]], [truth[1], pred[1]], color="tab:blue", lw=0.5, alpha=0.5)
        ax.scatter(*truth, s=8, c="tab:green", label="true" if k == 0 else None)
        ax.scatter(*pred, s=8, c="tab:blue", label="CNN prediction" if k == 0 else None)
    for label, (x, y), ood in scans:
        ax.scatter(x, y, s=60, marker="*", c="tab:red" if ood else "black")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("latent PC 1")
    ax.set_ylabel("latent PC 2")
    ax.set_title(title + "\nstars: scans (red: out of distribution)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    try:
        return save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)
