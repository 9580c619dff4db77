"""The trust policies: Bragg peak, CNN distribution, fit against the noise, the verdict."""

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from bcdi_bluesky import NoBraggPeakError, Reconstructor, pipeline
from bcdi_bluesky.backend import (
    FFT_WORKERS,
    NUMPY,
    SMALL_FFT_VOXELS,
    fft_workers,
    fft_workers_limit,
)
from bcdi_bluesky.physics import (
    DEV_SEED,
    chi,
    compare_objects,
    intensity,
    out_of_family_crystal,
    poisson_chi_expected,
    poisson_chi_floor,
    support_iou,
)
from bcdi_bluesky.pipeline import (
    FINALISTS,
    MIN_COARSE_EDGE,
    SEED_SUPPORT_THRESHOLD,
    SUBSAMPLED,
    es_budget_scale,
    far_from_noise,
    fit_at_noise,
    held_subsampling,
    polish_stage,
    prepare_measurement,
    refine_subsampling,
    refined_run_subsampling,
    starts_factor,
    subsampling,
)
from bcdi_bluesky.quality import (
    CHI_FAIR,
    CHI_GOOD,
    CNN_CHI_Z_LIMIT,
    FIT_FAIR,
    FIT_GOOD,
    QualityEvidence,
    check_bragg_peak,
    out_of_distribution,
    quality_verdict,
)
from bcdi_bluesky.settings import (
    FAR_FROM_NOISE,
    STARTS_GRID_EDGE,
    SUBSAMPLING_MARGIN,
    ReconstructionSettings,
)
from bcdi_bluesky.tuning import (
    autocorrelation_seed,
    central_slices,
    circular_extent,
    coarse_shape,
    crop_frequencies,
    fold,
    pad_frequencies,
    polish,
    random_start,
    subsample,
    subsampling_factors,
    unfold,
)


@pytest.fixture(scope="module")
def counted():
    """A development crystal measured as photon counts (out of the CNN's family)."""
    return next(
        c
        for c in (out_of_family_crystal(DEV_SEED, i) for i in range(8))
        if not c.noise_free and c.mask is None
    )


def test_expected_chi_is_the_truths_chi(counted):
    truth = intensity(counted.object)
    expected = poisson_chi_expected(truth, counted.measured)
    assert chi(truth, counted.measured) == pytest.approx(expected, rel=0.03)
    # The data-only floor is a lower bound, well below at these photon counts.
    assert poisson_chi_floor(counted.measured) < 0.8 * expected
    assert poisson_chi_expected(truth, counted.measured * 1.5 + 0.25) is None  # not counts


def test_peak_less_volume_is_refused():
    rng = np.random.default_rng(1)
    # The tail of a rocking curve: a flat background and at most a few counts a frame.
    tail = rng.poisson(0.3, size=(64, 64, 64)).astype(np.float32)
    tail[30:34, 30:34, 0] += 6
    assert tail.max() <= 12
    with pytest.raises(NoBraggPeakError, match="no usable Bragg peak"):
        check_bragg_peak(tail)
    # The same refusal from the pipeline, before any work.
    rec = Reconstructor()
    with pytest.raises(NoBraggPeakError):
        rec.reconstruct(tail)


@pytest.mark.parametrize("kind", ["flat-field corrected noise", "constant", "uniform noise"])
def test_data_that_are_not_counts_without_a_peak_are_refused(kind, scan54_64, cdinn_64):
    rng = np.random.default_rng(3)
    shape = (64, 64, 64)
    volume = {
        "flat-field corrected noise": rng.poisson(1.0, shape) / rng.uniform(0.8, 1.2, shape),
        "constant": np.full(shape, 0.5),
        "uniform noise": rng.uniform(0.0, 1.0, shape),
    }[kind].astype(np.float32)
    with pytest.raises(NoBraggPeakError, match="robust standard deviations"):
        check_bragg_peak(volume)
    with pytest.raises(NoBraggPeakError, match="robust standard deviations"):
        check_bragg_peak(volume, counts=False)  # the caller's word, as the pipeline gives it
    for measured in (scan54_64, cdinn_64):  # corrected measured data: peaks far above
        check_bragg_peak(measured.astype(np.float32))


