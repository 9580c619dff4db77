"""Refinement of crystal parameters against a measured intensity.

The cost is ``chi`` (cohere's error, scale fitted in closed form, masked voxels excluded). The
forward model is the inner loop, so the refinement runs coarse-to-fine over q: first on the
central ``N/2`` cube of the data, where the same crystal is rendered on an ``(N/2)^3`` grid of
twice-larger voxels (same field of view, so the same q sampling, eight times cheaper), then on
the full grid, or, where the crystal fits in half the field of view, on every other q
(:func:`folded_chi`: the same resolution, the FFT and chi on an eighth of the voxels).

Two stages: :func:`fit_odd_shape` fits the crystal's asymmetry (the odd-``l`` surface terms),
which the CNN cannot predict, by a derivative-free local search; :func:`refine_crystal` then
tunes every parameter by bounded extremum seeking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize

from ..backend import NUMPY, ArrayBackend
from ..physics import CrystalModel, intensity
from ..physics import support as amplitude_support
from ..settings import ES_SCREEN_SHARE, SEED_SUPPORT_THRESHOLD
from .extremum_seeking import ExtremumSeeker
from .sampling import central_slices, fits_every_other_q, fold_rendered, subsample


class ChiCost:
    """``chi`` of a model object against fixed data, with the data-side work done once.

    Parameters
    ----------
    measured : ndarray
        Intensity (host numpy or an array of ``backend``).
    mask : ndarray of bool, optional
        True for valid voxels.
    backend : ArrayBackend
        Where the model intensities live: the data move there once.
    """

    def __init__(
        self, measured: Any, mask: Any | None = None, backend: ArrayBackend = NUMPY
    ) -> None:
        xp = backend.xp
        self.backend = backend
        amp = xp.sqrt(backend.asarray(measured, dtype=xp.float64))
        self.mask = None if mask is None else backend.asarray(mask, dtype=xp.bool)
        self.b = amp[self.mask] if self.mask is not None else xp.reshape(amp, (-1,))
        self.b_norm = backend.dot(self.b, self.b) ** 0.5
        if self.b_norm == 0:
            raise ValueError("measured intensity has no signal in the valid voxels")

    def __call__(self, model_intensity: Any) -> float:
        """chi of a model intensity (an array of the backend) on the data's grid."""
        xp, vdot = self.backend.xp, self.backend.vdot
        a = xp.sqrt(xp.astype(model_intensity, xp.float64))
        a = a[self.mask] if self.mask is not None else xp.reshape(a, (-1,))
        aa = vdot(a, a)
        # The scale stays on the device (one host sync per call, at the end); no signal:
        # scale 0, residual -b, chi 1.
        scale = xp.where(aa > 0, vdot(a, self.b) / xp.where(aa > 0, aa, 1.0), 0.0)
        # float64 and the explicit residual: ||b||^2 - s <a, b> cancels badly at small chi.
        # In place: ``a`` is this call's own copy.
        a *= scale
        a -= self.b
        return float(vdot(a, a)) ** 0.5 / self.b_norm


def central_cube(volume: np.ndarray, n: int) -> np.ndarray:
    """The central ``n^3`` cube of a centred volume (q = 0 stays at index ``n // 2``)."""
    return volume[central_slices(volume.shape, (n,) * volume.ndim)]


def coarse_chi(
    model: CrystalModel,
    measured: np.ndarray,
    mask: np.ndarray | None = None,
    backend: ArrayBackend = NUMPY,
) -> Callable[[np.ndarray], float]:
    """``chi(normalised parameters)`` on the central half-size cube of q (8x cheaper)."""
    half = model.n // 2
    coarse = model.with_grid(half)
    cost = ChiCost(
        central_cube(measured, half), None if mask is None else central_cube(mask, half), backend
    )
    return lambda p: cost(coarse.intensity(coarse.denormalise(p), backend))


