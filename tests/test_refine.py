"""Refinement against a measured intensity: the odd-shape search and extremum seeking."""

import numpy as np
import pytest

import bcdi_bluesky.tuning.sampling as sampling
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.model.encoding import TwinBlockEncoding
from bcdi_bluesky.physics import CrystalPrior, intensity, support, support_iou
from bcdi_bluesky.tuning import (
    ChiCost,
    best_start,
    best_twin_variant,
    coarse_screen,
    fit_odd_shape,
    fits_every_other_q,
    folded_chi,
    refine_crystal,
    subsample,
)


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
    result = refine_crystal(model64, start, sample.counts, coarse_iterations=60, fine_iterations=20)
    assert result.chi < result.chi_start and result.iterations == 80


def test_es_runs_from_every_start_and_keeps_the_best(model64):
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 2, 1e8)
    poor = _without_odd_shape(model64, sample.params)
    poor[0] *= 1.15
    kwargs = dict(coarse_iterations=40, fine_iterations=10)
    alone = refine_crystal(model64, poor, sample.counts, **kwargs)
    both = refine_crystal(model64, poor, sample.counts, alternatives=[sample.params], **kwargs)
    truth_chi = fit_odd_shape(model64, sample.params, sample.counts, max_evaluations=0).chi
    assert both.chi_start == alone.chi_start  # chi_start is the first start's
    assert both.chi <= truth_chi + 0.01 < alone.chi
    # Each start runs the screen, the better one the rest of the coarse steps.
    assert both.iterations == 2 * coarse_screen(40) + (40 - coarse_screen(40)) + 10
    # A poor alternative costs its coarse run and changes nothing else.
    worse = refine_crystal(model64, sample.params, sample.counts, alternatives=[poor], **kwargs)
    assert worse.chi <= truth_chi + 0.01


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 1, 2)])
def test_folded_chi_is_chi_on_every_other_q(model64, factors):
    # The crystal folded into half the field of view has exactly the intensity of every other
    # q: the folded chi of any parameters equals the full-grid intensity's chi there.
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 2, 1e8)
    mask = np.ones(sample.counts.shape, dtype=bool)
    mask[:, 40:43] = False  # a detector gap
    cost = folded_chi(model64, sample.counts, factors, mask)
    exact = ChiCost(subsample(sample.counts, factors), subsample(mask, factors))
    for params in (sample.params, _without_odd_shape(model64, sample.params)):
        expected = exact(subsample(intensity(model64.voxelise(params)), factors))
        assert cost(model64.normalise(params)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 1, 2)])
def test_a_rendered_crystal_folds_to_the_bit_without_the_full_grid(monkeypatch, model64, factors):
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 2, 1e8)
    large = sample.params.copy()
    large[0] *= 1.6  # a crystal whose cube no longer fits in half the field of view
    folds = []
    whole = sampling.fold
    monkeypatch.setattr(sampling, "fold", lambda *args: folds.append(1) or whole(*args))
    for params, fits in ((sample.params, True), (large, False)):
        rendered = model64.render(params)
        expected = whole(rendered.to_object(), factors)
        folds.clear()
        folded = sampling.fold_rendered(rendered, factors)
        assert folded.dtype == expected.dtype and np.array_equal(folded, expected)
        assert (not folds) == fits  # straight to the cells where the cube fits, else fold


def test_fine_es_on_every_other_q_where_the_crystal_fits(model64):
    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 2, 1e8)
    start = _without_odd_shape(model64, sample.params)
    start[0] *= 1.1
    assert fits_every_other_q(support(model64.voxelise(start), 0.1)) is not None
    kwargs = dict(coarse_iterations=60, fine_iterations=40)
    full = refine_crystal(model64, start, sample.counts, **kwargs)
    folded = refine_crystal(model64, start, sample.counts, fine_subsampling=True, **kwargs)
    assert folded.iterations == full.iterations == 100
    # The same coarse steps, then other fine ones: both lower chi, to within 2% of each other.
    assert folded.costs[:60] == full.costs[:60] and folded.costs[60:] != full.costs[60:]
    assert folded.chi < folded.chi_start
    assert folded.chi == pytest.approx(full.chi, rel=0.02)
    # A crystal wider than half the field of view: the fine steps stay on the full grid.
    wide = start.copy()
    wide[0] *= 2.0
    assert fits_every_other_q(support(model64.voxelise(wide), 0.1)) is None
    kwargs = dict(coarse_iterations=0, fine_iterations=10)
    assert (
        refine_crystal(model64, wide, sample.counts, fine_subsampling=True, **kwargs).costs
        == refine_crystal(model64, wide, sample.counts, **kwargs).costs
    )


def test_seeded_polish_keeps_a_good_seed_and_repairs_a_poor_one(model64):
    from bcdi_bluesky.physics import compare_objects, poisson_chi_floor
    from bcdi_bluesky.tuning import seeded_polish

    sample = make_sample(model64, CrystalPrior(model64), 31, TEST_STREAM, 0, 1e8)
    truth = model64.voxelise(sample.params)
    close = sample.params.copy()
    close[0] *= 1.04  # a seed close to the answer, as the refined model is for such a crystal
    seed = model64.voxelise(close)
    support = np.abs(seed) > 0.1 * np.abs(seed).max()
    good = seeded_polish(sample.counts, seed, support)
    assert good.recipe == "ER" and good.iterations == 50
    assert good.chi <= 1.5 * poisson_chi_floor(sample.counts)
    assert compare_objects(truth, good.object).iou >= 0.95
    # Rescaled counts are not counts: no noise floor, so the ER/HIO run goes too, and the
    # better of the two fits is returned.
    steps: list[int] = []
    both = seeded_polish(sample.counts * 1.37, seed, support, hook=lambda i, e: steps.append(i))
    assert both.iterations == 200 and steps == list(range(1, 201))
    assert both.recipe in ("ER", "ER/HIO") and both.chi <= good.chi + 0.01
    # A uniform ball of the wrong size is a poor seed: ER/HIO repairs it.
    grid = np.indices(seed.shape) - seed.shape[0] // 2
    ball = (np.sum(grid**2, axis=0) < 6**2).astype(np.complex64)
    repaired = seeded_polish(sample.counts, ball, ball.real > 0)
    assert repaired.recipe == "ER/HIO" and repaired.iterations == 200
    assert compare_objects(truth, repaired.object).iou >= 0.7


def test_the_data_choose_the_relative_signs_of_the_odd_families(model64):
    # A strained crystal with voids: its surface, RBF and phase blocks flipped independently
    # give four different crystals, and the measured counts single out the true one (or its
    # twin, the same intensity).
    prior = CrystalPrior(model64, rbf_probability=1.0, flat_phase_probability=0.0)
    sample = make_sample(model64, prior, 5, TEST_STREAM, 0, 1e8)
    enc = TwinBlockEncoding(model64)
    truth = model64.normalise(sample.params)
    flipped = truth.copy()
    flipped[enc.blocks[1]] *= -1  # what a decoder with its own sign convention may give
    flipped[enc.blocks[0]] *= -1
    chosen, chi = best_twin_variant(model64, enc.twin_variants(flipped), ChiCost(sample.counts))
    assert (
        min(np.abs(chosen - truth).max(), np.abs(chosen - truth * model64.twin_signs).max()) < 1e-12
    )
    assert chi < 0.05
    with pytest.raises(ValueError, match="candidate"):
        best_start(model64, [], ChiCost(sample.counts))
