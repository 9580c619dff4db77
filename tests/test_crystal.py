import numpy as np
import pytest

from bcdi_bluesky.physics import (
    CrystalModel,
    CrystalPrior,
    cube_symmetry,
    intensity,
    support,
    twin_object,
)


def _sample(prior, seed):
    return prior.sample(np.random.default_rng(seed))


def test_layout_names_bounds_and_round_trip(model64, prior64):
    m = model64
    assert len(m.names) == m.size == len(set(m.names))
    lo, hi = m.bounds
    assert np.all(lo < hi)
    p = _sample(prior64, 1)
    assert np.all((p >= lo) & (p <= hi))
    q = m.normalise(p)
    assert np.all(np.abs(q) <= 1 + 1e-12)
    np.testing.assert_allclose(m.denormalise(q), p, atol=1e-12)
    assert m.structured(p)["radius"] == p[0]
    assert CrystalModel.from_dict(m.to_dict()) == m


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_twin_has_the_same_intensity(model64, prior64, seed):
    p = _sample(prior64, seed)
    obj = model64.voxelise(p)
    twin = model64.voxelise(model64.twin(p))
    # Rendering the twin parameters is the twin of the rendered object, voxel for voxel.
    np.testing.assert_allclose(twin, twin_object(obj), atol=2e-6)
    i0, i1 = intensity(obj), intensity(twin)
    assert np.abs(i1 - i0).max() <= 1e-5 * i0.max()


def test_twin_signs_flip_odd_l_and_even_phase(model64):
    s = model64.twin_signs
    names = model64.names
    assert s[names.index("sh_l3_m0")] == -1 and s[names.index("sh_l2_m0")] == 1
    assert s[names.index("phase_zz")] == -1 and s[names.index("phase_zzz")] == 1
    assert s[names.index("rbf0_cz")] == -1 and s[names.index("rbf0_width")] == 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reflection_signs_mirror_the_object_and_its_intensity(model64, prior64, axis):
    from bcdi_bluesky.physics import mirror

    p = _sample(prior64, 10 + axis)
    obj = model64.voxelise(p)
    mirrored = model64.voxelise(p * model64.reflection_signs(axis))
    np.testing.assert_array_equal(mirrored, mirror(obj, (axis,)))
    i0 = intensity(obj)
    assert np.abs(intensity(mirrored) - mirror(i0, (axis,))).max() <= 1e-5 * i0.max()
    # A mirror is not the identity, and the three mirrors together are the inversion, which
    # differs from the twin exactly by the phase terms (o(-r) vs conj(o(-r))).
    assert np.any(model64.reflection_signs(axis) < 0)
    inversion = np.prod([model64.reflection_signs(a) for a in range(3)], axis=0)
    phase = np.zeros(model64.size, dtype=bool)
    phase[model64.slices["phase"]] = True
    np.testing.assert_array_equal(inversion[~phase], model64.twin_signs[~phase])
    np.testing.assert_array_equal(inversion[phase], -model64.twin_signs[phase])
    with pytest.raises(ValueError, match="axis"):
        model64.reflection_signs(3)


def test_symmetry_matrices_move_the_crystal_with_the_grid(model64):
    # All 48 symmetries of the cube: the matrix's crystal is the transformed object, voxel for
    # voxel, for a strained crystal with voids (every parameter family involved).
    import itertools

    prior = CrystalPrior(model64, rbf_probability=1.0, flat_phase_probability=0.0)
    p = prior.sample(np.random.default_rng(3))
    obj = model64.voxelise(p)
    for perm in itertools.permutations(range(3)):
        for code in range(8):
            flips = tuple(a for a in range(3) if code >> a & 1)
            a = model64.symmetry_matrix(perm, flips)
            np.testing.assert_allclose(a @ a.T, np.eye(model64.size), atol=1e-9)
            moved = model64.voxelise(model64.denormalise(a @ model64.normalise(p)))
            np.testing.assert_allclose(
                moved, cube_symmetry(obj, perm, flips), atol=1e-4, err_msg=f"{perm} {flips}"
            )
    assert not np.allclose(
        model64.symmetry_matrix((1, 2, 0), ()), model64.symmetry_matrix((2, 0, 1), ())
    )
    with pytest.raises(ValueError, match="permutation"):
        model64.symmetry_matrix((0, 0, 1), ())


def test_voxelisation_is_smooth_in_the_parameters(model64, prior64):
    p = _sample(prior64, 5)
    base = model64.voxelise(p)
    changes = []
    for eps in (1e-3, 2e-3, 4e-3):
        q = p.copy()
        q[0] += eps * 0.01  # radius
        changes.append(np.linalg.norm(model64.voxelise(q) - base))
    # A soft edge makes the change grow linearly, not jump by whole voxels.
    assert 0 < changes[0] < changes[1] < changes[2]
    np.testing.assert_allclose(changes[2] / changes[0], 4.0, rtol=0.25)


def test_phase_is_the_documented_polynomial_of_u(model64, prior64):
    """phi = sum_e c_e u_z^a u_y^b u_x^c with u = r / r0, at every rendered voxel, on the
    half-size grid that the coarse refinement uses too."""
    for model in (model64, model64.with_grid(32)):
        for seed in range(3):
            p = _sample(prior64, seed)
            coefficients = p[model.slices["phase"]]
            coefficients[:] = np.random.default_rng(seed).uniform(-3, 3, coefficients.size)
            rendered = model.render(p)
            centre = model.n // 2
            u = (np.stack(np.unravel_index(rendered.flat_index, (model.n,) * 3)) - centre) / (
                p[0] * model.n
            )
            expected = sum(
                c * u[0] ** a * u[1] ** b * u[2] ** e
                for c, (a, b, e) in zip(coefficients, model.phase_exponents, strict=True)
            )
            np.testing.assert_allclose(rendered.phase, expected, atol=1e-4 * np.abs(expected).max())


def test_object_is_centred_complex64_and_inside_the_grid(model64, prior64):
    for seed in range(10):
        obj = model64.voxelise(_sample(prior64, seed))
        assert obj.dtype == np.complex64 and obj.shape == (64, 64, 64)
        idx = np.argwhere(support(obj, 0.01))
        assert idx.min() >= 2 and idx.max() <= 61
        centre = idx.mean(axis=0)
        assert np.all(np.abs(centre - 32) < 6)


def test_same_crystal_on_another_grid(model64, prior64):
    p = _sample(prior64, 7)
    small = support(model64.voxelise(p)).sum()
    big = support(model64.with_grid(128).voxelise(p)).sum()
    np.testing.assert_allclose(big / small, 8.0, rtol=0.1)


def test_bad_parameter_vectors_are_clear_errors(model64):
    with pytest.raises(ValueError, match="shape"):
        model64.voxelise(np.zeros(3))
    p = np.zeros(model64.size)
    p[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model64.voxelise(p)
    with pytest.raises(ValueError, match="lmax"):
        CrystalModel(lmax=99)
    with pytest.raises(ValueError, match="lmax"):
        CrystalModel(lmax=1)
