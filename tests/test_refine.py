"""Refinement against a measured intensity: the odd-shape search and extremum seeking."""

import numpy as np
import pytest

from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.physics import CrystalPrior, support_iou
from bcdi_bluesky.tuning import fit_odd_shape, refine_crystal


def _without_odd_shape(model, params):
    p = params.copy()
    p[model.slices["sh"]] *= model.sh_degrees % 2 == 0
    return p


@pytest.mark.parametrize("index", [0, 2, 3])
def test_odd_shape_search_recovers_the_asymmetry(model64, index):
    # A crystal known but for its odd-l terms (what the CNN gives): the search alone must find
    # them (up to the twin), which the support IoU with the truth shows.
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, index, 1e8)
    truth = model64.voxelise(sample.params)
    # (These crystals' Bragg peaks sit at q = 0, so the truth fits the centred data.)
    assert fit_odd_shape(model64, sample.params, sample.counts, max_evaluations=0).chi < 0.05
    start = _without_odd_shape(model64, sample.params)
    before = support_iou(truth, model64.voxelise(start))
    assert before < 0.85  # the asymmetry matters for this crystal
    result = fit_odd_shape(model64, start, sample.counts)
    after = support_iou(truth, model64.voxelise(result.params))
    assert after >= 0.9 and after > before + 0.05
    assert result.chi < result.chi_start
    assert 0 < result.iterations <= 150 + 2 * 7  # Powell may finish its last line search
    assert np.all(np.diff(result.costs) <= 0)  # best-so-far costs
    even = np.ones(model64.size, dtype=bool)
    even[model64.slices["sh"]] = model64.sh_degrees % 2 == 0
    np.testing.assert_allclose(result.params[even], start[even], rtol=1e-12, atol=1e-15)


def test_odd_shape_search_budgets_and_errors(model64):
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 0, 1e8)
    start = _without_odd_shape(model64, sample.params)
    stopped = fit_odd_shape(model64, start, sample.counts, hook=lambda i, c: i < 5)
    assert stopped.iterations == 5 and stopped.chi <= stopped.chi_start
    unchanged = fit_odd_shape(model64, start, sample.counts, max_evaluations=0)
    np.testing.assert_allclose(unchanged.params, start)
    assert unchanged.iterations == 0 and unchanged.chi == unchanged.chi_start
    quick = fit_odd_shape(model64, start, sample.counts, time_budget_s=0.0)
    assert quick.iterations == 0
    with pytest.raises(ValueError, match="model grid"):
        fit_odd_shape(model64, start, sample.counts[:32])


def test_es_refinement_never_ends_worse_than_its_start(model64):
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 2, 1e8)
    start = _without_odd_shape(model64, sample.params)
    start[0] *= 1.1
    result = refine_crystal(model64, start, sample.counts, coarse_iterations=60,
                            fine_iterations=20)
    assert result.chi < result.chi_start and result.iterations == 80
