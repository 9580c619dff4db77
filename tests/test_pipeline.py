"""The Reconstructor on simulated crystals with known truth and on the measured data sets."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
from builders import GENEROUS_BUDGETS

from bcdi_bluesky import ReconstructionSettings, Reconstructor, pipeline
from bcdi_bluesky.errors import DataError, SettingsError
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.physics import (
    DEV_SEED,
    CrystalPrior,
    chi,
    compare_objects,
    detector_gap_mask,
    intensity,
    out_of_family_crystal,
    r_factor,
)
from bcdi_bluesky.pipeline import TIMING_KEYS, polish_stage, prepare_measurement
from bcdi_bluesky.quality import CHI_GOOD
from bcdi_bluesky.settings import CONVERGED_NEAR
from bcdi_bluesky.tuning import polish


@pytest.fixture(scope="module")
def rec():
    # Generous time budgets: the iteration counts, not the load of the test machine, decide.
    return Reconstructor(**GENEROUS_BUDGETS)


@pytest.fixture(scope="module")
def samples(rec):
    prior = CrystalPrior(rec.model)
    return [make_sample(rec.model, prior, 777, TEST_STREAM, i, 1e8) for i in range(3)]


def test_full_pipeline_recovers_simulated_crystals(rec, samples):
    for s in samples:
        truth = rec.model.voxelise(s.params)
        stages: list[tuple[str, dict]] = []
        result = rec.reconstruct(
            s.counts,
            refine="full",
            progress=lambda stage, info, seen=stages: seen.append((stage, info)),
        )
        assert [st for st, _ in stages if not st.endswith("_step")] == [
            "preprocess",
            "inference",
            "refine",
            "preview",
            "polish",
            "done",
        ]
        # The preview is the model fit on the input grid, with the result's support rule.
        preview = next(info for st, info in stages if st == "preview")
        assert preview["object"].shape == s.counts.shape
        assert preview["support"].shape == s.counts.shape and preview["support"].any()
        assert preview["chi"] == pytest.approx(result.stage_chi["es"])
        assert compare_objects(truth, preview["object"]).iou >= 0.6
        assert result.object.shape == s.counts.shape and result.object.dtype == np.complex64
        assert result.support.shape == s.counts.shape and result.support.dtype == bool
        assert result.stage_chi["es"] < result.stage_chi["cnn"]
        assert result.chi < result.stage_chi["es"]
        assert compare_objects(truth, result.object).iou >= 0.8
        assert result.chi == pytest.approx(chi(intensity(result.object), s.counts), rel=1e-3)
        assert tuple(result.timings) == TIMING_KEYS
        assert (
            result.timings["network"] + result.timings["twin_choice"]
            <= (result.timings["inference"])
        )
        assert result.polish_recipe in result.polish_attempts
        assert result.chi == pytest.approx(min(result.polish_attempts.values()), rel=1e-6)
        assert result.summary()["polish_recipe"] == result.polish_recipe
        assert result.provider == "CPUExecutionProvider"


def test_cnn_only_and_es_modes(rec, samples):
    s = samples[0]
    none = rec.reconstruct(s.counts, refine="none")
    stages: list[str] = []
    es = rec.reconstruct(s.counts, refine="es", progress=lambda st, info: stages.append(st))
    assert "preview" not in stages  # nothing to preview without a polish
    assert none.es_costs == [] and none.timings["refine"] == 0.0
    assert es.chi < none.chi and len(es.es_costs) > 0
    assert es.polish_errors == [] and es.timings["polish"] == 0.0
    assert none.params.shape == (rec.model.size,)
    assert none.params_structured["radius"] == none.params[0]


def test_result_lives_on_the_input_grid(rec, samples):
    s = samples[1]
    # A larger, off-centre volume, as a detector delivers it: 64^3 of measured q inside 96^3.
    big = np.zeros((96, 96, 96), dtype=np.float32)
    big[16:80, 16:80, 16:80] = s.counts
    big = np.roll(big, (3, -5, 2), axis=(0, 1, 2))
    result = rec.reconstruct(big, refine="es")
    assert result.object.shape == big.shape and result.shift == (-3, 5, -2)
    # The model's far field sits where the input's peak is: chi on the input grid is as
    # good as on the model grid.
    assert chi(intensity(result.object), big) < result.stage_chi["es"] + 0.02
    # Same field of view on a finer grid: the crystal rendered at 96^3 is the truth.
    truth = rec.model.with_grid(96).voxelise(s.params)
    assert compare_objects(truth, result.object).iou > 0.6


def test_masked_detector_gap(rec, samples):
    s = samples[2]
    mask = detector_gap_mask(s.counts.shape, axis=2, start=42, width=3)
    counts = np.where(mask, s.counts, 0.0).astype(np.float32)
    result = rec.reconstruct(counts, mask=mask, refine="full")
    truth = rec.model.voxelise(s.params)
    assert compare_objects(truth, result.object).iou >= 0.75
    assert result.chi == pytest.approx(chi(intensity(result.object), counts, mask), rel=1e-3)


def test_tracking_starts_from_the_previous_scan(samples):
    rec = Reconstructor(
        track=True, es_coarse_iterations=100, es_fine_iterations=20, es_time_budget_s=30.0
    )
    s = samples[0]
    first = rec.reconstruct(s.counts, refine="es")
    assert rec.previous_params is first.params
    second = rec.reconstruct(s.counts, refine="es")
    assert second.stage_chi["es"] <= first.stage_chi["es"] + 1e-6


@pytest.mark.parametrize("name, bound", [("scan54", 0.20), ("cdinn", 0.095)])
def test_measured_data_sets(rec, name, bound, scan54_64, cdinn_64):
    """r_factor bounds: the median of three random cohere starts (620 iterations each) was
    0.194-0.199 (scan 54) and 0.091-0.094 (3D-CDI-NN crop) in two benchmark runs
    (docs/benchmarks.md); the bounds sit at or just above that. Ours is deterministic, 0.151
    and 0.067; the margin is for other FFT and BLAS builds. The CNN alone is above 0.4."""
    data = scan54_64 if name == "scan54" else cdinn_64
    result = rec.reconstruct(data, refine="full")
    assert r_factor(intensity(result.object), data) < bound
    assert result.stage_chi["es"] < result.stage_chi["cnn"]
    assert 200 < result.support.sum() < 20000


@pytest.mark.parametrize(
    "volume, match",
    [
        (np.ones((8, 8)), "3D"),
        (np.full((8, 8, 8), np.nan), "NaN"),
        (-np.ones((8, 8, 8)), "negative"),
        (np.zeros((8, 8, 8)), "empty"),
    ],
)
def test_bad_input_is_a_clear_error(rec, volume, match):
    with pytest.raises(ValueError, match=match):
        rec.reconstruct(volume)


def test_bad_geometry_or_settings_are_refused_before_any_work(rec, samples, monkeypatch):
    import bcdi_bluesky.pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the reconstruction started")

    monkeypatch.setattr(bcdi_bluesky.pipeline, "prepare_measurement", no_work)
    counts = samples[0].counts
    with pytest.raises(DataError, match="geometry must be a Geometry or a mapping"):
        rec.reconstruct(counts, geometry="geometry.json")
    with pytest.raises(DataError, match="geometry: geometry lacks"):
        rec.reconstruct(counts, geometry={"beamline": "aps_34idc"})
    with pytest.raises(SettingsError, match="settings must be ReconstructionSettings"):
        rec.reconstruct(counts, settings={"track": True})
    with pytest.raises(SettingsError, match="settings must be ReconstructionSettings"):
        Reconstructor(settings={"track": True})


def test_bad_mask_or_mode_is_a_clear_error(rec, samples):
    with pytest.raises(ValueError, match="mask"):
        rec.reconstruct(samples[0].counts, mask=np.ones((4, 4, 4), dtype=bool))
    with pytest.raises(SettingsError, match="refine must be one of"):
        rec.reconstruct(samples[0].counts, refine="fast")


@pytest.mark.timeout(600)
def test_same_input_same_result_under_cpu_load():
    """Stopping is by iteration counts and convergence: the same counts, twice and as int32,
    give identical results while another process keeps a core busy."""
    crystal = out_of_family_crystal(DEV_SEED, 9)  # strained: the fit-driven polish spends more
    settings = ReconstructionSettings(
        shape_search_evaluations=40,
        es_coarse_iterations=80,
        es_fine_iterations=20,
        polish_er_iterations=20,
        polish_iterations=40,
        adaptive_iterations=60,
        converge_iterations=40,
    )
    rec = Reconstructor(settings=settings)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runs = [
            rec.reconstruct(crystal.measured),
            rec.reconstruct(crystal.measured),
            rec.reconstruct(crystal.measured.astype(np.int32)),
        ]
    finally:
        load.kill()
        load.wait(timeout=10)
    if any(r.cut_short for r in runs):
        # Only a safety cap makes a result depend on the load, and a cut result says so.
        pytest.skip(f"the machine is so loaded that a safety cap cut {runs[0].cut_short}")
    first = runs[0]
    assert len(first.polish_attempts) > 1
    # Counts: no ER on a loosened support (its halo would fit the noise).
    assert not any(LOOSENED in label for label in first.polish_attempts)
    for other in runs[1:]:
        np.testing.assert_array_equal(other.object, first.object)
        np.testing.assert_array_equal(other.params, first.params)
        assert other.chi == first.chi and other.stage_chi == first.stage_chi
        assert other.polish_attempts == first.polish_attempts
        assert (other.quality, other.quality_reasons) == (first.quality, first.quality_reasons)


LOOSENED = " +ER on the loosened support"


@pytest.mark.timeout(300)
def test_noise_free_data_fit_the_soft_edge():
    """Noise-free data: the polish ends with ER steps on its support grown by two voxels, which
    fit the crystal's soft edge that the shrink-wrap cuts: R-factor <= 0.01."""
    crystal = out_of_family_crystal(DEV_SEED, 2, n=64)
    exact = intensity(crystal.object).astype(np.float64)
    data = exact * (1e8 / exact.sum())
    result = Reconstructor().reconstruct(data)
    assert result.polish_recipe.endswith(LOOSENED)
    before = result.polish_attempts[result.polish_recipe.removesuffix(LOOSENED)]
    assert result.chi < 0.5 * before
    assert r_factor(intensity(result.object), data) <= 0.01
    assert compare_objects(crystal.object, result.object).iou >= 0.9


