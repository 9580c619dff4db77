import numpy as np

from bcdi_bluesky.physics import CrystalPrior, support


def test_prior_is_deterministic_for_a_seed(prior64):
    a = prior64.sample(np.random.default_rng([1, 2]))
    b = prior64.sample(np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a, b)


def test_prior_is_broad_and_keeps_oversampling(model64, prior64):
    rng = np.random.default_rng(11)
    lo, hi = model64.bounds
    diam, aspect, ptp, voids = [], [], [], 0
    s = model64.slices
    for _ in range(60):
        p = prior64.sample(rng)
        assert np.all((p >= lo) & (p <= hi))
        obj = model64.voxelise(p)
        sup = support(obj, 0.05)
        idx = np.argwhere(sup)
        extent = idx.max(axis=0) - idx.min(axis=0) + 1
        assert extent.max() <= 64 / 2 + 1, "oversampling below 2"
        diam.append(2 * p[0] * 64)  # mean diameter, 2 r0
        # The principal-axis aspect ratio of the support.
        ev = np.linalg.eigvalsh(np.cov((idx - idx.mean(axis=0)).T))
        aspect.append(np.sqrt(ev[-1] / ev[0]))
        ptp.append(np.ptp(np.angle(obj[support(obj, 0.2)])))
        voids += int(np.any(p[s["rbf_amplitude"]] < -0.5))
    diam = np.array(diam)
    assert diam.min() >= 64 / 5 * 0.8 and diam.max() <= 64 / 2.2
    assert diam.min() < 64 / 4.5 and diam.max() > 64 / 2.8  # the whole range is drawn
    assert np.percentile(aspect, 90) > 1.6  # elongated and flattened crystals are common
    assert max(ptp) > 4.0 and min(ptp) < 0.5  # from flat to strongly strained
    assert voids >= 5


def test_photons_are_log_uniform(prior64):
    rng = np.random.default_rng(0)
    photons = np.array([prior64.sample_photons(rng) for _ in range(2000)])
    assert photons.min() >= 1e6 and photons.max() <= 1e9
    np.testing.assert_allclose(np.median(np.log10(photons)), 7.5, atol=0.1)


def test_custom_photon_range(model64):
    prior = CrystalPrior(model64, photons=(1e3, 1e4))
    assert 1e3 <= prior.sample_photons(np.random.default_rng(0)) <= 1e4
