"""The out-of-family crystal generator: seeded, faceted, with the displacement fields it names."""

import numpy as np
import pytest

from bcdi_bluesky.physics import (
    BENCHMARK_SEED,
    DEV_SEED,
    DISPLACEMENT_KINDS,
    SHAPE_KINDS,
    out_of_family_crystal,
    out_of_family_object,
    poisson_chi_floor,
    polyhedron_distance,
)
from bcdi_bluesky.physics._faceted import MAX_EXTENT


def windings(obj: np.ndarray, threshold: float = 0.5) -> int:
    """Grid plaquettes inside the crystal around which the phase winds by +-2 pi."""
    phase = np.angle(obj)
    inside = np.abs(obj) > threshold * np.abs(obj).max()

    def wrap(x):
        return (x + np.pi) % (2 * np.pi) - np.pi

    count = 0
    for a, b in ((0, 1), (0, 2), (1, 2)):
        p = np.moveaxis(phase, (a, b), (0, 1))
        m = np.moveaxis(inside, (a, b), (0, 1))
        loop = (
            wrap(p[1:, :-1] - p[:-1, :-1])
            + wrap(p[1:, 1:] - p[1:, :-1])
            + wrap(p[:-1, 1:] - p[1:, 1:])
            + wrap(p[:-1, :-1] - p[:-1, 1:])
        )
        inner = m[1:, :-1] & m[:-1, :-1] & m[1:, 1:] & m[:-1, 1:]
        count += int(np.count_nonzero(np.abs(loop[inner]) > np.pi))
    return count


def test_same_seed_same_crystal_and_disjoint_seeds():
    a = out_of_family_crystal(BENCHMARK_SEED, 3)
    b = out_of_family_crystal(BENCHMARK_SEED, 3)
    np.testing.assert_array_equal(a.object, b.object)
    np.testing.assert_array_equal(a.measured, b.measured)
    dev = out_of_family_crystal(DEV_SEED, 3)
    assert dev.shape_kind == a.shape_kind  # the kinds follow the index
    assert not np.allclose(np.abs(dev.object), np.abs(a.object))
    assert BENCHMARK_SEED != DEV_SEED


def test_forty_indices_cover_every_shape_and_displacement():
    kinds = {(SHAPE_KINDS[i % 8], DISPLACEMENT_KINDS[(i // 8) % 5]) for i in range(40)}
    assert len(kinds) == 40
    c = out_of_family_crystal(BENCHMARK_SEED, 17)
    assert (c.shape_kind, c.displacement_kind) == ("cube", "inclusion")


@pytest.mark.parametrize("index", [5, 6, 25, 33])  # platelet, rod, two large cubes
def test_oversampled_on_every_axis(index):
    c = out_of_family_crystal(BENCHMARK_SEED, index)
    idx = np.argwhere(np.abs(c.object) > 0)
    extent = idx.max(axis=0) - idx.min(axis=0) + 1
    assert extent.max() <= MAX_EXTENT * c.n
    assert extent.min() >= 6  # a crystal, not a speck


def test_polyhedron_distance_of_a_cube():
    normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1.0]])
    u = np.array([[0, 0, 0], [2, 0, 0], [5, 0, 0], [2, 2, 2]], float).T
    d = polyhedron_distance(u, normals, np.full(6, 3.0))
    np.testing.assert_allclose(d, [3, 1, -2, 1])


def test_amplitude_and_one_voxel_edge():
    rng = np.random.default_rng(0)
    obj = out_of_family_object(rng, 64, "cube", "none", "uniform")
    amp = np.abs(obj)
    assert np.isclose(amp.max(), 1.0) and amp.min() == 0.0
    # The soft edge is one voxel wide: few voxels are partly inside.
    partial = np.count_nonzero((amp > 0.05) & (amp < 0.95))
    assert partial < 0.45 * np.count_nonzero(amp >= 0.95)


@pytest.mark.parametrize(
    "kind, wound",
    [
        ("screw dislocation", True),
        ("edge dislocation", True),
        ("none", False),
        ("polynomial", False),
    ],
)
def test_dislocations_wind_the_phase_by_two_pi(kind, wound):
    hits = [
        windings(
            out_of_family_object(np.random.default_rng(s), 64, "cuboctahedron", kind, "uniform")
        )
        for s in range(3)
    ]
    if wound:
        assert min(hits) >= 3  # the line pierces several plaquettes inside the crystal
    else:
        assert max(hits) == 0


def test_noise_free_and_counts_and_gaps():
    crystals = [out_of_family_crystal(BENCHMARK_SEED, i) for i in range(12)]
    free = [c for c in crystals if c.noise_free]
    counted = [c for c in crystals if not c.noise_free]
    assert free and counted
    for c in free:
        assert poisson_chi_floor(c.measured, c.mask) is None  # not whole numbers
    for c in counted:
        assert 1e5 <= c.photons <= 1e7
        assert np.array_equal(c.measured, np.round(c.measured))
    gapped = [c for c in crystals if c.mask is not None]
    assert gapped and all(np.all(c.measured[~c.mask] == 0) for c in gapped)


def test_bad_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="shape kind"):
        out_of_family_object(np.random.default_rng(0), 64, "sphere", "none", "uniform")
    with pytest.raises(ValueError, match="displacement kind"):
        out_of_family_object(np.random.default_rng(0), 64, "cube", "twist", "uniform")