@pytest.mark.timeout(180)
def test_the_run_to_convergence_goes_on_every_other_q_then_where_needed_on_the_full_grid(
    monkeypatch,
):
    """Noise-free data of a crystal within half the field of view, seeded by its blurred self:
    the run to convergence goes on every other q first and ends just above the fit target,
    within ``CONVERGED_NEAR`` of it, so it is kept; with a stricter rule the run goes on the
    full grid as well, the lower chi wins, and here that is the same run (the full grid's
    ended no lower)."""
    crystal = out_of_family_crystal(DEV_SEED, 24)
    assert crystal.noise_free and crystal.mask is None
    blurred = scipy.ndimage.gaussian_filter(crystal.object.real, 1.0) + 1j * (
        scipy.ndimage.gaussian_filter(crystal.object.imag, 1.0)
    )
    settings = ReconstructionSettings(
        polish_er_iterations=20,
        polish_iterations=40,
        adaptive_iterations=0,
        uniform_amplitude_iterations=0,
        loose_support_iterations=0,
    )
    grids = []  # the grid of every run stopped at convergence

    def recorded(data, *args, **options):
        if options.get("tolerance"):
            grids.append(data.shape)
        return polish(data, *args, **options)

    monkeypatch.setattr(pipeline, "polish", recorded)
    measurement = prepare_measurement(crystal.measured, None, 64)
    outcomes = {}
    for near, expected_grids in ((CONVERGED_NEAR, [(32, 32, 32)]), (1.0, [(32,) * 3, (64,) * 3])):
        monkeypatch.setattr(pipeline, "CONVERGED_NEAR", near)
        grids.clear()
        outcomes[near] = polish_stage(measurement, blurred.astype(np.complex64), settings)
        assert grids == expected_grids
    kept, stricter = outcomes[CONVERGED_NEAR], outcomes[1.0]
    first, converged = kept.attempts.values()
    assert kept.chi == converged < 0.5 * first
    assert CHI_GOOD < converged <= CONVERGED_NEAR * CHI_GOOD
    assert stricter.chi == kept.chi and np.array_equal(stricter.object, kept.object)
    assert compare_objects(crystal.object, kept.object).iou >= 0.95