@pytest.mark.parametrize("where", ["hot voxel", "under the mask"])
def test_a_volume_whose_signal_is_all_removed_is_refused(where):
    """A dark scan with one zinger (masked as a hot pixel), or signal only under the mask:
    refused as without a Bragg peak, not a traceback from the fit."""
    dark = np.zeros((64, 64, 64), dtype=np.float32)
    mask = None
    if where == "hot voxel":
        dark[10, 20, 30] = 5000
    else:
        dark[28:36, 28:36, 28:36] = 100
        mask = np.ones(dark.shape, dtype=bool)
        mask[24:40, 24:40, 24:40] = False
    with pytest.raises(NoBraggPeakError, match="no signal in the valid voxels"):
        Reconstructor().reconstruct(dark, mask, refine="none")


def test_weak_but_real_peak_passes(counted):
    weak = (
        np.random.default_rng(2)
        .poisson(intensity(counted.object) * (1e5 / intensity(counted.object).sum()))
        .astype(np.float32)
    )
    check_bragg_peak(weak)  # 1e5 photons: hundreds in the peak voxel
    check_bragg_peak(weak * 0.37)  # not counts: not judged here
    # Taken for counts, the same data scaled down are judged by the Poisson criterion.
    with pytest.raises(NoBraggPeakError, match="Poisson standard deviations"):
        check_bragg_peak(weak * 1e-3, counts=True)


def test_out_of_distribution_uses_the_fit():
    usual = out_of_distribution(0.5, 0.30, chi_mean=0.32, chi_sd=0.09)
    assert not usual.flagged and usual.reasons == ()
    bad_fit = out_of_distribution(0.5, 0.32 + (CNN_CHI_Z_LIMIT + 0.5) * 0.09, 0.32, 0.09)
    assert bad_fit.flagged and "CNN fit unusual" in bad_fit.reasons[0]
    far = out_of_distribution(1.4, 0.30, 0.32, 0.09)
    assert far.flagged and "latent" in far.reasons[0]
    assert out_of_distribution(None, 0.9, None, None).flagged is False
    assert es_budget_scale(far) == 2 and es_budget_scale(usual) == 1


@pytest.mark.parametrize(
    "ratio, level", [(1.0, "good"), (FIT_GOOD + 0.05, "fair"), (FIT_FAIR + 0.1, "poor")]
)
def test_verdict_follows_the_fit_against_the_noise(ratio, level):
    quality, reasons = quality_verdict(
        QualityEvidence(chi=0.1 * ratio, expected_chi=0.1, converged=False, signal_floor=0.05)
    )
    assert quality == level
    assert (reasons == []) == (level == "good")


def test_a_small_misfit_of_bright_data_is_fair_not_poor():
    # 1e9 photons: noise alone leaves chi 0.01; a sound measured reconstruction ends at 0.04.
    quality, reasons = quality_verdict(
        QualityEvidence(chi=0.04, expected_chi=0.01, converged=True, signal_floor=0.008)
    )
    assert quality == "fair" and "4.00x the Poisson noise" in reasons[0]
    assert (
        quality_verdict(
            QualityEvidence(
                chi=CHI_FAIR + 0.01, expected_chi=0.01, converged=True, signal_floor=0.008
            )
        )[0]
        == "poor"
    )


def test_verdict_without_counts_asks_for_convergence():
    def verdict(chi_, converged):
        return quality_verdict(QualityEvidence(chi_, None, converged, None))[0]

    assert verdict(0.001, True) == "good"
    assert verdict(0.001, False) == "fair"
    assert verdict(0.05, True) == "fair"
    assert verdict(0.3, True) == "poor"


def test_anything_doubtful_keeps_a_good_fit_from_good():
    base = {"chi": 0.1, "expected_chi": 0.1, "converged": True, "signal_floor": 0.05}
    for extra, words in [
        ({"signal_floor": 0.3}, "low signal"),
        ({"distribution": out_of_distribution(1.5, 0.3, 0.32, 0.09)}, "out of distribution"),
        ({"cut_short": ("polish",)}, "wall-time cap"),
    ]:
        quality, reasons = quality_verdict(QualityEvidence(**{**base, **extra}))
        assert quality == "fair" and any(words in r for r in reasons)
    # ... but never lift a poor fit.
    assert (
        quality_verdict(QualityEvidence(**{**base, "chi": 0.2, "cut_short": ("refine",)}))[0]
        == "poor"
    )


