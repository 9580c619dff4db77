"""Where a scan falls in the CNN's low-dimensional space, and whether the CNN is out of its depth.

The latent is the CNN's prediction (the normalised parameter vector) with one more coordinate:
the chi of that prediction against the measured intensity. The parameters alone do not see a
volume of pure noise (the CNN maps it to an ordinary-looking crystal); their misfit does. At
export time the latents of fresh prior crystals give the training distribution: a mean, a shrunk
covariance (Mahalanobis distance), a 2D PCA projection for the map, a subsample of points
for plotting, and the 99th percentile of the distance, so that a calibrated distance of 1
separates the usual from the unusual. All of it lives in the model card (numpy only at run
time: no torch, no scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..physics import CrystalModel, CrystalPrior
from .data import make_sample

CALIBRATION_STREAM = 3  # disjoint from training, validation and test streams


@dataclass(frozen=True)
class LatentMap:
    """The training distribution of the CNN's latent, and the 2D map of it."""

    mean: np.ndarray  # (P,)
    precision: np.ndarray  # (P, P) inverse of the shrunk covariance
    components: np.ndarray  # (2, P) PCA axes of the map
    scale: float  # 99th percentile of the training Mahalanobis distance
    points: np.ndarray  # (K, 2) a subsample of the training distribution on the map

    def project(self, latent: np.ndarray) -> np.ndarray:
        """``(..., P)`` latents -> ``(..., 2)`` map coordinates."""
        return (np.asarray(latent, dtype=np.float64) - self.mean) @ self.components.T

    def distance(self, latent: np.ndarray) -> np.ndarray:
        """Calibrated Mahalanobis distance: 99% of the training distribution lies below 1."""
        d = np.asarray(latent, dtype=np.float64) - self.mean
        return np.sqrt(np.einsum("...i,ij,...j->...", d, self.precision, d)) / self.scale

    def chi_distribution(self) -> tuple[float, float]:
        """Mean and standard deviation of the CNN's chi (the latent's last coordinate) on the
        prior crystals it was calibrated on (the shrunk covariance's marginal)."""
        covariance = np.linalg.inv(self.precision)
        return float(self.mean[-1]), float(np.sqrt(covariance[-1, -1]))

    def to_dict(self) -> dict:
        """For the model card."""
        return {
            "mean": self.mean.tolist(),
            "precision": self.precision.tolist(),
            "components": self.components.tolist(),
            "scale": self.scale,
            "points": self.points.round(4).tolist(),
            "meaning": "latent = the CNN's normalised parameter vector and the chi of "
            "that prediction against the data; distance = "
            "Mahalanobis (shrunk covariance) / its 99th percentile on fresh "
            "prior crystals; map = 2D PCA of the latent",
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatentMap:
        """Inverse of :meth:`to_dict`."""
        return cls(
            np.array(d["mean"]),
            np.array(d["precision"]),
            np.array(d["components"]),
            float(d["scale"]),
            np.array(d["points"]),
        )


def fit_latent_map(latents: np.ndarray, shrinkage: float = 0.05, points: int = 300) -> LatentMap:
    """Fit the map to latents of fresh prior crystals (rows)."""
    z = np.asarray(latents, dtype=np.float64)
    mean = z.mean(axis=0)
    cov = np.cov(z - mean, rowvar=False)
    # Shrinkage keeps the nearly constant directions (twin-odd terms the CNN leaves near zero)
    # from turning tiny differences into huge distances.
    target = np.trace(cov) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * target * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
    raw = np.sqrt(np.einsum("ni,ij,nj->n", z - mean, precision, z - mean))
    scale = float(np.percentile(raw, 99))
    pick = np.linspace(0, len(z) - 1, min(points, len(z))).astype(int)
    partial = LatentMap(mean, precision, vt[:2], scale, np.zeros((0, 2)))
    return LatentMap(mean, precision, vt[:2], scale, partial.project(z[pick]))


def latent_vector(normalised: np.ndarray, chi: float) -> np.ndarray:
    """The latent of one prediction: normalised parameters, then the prediction's chi."""
    return np.concatenate([np.asarray(normalised, dtype=np.float64).ravel(), [float(chi)]])


def calibrate(
    predict: Callable[[np.ndarray], np.ndarray],
    model: CrystalModel,
    count: int = 2000,
    seed: int = 0,
    batch: int = 16,
    twin_variants: Callable[[np.ndarray], list[np.ndarray]] | None = None,
) -> LatentMap:
    """Run ``predict`` on ``count`` fresh prior crystals (their photon counts drawn from the
    prior too) and fit the map.

    ``twin_variants`` (the model's ``encoding.twin_variants``) gives the candidates among
    which the data choose, as the pipeline does: the latent of a scan is then the same
    function of its prediction here and there.
    """
    from ..preprocess import fit_to_grid
    from ..tuning.refine import ChiCost, best_twin_variant

    prior = CrystalPrior(model)
    latents = []
    for start in range(0, count, batch):
        samples = [
            make_sample(model, prior, seed, CALIBRATION_STREAM, i)
            for i in range(start, min(start + batch, count))
        ]
        preds = np.atleast_2d(predict(np.stack([s.inputs for s in samples])))
        for s, pred in zip(samples, preds, strict=True):
            prepared = fit_to_grid(s.counts, model.n)
            pred = pred.astype(np.float64)
            latent, chi = best_twin_variant(
                model,
                twin_variants(pred) if twin_variants else [pred],
                ChiCost(prepared.intensity, prepared.mask),
            )
            latents.append(latent_vector(latent, chi))
    return fit_latent_map(np.array(latents))
