import numpy as np
import pytest

from bcdi_bluesky.backend import NUMPY, PRUNED_FFT_MAX_SPAN, ArrayBackend
from bcdi_bluesky.physics import (
    DEV_SEED,
    beamstop_mask,
    detector_gap_mask,
    far_field,
    intensity,
    out_of_family_crystal,
    poisson_counts,
    scale_to_photons,
    simulate_counts,
)
from bcdi_bluesky.tuning import polish


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


@pytest.mark.parametrize(
    "shape, box",
    [
        ((32, 32, 32), (slice(9, 22), slice(10, 21), slice(8, 24))),
        ((48, 50, 36), (slice(12, 30), slice(3, 31), slice(10, 27))),
        ((21, 64, 40), (slice(4, 16), slice(20, 50), slice(0, 24))),
    ],
)
def test_transforms_within_a_box_are_the_whole_transforms_to_the_bit(shape, box, rng):
    obj = np.zeros(shape, np.complex64)
    inner = obj[box].shape
    obj[box] = rng.normal(size=inner) + 1j * rng.normal(size=inner)
    f = NUMPY.fftn(obj)
    assert np.array_equal(NUMPY.fftn_within(obj, box), f)
    back = NUMPY.ifftn_within(f, box)
    assert np.array_equal(back[box], NUMPY.ifftn(f)[box])
    outside = np.ones(shape, bool)
    outside[box] = False
    assert not back[outside].any()


def test_the_support_box_is_the_bounding_box_where_pruning_pays():
    support = np.zeros((32, 40, 24), bool)
    support[5, 10, 3] = support[20, 12, 9] = True
    assert NUMPY.support_box(support) == (slice(5, 21), slice(10, 13), slice(3, 10))
    assert NUMPY.support_box(np.zeros((16,) * 3, bool)) is None
    wide = np.zeros((32,) * 3, bool)
    wide[0, 0, 0] = wide[int(PRUNED_FFT_MAX_SPAN * 32) + 1, 1, 1] = True
    assert NUMPY.support_box(wide) is None


@pytest.mark.parametrize("hio_fraction", [0.0, 0.65])
def test_phase_retrieval_gives_the_same_bits_with_and_without_pruned_transforms(
    monkeypatch, hio_fraction
):
    crystal = out_of_family_crystal(DEV_SEED, 2, 32)
    seed = np.zeros((32,) * 3, np.complex64)
    seed[9:22, 10:21, 8:23] = 1.0
    mask = np.ones((32,) * 3, bool)
    mask[:, 14:16, :] = False  # a detector gap: the masked voxels keep their own modulus

    def run() -> object:
        return polish(
            crystal.measured,
            seed,
            np.abs(seed) > 0,
            mask,
            iterations=60,
            hio_fraction=hio_fraction,
            shrink_every=10,
        )

    within = ArrayBackend.ifftn_within
    calls = []
    monkeypatch.setattr(
        ArrayBackend, "ifftn_within", lambda self, f, box: calls.append(box) or within(self, f, box)
    )
    pruned = run()
    assert pruned.iterations == 60 and len(calls) >= 20  # every ER step, at least
    monkeypatch.setattr(ArrayBackend, "support_box", lambda self, support: None)
    whole = run()
    assert np.array_equal(pruned.object, whole.object)
    assert np.array_equal(pruned.support, whole.support)
    assert pruned.errors == whole.errors


def test_the_forward_model_gives_the_same_bits_with_and_without_pruned_transforms(
    monkeypatch, model64, prior64
):
    coarse = model64.with_grid(32)
    params = [prior64.sample(np.random.default_rng(seed)) for seed in range(3)]
    within = ArrayBackend.fftn_within
    calls = []
    monkeypatch.setattr(
        ArrayBackend, "fftn_within", lambda self, x, box: calls.append(box) or within(self, x, box)
    )
    pruned = [coarse.intensity(p) for p in params]
    assert len(calls) == len(params)  # prior crystals fit well inside the grid
    monkeypatch.setattr(ArrayBackend, "prunes", lambda self, shape, box: False)
    for p, expected in zip(params, pruned, strict=True):
        assert np.array_equal(coarse.intensity(p), expected)
        np.testing.assert_allclose(expected, intensity(coarse.voxelise(p)), rtol=1e-4, atol=1e-3)
