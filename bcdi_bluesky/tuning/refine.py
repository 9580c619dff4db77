"""Extremum-seeking refinement of crystal parameters against a measured intensity.

The cost is ``chi`` (cohere's error, scale fitted in closed form, masked voxels excluded). The
forward model is the inner loop, so the refinement runs coarse-to-fine over q: first on the
central ``N/2`` cube of the data, where the same crystal is rendered on an ``(N/2)^3`` grid of
twice-larger voxels (same field of view, so the same q sampling, eight times cheaper), then on
the full grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..physics import CrystalModel, fitted_scale
from .extremum_seeking import ExtremumSeeker


class ChiCost:
    """``chi`` of a model object against fixed data, with the data-side work done once."""

    def __init__(self, measured: np.ndarray, mask: np.ndarray | None = None):
        amp = np.sqrt(np.asarray(measured, dtype=np.float64))
        self.mask = mask
        self.b = amp[mask] if mask is not None else amp.ravel()
        self.b_norm = float(np.linalg.norm(self.b))
        if self.b_norm == 0:
            raise ValueError("measured intensity has no signal in the valid voxels")

    def __call__(self, model_intensity: np.ndarray) -> float:
        """chi of a model intensity on the data's grid."""
        a = np.sqrt(model_intensity, dtype=np.float64)
        a = a[self.mask] if self.mask is not None else a.ravel()
        if not a.any():
            return 1.0
        # float64 and the explicit residual: ||b||^2 - s <a, b> cancels badly at small chi.
        return float(np.linalg.norm(fitted_scale(a, self.b) * a - self.b) / self.b_norm)


def central_cube(volume: np.ndarray, n: int) -> np.ndarray:
    """The central ``n^3`` cube of a centred volume (q = 0 stays at index ``n // 2``)."""
    starts = [s // 2 - n // 2 for s in volume.shape]
    return volume[tuple(slice(a, a + n) for a in starts)]


@dataclass
class RefineResult:
    """Refined parameters, the cost history, and the cost before and after."""

    params: np.ndarray
    chi_start: float
    chi: float
    costs: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def refine_crystal(model: CrystalModel, params: np.ndarray, measured: np.ndarray,
                   mask: np.ndarray | None = None, *, coarse_iterations: int = 300,
                   fine_iterations: int = 100, time_budget_s: float | None = None,
                   gain: float = 3.0, dither: float = 0.04, seed: int = 0,
                   hook: Callable[[int, float], bool | None] | None = None) -> RefineResult:
    """Tune crystal parameters by bounded ES to minimise ``chi`` against ``measured``.

    Parameters
    ----------
    model : CrystalModel
        Layout and grid (``model.n`` must equal the measured volume's size).
    params : ndarray
        Starting physical parameters (the CNN's prediction, or the previous scan's result).
    measured : ndarray
        Centred ``N^3`` intensity.
    mask : ndarray of bool, optional
        True for valid voxels.
    coarse_iterations, fine_iterations : int
        ES steps on the central half-size cube, then on the full grid.
    time_budget_s : float, optional
        Wall-time budget for both stages together.
    gain, dither : float
        ES gain ``k`` (on ``chi / chi_start``) and dither amplitude ``D``.
    seed : int
        Seed of the ES frequency assignment.
    hook : callable, optional
        ``hook(iteration, cost)`` after each step (live publishing); False stops.

    Returns
    -------
    RefineResult
        The best parameters found; never worse than the start on the full grid.
    """
    started = time.perf_counter()
    if measured.shape != (model.n,) * 3:
        raise ValueError(f"measured intensity has shape {measured.shape}, the model grid is "
                         f"{(model.n,) * 3}")
    full_cost = ChiCost(measured, mask)

    def chi_full(p: np.ndarray) -> float:
        return full_cost(model.intensity(model.denormalise(p)))

    p0 = model.normalise(model.clip(params))
    chi_start = chi_full(p0)
    best_p, best_chi = p0, chi_start
    costs: list[float] = []
    count = 0
    stages = []
    half = model.n // 2
    if coarse_iterations > 0 and half >= 16:
        coarse = model.with_grid(half)
        cost = ChiCost(central_cube(measured, half),
                       None if mask is None else central_cube(mask, half))
        stages.append((lambda p, m=coarse, c=cost: c(m.intensity(m.denormalise(p))),
                       coarse_iterations))
    if fine_iterations > 0:
        stages.append((chi_full, fine_iterations))

    p = p0
    for cost_fn, iterations in stages:
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - started)
        if left is not None and left <= 0:
            break

        def step(i: int, _p: np.ndarray, c: float) -> bool | None:
            nonlocal count
            costs.append(c)
            count += 1
            return hook(count, c) if hook is not None else None

        es = ExtremumSeeker(p, gain=gain, dither=dither, decay=0.998, seed=seed)
        result = es.minimise(cost_fn, max_iter=iterations, time_budget_s=left, hook=step)
        p = result.best_params
        if result.stopped_by == "hook":
            break
    final = chi_full(p)
    if final < best_chi:
        best_p, best_chi = p, final
    return RefineResult(model.denormalise(best_p), chi_start, best_chi, costs, count,
                        time.perf_counter() - started)