@pytest.mark.timeout(120)
def test_corrected_data_with_noise_are_not_run_to_convergence(rec, monkeypatch):
    """Counts rescaled by a correction (not whole numbers: no Poisson floor) keep their noise,
    which the data's autocorrelation shows: no run to convergence (it would fit the noise),
    the held steps on every other q, and still the ER on the loosened support; the same
    crystal's noise-free intensity is known noise-free."""
    crystal = out_of_family_crystal(DEV_SEED, 0)
    assert not crystal.noise_free
    corrected = crystal.measured * 1.37
    measurement = prepare_measurement(corrected, crystal.mask, 64)
    assert not measurement.counts and not measurement.noise_free
    exact = intensity(crystal.object).astype(np.float64)
    assert prepare_measurement(exact * (1e8 / exact.sum()), None, 64).noise_free
    assert not prepare_measurement(crystal.measured, crystal.mask, 64).noise_free  # counts
    held = []  # the grid of every run with the amplitude held

    def recorded(data, *args, **options):
        if options.get("uniform_interior") is not None:
            held.append(data.shape)
        return polish(data, *args, **options)

    monkeypatch.setattr(pipeline, "polish", recorded)
    result = rec.reconstruct(corrected, crystal.mask)
    assert not any("to convergence" in label for label in result.polish_attempts)
    assert any(label.endswith(LOOSENED) for label in result.polish_attempts)
    assert held and all(shape == (32, 32, 32) for shape in held)
    assert compare_objects(crystal.object, result.object).iou >= 0.85


