"""Bounded extremum seeking (Scheinker's form): a model-free optimiser for noisy black boxes.

For each parameter ``p_j`` normalised to [-1, 1]::

    p_j(n+1) = clip(p_j(n) + dt sqrt(alpha_j omega_j) cos(omega_j n dt + k C(n)), -1, 1)

with distinct dither frequencies ``omega_j``, ``alpha_j = omega_j D^2`` (``D``: dither amplitude in
normalised units), ``dt = 2 pi / (10 max omega)`` and gain ``k`` (``k > 0`` minimises, ``k < 0``
maximises). Whatever the cost does, a step never exceeds ``dt sqrt(alpha_j omega_j)``; on average
the parameters descend the gradient at rate ``k alpha / 2``. Only the cost's value is used, so
the same optimiser tunes a simulation or moves real motors one measurement at a time.

References: A. Scheinker, "Bounded extremum seeking" (2012-2024); Scheinker & Pokharel, J. Appl.
Phys. 128, 184901 (2020).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: Called after every step with (iteration, parameters, cost); returning False stops the run.
StepHook = Callable[[int, np.ndarray, float], "bool | None"]


@dataclass
class ESResult:
    """Outcome of :meth:`ExtremumSeeker.minimise`."""

    best_params: np.ndarray
    best_cost: float
    final_params: np.ndarray
    iterations: int
    costs: list[float] = field(default_factory=list)
    stopped_by: str = "iterations"


class ExtremumSeeker:
    """Bounded extremum seeking over parameters normalised to [-1, 1].

    Use it step by step (:meth:`ask` the parameters to measure, :meth:`tell` their cost), so that
    a Bluesky plan can drive it one measurement at a time, or in one call with :meth:`minimise`.

    Parameters
    ----------
    p0 : array_like
        Starting point in [-1, 1] (values outside are clipped).
    gain : float
        ``k``: positive to minimise, negative to maximise. With ``normalise_cost`` it acts on
        ``C / |C(0)|``, so a gain of order 1-10 suits most problems.
    dither : float or array_like
        Dither amplitude ``D`` per parameter (normalised units).
    omega_range : tuple of float
        Lowest and highest dither frequency (distinct frequencies spread between them).
    decay : float
        Factor applied to the dither amplitude after every step (1: no decay).
    normalise_cost : bool
        Divide costs by the magnitude of the first one.
    seed : int
        Assigns the frequencies to parameters (a seeded permutation): runs are deterministic.
    """

    def __init__(
        self,
        p0: np.ndarray,
        gain: float = 2.0,
        dither: float | np.ndarray = 0.05,
        omega_range: tuple[float, float] = (1.0, 1.75),
        decay: float = 1.0,
        normalise_cost: bool = True,
        seed: int = 0,
    ) -> None:
        p = np.asarray(p0, dtype=np.float64).ravel()
        if p.size == 0:
            raise ValueError("extremum seeking needs at least one parameter")
        if not np.all(np.isfinite(p)):
            raise ValueError("starting point contains NaN or inf")
        if not math.isfinite(gain) or gain == 0:
            raise ValueError(f"gain must be a non-zero finite number, got {gain!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        lo, hi = omega_range
        if not 0 < lo < hi:
            raise ValueError(f"omega_range must satisfy 0 < low < high, got {omega_range!r}")
        self.p = np.clip(p, -1.0, 1.0)
        rng = np.random.default_rng(seed)
        # Distinct frequencies; the tiny offset keeps them distinct for a single parameter too.
        self.omega = rng.permutation(np.linspace(lo, hi, p.size) if p.size > 1 else np.array([hi]))
        self.dt = 2.0 * math.pi / (10.0 * float(self.omega.max()))
        d = np.broadcast_to(np.asarray(dither, dtype=np.float64), p.shape).copy()
        if np.any(d <= 0) or not np.all(np.isfinite(d)):
            raise ValueError("dither amplitudes must be positive and finite")
        self.dither = d
        self.gain = float(gain)
        self.decay = float(decay)
        self.normalise_cost = normalise_cost
        self.iteration = 0
        self._scale: float | None = None

    @property
    def step_bound(self) -> np.ndarray:
        """Largest possible change of each parameter in the next step."""
        alpha = self.omega * self.dither**2
        return self.dt * np.sqrt(alpha * self.omega)

    def ask(self) -> np.ndarray:
        """The parameters whose cost the optimiser needs next (a copy)."""
        return self.p.copy()

    def tell(self, cost: float) -> np.ndarray:
        """Report the cost of the last :meth:`ask`; returns the next parameters.

        A non-finite cost (a failed measurement) is not used: the dither still advances, but
        the phase ignores the bad value, so one spike cannot throw the parameters far.
        """
        c = float(cost)
        if math.isfinite(c):
            if self._scale is None:
                self._scale = abs(c) if (self.normalise_cost and c != 0) else 1.0
            c = c / self._scale
        else:
            c = 0.0
        n = self.iteration
        self.p = np.clip(
            self.p + self.step_bound * np.cos(self.omega * n * self.dt + self.gain * c), -1.0, 1.0
        )
        self.dither *= self.decay
        self.iteration += 1
        return self.p.copy()

    def minimise(
        self,
        cost: Callable[[np.ndarray], float],
        max_iter: int = 500,
        time_budget_s: float | None = None,
        hook: StepHook | None = None,
    ) -> ESResult:
        """Run until ``max_iter`` evaluations, the time budget, or the hook says stop.

        Returns the best parameters seen (lowest cost), not merely the last ones: the dither
        keeps the final point oscillating around the optimum.
        """
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        started = time.perf_counter()
        best_p, best_c = self.ask(), math.inf
        costs: list[float] = []
        stopped = "iterations"
        for i in range(max_iter):
            p = self.ask()
            c = float(cost(p))
            costs.append(c)
            if c < best_c:
                best_p, best_c = p, c
            self.tell(c)
            if hook is not None and hook(i, p, c) is False:
                stopped = "hook"
                break
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                stopped = "time"
                break
        return ESResult(best_p, best_c, self.ask(), len(costs), costs, stopped)
