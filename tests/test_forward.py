import numpy as np
import pytest

from bcdi_bluesky.physics import (
    beamstop_mask,
    detector_gap_mask,
    far_field,
    intensity,
    poisson_counts,
    scale_to_photons,
    simulate_counts,
)


def test_intensity_is_centred_and_obeys_parseval(model64, prior64):
    p = prior64.sample(np.random.default_rng(3))
    p[model64.slices["phase"]] = 0.0  # a real, positive object peaks exactly at q = 0
    obj = model64.voxelise(p)
    i = intensity(obj)
    assert i.dtype == np.float32
    assert np.unravel_index(np.argmax(i), i.shape) == (32, 32, 32)
    np.testing.assert_allclose(i.sum(), obj.size * np.sum(np.abs(obj) ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.abs(far_field(obj)) ** 2, i, rtol=1e-5, atol=1e-3)


def test_photon_scaling_and_poisson_statistics(rng):
    expected = np.full((8, 8, 8), 4.0, dtype=np.float32)
    scaled = scale_to_photons(expected, 1e5)
    np.testing.assert_allclose(scaled.sum(), 1e5, rtol=1e-5)
    counts = poisson_counts(scaled, rng)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    np.testing.assert_allclose(counts.mean(), scaled.mean(), rtol=0.02)
    np.testing.assert_allclose(counts.var(), scaled.mean(), rtol=0.15)
    with pytest.raises(ValueError, match="photons"):
        scale_to_photons(expected, -1)


def test_masks_hide_beamstop_and_gap(model64, prior64, rng):
    shape = (64, 64, 64)
    stop = beamstop_mask(shape, 2.5)
    assert not stop[32, 32, 32] and stop[0, 0, 0]
    assert np.count_nonzero(~stop) == np.count_nonzero(
        sum((g - 32) ** 2 for g in np.indices(shape)) <= 6.25
    )
    gap = detector_gap_mask(shape, axis=2, start=40, width=3)
    assert not gap[:, :, 40:43].any() and gap[:, :, 39].all()
    with pytest.raises(ValueError, match="axis"):
        detector_gap_mask(shape, axis=0, start=1, width=1)
    obj = model64.voxelise(prior64.sample(rng))
    counts = simulate_counts(obj, 1e7, rng, mask=stop & gap)
    assert counts[~(stop & gap)].sum() == 0
    np.testing.assert_allclose(counts.sum(), 1e7, rtol=0.01)


@pytest.mark.parametrize("n", [64, 33])
def test_fast_forward_model_equals_the_definition(model64, prior64, n):
    model = model64.with_grid(n)
    for seed in range(3):
        p = prior64.sample(np.random.default_rng(seed))
        expected = intensity(model.voxelise(p))
        fast = model.intensity(p)
        assert fast.dtype == np.float32 and fast.shape == (n, n, n)
        np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-4 * expected.max())