def test_the_cnn_estimate_does_not_depend_on_the_units_of_noise_free_data(rec):
    """Noise-free data in arbitrary units (normalised to 1, or 1e13 in total) give the CNN the
    estimate it makes at the nearest trained photon level."""
    crystal = out_of_family_crystal(DEV_SEED, 4, n=64)
    exact = intensity(crystal.object).astype(np.float64)

    def iou(data):
        return compare_objects(crystal.object, rec.reconstruct(data, refine="none").object).iou

    assert iou(exact / exact.max()) == pytest.approx(iou(exact * (1e6 / exact.sum())), abs=0.01)
    assert iou(exact * (1e13 / exact.sum())) == pytest.approx(
        iou(exact * (1e9 / exact.sum())), abs=0.01
    )
    assert iou(exact / exact.max()) >= 0.75


def test_summary_carries_the_verdict(rec, samples):
    result = rec.reconstruct(samples[0].counts, refine="none")
    summary = result.summary()
    assert summary["quality"] == result.quality and summary["quality"] in ("good", "fair", "poor")
    assert summary["quality_reasons"] == result.quality_reasons
    # The CNN alone does not fit 1e8-photon counts down to the noise: never "good".
    assert result.quality != "good" and any("Poisson noise" in r for r in result.quality_reasons)
    assert json.loads(json.dumps(summary))["quality"] == result.quality


