"""Simulated training samples (numpy only): prior crystal -> noisy counts -> network input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import CrystalModel, CrystalPrior, mirror, simulate_counts
from ..preprocess import fit_to_grid, network_input

#: Seed offsets that keep the training, validation and test streams disjoint.
TRAIN_STREAM, VALIDATION_STREAM, TEST_STREAM = 0, 1, 2
#: Seed offset of the choice of mirror images in the training stream.
MIRROR_STREAM = 4
#: Seed offset of the crystals that distil a symmetry-averaged model into one network pass
#: (:mod:`bcdi_bluesky.model.distil`); 3 is the latent map's calibration stream.
DISTIL_STREAM = 5


@dataclass(frozen=True)
class Sample:
    """One simulated measurement and its truth."""

    params: np.ndarray  # physical parameters (float64)
    photons: float
    counts: np.ndarray  # float32 N^3 photon counts, centred as measured
    inputs: np.ndarray  # float32 N^3 network input


def make_sample(
    model: CrystalModel,
    prior: CrystalPrior,
    seed: int,
    stream: int,
    index: int,
    photons: float | None = None,
) -> Sample:
    """Deterministic sample ``index`` of a stream: the same arguments give the same sample."""
    rng = np.random.default_rng([seed, stream, index])
    params = prior.sample(rng)
    total = prior.sample_photons(rng) if photons is None else photons
    counts = simulate_counts(model.voxelise(params), total, rng)
    prepared = fit_to_grid(counts, model.n)
    return Sample(params, total, prepared.intensity, network_input(prepared.intensity))


def make_batch(
    model: CrystalModel,
    prior: CrystalPrior,
    seed: int,
    stream: int,
    start: int,
    size: int,
    photons: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(size, 1, N, N, N)`` and normalised targets ``(size, P)`` of consecutive samples."""
    xs, ys = [], []
    for i in range(start, start + size):
        s = make_sample(model, prior, seed, stream, i, photons)
        xs.append(s.inputs)
        ys.append(model.normalise(s.params))
    return np.stack(xs)[:, None], np.stack(ys).astype(np.float32)


def mirror_views(
    model: CrystalModel,
    inputs: np.ndarray,
    targets: np.ndarray,
    flips: list[tuple[int, ...]],
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample seen through the mirrors ``flips[k]`` (axes, 0 = z), sample by sample.

    ``inputs`` ``(B, 1, N, N, N)`` and normalised ``targets`` ``(B, P)`` become
    ``(B * len(flips), ...)``, sample-major: the measurement mirrored and its parameters
    mapped to the mirrored crystal (:meth:`~bcdi_bluesky.physics.CrystalModel.reflection_signs`).
    """
    xs, ys = [], []
    for x, y in zip(inputs, targets, strict=True):
        for axes in flips:
            signs = np.prod(
                [model.reflection_signs(a) for a in axes] or [np.ones(model.size)], axis=0
            )
            xs.append(np.ascontiguousarray(mirror(x, axes)))
            ys.append((y * signs).astype(targets.dtype))
    return np.stack(xs), np.stack(ys)


def mirrored_copies(
    model: CrystalModel,
    inputs: np.ndarray,
    targets: np.ndarray,
    copies: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` distinct mirror images of each sample (of the 8 that z, y, x mirrors make).

    ``inputs`` ``(B, 1, N, N, N)`` and normalised ``targets`` ``(B, P)`` become
    ``(B * copies, ...)``: one simulated crystal (the expensive part of a sample) then trains
    the network ``copies`` times, on different but equally valid measurements.
    """
    if not 1 <= copies <= 8:
        raise ValueError(f"copies must be in [1, 8], got {copies}")
    xs, ys = [], []
    for x, y in zip(inputs, targets, strict=True):
        flips = [tuple(a for a in range(3) if code >> a & 1) for code in rng.permutation(8)]
        views = mirror_views(model, x[None], y[None], flips[:copies])
        xs.append(views[0])
        ys.append(views[1])
    return np.concatenate(xs), np.concatenate(ys)