def test_an_underdetermined_result_is_poor_whatever_its_fit():
    from bcdi_bluesky.quality import MIN_OVERSAMPLING

    good = {"chi": 0.1, "expected_chi": 0.1, "converged": True, "signal_floor": 0.05}
    assert quality_verdict(QualityEvidence(**good, oversampling=12.0))[0] == "good"
    quality, reasons = quality_verdict(QualityEvidence(**good, oversampling=1.5))
    assert quality == "poor" and "underdetermined: 1.50 valid voxels" in reasons[-1]
    assert MIN_OVERSAMPLING == 2.0


def test_a_volume_or_support_too_small_for_a_3d_crystal_is_poor(scan54_64):
    """A 4^3 crop fits its data to the noise with a one-voxel support, a 6-frame scan is no
    3D measurement: nothing is resolved."""
    good = {"chi": 0.1, "expected_chi": 0.1, "converged": True, "signal_floor": 0.05}
    assert quality_verdict(QualityEvidence(**good, shape=(8, 64, 64), support_voxels=27))[0] == (
        "good"
    )
    quality, reasons = quality_verdict(QualityEvidence(**good, shape=(2, 64, 64)))
    assert quality == "poor" and reasons == [
        "a volume of 2 x 64 x 64 samples: fewer than 8 along an axis resolve no crystal in 3D"
    ]
    tiny = Reconstructor().reconstruct(scan54_64[29:35], refine="none")  # 6 frames
    assert tiny.quality == "poor"
    assert any("fewer than 8 along an axis" in r for r in tiny.quality_reasons)


