"""Simulated training samples (numpy only): prior crystal -> noisy counts -> network input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import CrystalModel, CrystalPrior, simulate_counts
from ..preprocess import fit_to_grid, network_input

#: Seed offsets that keep the training, validation and test streams disjoint.
TRAIN_STREAM, VALIDATION_STREAM, TEST_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Sample:
    """One simulated measurement and its truth."""

    params: np.ndarray  # physical parameters (float64)
    photons: float
    counts: np.ndarray  # float32 N^3 photon counts, centred as measured
    inputs: np.ndarray  # float32 N^3 network input


def make_sample(model: CrystalModel, prior: CrystalPrior, seed: int, stream: int, index: int,
                photons: float | None = None) -> Sample:
    """Deterministic sample ``index`` of a stream: the same arguments give the same sample."""
    rng = np.random.default_rng([seed, stream, index])
    params = prior.sample(rng)
    total = prior.sample_photons(rng) if photons is None else photons
    counts = simulate_counts(model.voxelise(params), total, rng)
    prepared = fit_to_grid(counts, model.n)
    return Sample(params, total, prepared.intensity, network_input(prepared.intensity))


def make_batch(model: CrystalModel, prior: CrystalPrior, seed: int, stream: int, start: int,
               size: int, photons: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(size, 1, N, N, N)`` and normalised targets ``(size, P)`` of consecutive samples."""
    xs, ys = [], []
    for i in range(start, start + size):
        s = make_sample(model, prior, seed, stream, i, photons)
        xs.append(s.inputs)
        ys.append(model.normalise(s.params))
    return np.stack(xs)[:, None], np.stack(ys).astype(np.float32)
