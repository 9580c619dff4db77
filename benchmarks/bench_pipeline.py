"""Our reconstruction pipeline against cohere-core's iterative phase retrieval, in one run.

    python benchmarks/bench_pipeline.py [--ood-count 40] [--ood128-count 4] [--count 20]
        [--seed 2026] [--ablation] [--skip-cohere] [--data-dir ../shared/data]
        [--json results.json] [--report results.json]

Everything runs on this machine, one reconstruction at a time, so the wall times compare. The
JSON file is rewritten after every crystal, so a run stopped early keeps what it measured, and
``--report`` prints the tables from it.

0. **Out-of-family set** (first, the most telling): ``--ood-count`` crystals at 64^3 and
   ``--ood128-count`` at 128^3 from :func:`~bcdi_bluesky.physics.out_of_family_crystal` with
   ``BENCHMARK_SEED`` (never used for tuning: development used ``DEV_SEED``): faceted
   polyhedra, platelets, rods and substrate-cut crystals with voids or ramps, inclusion,
   dislocation and polynomial fields, noise-free to 1e7 photons, some with a detector gap.
   Ours with ``refine="full"``, the same with the further starts on every q instead of every
   other one, without the further starts, and without spending more at all (ablations of the
   fit-driven polish), and cohere-core; tables: medians, per
   kind, the confusion of the quality verdict with IoU < 0.8, the CNN's out-of-distribution
   rate on every set.
1. **Synthetic set**: ``--count`` fresh crystals from the prior at 1e8 photons (stream
   ``TEST_STREAM``, seed ``--seed``; the tests use other seeds). Each is reconstructed by our
   pipeline with ``refine="none"`` (CNN), ``"es"`` (CNN + extremum seeking) and ``"full"``
   (+ ER/HIO polish), with ``--ablation`` the last two also without the odd-shape search
   (ablation of
   :func:`~bcdi_bluesky.tuning.refine.fit_odd_shape`), and by cohere-core from a random
   start with cohere's default recipe (:data:`COHERE_RECIPE`, 620 iterations). Figures:
   support IoU and phase RMS against the truth (twin, translation and phase ramp resolved),
   chi and amplitude R-factor against the counts, wall seconds.
2. **Measured sets** (``--data-dir``): the 64^3 crops of APS scan 54 and of the 3D-CDI-NN
   example. No truth there: chi, R-factor, seconds, and the support IoU of each of our
   reconstructions with cohere's (cohere run from three random starts, the median one by
   R-factor reported, with the median wall time of the three; our ``full`` run timed three
   times, its median time reported, the same object each time).
3. **Ablation** (synthetic set, ``--ablation``): the same polish (`seeded_polish`) seeded
   by our CNN + ES object (that is ``refine="full"``), by a sphere sized from the intensity's
   autocorrelation, and by a cohere-style random start in a central box; median IoU per seed,
   overall and per kind of crystal (phase peak-to-peak, shape aspect ratio, density).

Conventions. Our intensities are centred (q = 0 at index ``N // 2``) with
``I = |fftshift(fftn(o))|^2``. cohere-core's ``Rec`` reads *amplitudes* from a file, moves
q = 0 to index 0 with ``fftshift`` and models the far field as ``ifftn(o)``, whose modulus is
that of ``fftn(conj(o))``: its image ``o_c`` is brought to our convention as ``conj(o_c)``
(see :func:`run_cohere`; each run records the chi of both, as a check).

cohere-core's numpy backend draws its random start from a clock-seeded global generator, so
its figures vary from run to run; ours are deterministic. Its FFTs (``scipy.fft``) run on one
thread; ours on ``BCDI_FFT_WORKERS`` (default: all cores). On a machine that other jobs keep
busy, multithreaded FFTs of these small volumes can stall: the same ES run then takes anywhere
from 1 to 10 s. ``BCDI_FFT_WORKERS=1`` gives steadier times there; the tables give medians.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bcdi_bluesky.io import atomic_write_bytes
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.physics import (
    BENCHMARK_SEED,
    DISPLACEMENT_KINDS,
    FFT_WORKERS,
    SHAPE_KINDS,
    CrystalModel,
    CrystalPrior,
    chi,
    compare_objects,
    intensity,
    out_of_family_crystal,
    r_factor,
    support_iou,
)
from bcdi_bluesky.pipeline import ReconstructionResult, Reconstructor
from bcdi_bluesky.quality import QUALITY_LEVELS
from bcdi_bluesky.tuning import autocorrelation_seed, seeded_polish

REPO = Path(__file__).resolve().parents[1]
PHOTONS = 1e8
MODES = ("none", "es", "full")

#: cohere's default reconstruction configuration (the ``config_rec`` that cohere-ui writes for a
#: new experiment), without its console progress trigger.
COHERE_RECIPE: dict[str, Any] = {
    "algorithm_sequence": "3* (20*ER + 180*HIO) + 20*ER",
    "hio_beta": 0.9,
    "twin_trigger": [2],
    "shrink_wrap_trigger": [10, 1],
    "shrink_wrap_type": "GAUSS",
    "shrink_wrap_threshold": 0.1,
    "shrink_wrap_gauss_sigma": 1.0,
    "initial_support_area": [0.5, 0.5, 0.5],
}

#: cohere's example preprocessing of the measured scans zeroes I <= 2 before the square root.
COHERE_MEASURED_THRESHOLD = 2.0
#: Runs per measured set: cohere's random starts (the median one by R-factor is reported) and
#: our ``full`` runs (the same result each time); each side's wall time is the median of its
#: runs, as this VM's speed varies from run to run.
MEASURED_REPEATS = 3

MEASURED_SETS = {
    "APS scan 54": "cohere_examples_scan54/S0054_intensity_64.npy",
    "3D-CDI-NN example": "3dcdinn_example/ft_crop_64_intensity.npy",
}

# Crystal kinds: phase peak-to-peak (rad) over the support, principal-axis aspect ratio.
FLAT_PHASE_PTP, STRAINED_PTP, ELONGATED_ASPECT = 1.0, 3.0, 1.8

METHOD_LABELS = {
    "none": "ours: CNN (none)",
    "es": "ours: CNN+ES (es)",
    "full": "ours: CNN+ES+polish (full)",
    "es_no_search": "ours: es, without the shape search",
    "full_no_search": "ours: full, without the shape search",
    "cohere": "cohere-core 620 it.",
}
#: Modes also run without the odd-shape search (method name ``<mode>_no_search``).
NO_SEARCH_MODES = ("es", "full")
SEED_LABELS = {
    "full": "CNN+ES object (= full)",
    "sphere": "autocorrelation sphere",
    "random_box": "random, central box",
}


# ----------------------------------------------------------------------------- seeds
def random_box_seed(
    shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A cohere-style random start: random complex values in a central half-size box.

    Like cohere's, the values have real and imaginary parts uniform in [0, 1).

    Parameters
    ----------
    shape : tuple of int
        Grid shape.
    rng : numpy.random.Generator
        Source of the random values.

    Returns
    -------
    object, support : ndarray
        complex64 start and its boolean support.
    """
    box = np.zeros(shape, dtype=bool)
    box[tuple(slice(s // 4, s // 4 + s // 2) for s in shape)] = True
    values = rng.uniform(size=shape) + 1j * rng.uniform(size=shape)
    return (values * box).astype(np.complex64), box


# ----------------------------------------------------------------------------- crystals
@dataclass(frozen=True)
class CrystalKind:
    """What kind of crystal a truth is, for the per-kind breakdown."""

    phase_ptp: float  # radians, over the support (amplitude > 0.2 of max), unwrapped
    aspect: float  # longest / shortest principal axis of the support
    inhomogeneous: bool  # voids or density ramps

    @property
    def phase_class(self) -> str:
        """``flat-phase``, ``moderate`` or ``strained``."""
        if self.phase_ptp < FLAT_PHASE_PTP:
            return "flat-phase"
        return "strained" if self.phase_ptp > STRAINED_PTP else "moderate"

    @property
    def shape_class(self) -> str:
        """``platelet/needle`` or ``compact``."""
        return "platelet/needle" if self.aspect > ELONGATED_ASPECT else "compact"

    @property
    def density_class(self) -> str:
        """``voids/ramps`` or ``uniform``."""
        return "voids/ramps" if self.inhomogeneous else "uniform"

    @property
    def labels(self) -> list[str]:
        """Phase, shape and density class."""
        return [self.phase_class, self.shape_class, self.density_class]


def crystal_kind(model: CrystalModel, params: np.ndarray) -> CrystalKind:
    """Classify a truth crystal by its phase range, elongation and density.

    Parameters
    ----------
    model : CrystalModel
        The parameter layout and renderer.
    params : ndarray
        Physical parameters of the crystal.

    Returns
    -------
    CrystalKind
    """
    rendered = model.render(params)
    amp = rendered.shape * rendered.density
    sel = amp > 0.2 * amp.max()
    # The rendered phase is the model's polynomial, not wrapped into (-pi, pi].
    ptp = float(np.ptp(rendered.phase[sel]))
    coords = np.stack(np.unravel_index(rendered.flat_index[sel], (model.n,) * 3))
    eig = np.linalg.eigvalsh(np.cov(coords.astype(np.float64)))
    aspect = float(np.sqrt(eig[-1] / max(eig[0], 1e-12)))
    inhomogeneous = bool(np.any(params[model.slices["rbf_amplitude"]] != 0))
    return CrystalKind(ptp, aspect, inhomogeneous)


# ----------------------------------------------------------------------------- runs
def centre_on_max(data: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Roll the maximum to index ``N // 2`` on every axis (cohere's ``center_max``).

    Returns
    -------
    centred : ndarray
    shift : tuple of int
        The roll applied.
    """
    peak = np.unravel_index(int(np.argmax(data)), data.shape)
    shift = tuple(int(s // 2 - p) for s, p in zip(data.shape, peak, strict=True))
    return np.roll(data, shift, axis=tuple(range(data.ndim))), shift


def undo_centring(obj: np.ndarray, shift: tuple[int, ...]) -> np.ndarray:
    """Object whose far field is that of ``obj`` rolled by ``-shift`` (a linear phase ramp).

    ``roll(I, s)[q] = I[q - s]``, and ``F(q + s)`` is the transform of
    ``o(r) exp(-2 pi i s.r / N)``.
    """
    grids = np.ogrid[tuple(slice(0, n) for n in obj.shape)]
    ramp = sum(s * g / n for s, g, n in zip(shift, grids, obj.shape, strict=True))
    return (obj * np.exp(-2j * np.pi * ramp)).astype(np.complex64)


@dataclass
class CohereRun:
    """A cohere-core reconstruction, in our convention, on the grid of the data it was given."""

    object: np.ndarray
    seconds: float
    error: float  # cohere's own last error: sum (|F| - A)^2 / sum A^2 over its thresholded data
    chi: float  # ours, against the data cohere was given
    chi_unconverted: float  # the same for cohere's image as returned (not conjugated)


def run_cohere(
    measured: np.ndarray, threshold: float = 0.0, package: str = "np", device: int = -1
) -> CohereRun:
    """Reconstruct with cohere-core from a random start (numpy on the CPU by default).

    ``cohere_core.controller.phasing.create_rec(params, data_file, package, device)`` loads the
    amplitudes (``.npy``), ``fftshift``s them to put q = 0 at index 0, draws the random start
    and support (central box of :data:`COHERE_RECIPE`'s ``initial_support_area``);
    ``Rec.iterate()`` runs the recipe and ``Rec.get_image()`` returns the image, scaled to
    maximum 1. cohere's far field is ``ifftn(image)`` (q = 0 at index 0), which equals
    ``conj(fftn(conj(image))) / N^3``: ``conj(image)`` is the object in our convention, and
    is returned.

    Parameters
    ----------
    measured : ndarray
        Intensity with its maximum at index ``N // 2`` (see :func:`centre_on_max`).
    threshold : float
        Intensities at or below it are zeroed, as cohere's preprocessing does.
    package, device : str, int
        cohere's array library ("np", "cp" for CuPy, "torch") and GPU id (-1: the CPU).

    Returns
    -------
    CohereRun
    """
    # Imported here so that --skip-cohere runs where cohere-core is not installed.
    from cohere_core.controller import phasing

    data = np.where(measured > threshold, measured, 0.0).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npy")
        np.save(path, np.sqrt(data))
        started = time.perf_counter()
        # cohere reports progress with print(); the table is the output here.
        with contextlib.redirect_stdout(io.StringIO()):
            rec = phasing.create_rec(
                copy.deepcopy(COHERE_RECIPE), path, package, device, debug=True
            )
            if rec is None or rec.iterate() != 0:
                raise RuntimeError("cohere-core reconstruction failed")
        seconds = time.perf_counter() - started
    image = np.asarray(phasing.devlib.to_numpy(rec.get_image()))  # CuPy or torch: to the host
    obj = np.conj(image).astype(np.complex64)
    return CohereRun(
        obj, seconds, float(rec.errs[-1]), chi(intensity(obj), data), chi(intensity(image), data)
    )


@dataclass
class CohereStart:
    """One cohere start, carried back to the data's grid (:func:`run_cohere_starts`)."""

    run: CohereRun
    object: np.ndarray
    figures: dict[str, Any]
    cpu_seconds: float
    shift: tuple[int, ...]  # the centring undone (:func:`centre_on_max`)


def run_cohere_starts(
    data: np.ndarray,
    count: int,
    measure: Callable[[np.ndarray], dict[str, Any]],
    key: str,
    threshold: float = 0.0,
    seeds: Callable[[int], int] | None = None,
    package: str = "np",
    device: int = -1,
) -> tuple[CohereStart, list[CohereStart]]:
    """``count`` cohere runs from random starts on ``data`` (centred on its maximum for
    cohere, the objects carried back by :func:`undo_centring`), each object's figures
    ``measure(object)``, ordered by ``figures[key]``.

    cohere starts from a random object, so one run is a draw: the median by ``key`` stands
    for it, and the others are returned too. ``seeds(k)`` seeds numpy's global state (which
    cohere draws from) before start ``k``; None leaves it as it is. ``package`` and
    ``device``: cohere's array library and GPU (:func:`run_cohere`).

    Returns
    -------
    median, starts : CohereStart, list of CohereStart
        The median start by ``key`` and every start, lowest first.
    """
    centred, shift = centre_on_max(data)
    starts = []
    for k in range(count):
        if seeds is not None:
            np.random.seed(seeds(k))  # noqa: NPY002
        cpu = time.process_time()
        run = run_cohere(centred, threshold, package, device)
        cpu = time.process_time() - cpu
        obj = undo_centring(run.object, shift)
        start = CohereStart(run, obj, measure(obj), cpu, tuple(shift))
        starts.append((start.figures[key], k, start))
    starts.sort(key=lambda entry: entry[:2])
    ordered = [entry[2] for entry in starts]
    return ordered[len(ordered) // 2], ordered


def figures(
    obj: np.ndarray,
    measured: np.ndarray,
    truth: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Figures of merit of a reconstruction.

    Parameters
    ----------
    obj : ndarray
        Reconstruction, in our convention for ``measured``.
    measured : ndarray
        Intensity it is compared with (chi, R-factor).
    truth : ndarray, optional
        True object: support IoU, complex overlap and phase RMS.
    reference : ndarray, optional
        Another reconstruction (no truth): support IoU with it, as ``iou_ref``.
    mask : ndarray of bool, optional
        Valid voxels of ``measured`` (chi and R-factor leave the others out).

    Returns
    -------
    dict
        ``chi``, ``r_factor``, ``iou``, ``overlap``, ``phase_rms`` and ``iou_ref`` (NaN where
        unknown).
    """
    model_intensity = intensity(obj)
    out = {
        "chi": chi(model_intensity, measured, mask),
        "r_factor": r_factor(model_intensity, measured, mask),
        "iou": float("nan"),
        "overlap": float("nan"),
        "phase_rms": float("nan"),
        "iou_ref": float("nan"),
    }
    if truth is not None:
        c = compare_objects(truth, obj)
        out["iou"], out["overlap"], out["phase_rms"] = c.iou, c.overlap, c.phase_rms
    if reference is not None:
        out["iou_ref"] = support_iou(reference, obj)
    return out


def verdict(result: ReconstructionResult) -> dict[str, Any]:
    """The result's own verdict and where its CNN stood (for the confusion and OOD tables)."""
    return {
        "quality": result.quality,
        "quality_reasons": list(result.quality_reasons),
        "out_of_distribution": result.out_of_distribution,
        "latent_distance": result.latent_distance,
        "chi_cnn": result.chi_cnn,
        "expected_chi": result.expected_chi,
        "polish_recipe": result.polish_recipe,
        "polish_attempts": dict(result.polish_attempts),
        "cut_short": list(result.cut_short),
    }


def run_ours(
    rec: Reconstructor, measured: np.ndarray, mode: str, mask: np.ndarray | None = None
) -> tuple[ReconstructionResult, float]:
    """Run our pipeline in one refine mode; return the result and the wall seconds (the CPU
    seconds of this process, all threads, go to ``result.metadata["cpu_seconds"]``)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = rec.reconstruct(measured, mask, refine=mode)
    result.metadata["cpu_seconds"] = time.process_time() - cpu
    return result, time.perf_counter() - started


def run_all_modes(
    rec: Reconstructor, plain: Reconstructor, measured: np.ndarray, ablation: bool = False
) -> dict[str, tuple[ReconstructionResult, float]]:
    """Every mode of ``rec``, and with ``ablation`` :data:`NO_SEARCH_MODES` of ``plain`` (no
    shape search)."""
    runs = {mode: run_ours(rec, measured, mode) for mode in MODES}
    if ablation:
        runs.update(
            {f"{mode}_no_search": run_ours(plain, measured, mode) for mode in NO_SEARCH_MODES}
        )
    return runs


def progress(message: str) -> None:
    """One line of progress on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def synthetic_cases(
    rec: Reconstructor,
    plain: Reconstructor,
    count: int,
    seed: int,
    skip_cohere: bool,
    ablation: bool = False,
    sink: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct ``count`` fresh prior crystals with every method (and, with ``ablation``,
    without the shape search and from the model-free polish seeds).

    Returns
    -------
    list of dict
        Per crystal: ``index``, ``kind``, ``stage_chi`` (of the ``es`` run) and ``methods``
        (per method: figures and ``seconds``).
    """
    model = rec.model
    prior = CrystalPrior(model)
    cases = []
    for i in range(count):
        sample = make_sample(model, prior, seed, TEST_STREAM, i, photons=PHOTONS)
        counts = sample.counts
        truth = model.voxelise(sample.params)
        kind = crystal_kind(model, sample.params)
        methods: dict[str, dict[str, Any]] = {}
        stage_chi: dict[str, float] = {}
        for method, (result, seconds) in run_all_modes(rec, plain, counts, ablation).items():
            methods[method] = {
                **figures(result.object, counts, truth),
                "seconds": seconds,
                "timings": dict(result.timings),
                **verdict(result),
            }
            if method == "es":
                stage_chi = dict(result.stage_chi)
        if not skip_cohere:
            centred, shift = centre_on_max(counts)
            run = run_cohere(centred)
            obj = undo_centring(run.object, shift)
            methods["cohere"] = {
                **figures(obj, counts, truth),
                "seconds": run.seconds,
                "cohere_error": run.error,
                "chi_fit": run.chi,
                "chi_fit_unconverted": run.chi_unconverted,
            }
        rng = np.random.default_rng([seed, i, 1])
        seeds = (
            (
                ("sphere", autocorrelation_seed(counts)),
                ("random_box", random_box_seed(counts.shape, rng)),
            )
            if ablation
            else ()
        )
        for name, (start, start_support) in seeds:
            started = time.perf_counter()
            polished = seeded_polish(
                counts,
                start,
                start_support,
                er_iterations=rec.settings.polish_er_iterations,
                iterations=rec.settings.polish_iterations,
                hio_fraction=rec.settings.polish_hio_fraction,
            )
            methods[name] = {
                **figures(polished.object, counts, truth),
                "seconds": time.perf_counter() - started,
            }
        cases.append(
            {
                "index": i,
                "kind": {**asdict(kind), "labels": kind.labels},
                "stage_chi": stage_chi,
                "methods": methods,
            }
        )
        if sink is not None:
            sink.append(cases[-1])
        progress(
            f"synthetic {i + 1}/{count} ({', '.join(kind.labels)}): "
            + ", ".join(f"{k} IoU {v['iou']:.2f} {v['seconds']:.1f}s" for k, v in methods.items())
        )
    return cases


def measured_cases(
    rec: Reconstructor,
    plain: Reconstructor,
    data_dir: Path,
    skip_cohere: bool,
    ablation: bool = False,
    sink: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct the measured crops with our three modes and cohere-core.

    Every figure is computed against the file's intensity as it is (unthresholded, on its
    own grid): our results are already there; cohere's, fitted to the centred and thresholded
    copy cohere's example preprocessing makes, are carried back by :func:`undo_centring`.

    Returns
    -------
    list of dict
        Per data set: ``name``, ``path``, ``stage_chi`` (of the ``es`` run), ``methods``.
    """
    cases = []
    for name, relative in MEASURED_SETS.items():
        path = data_dir / relative
        if not path.is_file():
            progress(f"{name}: {path} not found, skipped")
            continue
        data = np.load(path).astype(np.float32)
        methods: dict[str, dict[str, Any]] = {}
        results = {}
        for method, (result, seconds) in run_all_modes(rec, plain, data, ablation).items():
            results[method] = result
            methods[method] = {
                "seconds": seconds,
                "timings": dict(result.timings),
                **verdict(result),
            }
        repeats = [methods["full"]["seconds"]]
        for _ in range(MEASURED_REPEATS - 1):
            again, seconds = run_ours(rec, data, "full")
            repeats.append(seconds)
            if not np.array_equal(again.object, results["full"].object):
                raise RuntimeError(f"{name}: the full pipeline gave another object when rerun")
        methods["full"].update(seconds=median(repeats), seconds_each=repeats)
        stage_chi = dict(results["es"].stage_chi)
        cohere_obj = None
        if not skip_cohere:
            median_start, starts = run_cohere_starts(
                data,
                MEASURED_REPEATS,
                lambda obj, data=data: figures(obj, data),
                "r_factor",
                COHERE_MEASURED_THRESHOLD,
            )
            cohere_obj, run = median_start.object, median_start.run
            seconds_each = [start.run.seconds for start in starts]
            methods["cohere"] = {
                **median_start.figures,
                "seconds": median(seconds_each),
                "seconds_each": seconds_each,
                "cohere_error": run.error,
                "chi_fit": run.chi,
                "chi_fit_unconverted": run.chi_unconverted,
                "shift": list(median_start.shift),
                "r_factor_of_each_run": [start.figures["r_factor"] for start in starts],
            }
        for method, result in results.items():
            methods[method].update(figures(result.object, data, reference=cohere_obj))
        cases.append({"name": name, "path": str(path), "stage_chi": stage_chi, "methods": methods})
        if sink is not None:
            sink.append(cases[-1])
        progress(
            f"{name}: "
            + ", ".join(f"{k} chi {v['chi']:.3f} {v['seconds']:.1f}s" for k, v in methods.items())
        )
    return cases


def out_of_family_cases(
    ours: dict[str, Reconstructor],
    count: int,
    n: int,
    skip_cohere: bool,
    sink: list[dict[str, Any]] | None = None,
    start: int = 0,
    indices: list[int] | None = None,
    cohere_starts: int = 1,
) -> list[dict[str, Any]]:
    """Reconstruct ``count`` out-of-family crystals (``BENCHMARK_SEED``) at ``n^3``.

    Ours with ``refine="full"``, each of ``ours`` (name -> reconstructor: ``full``, the
    defaults; ``whole_q``, the further starts on every q (not on every other one: as on the
    full grid or the coarse one where the crystal does not fit in half the field of view);
    ``no_starts``, without the further starts, the rescue starts and the run to convergence;
    ``base``,
    without spending more at all, nor the uniform-amplitude run: the ablations of the
    fit-driven polish); cohere-core
    from ``cohere_starts`` random starts (the median by chi is its figure; each start's IoU and
    chi are kept) with its default recipe, given the counts as they are (a detector gap
    is zeros to it, as to a user who has no mask). Figures against the truth and the counts
    (chi and R-factor over the valid voxels).

    Returns
    -------
    list of dict
        Per crystal: ``index``, ``n``, ``labels``, ``photons``, ``noise_free`` and ``methods``.
    """
    cases = []
    for i in indices if indices is not None else range(start, start + count):
        crystal = out_of_family_crystal(BENCHMARK_SEED, i, n)
        data, mask, truth = crystal.measured, crystal.mask, crystal.object
        methods: dict[str, dict[str, Any]] = {}
        for name, r in ours.items():
            result, seconds = run_ours(r, data, "full", mask)
            methods[name] = {
                **figures(result.object, data, truth, mask=mask),
                "seconds": seconds,
                "cpu_seconds": result.metadata["cpu_seconds"],
                "timings": dict(result.timings),
                **verdict(result),
            }
        if not skip_cohere:
            _, starts = run_cohere_starts(
                data,
                cohere_starts,
                lambda obj, data=data, truth=truth, mask=mask: figures(obj, data, truth, mask=mask),
                "chi",
                # One seed per start where there are several (cohere draws from numpy's
                # global state); a single start is the draw a user gets.
                seeds=None if cohere_starts == 1 else lambda k, i=i: 1000 * i + k,
            )
            each = [
                {
                    **start.figures,
                    "seconds": start.run.seconds,
                    "cpu_seconds": start.cpu_seconds,
                    "cohere_error": start.run.error,
                }
                for start in starts
            ]
            # The typical start: the median by chi (its lowest and highest are in the lists).
            methods["cohere"] = {
                **each[len(each) // 2],
                "iou_of_each_start": [f["iou"] for f in each],
                "chi_of_each_start": [f["chi"] for f in each],
            }
        cases.append(
            {
                "index": i,
                "n": n,
                "labels": crystal.labels,
                "photons": crystal.photons,
                "noise_free": crystal.noise_free,
                "methods": methods,
            }
        )
        if sink is not None:
            sink.append(cases[-1])
        progress(
            f"out-of-family {n}^3 #{i} ({', '.join(crystal.labels)}): "
            + ", ".join(
                f"{k} IoU {v['iou']:.2f} R {v['r_factor']:.3f} "
                f"{v.get('quality', '')} {v['seconds']:.1f}s"
                for k, v in methods.items()
            )
        )
    return cases


# ----------------------------------------------------------------------------- report
def median(values: list[float]) -> float:
    """Median of the finite values (NaN if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def fmt(value: float, digits: int = 3) -> str:
    """A number, or ``-`` when it is not known."""
    return f"{value:.{digits}f}" if np.isfinite(value) else "-"


def method_table(cases: list[dict[str, Any]], methods: list[str], truth: bool) -> str:
    """Median figures per method over ``cases``, and cohere's median time over each method's.

    Parameters
    ----------
    cases : list of dict
        Per-case records with a ``methods`` mapping.
    methods : list of str
        Which methods, in row order.
    truth : bool
        Real-space columns against the truth (synthetic) or the IoU with cohere (measured).
    """

    def med(method: str, key: str) -> float:
        return median([c["methods"][method].get(key, float("nan")) for c in cases])

    cohere_time = med("cohere", "seconds") if "cohere" in methods else float("nan")
    first = ["IoU", "phase RMS"] if truth else ["IoU vs cohere"]
    header = ["method", *first, "chi", "R-factor", "seconds", "cohere time / ours"]
    rows = []
    for m in methods:
        real = [fmt(med(m, "iou")), fmt(med(m, "phase_rms"))] if truth else [fmt(med(m, "iou_ref"))]
        seconds = med(m, "seconds")
        ratio = cohere_time / seconds if seconds > 0 else float("nan")
        rows.append(
            [
                METHOD_LABELS.get(m, m),
                *real,
                fmt(med(m, "chi"), 4),
                fmt(med(m, "r_factor")),
                fmt(seconds, 2),
                "-" if not np.isfinite(ratio) else f"{ratio:.2f}x",
            ]
        )
    return table(header, rows)


def es_gain(cases: list[dict[str, Any]]) -> str:
    """How often ES took chi below the CNN's (chi on the model grid, as ES measures it)."""
    lowered = [c["stage_chi"]["es"] < c["stage_chi"]["cnn"] for c in cases]
    cnn = median([c["stage_chi"]["cnn"] for c in cases])
    es = median([c["stage_chi"]["es"] for c in cases])
    return (
        f"ES lowered chi below the CNN's in {sum(lowered)}/{len(lowered)} cases "
        f"({100 * sum(lowered) / max(len(lowered), 1):.0f}%); median chi CNN {cnn:.4f} "
        f"-> ES {es:.4f}"
    )


def ablation_tables(cases: list[dict[str, Any]], skip_cohere: bool) -> str:
    """Polish-seed figures overall, and the median IoU per kind of crystal."""
    seeds = [*SEED_LABELS, *([] if skip_cohere else ["cohere"])]
    labels = {**SEED_LABELS, "cohere": "(cohere-core 620 it., random start)"}

    def med(group: list[dict[str, Any]], seed: str, key: str) -> float:
        return median([c["methods"][seed][key] for c in group])

    def polish_seconds(seed: str) -> float:
        # The seed's own cost (CNN + ES) is in the main table; here only the polish counts.
        if seed == "full":
            return median([c["methods"]["full"]["timings"]["polish"] for c in cases])
        return med(cases, seed, "seconds")

    overall = table(
        ["seed of the polish", "median IoU", "phase RMS", "chi", "polish s"],
        [
            [
                labels[s],
                fmt(med(cases, s, "iou")),
                fmt(med(cases, s, "phase_rms")),
                fmt(med(cases, s, "chi"), 4),
                fmt(polish_seconds(s), 2),
            ]
            for s in seeds
        ],
    )
    classes = (
        "flat-phase",
        "moderate",
        "strained",
        "compact",
        "platelet/needle",
        "uniform",
        "voids/ramps",
    )
    groups = {"all": cases, **{k: [c for c in cases if k in c["kind"]["labels"]] for k in classes}}
    header = ["median IoU by kind", *groups]
    rows = [["(crystals)", *(str(len(v)) for v in groups.values())]]
    rows += [[labels[s], *(fmt(med(v, s, "iou")) for v in groups.values())] for s in seeds]
    return overall + "\n\n" + table(header, rows)


def p90(values: list[float]) -> float:
    """90th percentile of the finite values (NaN if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.percentile(finite, 90)) if finite else float("nan")


#: IoU below which a reconstruction counts as wrong in the confusion table.
WRONG_IOU = 0.8
OOD_METHODS = {
    "full": "ours: full (fit-driven polish)",
    "whole_q": "ours: the further starts on every q (ablation)",
    "no_starts": "ours: without the further starts (ablation)",
    "base": "ours: full without spending more (ablation)",
    "cohere": "cohere-core 620 it.",
}


def out_of_family_report(cases: list[dict[str, Any]]) -> str:
    """Method table, per-kind medians, the issue's targets, the quality confusion table."""
    methods = [m for m in OOD_METHODS if all(m in c["methods"] for c in cases)]

    def col(group: list[dict[str, Any]], m: str, key: str) -> list[float]:
        return [c["methods"][m][key] for c in group]

    cohere = "cohere" in methods
    rows = []
    timed = [c for c in cases if all("cpu_seconds" in v for v in c["methods"].values())]
    for m in methods:
        secs = col(cases, m, "seconds")
        ratio = (median(col(cases, "cohere", "seconds")) / median(secs)) if cohere else np.nan
        cpu = col(timed, m, "cpu_seconds")
        cpu_ratio = (
            median(col(timed, "cohere", "cpu_seconds")) / median(cpu)
            if cohere and timed
            else np.nan
        )
        rows.append(
            [
                OOD_METHODS[m],
                fmt(median(col(cases, m, "iou"))),
                fmt(median(col(cases, m, "overlap"))),
                fmt(median(col(cases, m, "phase_rms"))),
                fmt(median(col(cases, m, "r_factor"))),
                fmt(median(secs), 2),
                fmt(p90(secs), 2),
                fmt(ratio, 2) + "x",
                fmt(median(cpu), 2),
                fmt(p90(cpu), 2),
                fmt(cpu_ratio, 2) + "x",
            ]
        )
    out = [
        table(
            [
                "method",
                "IoU",
                "overlap",
                "phase RMS",
                "R-factor",
                "wall s",
                "wall p90",
                "cohere wall / ours",
                f"CPU s ({len(timed)})",
                "CPU p90",
                "cohere CPU / ours",
            ],
            rows,
        )
    ]
    groups = [
        *SHAPE_KINDS,
        *DISPLACEMENT_KINDS,
        "uniform",
        "voids",
        "ramp",
        "noise-free",
        "counts",
        "gap",
    ]
    rows = []
    for g in groups:
        members = [c for c in cases if g in c["labels"]]
        if members:
            rows.append(
                [g, str(len(members)), *(fmt(median(col(members, m, "iou"))) for m in methods)]
            )
    out.append(table(["median IoU by kind", "crystals", *methods], rows))
    if cohere:
        gap = [c["methods"]["full"]["iou"] - c["methods"]["cohere"]["iou"] for c in cases]
        below = [
            (c["index"], c["methods"]["full"]["iou"], c["methods"]["cohere"]["iou"])
            for c, d in zip(cases, gap, strict=True)
            if d < -0.05
        ]
        below_ids = {i for i, _, _ in below}
        spread = [
            f"#{c['index']}: " + ", ".join(f"{v:.2f}" for v in each)
            for c in cases
            if c["index"] in below_ids
            and len(each := c["methods"]["cohere"].get("iou_of_each_start", [])) > 1
        ]
        out.append(
            f"median IoU ours {median(col(cases, 'full', 'iou')):.3f} vs cohere "
            f"{median(col(cases, 'cohere', 'iou')):.3f} (target: cohere's + 0.03); median "
            f"overlap {median(col(cases, 'full', 'overlap')):.3f} vs "
            f"{median(col(cases, 'cohere', 'overlap')):.3f}; crystals more than 0.05 IoU below "
            f"cohere's: {len(below)}"
            + (
                ""
                if not below
                else " (" + ", ".join(f"#{i} {a:.2f} vs {b:.2f}" for i, a, b in below) + ")"
            )
            + ("" if not spread else "; cohere's IoU from each start there: " + "; ".join(spread))
        )
    free = [c for c in cases if c["noise_free"]]
    if free:
        r = col(free, "full", "r_factor")
        out.append(
            f"noise-free crystals ({len(free)}): R-factor ours median {median(r):.4f}, "
            f"max {max(r):.4f}, {sum(v <= 0.01 for v in r)} of {len(r)} at <= 0.01"
            + (f"; cohere median {median(col(free, 'cohere', 'r_factor')):.4f}" if cohere else "")
        )
    for m in ("full", "base"):
        if m not in methods:
            continue
        rows = []
        for q in QUALITY_LEVELS:
            members = [c for c in cases if c["methods"][m]["quality"] == q]
            wrong = sum(c["methods"][m]["iou"] < WRONG_IOU for c in members)
            rows.append([q, str(wrong), str(len(members) - wrong)])
        out.append(table([f"quality ({m})", f"IoU < {WRONG_IOU}", f"IoU >= {WRONG_IOU}"], rows))
    chosen: dict[str, int] = {}
    for c in cases:
        label = c["methods"]["full"]["polish_recipe"]
        chosen[label] = chosen.get(label, 0) + 1
    out.append(
        "polish run that gave the object (full): "
        + ", ".join(f"{k} {v}" for k, v in sorted(chosen.items(), key=lambda kv: -kv[1]))
    )
    return "\n\n".join(out)


def ood_rates(sets: dict[str, list[dict[str, Any]]], method: str = "full") -> str:
    """How often the CNN was flagged out of distribution, and by what, on each set."""
    lines = []
    for name, cases in sets.items():
        runs = [c["methods"][method] for c in cases if method in c["methods"]]
        if not runs:
            continue
        flagged = sum(r["out_of_distribution"] for r in runs)
        latent = sum((r["latent_distance"] or 0) > 1 for r in runs)
        lines.append(
            f"{name}: CNN flagged out of distribution on {flagged}/{len(runs)} "
            f"({100 * flagged / len(runs):.0f}%); latent distance > 1 on {latent}, "
            f"the CNN's chi unusual on {flagged - latent} more"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Processor (model name where Linux gives it), CPU count and load average."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = f"{line.split(':', 1)[1].strip()} ({name})"
                break
    return {
        "processor": name,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "fft_workers": FFT_WORKERS,
    }


def convention_check(cases: list[dict[str, Any]]) -> str:
    """cohere's image against the data it was given, converted and as returned."""
    conv = median([c["methods"]["cohere"]["chi_fit"] for c in cases])
    raw = median([c["methods"]["cohere"]["chi_fit_unconverted"] for c in cases])
    return (
        f"cohere convention check: chi of conj(image) {conv:.4f}, of the image as "
        f"returned {raw:.4f} (against the data cohere was given)"
    )


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the machine and the tables (``results`` as written to ``--json``)."""
    synthetic, measured = results["synthetic"], results["measured"]
    methods = [
        *MODES,
        *((f"{mode}_no_search" for mode in NO_SEARCH_MODES) if args.ablation else ()),
        *([] if args.skip_cohere else ["cohere"]),
    ]
    m = results["machine"]
    print(
        f"machine: {m['processor']}, {m['cpus']} CPUs, load average "
        f"{m['load_average'][0]:.1f} at the end; our FFT workers {m['fft_workers']} "
        f"(cohere's 1), as many further starts side by side at most; ONNX Runtime provider "
        f"{results['provider']}; model "
        f"{results['model']}"
    )
    for key in ("out_of_family_64", "out_of_family_128"):
        cases = results[key]
        if cases:
            print(
                f"\nOut-of-family: {len(cases)} crystals at {cases[0]['n']}^3 (seed "
                f"{BENCHMARK_SEED}); medians"
            )
            print(out_of_family_report(cases))
    if synthetic:
        print(
            f"\nSynthetic: {len(synthetic)} prior crystals at {PHOTONS:.0e} photons "
            f"(seed {args.seed}); medians"
        )
        print(method_table(synthetic, methods, truth=True))
        print(es_gain(synthetic))
        rows = [
            [q, str(sum(c["methods"]["full"]["quality"] == q for c in synthetic))]
            for q in QUALITY_LEVELS
        ]
        print(table(["quality (full)", "crystals"], rows))
        if not args.skip_cohere:
            print(convention_check(synthetic))
    for case in measured:
        print(f"\nMeasured: {case['name']} ({case['path']})")
        print(method_table([case], methods, truth=False))
        print(es_gain([case]))
        full = case["methods"]["full"]
        print(
            f"quality (full): {full['quality']} {full['quality_reasons']}; polish runs "
            f"{full['polish_attempts']}"
        )
        if "cohere" in case["methods"]:
            each = case["methods"]["cohere"]["r_factor_of_each_run"]
            print(
                f"cohere R-factor of each of its {len(each)} random starts: "
                + ", ".join(f"{r:.3f}" for r in each)
                + " (the median run is in the table, with the median of the runs' wall times)"
            )
        if not args.skip_cohere:
            print(convention_check([case]))
    print(
        "\n"
        + ood_rates(
            {
                "prior set": synthetic,
                "measured sets": measured,
                "out-of-family 64^3": results["out_of_family_64"],
                "out-of-family 128^3": results["out_of_family_128"],
            }
        )
    )
    if synthetic and args.ablation:
        s = results["settings"]
        print(
            f"\nAblation (synthetic set): the same polish (ER {s['polish_er_iterations']} "
            f"steps; ER/HIO {s['polish_iterations']} steps, {s['polish_hio_fraction']:.0%} HIO, "
            f"unless ER fits to the noise), by seed"
        )
        print(ablation_tables(synthetic, args.skip_cohere))
        print(
            f"kinds: phase peak-to-peak < {FLAT_PHASE_PTP} rad flat-phase, > {STRAINED_PTP} "
            f"rad strained; support aspect ratio > {ELONGATED_ASPECT} platelet/needle"
        )


def main() -> None:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="synthetic prior crystals")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the synthetic set")
    parser.add_argument("--ood-count", type=int, default=40, help="out-of-family crystals at 64^3")
    parser.add_argument(
        "--ood-start",
        type=int,
        default=0,
        help="index of the first out-of-family crystal (to continue a run)",
    )
    parser.add_argument(
        "--ood-indices",
        default=None,
        metavar="I,J,...",
        help="these out-of-family crystals (64^3) instead of a range",
    )
    parser.add_argument(
        "--ood128-count", type=int, default=4, help="out-of-family crystals at 128^3"
    )
    parser.add_argument(
        "--cohere-starts",
        type=int,
        default=1,
        help="cohere-core random starts per out-of-family crystal (its figure: the median "
        "start by chi)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="prior and measured sets also without the shape search and from "
        "the model-free polish seeds",
    )
    parser.add_argument("--skip-cohere", action="store_true", help="run only our pipeline")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="folder with the measured data sets",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write every figure here (rewritten after each crystal)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="only print the tables of a run saved with --json (complete or not)",
    )
    args = parser.parse_args()
    if args.report is not None:
        report(args, json.loads(args.report.read_text()))
        return

    # Default settings: the iteration counts and convergence end every run; the wall-time caps
    # are a safety net, and a result they cut says so (``cut_short``, in the JSON).
    rec = Reconstructor()
    plain = Reconstructor(settings=rec.settings, shape_search_evaluations=0)
    no_starts = Reconstructor(
        settings=rec.settings, adaptive_iterations=0, converge_iterations=0, rescue_starts=0
    )
    base = Reconstructor(settings=no_starts.settings, uniform_amplitude_iterations=0)
    whole_q = Reconstructor(settings=rec.settings, starts_subsampling=False)
    ours = {"full": rec, "whole_q": whole_q, "no_starts": no_starts, "base": base}
    # The first inference pays ONNX Runtime's start-up, which no later call does.
    warm = out_of_family_crystal(BENCHMARK_SEED + 1, 0).measured
    for r in (rec, plain, whole_q, no_starts, base):
        r.reconstruct(warm, refine="none")
    results: dict[str, Any] = {
        "machine": machine(),
        "seed": args.seed,
        "photons": PHOTONS,
        "out_of_family_seed": BENCHMARK_SEED,
        "cohere_recipe": COHERE_RECIPE,
        "settings": rec.settings.as_dict(),
        "provider": rec.provider,
        "model": rec.model_name,
        "out_of_family_64": [],
        "measured": [],
        "synthetic": [],
        "out_of_family_128": [],
    }

    class Saved(list):
        """A list that rewrites the JSON file after each case: a run cut short keeps its
        figures."""

        def append(self, item: Any) -> None:
            super().append(item)
            if args.json is not None:
                results["machine"] = machine()
                atomic_write_bytes(args.json, json.dumps(results, indent=1, default=float).encode())

    for key in ("out_of_family_64", "measured", "synthetic", "out_of_family_128"):
        results[key] = Saved()
    out_of_family_cases(
        ours,
        args.ood_count,
        64,
        args.skip_cohere,
        results["out_of_family_64"],
        args.ood_start,
        None if args.ood_indices is None else [int(i) for i in args.ood_indices.split(",")],
        args.cohere_starts,
    )
    measured_cases(rec, plain, args.data_dir, args.skip_cohere, args.ablation, results["measured"])
    synthetic_cases(
        rec, plain, args.count, args.seed, args.skip_cohere, args.ablation, results["synthetic"]
    )
    # Above 64 voxels the starts run on the coarse grid, never on every other q: no ablation.
    out_of_family_cases(
        {k: v for k, v in ours.items() if k != "whole_q"},
        args.ood128_count,
        128,
        args.skip_cohere,
        results["out_of_family_128"],
        cohere_starts=args.cohere_starts,
    )
    report(args, results)


if __name__ == "__main__":
    main()
