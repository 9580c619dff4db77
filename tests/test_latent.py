"""The latent map: a scan's place in the CNN's training distribution, and the OOD flag."""

import numpy as np
import pytest

from bcdi_bluesky import Reconstructor
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.model.latent import fit_latent_map
from bcdi_bluesky.physics import CrystalPrior


@pytest.fixture(scope="module")
def rec():
    return Reconstructor()


def test_noise_is_flagged_and_prior_crystals_are_not(rec):
    rng = np.random.default_rng(3)
    for lam in (0.5, 20.0):
        noise = rng.poisson(lam, size=(64, 64, 64)).astype(np.float32) + 1
        result = rec.reconstruct(noise, refine="none")
        assert result.out_of_distribution and result.latent_distance > 1
    prior = CrystalPrior(rec.model)
    flagged = 0
    for i in range(50):
        sample = make_sample(rec.model, prior, 4242, TEST_STREAM, i)
        result = rec.reconstruct(sample.counts, refine="none")
        assert result.latent_xy is not None and len(result.latent_xy) == 2
        flagged += result.out_of_distribution
    assert flagged <= 1  # calibrated at 1%: fewer than 2% flagged


def test_out_of_distribution_doubles_the_es_budget(rec, monkeypatch):
    import bcdi_bluesky.pipeline as pipeline

    budgets = {}

    def spy(function):
        def wrapped(*args, **kwargs):
            budgets.setdefault(function.__name__, []).append(kwargs)
            return function(*args, **kwargs)
        return wrapped

    for name in ("fit_odd_shape", "refine_crystal"):
        monkeypatch.setattr(pipeline, name, spy(getattr(pipeline, name)))
    noise = np.random.default_rng(4).poisson(5.0, size=(64, 64, 64)).astype(np.float32) + 1
    messages = []
    result = rec.reconstruct(noise, refine="es",
                             progress=lambda stage, info: messages.append(info.get("message")))
    assert result.out_of_distribution
    (search,) = budgets["fit_odd_shape"]
    (es,) = budgets["refine_crystal"]
    assert search["max_evaluations"] == 2 * rec.settings.shape_search_evaluations
    assert es["coarse_iterations"] == 2 * rec.settings.es_coarse_iterations
    assert es["fine_iterations"] == 2 * rec.settings.es_fine_iterations
    assert search["time_budget_s"] == 2 * rec.settings.es_time_budget_s
    assert len(result.es_costs) > 0
    assert any(m and "out of distribution" in m for m in messages)


def test_map_calibration_on_a_known_distribution():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * [3, 1, 1, 0.5, 0.1]
    latent_map = fit_latent_map(z, shrinkage=0.0)
    d = latent_map.distance(z)
    assert np.mean(d > 1) == pytest.approx(0.01, abs=0.003)
    np.testing.assert_allclose(np.abs(latent_map.components[0]), [1, 0, 0, 0, 0], atol=0.05)
    assert latent_map.distance(np.array([0, 0, 0, 0, 5.0])) > 10  # 50 sigma along a thin axis
