"""The latent map: a scan's place in the CNN's training distribution, and the OOD flag."""

import numpy as np
import pytest

from bcdi_bluesky import NoBraggPeakError, ReconstructionSettings, Reconstructor
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.model.latent import fit_latent_map
from bcdi_bluesky.physics import CrystalPrior
from bcdi_bluesky.pipeline import prepare_measurement, refine_stage


@pytest.fixture(scope="module")
def rec():
    return Reconstructor()


def _peak_on(field: np.ndarray, height: float = 1000.0) -> np.ndarray:
    """``field`` with a small Gaussian peak (sigma 1 voxel) at the centre: a volume with a
    Bragg peak that no crystal of the prior makes."""
    r2 = ((np.indices(field.shape) - 32) ** 2).sum(axis=0)
    return (field + height * np.exp(-r2 / 2.0)).astype(np.float32)


def test_noise_is_flagged_and_prior_crystals_are_not(rec):
    rng = np.random.default_rng(3)
    for lam in (0.5, 20.0):
        noise = rng.poisson(lam, size=(64, 64, 64)).astype(np.float32) + 1
        # Noise has no Bragg peak, as counts or as corrected intensities: refused at once ...
        for volume in (noise, noise * np.float32(1.37)):
            with pytest.raises(NoBraggPeakError):
                rec.reconstruct(volume, refine="none")
        # ... with a small peak on it the CNN runs, and flags what it sees.
        result = rec.reconstruct(_peak_on(noise * np.float32(1.37)), refine="none")
        assert result.out_of_distribution and result.latent_distance > 1
    prior = CrystalPrior(rec.model)
    flagged = 0
    for i in range(50):
        sample = make_sample(rec.model, prior, 4242, TEST_STREAM, i)
        result = rec.reconstruct(sample.counts, refine="none")
        assert result.latent_xy is not None and len(result.latent_xy) == 2
        flagged += result.out_of_distribution
    # Latent distance and CNN fit each calibrated at 1% of the prior: at most 2 of 50.
    assert flagged <= 2


def test_out_of_distribution_doubles_the_es_budget(rec):
    noise = _peak_on(np.random.default_rng(4).poisson(5.0, size=(64, 64, 64)) + 1.5)
    messages = []
    result = rec.reconstruct(
        noise, refine="none", progress=lambda stage, info: messages.append(info.get("message"))
    )
    assert result.out_of_distribution
    assert any(m and "doubling the extremum-seeking budget" in m for m in messages)
    # The refinement stage given the policy's factor runs that many times the steps.
    settings = ReconstructionSettings(
        shape_search_evaluations=0, es_coarse_iterations=20, es_fine_iterations=10
    )
    prepared = prepare_measurement(noise, None, rec.model.n).prepared
    single = refine_stage(rec.model, result.params, prepared, settings, scale=1)
    double = refine_stage(rec.model, result.params, prepared, settings, scale=2)
    assert len(single.costs) == 30 and len(double.costs) == 60
    assert not single.cut_short and not double.cut_short


def test_map_calibration_on_a_known_distribution():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * [3, 1, 1, 0.5, 0.1]
    latent_map = fit_latent_map(z, shrinkage=0.0)
    d = latent_map.distance(z)
    assert np.mean(d > 1) == pytest.approx(0.01, abs=0.003)
    np.testing.assert_allclose(np.abs(latent_map.components[0]), [1, 0, 0, 0, 0], atol=0.05)
    assert latent_map.distance(np.array([0, 0, 0, 0, 5.0])) > 10  # 50 sigma along a thin axis