def folded_chi(
    model: CrystalModel,
    measured: np.ndarray,
    factors: tuple[int, ...],
    mask: np.ndarray | None = None,
    backend: ArrayBackend = NUMPY,
) -> Callable[[np.ndarray], float]:
    """``chi(normalised parameters)`` on every other q (:func:`~bcdi_bluesky.tuning.subsample`
    by ``factors``): the crystal rendered on the full grid and folded into the smaller field
    of view (:func:`~bcdi_bluesky.tuning.fold`), whose intensity is exactly the data's there
    while the crystal fits in it; the FFT and chi run on ``prod(factors)`` times fewer voxels."""
    cost = ChiCost(
        subsample(measured, factors), None if mask is None else subsample(mask, factors), backend
    )

    def chi(p: np.ndarray) -> float:
        rendered = model.render(model.denormalise(p), backend)
        return cost(intensity(fold_rendered(rendered, factors, backend), backend=backend))

    return chi


def best_start(
    model: CrystalModel, starts: Sequence[np.ndarray], cost: ChiCost
) -> tuple[int, float]:
    """Index and ``chi`` of the physical parameter vector that fits the data best.

    Parameters
    ----------
    model : CrystalModel
        The parameter layout.
    starts : sequence of ndarray
        Candidate physical parameter vectors (at least one).
    cost : ChiCost
        ``chi`` against the data.

    Returns
    -------
    tuple of (int, float)
        The first best candidate's index and its ``chi``.
    """
    if not len(starts):
        raise ValueError("best_start needs at least one candidate")
    chis = [cost(model.intensity(p, cost.backend)) for p in starts]
    best = int(np.argmin(chis))
    return best, chis[best]


def best_twin_variant(
    model: CrystalModel,
    variants: Sequence[np.ndarray],
    cost: ChiCost,
    coarse_cost: Callable[[np.ndarray], float] | None = None,
) -> tuple[np.ndarray, float]:
    """The normalised candidate (``encoding.twin_variants``) whose crystal fits best, and its chi.

    The CNN gives each family of twin-odd parameters up to its own sign; the data choose
    their relative signs: one forward model per candidate (:func:`best_start`), or with
    ``coarse_cost`` (:func:`coarse_chi`) one on the central half-size cube of q, 8x cheaper,
    and the full grid's chi for the chosen one only.
    """
    if coarse_cost is None or len(variants) == 1:
        best, chi = best_start(model, [model.denormalise(v) for v in variants], cost)
        return variants[best], chi
    best = int(np.argmin([coarse_cost(v) for v in variants]))
    return variants[best], cost(model.intensity(model.denormalise(variants[best]), cost.backend))


class _Stop(Exception):
    """Ends a scipy search early (``by``: "time" for the wall-time cap, or "hook")."""

    def __init__(self, by: str) -> None:
        super().__init__(by)
        self.by = by


@dataclass
class RefineResult:
    """Refined parameters, the cost history, and the cost before and after."""

    params: np.ndarray
    chi_start: float
    chi: float
    costs: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    #: The wall-time cap stopped the run before its iteration counts.
    cut_short: bool = False


def coarse_screen(iterations: int) -> int:
    """Coarse ES steps that every start of :func:`refine_crystal` runs when it has several:
    :data:`~bcdi_bluesky.settings.ES_SCREEN_SHARE` of ``iterations`` (at least one); the
    start that ends lowest runs the rest."""
    return max(round(iterations * ES_SCREEN_SHARE), 1)


