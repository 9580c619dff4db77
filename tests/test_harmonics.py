import numpy as np
import pytest
import scipy.special

from bcdi_bluesky.physics import (
    LMAX_LIMIT,
    fibonacci_directions,
    grid_table,
    real_sph_harm,
    sh_index,
)


def test_matches_scipy_complex_harmonics():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(200, 3))
    y = real_sph_harm(8, d)
    n = d / np.linalg.norm(d, axis=1, keepdims=True)
    theta, phi = np.arccos(n[:, 0]), np.arctan2(n[:, 1], n[:, 2])
    for l in range(9):
        for m in range(-l, l + 1):
            c = scipy.special.sph_harm_y(l, abs(m), theta, phi)
            if m == 0:
                ref = c.real
            else:
                ref = np.sqrt(2) * (-1) ** m * (c.real if m > 0 else c.imag)
            np.testing.assert_allclose(y[sh_index(l, m)], ref, atol=1e-12)


def test_orthonormal_on_the_sphere():
    d = fibonacci_directions(20000)
    y = real_sph_harm(6, d)
    gram = y @ y.T * (4 * np.pi / d.shape[0])
    np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=2e-3)


@pytest.mark.parametrize("lmax", [-1, LMAX_LIMIT + 1, 2.5, True])
def test_lmax_out_of_range_is_a_clear_error(lmax):
    with pytest.raises(ValueError, match="lmax"):
        real_sph_harm(lmax, np.ones((3, 3)))


def test_grid_table_is_cached_sorted_and_read_only():
    t = grid_table(32, 4)
    assert grid_table(32, 4) is t
    assert np.all(np.diff(t.radius) >= 0)
    assert t.harmonics.shape == (25, t.radius.size)
    assert t.prefix(5.0) == np.count_nonzero(t.radius < 5.0)
    with pytest.raises(ValueError):
        t.radius[0] = 1.0