@pytest.mark.timeout(300)
def test_a_mask_that_leaves_too_little_makes_the_result_poor(counted):
    """Every detector frame masked but a small window: fewer measured voxels than unknowns."""
    mask = np.zeros(counted.measured.shape, dtype=bool)
    n = mask.shape[0]
    mask[:, n // 2 - 4 : n // 2 + 4, n // 2 - 4 : n // 2 + 4] = True  # 1.6% of the voxels
    result = Reconstructor().reconstruct(counted.measured, mask=mask, refine="none")
    assert result.quality == "poor", result.quality_reasons
    assert any("underdetermined" in r for r in result.quality_reasons)
    unmasked = Reconstructor().reconstruct(counted.measured, refine="none")
    assert not any("underdetermined" in r for r in unmasked.quality_reasons)


@pytest.mark.timeout(300)
def test_polish_spends_more_only_where_the_fit_asks(counted):
    settings = ReconstructionSettings(
        polish_er_iterations=20, polish_iterations=40, adaptive_iterations=150
    )
    measurement = prepare_measurement(counted.measured, None, 64)
    # Seeded by the truth the fit reaches the noise at once: nothing more is spent.
    easy = polish_stage(measurement, counted.object, settings)
    assert list(easy.attempts) == [f"ER{SUBSAMPLED}, refined"]
    assert fit_at_noise(easy.chi, easy.expected_chi)
    # A strained cube seeded by a sphere: the short polish stays above the noise, and more
    # starts run (the model seed, the flat sphere, random ones), the finalists to the end, the
    # others screened out after a share of the steps; the lowest chi wins.
    strained = out_of_family_crystal(DEV_SEED, 9)
    assert strained.displacement_kind == "polynomial" and not strained.noise_free
    sphere, _ = autocorrelation_seed(strained.measured)
    measurement = prepare_measurement(strained.measured, strained.mask, 64)
    full_grid = polish_stage(measurement, sphere, replace(settings, starts_subsampling=False))
    starts = {"model ER/HIO", "autocorrelation ER/HIO", "random start 1 ER/HIO"}
    screened = {k for k in full_grid.attempts if k.endswith(", screened out")}
    assert len(screened) == 2 + settings.random_starts - FINALISTS
    assert starts <= {k.removesuffix(", screened out") for k in full_grid.attempts}
    # On the coarse grid the same starts run; the two best come back refined on the full one.
    hard = polish_stage(
        measurement, sphere, replace(settings, starts_downsampling=2, starts_subsampling=False)
    )
    refined = [k for k in hard.attempts if k.endswith("at 1/2 resolution, refined")]
    assert len(refined) == FINALISTS and not starts & set(hard.attempts)
    # Where the finalists fit in half the field of view, their refinement at full resolution
    # goes on every other q (then a few ER steps on the full grid).
    coarse = polish_stage(measurement, sphere, replace(settings, starts_downsampling=2))
    refined = [k for k in coarse.attempts if k.endswith(f"resolution, refined{SUBSAMPLED}")]
    assert len(refined) == 1  # the other finalist does not fit: refined on the full grid
    assert len([k for k in coarse.attempts if k.endswith("resolution, refined")]) == 1
    # By default, the crystal fitting in half the field of view, the starts go on every other
    # q, and the two best come back refined on the full grid.
    subsampled = polish_stage(measurement, sphere, settings)
    further = list(subsampled.attempts)[1:]  # after the first run (on every other q too)
    refined = [k for k in further if k.endswith(f"{SUBSAMPLED}, refined")]
    assert len(refined) == FINALISTS and not starts & set(subsampled.attempts)
    for outcome in (full_grid, hard, coarse, subsampled):
        assert outcome.chi == min(outcome.attempts.values())
        assert outcome.chi <= next(iter(outcome.attempts.values()))  # never worse than the first
        assert not outcome.cut_short


@pytest.mark.timeout(10)
def test_the_starts_grid_is_chosen_from_the_data_shape():
    # Automatic (0): every start on the full grid up to the starts' grid edge, then the
    # smallest factor that brings every axis to it; a set factor is kept unless the coarse
    # grid would be too small to hold a crystal.
    edge = STARTS_GRID_EDGE
    assert starts_factor(0, (edge,) * 3) == 1
    assert starts_factor(0, (2 * edge,) * 3) == 2
    assert starts_factor(0, (edge, 2 * edge + 1, edge)) == 3
    assert starts_factor(0, (151, 256, 256)) == 4
    assert starts_factor(2, (edge,) * 3) == 2
    assert starts_factor(1, (4 * edge,) * 3) == 1
    assert starts_factor(4, (4 * MIN_COARSE_EDGE - 1,) * 3) == 1
    assert starts_factor(0, (edge + 1, 2 * MIN_COARSE_EDGE - 1, edge)) == 1
    assert ReconstructionSettings().starts_downsampling == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("subsampled", [False, True])
def test_starts_side_by_side_give_the_result_of_one_after_the_other(monkeypatch, subsampled):
    # The further starts are independent runs: on a CPU they go on side by side (threads that
    # share the cores among their FFTs), and the outcome must be that of one after the other
    # to the bit; the hook sees every step counted once, from one thread at a time.
    strained = out_of_family_crystal(DEV_SEED, 11)  # 22 voxels across at most
    measurement = prepare_measurement(strained.measured, strained.mask, 64)
    # The crystal's amplitude without its strain: a first run that stays above the noise, on
    # a support that fits in half the field of view (the starts then go on every other q).
    seed = np.abs(strained.object).astype(np.complex64)
    settings = ReconstructionSettings(
        polish_er_iterations=10,
        polish_iterations=20,
        adaptive_iterations=60,
        random_starts=3,
        starts_subsampling=subsampled,
    )
    calls, inside, overlapped = [], threading.Lock(), []

    def hook(step, error):
        if not inside.acquire(blocking=False):
            overlapped.append(step)
            return None
        try:
            calls.append((step, threading.get_ident()))
            time.sleep(1e-4)  # widen the window in which a second caller would overlap
        finally:
            inside.release()
        return None

    assert pipeline.side_by_side(NUMPY, 5) == min(5, FFT_WORKERS)
    together = polish_stage(measurement, seed, settings, hook=hook)
    monkeypatch.setattr(pipeline, "side_by_side", lambda backend, runs: 1)
    in_turn = polish_stage(measurement, seed, settings)
    further = list(together.attempts)[1:]  # after the first run (on every other q too)
    refined = [k for k in further if k.endswith(f"{SUBSAMPLED}, refined")]
    assert len(refined) == (FINALISTS if subsampled else 0)
    assert len(together.attempts) == (2 + FINALISTS if subsampled else 7)
    assert together.attempts == in_turn.attempts
    assert together.recipe == in_turn.recipe and together.errors == in_turn.errors
    np.testing.assert_array_equal(together.object, in_turn.object)
    assert [step for step, _ in calls] == list(range(1, len(together.errors) + 1))
    assert not overlapped
    if FFT_WORKERS > 1:  # the starts ran on threads of their own
        assert len({thread for _, thread in calls}) > 1


@pytest.mark.timeout(120)
def test_a_hook_that_raises_stops_the_starts_side_by_side():
    # The callback cancels a reconstruction by raising from the progress hook: raised in one
    # of the threads of the further starts, it must reach the caller at once, the other runs
    # stopped by it too, no thread left behind.
    strained = out_of_family_crystal(DEV_SEED, 9)
    measurement = prepare_measurement(strained.measured, strained.mask, 64)
    # The crystal's amplitude without its strain: a first run that stays above the noise, on
    # a support that fits in half the field of view (the starts then go on every other q).
    sphere = np.abs(strained.object).astype(np.complex64)
    settings = ReconstructionSettings(
        polish_er_iterations=10, polish_iterations=20, adaptive_iterations=2000
    )

    class Cancelled(Exception):
        pass

    def hook(step, error):
        if step > 70:  # inside the further starts (the first polish takes at most 60 steps)
            raise Cancelled

    before = threading.active_count()
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        polish_stage(measurement, sphere, settings, hook=hook)
    assert time.perf_counter() - started < 30  # 4 x 2000 steps would take minutes
    assert threading.active_count() == before


def test_a_thread_s_fft_worker_limit_is_its_own():
    big = 2 * SMALL_FFT_VOXELS
    seen = {}
    with fft_workers_limit(1):
        seen["limited"] = fft_workers(big)
        worker = threading.Thread(target=lambda: seen.setdefault("other", fft_workers(big)))
        worker.start()
        worker.join()
    seen["after"] = fft_workers(big)
    assert seen == {"limited": 1, "other": FFT_WORKERS, "after": FFT_WORKERS}
    assert fft_workers(SMALL_FFT_VOXELS) == 1


@pytest.mark.parametrize("shape", [(64, 64, 64), (66, 64, 50), (40, 35, 24)])
def test_every_other_q_is_the_folded_crystal_s_intensity(shape):
    # Sampling every other q through q = 0 halves the field of view at the same resolution:
    # the intensity there is exactly the folded object's (even axes whose half is odd too,
    # where the samples are the odd indices; an odd axis keeps every q), and a crystal within
    # the smaller field of view comes back whole, wherever the fold wrapped it.
    rng = np.random.default_rng(5)
    obj = np.zeros(shape, dtype=np.complex64)
    box = tuple(slice(n // 2 - 5, n // 2 + 6) for n in shape)
    fill = rng.random((11, 11, 11)) * np.exp(2j * rng.random((11, 11, 11)))
    obj[box] = fill.astype(np.complex64)
    factors = subsampling_factors(np.abs(obj) > 0)
    assert factors == tuple(
        2 if n % 2 == 0 and 11 + SUBSAMPLING_MARGIN <= n // 2 else 1 for n in shape
    )
    folded = fold(obj, factors)
    assert folded.shape == tuple(n // k for n, k in zip(shape, factors, strict=True))
    full = intensity(obj)
    np.testing.assert_allclose(intensity(folded), subsample(full, factors), atol=1e-5 * full.max())
    # Off centre and wrapped by the periodic grid: still the same crystal once unfolded.
    shifted = np.roll(folded, tuple(m // 2 for m in folded.shape), axis=(0, 1, 2))
    np.testing.assert_array_equal(unfold(shifted, shape), obj)
    with pytest.raises(ValueError, match="cannot be subsampled"):
        subsample(full, (3, 1, 1) if shape[0] % 3 else (5, 1, 1))


def test_every_other_q_only_where_the_crystal_fits():
    assert circular_extent(np.array([1, 0, 0, 0, 0, 1, 1], dtype=bool)) == 3  # across the wrap
    assert circular_extent(np.array([0, 1, 1, 0, 1, 0, 0], dtype=bool)) == 4
    assert circular_extent(np.zeros(5, dtype=bool)) == 0
    support = np.zeros((64, 64, 64), dtype=bool)
    span = 32 - SUBSAMPLING_MARGIN
    support[10 : 10 + span, 20:30, 5 : 5 + span + 1] = True
    assert subsampling_factors(support) == (2, 2, 1)
    settings = ReconstructionSettings()
    assert subsampling(settings, support) is None  # every axis, or none
    support[:, :, 5 + span] = False
    assert subsampling(settings, support) == (2, 2, 2)
    assert subsampling(replace(settings, starts_subsampling=False), support) is None
    # A blur over q mixes the q between the samples into each: not the folded intensity.
    assert subsampling(replace(settings, partial_coherence=True), support) is None
    assert subsampling(settings, np.ones((64, 64, 64), dtype=bool)) is None  # fits nowhere
    # Where the starts run on the coarse grid (above the starts' grid edge, or asked for),
    # they stay there.
    big = np.zeros((2 * STARTS_GRID_EDGE,) * 3, dtype=bool)
    big[:10, :10, :10] = True
    assert subsampling(settings, big) is None
    assert subsampling(replace(settings, starts_downsampling=2), support) is None
    # The polish's first run, from the model: on every grid size, the same rule of fit.
    assert refined_run_subsampling(settings, support) == (2, 2, 2)
    assert refined_run_subsampling(settings, big) == (2, 2, 2)
    assert refined_run_subsampling(settings, np.ones((64, 64, 64), dtype=bool)) is None
    support[:, :, 5 + span] = True
    assert refined_run_subsampling(settings, support) is None
    support[:, :, 5 + span] = False
    for off in (
        {"polish_subsampling": False},
        {"partial_coherence": True},
        {"polish_er_iterations": 0},  # no ER steps to carry it back to the full grid
    ):
        assert refined_run_subsampling(replace(settings, **off), support) is None
    # The coarse starts' finalists: the same rule, each on its own.
    assert refine_subsampling(settings, support) == (2, 2, 2)
    assert refine_subsampling(settings, np.ones((64, 64, 64), dtype=bool)) is None
    for off in ({"starts_subsampling": False}, {"partial_coherence": True}):
        assert refine_subsampling(replace(settings, **off), support) is None
    # The uniform-amplitude run's held steps: the same rule on their fixed support.
    assert held_subsampling(settings, support, False) == (2, 2, 2)
    assert held_subsampling(settings, big, False) == (2, 2, 2)
    assert held_subsampling(settings, np.ones((64, 64, 64), dtype=bool), False) is None
    assert held_subsampling(settings, support, True) is None  # noise-free: the full grid
    for off in ({"polish_subsampling": False}, {"partial_coherence": True}):
        assert held_subsampling(replace(settings, **off), support, False) is None


@pytest.mark.timeout(120)
def test_first_run_on_every_other_q_only_for_a_crystal_that_fits(counted):
    settings = ReconstructionSettings(
        polish_er_iterations=20,
        polish_iterations=40,
        adaptive_iterations=0,
        uniform_amplitude_iterations=0,
        converge_iterations=0,
        loose_support_iterations=0,
    )
    # The counted crystal (27 voxels across at most) fits in half the 64^3 field of view: the
    # first run goes on every other q, comes back refined on the full grid, and is as close
    # to the truth as the run on the full grid.
    measurement = prepare_measurement(counted.measured, None, 64)
    seed = np.abs(counted.object).astype(np.complex64)
    folded = polish_stage(measurement, seed, settings)
    whole = polish_stage(measurement, seed, replace(settings, polish_subsampling=False))
    assert folded.recipe == f"ER{SUBSAMPLED}, refined" and whole.recipe == "ER"
    iou = compare_objects(counted.object, folded.object).iou
    assert iou >= 0.95 and iou >= compare_objects(counted.object, whole.object).iou - 0.01
    assert folded.chi <= 1.02 * whole.chi
    # The same crystal in a 40^3 window (half of it 20 voxels), seeded by a sphere that fits:
    # the folded run finds a crystal that does not, and the first run starts again on the full
    # grid, to the full grid's result.
    crystal = counted.object[12:52, 12:52, 12:52]
    window = intensity(crystal)
    data = (window / window.sum() * 1e9).astype(np.float32)
    r2 = ((np.indices(data.shape) - 20) ** 2).sum(axis=0)
    sphere = (r2 <= 49).astype(np.complex64)
    seed_support = np.abs(sphere) > SEED_SUPPORT_THRESHOLD
    assert refined_run_subsampling(settings, seed_support) == (2, 2, 2)
    measurement = prepare_measurement(data, None, 64)
    again = polish_stage(measurement, sphere, settings)
    whole = polish_stage(measurement, sphere, replace(settings, polish_subsampling=False))
    assert SUBSAMPLED not in again.recipe and again.recipe == whole.recipe
    np.testing.assert_array_equal(again.object, whole.object)
    assert compare_objects(crystal, again.object).iou >= 0.9


def test_far_from_noise_is_beyond_the_fit_target():
    floor = 0.1
    target = FIT_GOOD * floor
    assert not far_from_noise(FAR_FROM_NOISE * target * 0.99, floor)
    assert far_from_noise(FAR_FROM_NOISE * target * 1.01, floor)
    # Not counts: the absolute target.
    assert not far_from_noise(FAR_FROM_NOISE * CHI_GOOD * 0.99, None)
    assert far_from_noise(FAR_FROM_NOISE * CHI_GOOD * 1.01, None)


@pytest.mark.timeout(120)
def test_first_run_far_from_the_noise_comes_back_without_the_full_grids_steps():
    # A strained cube measured as counts, seeded without its phase: on every other q the first
    # run ends far above the noise, so with further starts to follow it comes back as it is
    # (one of the candidates); without them it is refined on the full grid.
    crystal = out_of_family_crystal(DEV_SEED, 9)
    assert crystal.labels[:2] == ["cube", "polynomial"] and crystal.mask is None
    settings = ReconstructionSettings(
        polish_er_iterations=20,
        polish_iterations=40,
        adaptive_iterations=30,
        random_starts=0,
        uniform_amplitude_iterations=0,
        rescue_starts=0,
        converge_iterations=0,
        loose_support_iterations=0,
    )
    measurement = prepare_measurement(crystal.measured, None, 64)
    seed = np.abs(crystal.object).astype(np.complex64)
    alone = polish_stage(measurement, seed, replace(settings, adaptive_iterations=0))
    (refined,) = alone.attempts
    assert refined.endswith(f"{SUBSAMPLED}, refined")
    assert not fit_at_noise(alone.chi, alone.expected_chi)
    started = polish_stage(measurement, seed, settings)
    first = refined.removesuffix(", refined")
    assert next(iter(started.attempts)) == first and refined not in started.attempts
    # Its chi is the full grid's (within a few percent of the refined run's), and the
    # starts' winner is kept only where it fits better.
    assert abs(started.attempts[first] / alone.attempts[refined] - 1) < 0.05
    assert started.chi <= started.attempts[first]


@pytest.mark.timeout(120)
def test_held_amplitude_steps_on_every_other_q_fit_as_on_the_full_grid(monkeypatch):
    # A strained cube (polynomial displacement) measured as counts, seeded without its phase:
    # the first run stays above the noise and the uniform-amplitude run follows. Its held steps
    # on every other q, the free ones on the full grid, end as close to the data and to the
    # truth as every step on the full grid.
    crystal = out_of_family_crystal(DEV_SEED, 9)
    assert crystal.labels[:2] == ["cube", "polynomial"] and crystal.mask is None
    settings = ReconstructionSettings(
        polish_er_iterations=0,  # the first run on the full grid, the same for both
        polish_iterations=40,
        adaptive_iterations=0,
        converge_iterations=0,
        loose_support_iterations=0,
    )
    measurement = prepare_measurement(crystal.measured, None, 64)
    seed = np.abs(crystal.object).astype(np.complex64)
    grids = []  # the grid of every held run

    def recorded(data, *args, **options):
        if options.get("uniform_interior") is not None:
            grids.append(data.shape)
        return polish(data, *args, **options)

    monkeypatch.setattr(pipeline, "polish", recorded)
    folded = polish_stage(measurement, seed, settings)
    assert grids == [(32, 32, 32)] * 2
    whole = polish_stage(measurement, seed, replace(settings, polish_subsampling=False))
    assert grids[2:] == [(64, 64, 64)] * 2
    assert list(folded.attempts) == list(whole.attempts) == ["ER/HIO", "ER/HIO +uniform amplitude"]
    assert folded.attempts["ER/HIO"] == whole.attempts["ER/HIO"]
    assert folded.chi < folded.attempts["ER/HIO"] and folded.chi <= 1.01 * whole.chi
    iou = compare_objects(crystal.object, folded.object).iou
    assert iou >= compare_objects(crystal.object, whole.object).iou - 0.02 and iou >= 0.85


@pytest.mark.parametrize("shape", [(64, 64, 64), (33, 30, 27)])
def test_the_coarse_grid_sees_the_central_q_region(shape):
    # The coarse starts fit the central 1/2 of q: the coarse object's intensity must be that
    # region of the object's, and the object interpolated back must keep it, with nothing
    # outside (odd and even edges: q = 0 stays at index n // 2 on both grids).
    rng = np.random.default_rng(3)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum(((g - s // 2) / (s / 5)) ** 2 for g, s in zip(grids, shape, strict=True))
    obj = ((r2 < 1) * np.exp(1j * rng.uniform(0, 0.5, shape))).astype(np.complex64)
    full = intensity(obj)
    window = central_slices(shape, coarse_shape(shape, 2))
    coarse = crop_frequencies(obj, 2)
    assert coarse.shape == coarse_shape(shape, 2)
    np.testing.assert_allclose(intensity(coarse), full[window], atol=1e-5 * full.max())
    back = intensity(pad_frequencies(coarse, shape))
    np.testing.assert_allclose(back[window], full[window], atol=1e-5 * full.max())
    back[window] = 0
    assert back.max() < 1e-5 * full.max()


@pytest.mark.timeout(300)
def test_a_random_start_finds_what_the_flat_sphere_misses():
    # A screw-dislocated cube (development seed): ER/HIO from the flat, uniform sphere keeps to
    # a strain-free-like solution; from random amplitudes and phases in the same sphere the
    # runs end in other minima, and the lowest of four draws is below the flat start's, with
    # the better crystal, so ranking the runs by chi picks it.
    crystal = out_of_family_crystal(DEV_SEED, 25)
    assert crystal.displacement_kind == "screw dislocation" and not crystal.noise_free
    flat, support = autocorrelation_seed(crystal.measured)
    drawn = random_start(support, np.random.default_rng((0, 0)))
    again = random_start(support, np.random.default_rng((0, 0)))
    np.testing.assert_array_equal(drawn, again)  # drawn from the seed: deterministic
    np.testing.assert_array_equal(support, np.abs(drawn) > 0)
    assert np.ptp(np.angle(drawn[support])) > 6.0 and np.ptp(np.angle(flat[support])) == 0
    seeds = {"flat": flat, 0: drawn}
    seeds.update({k: random_start(support, np.random.default_rng((0, k))) for k in (1, 2, 3)})
    runs = {
        name: polish(
            crystal.measured, seed, support, crystal.mask, iterations=600, hio_fraction=0.65
        )
        for name, seed in seeds.items()
    }
    chis = {k: chi(intensity(r.object), crystal.measured, crystal.mask) for k, r in runs.items()}
    ious = {k: support_iou(crystal.object, r.object) for k, r in runs.items()}
    best = min((k for k in chis if k != "flat"), key=chis.get)
    assert chis[best] < 0.9 * chis["flat"]
    assert ious[best] > ious["flat"] + 0.05