@pytest.mark.timeout(400)
def test_partial_coherence_recovers_a_crystal_measured_with_a_blurred_beam():
    """A crystal whose intensity a partially coherent beam blurred (Gaussian, 1 pixel): the
    coherent model cannot fit it; the kernel can, and the crystal comes out right (measured
    IoU 0.86 with the kernel, 0.73 without)."""
    crystal = out_of_family_crystal(DEV_SEED, 2, n=64)
    blurred = scipy.ndimage.gaussian_filter(
        intensity(crystal.object).astype(np.float64), 1.0, mode="wrap"
    )
    counts = np.random.default_rng(2).poisson(blurred * 1e8 / blurred.sum()).astype(np.float32)
    coherent = Reconstructor().reconstruct(counts)
    partial = Reconstructor(partial_coherence=True).reconstruct(counts)
    assert coherent.coherence_kernel is None
    assert coherent.summary()["coherence_kernel_peak"] is None
    assert partial.chi < 0.6 * coherent.chi
    assert compare_objects(crystal.object, partial.object).iou >= 0.85
    assert compare_objects(crystal.object, partial.object).iou > (
        compare_objects(crystal.object, coherent.object).iou + 0.1
    )
    kernel = partial.coherence_kernel
    assert kernel.shape == counts.shape and kernel.sum() == pytest.approx(1.0, rel=1e-4)
    # A 1-pixel Gaussian peaks at (2 pi)^-1.5 = 0.063 on the grid.
    assert 0.03 < partial.summary()["coherence_kernel_peak"] < 0.12


@pytest.mark.timeout(200)
def test_a_crystal_too_small_for_an_interior_skips_the_uniform_amplitude_run():
    """Noise-free data of a crystal 3 voxels across with a winding phase: the fit stays above
    the target, so every further run goes, but there is no interior to hold uniform (it
    raised an IndexError from an empty median); the result comes back, rated poor. Run with the
    starts on every q: on every other q their winner holds more than 27 voxels, and the verdict
    rates that `fair` on its fit (chi 0.013) instead."""
    n = 32
    z, y, x = np.indices((n, n, n)) - n // 2
    radius = np.sqrt(x**2 + y**2 + z**2)
    crystal = ((radius < 1.5) * np.exp(1j * np.arctan2(y, x))).astype(np.complex64)
    rec = Reconstructor(starts_subsampling=False)
    result = rec.reconstruct(intensity(crystal).astype(np.float32) * 1e3)
    assert any(k.startswith("random start 1 ER/HIO") for k in result.polish_attempts)
    assert not any("uniform amplitude" in label for label in result.polish_attempts)
    assert result.quality == "poor"


@pytest.mark.timeout(300)
def test_a_poor_fit_is_rescued_by_starts_of_cohere_recipe(rec):
    """A polynomially strained rod (a development crystal) whose polish keeps half of it and
    ends poor: the rescue starts (shrink-wrap after every step, 87% HIO, on the full grid, each
    with its uniform-amplitude run) fit it lower and find the whole crystal; without them it
    stays poor."""
    crystal = out_of_family_crystal(DEV_SEED, 54)
    results = {
        starts: rec.reconstruct(
            crystal.measured,
            crystal.mask,
            settings=ReconstructionSettings(**{**GENEROUS_BUDGETS, "rescue_starts": starts}),
        )
        for starts in (0, 3)
    }
    plain, rescued = results[0], results[3]
    assert plain.quality == "poor" and not plain.polish_recipe.startswith("rescue")
    assert compare_objects(crystal.object, plain.object).iou < 0.6
    assert rescued.polish_recipe.startswith("rescue start")
    assert rescued.chi < 0.8 * plain.chi
    assert rescued.quality != "poor"
    assert compare_objects(crystal.object, rescued.object).iou > 0.8
    labels = [label for label in rescued.polish_attempts if label.startswith("rescue")]
    assert len(labels) == 6  # each start, and each with its uniform-amplitude run
    # Measured at 64^3: not on larger grids, where their cost grows with the volume.
    assert pipeline.rescues(rec.settings, (64, 64, 64))
    assert not pipeline.rescues(rec.settings, (64, 96, 96))
    assert not pipeline.rescues(rec.settings.replace(rescue_starts=0), (64, 64, 64))
