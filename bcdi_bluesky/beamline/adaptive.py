"""Bounded extremum seeking behind bluesky-adaptive's ``Optimizer`` protocol.

bluesky-adaptive 1.0 drives optimisers through ``suggest(n)`` / ``ingest(points)`` from its
``optimize(...)`` plan; this adapter lets that plan (and the tools built on it) drive our ES,
one suggestion per iteration (ES is sequential by nature).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tuning import ExtremumSeeker

log = logging.getLogger(__name__)
ID_KEY = "_id"  # bluesky-adaptive's key for a suggestion's identity


class ExtremumSeekingOptimizer:
    """A bluesky-adaptive ``Optimizer`` (``suggest``/``ingest``/``get_best_points``) doing ES.

    Parameters
    ----------
    bounds : mapping of str to (low, high)
        Actuator name -> limits; suggestions stay inside.
    objective : str
        Outcome key to optimise.
    initial : mapping of str to float, optional
        Starting point (default: the middle of the bounds).
    maximize : bool
        Maximise (default) or minimise the objective.
    log_objective : bool
        Work on ``log(1 + objective)`` (scale-free for counts); needs a non-negative objective.
    gain, dither, decay, seed
        As for :class:`bcdi_bluesky.tuning.ExtremumSeeker` (cost not normalised).
    """

    def __init__(
        self,
        bounds: Mapping[str, tuple[float, float]],
        objective: str,
        *,
        initial: Mapping[str, float] | None = None,
        maximize: bool = True,
        log_objective: bool = True,
        gain: float = 4.0,
        dither: float = 0.05,
        decay: float = 0.999,
        seed: int = 0,
    ) -> None:
        self.names = list(bounds)
        self.lo = np.array([bounds[n][0] for n in self.names], dtype=float)
        self.hi = np.array([bounds[n][1] for n in self.names], dtype=float)
        if np.any(self.hi <= self.lo):
            raise ValueError("every bound must satisfy low < high")
        start = np.array(
            [
                (initial or {}).get(n, (lo + hi) / 2)
                for n, lo, hi in zip(self.names, self.lo, self.hi, strict=True)
            ]
        )
        p0 = 2 * (np.clip(start, self.lo, self.hi) - self.lo) / (self.hi - self.lo) - 1
        self.es = ExtremumSeeker(
            p0, gain=gain, dither=dither, decay=decay, normalise_cost=False, seed=seed
        )
        self.objective = objective
        self.sign = -1.0 if maximize else 1.0
        self.log_objective = log_objective
        self._next_id = 0
        self._pending: dict[Any, dict] = {}
        self._best: tuple[Any, dict, dict] | None = None
        self._best_value = -math.inf

    def _to_positions(self, p: np.ndarray) -> dict[str, float]:
        x = self.lo + (p + 1) * 0.5 * (self.hi - self.lo)
        return {n: float(v) for n, v in zip(self.names, x, strict=True)}

    def suggest(self, num_points: int | None = None) -> Sequence[Mapping]:
        """The next point to measure (ES suggests one at a time)."""
        if num_points not in (None, 1):
            raise ValueError("extremum seeking is sequential: suggest one point at a time")
        suggestion = {**self._to_positions(self.es.ask()), ID_KEY: self._next_id}
        self._pending[self._next_id] = suggestion
        self._next_id += 1
        return [suggestion]

    def ingest(self, points: Sequence[Mapping]) -> None:
        """Take measured outcomes; only the outcome of the pending suggestion steps the ES."""
        for point in points:
            value = float(point.get(self.objective, math.nan))
            params = {n: point[n] for n in self.names if n in point}
            suggestion = self._pending.pop(point.get(ID_KEY), None)
            if suggestion is not None:
                params = {n: suggestion[n] for n in self.names}
                if math.isfinite(value):
                    x = math.log1p(max(value, 0.0)) if self.log_objective else value
                    self.es.tell(self.sign * x)
                else:
                    self.es.tell(math.nan)  # a failed measurement: the dither still advances
            else:
                log.info(
                    "outcome %s is not the pending suggestion: kept for the best point "
                    "only (ES learns from its own measurements in order)",
                    point,
                )
            score = -self.sign * value
            if math.isfinite(value) and score > self._best_value:
                self._best_value = score
                self._best = (point.get(ID_KEY), params, {self.objective: value})

    def get_best_points(self) -> Sequence[tuple[Any, Mapping, Mapping]]:
        """The best measured point: ``[(id, parameters, outcomes)]``."""
        return [self._best] if self._best is not None else []
