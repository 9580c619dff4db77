import numpy as np
import pytest
import scipy.ndimage

from bcdi_bluesky.physics import (
    DEV_SEED,
    NOISE_FREE_LEVEL,
    align,
    autocorrelation_noise,
    check_volume,
    chi,
    compare_objects,
    complex_overlap,
    fourier_shift,
    intensity,
    out_of_family_crystal,
    phase_rms,
    poisson_chi_floor,
    poisson_nll,
    r_factor,
    simulate_counts,
    support,
    support_iou,
    twin_object,
)


@pytest.fixture(scope="module")
def crystal(model64, prior64):
    p = prior64.sample(np.random.default_rng(42))
    return model64.voxelise(p)


def test_perfect_against_itself_its_twin_and_a_shifted_copy(crystal):
    ramp = np.exp(1j * (0.3 * np.indices(crystal.shape)[2] * 2 * np.pi / 64 + 1.1))
    for other in (
        crystal,
        twin_object(crystal),
        np.roll(crystal, (4, -3, 6), axis=(0, 1, 2)) * np.exp(0.7j),
        crystal * ramp.astype(np.complex64),
    ):
        c = compare_objects(crystal, other)
        assert c.iou == pytest.approx(1.0)
        assert c.overlap == pytest.approx(1.0, abs=1e-5)
        assert c.phase_rms == pytest.approx(0.0, abs=1e-3)
        assert c.ssim == pytest.approx(1.0, abs=1e-6)
    i = intensity(crystal)
    assert chi(i, i) == pytest.approx(0.0, abs=1e-6)
    assert chi(intensity(twin_object(crystal)), i) == pytest.approx(0.0, abs=1e-5)
    assert r_factor(3.0 * i, i) == pytest.approx(0.0, abs=1e-6)


def test_subvoxel_alignment_of_a_strongly_strained_crystal(crystal):
    # A phase that changes by up to 1.6 rad per voxel (no ramp can absorb a shift of it): a
    # third of a voxel of translation alone puts it off by ~0.4 rad, which whole voxels keep.
    n = np.indices(crystal.shape) * (2 * np.pi / 12)
    # Band-limited, as a reconstruction from data is (a sharp edge rings when shifted).
    amplitude = scipy.ndimage.gaussian_filter(np.abs(crystal), 0.7)
    strained = amplitude * np.exp(3j * (np.sin(n[0]) + np.cos(n[1])))
    strained = strained.astype(np.complex64)
    shift = (2.3, -1.35, 0.4)
    moved = fourier_shift(twin_object(strained), shift)
    # The Fourier shift is the circular shift for whole voxels.
    np.testing.assert_allclose(
        fourier_shift(strained, (2, -1, 0)), np.roll(strained, (2, -1, 0), (0, 1, 2)), atol=1e-5
    )
    whole = phase_rms(strained, align(strained, moved), aligned=True)
    exact = phase_rms(strained, align(strained, moved, subvoxel=True), aligned=True)
    assert whole > 0.3
    assert exact < 0.1 * whole
    assert complex_overlap(strained, align(strained, moved, subvoxel=True)) > 0.995


def test_sphere_of_the_same_volume_scores_clearly_worse(model64, crystal):
    volume = support(crystal).sum()
    p = np.zeros(model64.size)
    p[0] = (3 * volume / (4 * np.pi)) ** (1 / 3) / 64
    p[model64.slices["rbf_width"]] = 0.5
    sphere = model64.voxelise(p)
    c = compare_objects(crystal, sphere)
    assert c.iou < 0.85 and c.overlap < 0.9
    assert chi(intensity(sphere), intensity(crystal)) > 0.2


def test_hand_computed_values():
    measured = np.zeros((2, 2, 2), dtype=np.float32)
    model = np.zeros((2, 2, 2), dtype=np.float32)
    measured.flat[:2] = [4.0, 1.0]  # amplitudes b = [2, 1]
    model.flat[:2] = [1.0, 4.0]  # amplitudes a = [1, 2]
    # s = <a,b>/<a,a> = 4/5; residual = [4/5-2, 8/5-1] = [-6/5, 3/5]
    assert chi(model, measured) == pytest.approx(np.sqrt(36 / 25 + 9 / 25) / np.sqrt(5))
    assert r_factor(model, measured) == pytest.approx((6 / 5 + 3 / 5) / 3)
    mask = np.ones((2, 2, 2), dtype=bool)
    mask.flat[1] = False  # only voxel 0 (and the zeros) remain: a perfect fit
    assert chi(model, measured, mask) == pytest.approx(0.0)
    counts = np.zeros((2, 2, 2), dtype=np.float32)
    counts.flat[:2] = [2.0, 0.0]
    lam = np.maximum(model.ravel().astype(float) * 2 / 5, 1e-6)
    k = counts.ravel().astype(float)
    expected = np.mean(lam - k * np.log(lam) + np.log([2, 1, 1, 1, 1, 1, 1, 1]))
    assert poisson_nll(model, counts) == pytest.approx(expected)
    a = np.array([1, 1j, 0]).reshape(1, 1, 3)
    assert complex_overlap(a, a * 1j) == pytest.approx(1.0)


