import numpy as np
import pytest

from bcdi_bluesky.physics import intensity, scale_to_photons
from bcdi_bluesky.preprocess import (
    fit_to_grid,
    network_input,
    peak_position,
    remove_hot_pixels,
)


@pytest.fixture(scope="module")
def pattern(model64, prior64):
    p = prior64.sample(np.random.default_rng(8))
    p[model64.slices["phase"]] = 0.0
    return scale_to_photons(intensity(model64.voxelise(p)), 1e8)


def test_off_centre_peak_is_centred(pattern):
    moved = np.roll(pattern, (5, -7, 3), axis=(0, 1, 2))
    prepared = fit_to_grid(moved, 64)
    assert prepared.shift == (-5, 7, -3)
    assert peak_position(prepared.intensity) == (32, 32, 32)
    assert prepared.mask is None


def test_larger_volume_is_cropped_and_smaller_padded(pattern):
    big = np.zeros((96, 80, 72), dtype=np.float32)
    big[10:74, 8:72, 4:68] = pattern
    prepared = fit_to_grid(big, 64)
    assert prepared.intensity.shape == (64, 64, 64)
    np.testing.assert_allclose(prepared.intensity, pattern)
    small = pattern[8:56, 8:56, 8:56]
    padded = fit_to_grid(small, 64)
    assert padded.mask is not None and padded.mask.sum() == 48**3
    assert padded.intensity[~padded.mask].sum() == 0


def test_network_input_is_log_scaled_to_unit_range(pattern):
    x = network_input(pattern)
    assert x.dtype == np.float32 and x.max() == pytest.approx(1.0) and x.min() >= 0
    mask = np.ones(pattern.shape, dtype=bool)
    mask[:, :, :5] = False
    assert network_input(pattern, mask)[:, :, :5].max() == 0


def test_a_hot_pixel_is_masked_and_not_taken_for_the_peak(pattern):
    hot = pattern.copy()
    hot[3, 4, 5] = pattern.max() * 50
    assert peak_position(hot) == (32, 32, 32)
    valid = remove_hot_pixels(hot)
    assert not valid[3, 4, 5] and valid.sum() == hot.size - 1
    # A mask that already leaves the hot pixels out is not searched again: the same peak,
    # and the same centring, but a hot pixel it leaves in is taken for the peak.
    assert peak_position(hot, valid, hot_pixels_masked=True) == (32, 32, 32)
    once, twice = fit_to_grid(hot, 64, valid, hot_pixels_masked=True), fit_to_grid(hot, 64, valid)
    assert once.shift == twice.shift and np.array_equal(once.intensity, twice.intensity)
    assert peak_position(hot, hot_pixels_masked=True) == (3, 4, 5)


def test_measured_scan_is_centred(scan54_64):
    prepared = fit_to_grid(scan54_64, 64)
    assert prepared.shift == (0, 0, 0)
    x = network_input(prepared.intensity)
    assert x.shape == (64, 64, 64) and np.isfinite(x).all()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="3D"):
        fit_to_grid(np.ones((8, 8)), 64)
    with pytest.raises(ValueError, match="negative"):
        fit_to_grid(-np.ones((8, 8, 8)), 64)
    with pytest.raises(ValueError, match="mask"):
        fit_to_grid(np.ones((8, 8, 8)), 64, mask=np.ones((4, 4, 4), dtype=bool))


def test_data_that_are_not_counts_reach_the_network_at_a_trained_photon_level():
    """log(1 + I) depends on the scale: counts keep theirs, other data are brought into the
    prior's photon range (a volume normalised to 1 is not shown as a linear map)."""
    from bcdi_bluesky.physics import PRIOR_PHOTONS
    from bcdi_bluesky.preprocess import at_photon_level

    rng = np.random.default_rng(0)
    pattern = rng.random((8, 8, 8)).astype(np.float32)
    low, high = PRIOR_PHOTONS
    normalised = pattern / pattern.max()
    assert at_photon_level(normalised, counts=True) is normalised
    assert at_photon_level(normalised, counts=False).sum() == pytest.approx(low, rel=1e-5)
    huge = pattern * np.float32(1e13 / pattern.sum())
    assert at_photon_level(huge, counts=False).sum() == pytest.approx(high, rel=1e-5)
    inside = pattern * np.float32(1e8 / pattern.sum())
    assert at_photon_level(inside, counts=False) is inside
    mask = np.ones(pattern.shape, dtype=bool)
    mask[:, :, :4] = False  # the total counts the valid voxels only
    scaled = at_photon_level(normalised, mask, counts=False)
    assert scaled[mask].sum() == pytest.approx(low, rel=1e-5)


def test_saturated_counts_are_masked_in_files_and_arrays(tmp_path, caplog):
    """Voxels at an unsigned type's largest value (the detector saturated) are invalid, from a
    file and from an array; float data are never judged without a max_count."""
    from bcdi_bluesky.io import read_intensity
    from bcdi_bluesky.pipeline import prepare_measurement
    from bcdi_bluesky.preprocess import saturation_mask

    grids = np.indices((32, 32, 32)) - 16
    peak = 200000.0 * np.exp(-(grids**2).sum(axis=0) / 8.0) + 2
    counts = np.minimum(peak, 65535).astype(np.uint16)
    hit = counts == 65535
    assert 0 < hit.sum() < 100
    np.testing.assert_array_equal(saturation_mask(counts), ~hit)
    assert saturation_mask(counts.astype(np.float32)) is None
    np.testing.assert_array_equal(saturation_mask(counts.astype(np.float32), 65535), ~hit)
    assert saturation_mask(np.ones((4, 4, 4), dtype=np.uint16)) is None
    np.save(tmp_path / "scan.npy", counts)
    _, mask = read_intensity(tmp_path / "scan.npy")
    np.testing.assert_array_equal(mask, ~hit)
    assert f"{hit.sum()} voxels at the integer type's maximum (saturated) masked" in caplog.text
    valid = prepare_measurement(counts, None, 32).valid
    assert not valid[hit].any()
