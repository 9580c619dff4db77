"""Figures a beamline scientist reads at a glance (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .pipeline import ReconstructionResult

PLANES = (("XY", 0), ("XZ", 1), ("YZ", 2))  # plane name, axis cut through its centre


def central_slices(volume: np.ndarray, centre: tuple[int, int, int] | None = None
                   ) -> dict[str, np.ndarray]:
    """The three central planes of a volume: ``XY`` (cut along axis 0), ``XZ``, ``YZ``."""
    c = centre or tuple(s // 2 for s in volume.shape)
    return {"XY": volume[c[0], :, :], "XZ": volume[:, c[1], :], "YZ": volume[:, :, c[2]]}


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


def plot_reconstruction(result: ReconstructionResult, path: str | Path,
                        title: str = "") -> Path:
    """Amplitude and phase in three central planes, and the convergence of ES and polish."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax = fig.add_subplot(grid[2, :2])
    if result.es_costs:
        ax.plot(result.es_costs, lw=1, label="extremum seeking: chi per step")
    if result.polish_errors:
        start = len(result.es_costs)
        ax.plot(range(start, start + len(result.polish_errors)), result.polish_errors, lw=1,
                label="ER/HIO polish: Fourier error")
    ax.axhline(result.chi_cnn, color="gray", ls=":", label=f"CNN estimate chi {result.chi_cnn:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("chi / error")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("convergence")
    ax = fig.add_subplot(grid[2, 2])
    ax.axis("off")
    t = result.timings
    ax.text(0, 1, "\n".join([
        f"chi (final): {result.chi:.4f}",
        f"support: {int(result.support.sum())} voxels",
        f"model: {result.model_name} on {result.provider}",
        "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()),
    ]), va="top", fontsize=9, family="monospace", wrap=True)
    if title:
        fig.suptitle(title)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def plot_latent_map(latent_map, path: str | Path, scans: list[tuple[str, tuple[float, float],
                                                                  bool]] = (),
                    pairs: list[tuple[tuple[float, float], tuple[float, float]]] = (),
                    title: str = "CNN latent map") -> Path:
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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