def test_phase_rms_sees_a_strain_difference(crystal):
    idx = np.indices(crystal.shape) - 32
    strained = crystal * np.exp(1j * 0.004 * (idx[0] ** 2)).astype(np.complex64)
    assert 0.05 < phase_rms(crystal, strained) < 1.0
    assert support_iou(crystal, strained) == pytest.approx(1.0)
    assert align(crystal, strained).dtype == np.complex64


def test_bad_inputs_are_clear_errors():
    good = np.ones((4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="3D"):
        check_volume(np.ones((4, 4)))
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        chi(good, bad)
    with pytest.raises(ValueError, match="negative"):
        chi(good, -good)
    with pytest.raises(ValueError, match="shape"):
        chi(good, np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="mask"):
        chi(good, good, mask=np.ones((2, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        check_volume(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="complex"):
        check_volume(good.astype(np.complex64))
    big_endian = good.astype(">f4")
    assert check_volume(big_endian).dtype.byteorder in ("=", "<", "|")


def test_poisson_chi_floor_is_the_chi_of_the_truth_against_its_counts(crystal):
    truth = intensity(crystal)
    # The floor is the truth's chi, underestimated where many voxels hold only a few photons
    # (it errs towards "not yet down to the noise"): by about 20% at 1e8 photons in 64^3.
    for photons, low in ((1e8, 0.75), (1e9, 0.75), (1e6, 0.3)):
        counts = simulate_counts(crystal, photons, np.random.default_rng(int(photons)))
        floor = poisson_chi_floor(counts)
        assert floor is not None
        assert low * chi(truth, counts) <= floor <= 1.05 * chi(truth, counts)
    mask = np.ones(counts.shape, dtype=bool)
    mask[:, :8] = False
    assert poisson_chi_floor(counts, mask) == pytest.approx(floor, rel=0.05)
    # Not counts (corrected, rescaled, empty): the noise is unknown.
    assert poisson_chi_floor(counts * 1.37) is None
    assert poisson_chi_floor(np.zeros((4, 4, 4))) is None
    # Normalised data round to zero, float32 beyond 2^24 rounds to whole numbers: not counts.
    assert poisson_chi_floor((counts / 1e13).astype(np.float32)) is None
    assert poisson_chi_floor((counts * 1e30).astype(np.float32)) is None


def test_autocorrelation_noise_tells_noise_free_data_from_noisy_data(crystal):
    """Noise-free intensities, in any units, with a detector gap or filling half the field of
    view, stay below NOISE_FREE_LEVEL; counts, rescaled counts (not whole numbers) and
    corrected measured-like data stay above it, with a level near 1 / sqrt(photons)."""
    truth = intensity(crystal)
    gapped = out_of_family_crystal(DEV_SEED, 1)
    assert gapped.noise_free and gapped.mask is not None
    n = 64
    x = np.indices((n, n, n)) - n // 2
    cube = (np.abs(x) < n // 4).all(axis=0) * np.exp(0.4j * x[0] / n)
    for quiet in (
        truth,
        truth / truth.max(),
        truth.astype(np.float64) * 1e13,
        intensity(cube.astype(np.complex64)),
    ):
        assert autocorrelation_noise(quiet) < 0.1 * NOISE_FREE_LEVEL
    assert autocorrelation_noise(gapped.measured, gapped.mask) < 0.1 * NOISE_FREE_LEVEL
    # Garbage in the gap is left out by the mask.
    garbage = np.where(gapped.mask, gapped.measured, 1e3 * gapped.measured.max())
    assert autocorrelation_noise(garbage, gapped.mask) < 0.1 * NOISE_FREE_LEVEL
    for photons in (1e6, 1e8, 1e10):
        counts = simulate_counts(crystal, photons, np.random.default_rng(int(photons)))
        level = autocorrelation_noise(counts)
        assert level > 3 * NOISE_FREE_LEVEL
        assert 0.1 < level * photons**0.5 < 10
        assert autocorrelation_noise(counts * 1.37) == pytest.approx(level, rel=1e-4)
    with pytest.raises(ValueError):
        autocorrelation_noise(np.zeros((8, 8, 8)))