def refine_crystal(
    model: CrystalModel,
    params: np.ndarray,
    measured: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    alternatives: Sequence[np.ndarray] = (),
    coarse_iterations: int = 300,
    fine_iterations: int = 100,
    fine_subsampling: bool = False,
    time_budget_s: float | None = None,
    gain: float = 3.0,
    dither: float = 0.04,
    seed: int = 0,
    hook: Callable[[int, float], bool | None] | None = None,
    backend: ArrayBackend = NUMPY,
) -> RefineResult:
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
    alternatives : sequence of ndarray
        Other starting points (physical parameters). The coarse stage runs from each start in
        turn (:func:`coarse_screen` of its steps), the one that ended best runs the rest, and
        the fine stage follows from it: a second start (such as :func:`fit_odd_shape`'s) is a
        hypothesis that ES then confirms or rejects.
    coarse_iterations, fine_iterations : int
        ES steps on the central half-size cube (those of the start that ends best; the
        others run :func:`coarse_screen` of them), then on the full grid (or every other q,
        ``fine_subsampling``).
    fine_subsampling : bool
        Run the fine steps on every other q (:func:`folded_chi`) where the crystal they start
        from fits in half the field of view along every axis
        (:func:`~bcdi_bluesky.tuning.fits_every_other_q`).
    time_budget_s : float, optional
        Wall-time budget for both stages together.
    gain, dither : float
        ES gain ``k`` (on ``chi / chi_start``) and dither amplitude ``D``.
    seed : int
        Seed of the ES frequency assignment.
    hook : callable, optional
        ``hook(iteration, cost)`` after each step (live publishing); False stops.
    backend : ArrayBackend
        Where the forward models and ``chi`` run.

    Returns
    -------
    RefineResult
        The best parameters found; never worse than the start on the full grid
        (``chi_start`` is the chi of ``params``).
    """
    started = time.perf_counter()
    if measured.shape != (model.n,) * 3:
        raise ValueError(
            f"measured intensity has shape {measured.shape}, the model grid is {(model.n,) * 3}"
        )
    full_cost = ChiCost(measured, mask, backend)

    def chi_full(p: np.ndarray) -> float:
        return full_cost(model.intensity(model.denormalise(p), backend))

    p0 = model.normalise(model.clip(params))
    chi_start = chi_full(p0)
    best_p, best_chi = p0, chi_start
    costs: list[float] = []
    count = 0

    def step(i: int, _p: np.ndarray, c: float) -> bool | None:
        nonlocal count
        costs.append(c)
        count += 1
        return hook(count, c) if hook is not None else None

    cut_short = False

    def seeker(start: np.ndarray) -> ExtremumSeeker:
        return ExtremumSeeker(start, gain=gain, dither=dither, decay=0.998, seed=seed)

    def seek(
        cost_fn: Callable[[np.ndarray], float], es: ExtremumSeeker, iterations: int
    ) -> tuple[np.ndarray, float, bool]:
        nonlocal cut_short
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - started)
        if left is not None and left <= 0:
            cut_short = True
            return es.ask(), np.inf, True
        result = es.minimise(cost_fn, max_iter=iterations, time_budget_s=left, hook=step)
        cut_short = cut_short or result.stopped_by == "time"
        return result.best_params, result.best_cost, result.stopped_by != "iterations"

    starts = [p0, *(model.normalise(model.clip(a)) for a in alternatives)]
    p, stop = p0, False
    if coarse_iterations > 0 and model.n // 2 >= 16:
        coarse = coarse_chi(model, measured, mask, backend)
        # Several starts: each runs the screen's share of the steps, the best the rest.
        screen = coarse_iterations if len(starts) == 1 else coarse_screen(coarse_iterations)
        ends = []
        for start in starts:
            es = seeker(start)
            end, cost, stop = seek(coarse, es, screen)
            ends.append((cost, len(ends), end, es))
            if stop:
                break
        cost, _, p, es = min(ends, key=lambda entry: entry[:2])
        if not stop and coarse_iterations > screen:
            end, more, stop = seek(coarse, es, coarse_iterations - screen)
            if more < cost:
                p = end
    elif len(starts) > 1:
        p = min((chi_full(q), i, q) for i, q in enumerate(starts))[2]
    if fine_iterations > 0 and not stop:
        fine = chi_full
        if fine_subsampling:
            start_support = amplitude_support(
                backend.to_numpy(model.voxelise(model.denormalise(p), backend)),
                SEED_SUPPORT_THRESHOLD,
            )
            factors = fits_every_other_q(start_support)
            if factors is not None:
                fine = folded_chi(model, measured, factors, mask, backend)
        p = seek(fine, seeker(p), fine_iterations)[0]
    final = chi_full(p)
    if final < best_chi:
        best_p, best_chi = p, final
    return RefineResult(
        model.denormalise(best_p),
        chi_start,
        best_chi,
        costs,
        count,
        time.perf_counter() - started,
        cut_short,
    )


def fit_odd_shape(
    model: CrystalModel,
    params: np.ndarray,
    measured: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    max_evaluations: int = 150,
    time_budget_s: float | None = None,
    hook: Callable[[int, float], bool | None] | None = None,
    backend: ArrayBackend = NUMPY,
) -> RefineResult:
    """Fit the odd-``l`` surface terms (the crystal's asymmetry) to ``measured``.

    The intensity cannot tell an object from its twin, which negates these terms, and for a
    real-valued crystal it sees them only at second order, so the CNN leaves them near zero
    (model card). There, chi sits on a saddle between the two twins: the ES gradient estimate
    is near zero and it moves them slowly. A Powell search (line minimisations, no gradient)
    over just these few terms, everything else fixed, on the coarse grid, leaves the saddle at
    once and lands on one of the two equivalent minima. Measured on 12 prior crystals at 1e8
    photons, 150 evaluations (0.15 s) raised the model's support IoU from 0.78 to 0.90
    (docs/benchmarks.md).

    Parameters
    ----------
    model : CrystalModel
        Layout and grid (``model.n`` must equal the measured volume's size).
    params : ndarray
        Starting physical parameters.
    measured : ndarray
        Centred ``N^3`` intensity.
    mask : ndarray of bool, optional
        True for valid voxels.
    max_evaluations : int
        Forward models the search may run (0: return the start).
    time_budget_s : float, optional
        Wall-time budget.
    hook : callable, optional
        ``hook(evaluation, best cost so far)`` after each forward model; False stops.
    backend : ArrayBackend
        Where the forward models and ``chi`` run.

    Returns
    -------
    RefineResult
        The parameters with the best odd terms found; never worse than the start on the full
        grid (chi fields are full-grid values; ``costs`` are the coarse ones).
    """
    started = time.perf_counter()
    if measured.shape != (model.n,) * 3:
        raise ValueError(
            f"measured intensity has shape {measured.shape}, the model grid is {(model.n,) * 3}"
        )
    full_cost = ChiCost(measured, mask, backend)
    p0 = model.normalise(model.clip(params))
    chi_start = full_cost(model.intensity(model.denormalise(p0), backend))
    odd = np.flatnonzero(model.sh_degrees % 2 == 1) + model.slices["sh"].start
    if max_evaluations <= 0 or odd.size == 0 or model.n // 2 < 16:
        return RefineResult(
            model.denormalise(p0), chi_start, chi_start, [], 0, time.perf_counter() - started
        )
    cost_fn = coarse_chi(model, measured, mask, backend)
    costs: list[float] = []
    best = [np.inf, p0[odd].copy()]

    def cost(values: np.ndarray) -> float:
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            raise _Stop("time")
        p = p0.copy()
        p[odd] = np.clip(values, -1.0, 1.0)
        c = cost_fn(p)
        if c < best[0]:
            best[:] = [c, p[odd].copy()]
        costs.append(best[0])
        if hook is not None and hook(len(costs), best[0]) is False:
            raise _Stop("hook")
        return c

    cut_short = False
    try:
        scipy.optimize.minimize(
            cost,
            p0[odd],
            method="Powell",
            bounds=[(-1.0, 1.0)] * odd.size,
            options={"maxfev": max_evaluations, "xtol": 1e-2, "ftol": 1e-3},
        )
    except _Stop as stop:
        cut_short = stop.by == "time"
    p = p0.copy()
    p[odd] = best[1]
    chi = full_cost(model.intensity(model.denormalise(p), backend))
    if chi >= chi_start:
        p, chi = p0, chi_start
    return RefineResult(
        model.denormalise(p),
        chi_start,
        chi,
        costs,
        len(costs),
        time.perf_counter() - started,
        cut_short,
    )
