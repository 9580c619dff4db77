"""The reconstruction pipeline: preprocess -> CNN -> extremum seeking -> phase-retrieval polish.

It knows nothing of Bluesky or EPICS: arrays in, a :class:`ReconstructionResult` out. Each stage
is a function with a small record in and out (:func:`prepare_measurement`, :func:`cnn_stage`,
:func:`refine_stage`, :func:`polish_stage`); the decisions between them are named policies
(:func:`es_budget_scale`, :func:`fit_at_noise`, :func:`~bcdi_bluesky.quality.quality_verdict`).
Every stage stops by iteration counts and convergence, so the same input gives the same result
on any machine; wall-time caps are a safety net, reported when they cut a run short.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import scipy.fft
import scipy.ndimage

from .backend import FFT_WORKERS, NUMPY, ArrayBackend, fft_workers_limit, select_backend
from .errors import DataError, SettingsError
from .model.latent import latent_vector
from .model.runtime import OnnxCrystalModel
from .physics import (
    NOISE_FREE_LEVEL,
    CrystalModel,
    Geometry,
    PhysicalResult,
    autocorrelation_noise,
    check_mask,
    check_volume,
    physical_result,
    poisson_chi_expected,
    poisson_chi_floor,
)
from .physics import intensity as far_field_intensity
from .physics import support as amplitude_support
from .preprocess import (
    Prepared,
    at_photon_level,
    fit_to_grid,
    network_input,
    remove_hot_pixels,
    saturation_mask,
)
from .quality import (
    CHI_GOOD,
    FIT_GOOD,
    Distribution,
    QualityEvidence,
    check_bragg_peak,
    out_of_distribution,
    poor_fit,
    quality_verdict,
)
from .settings import (
    CONVERGED_NEAR,
    FAR_FROM_NOISE,
    FINALISTS,
    FREE_ER_RELAXATION,
    FREE_ER_SHARE,
    LOOSE_SUPPORT_DILATION,
    RESCUE_GRID_EDGE,
    RESCUE_HIO_FRACTION,
    RESCUE_ITERATIONS,
    SCREEN_SHARE,
    SEED_SUPPORT_THRESHOLD,
    STARTS_GRID_EDGE,
    UNIFORM_AMPLITUDE_DEPTH,
    UNIFORM_AMPLITUDE_GROWTH,
    ReconstructionSettings,
)
from .tuning.phase_retrieval import (
    CoherenceKernel,
    PolishResult,
    autocorrelation_seed,
    polish,
    random_start,
    seeded_polish,
    shrink_wrap,
)
from .tuning.refine import (
    ChiCost,
    best_start,
    best_twin_variant,
    coarse_chi,
    fit_odd_shape,
    refine_crystal,
)
from .tuning.sampling import (
    central_slices,
    coarse_shape,
    crop_frequencies,
    fits_every_other_q,
    fold,
    pad_frequencies,
    subsample,
    unfold,
)

REFINE_MODES = ("none", "es", "full")
#: Keys of :attr:`ReconstructionResult.timings`, seconds: the stages, the CNN stage's two parts
#: (``network``: its input and the network; ``twin_choice``: the data's choice of the twin-odd
#: signs; both inside ``inference``), and the whole run.
TIMING_KEYS = (
    "preprocess",
    "inference",
    "network",
    "twin_choice",
    "refine",
    "polish",
    "total",
)

#: ``progress(stage, info)``: called after each stage ("preprocess", "inference", "refine",
#: "polish", "done") and during ES ("es_step") and polish ("polish_step"). Before a polish,
#: "preview" hands over the model fit's object on the input grid (``object``, ``support``,
#: ``chi``): a first picture for the control room while the polish runs.
ProgressHook = Callable[[str, dict[str, Any]], None]


class ResultField(NamedTuple):
    """One key of the result schema: its units ("" for none) and what it means."""

    units: str
    doc: str


#: The result schema: every key of :meth:`ReconstructionResult.summary`, with units and meaning.
#: Every face uses these names: ``reconstruct --json``, the lines of ``serve`` and
#: ``reprocess``, the figures of a scan record, result files, derived runs (scalar keys, nested
#: ones as ``key_sub``) and the IOC's result PVs.
RESULT_SCHEMA: dict[str, ResultField] = {
    "chi": ResultField("", "misfit ||A - sqrt(I)|| / ||sqrt(I)|| of the result against the data"),
    "stage_chi": ResultField("", "chi after each stage: cnn, shape, es, polish"),
    "timings_s": ResultField(
        "s",
        "seconds of each stage: preprocess, inference (the CNN stage: network, then the "
        "data's choice of the twin-odd signs, twin_choice), refine, polish, total",
    ),
    "provider": ResultField("", "the ONNX Runtime provider that ran the CNN"),
    "device": ResultField("", "where the phase retrieval ran: cpu or cuda:N"),
    "array_library": ResultField(
        "", "the array library of the phase retrieval: numpy, cupy or torch"
    ),
    "model": ResultField("", "name of the CNN"),
    "refine": ResultField("", "refinement mode: none, es or full"),
    "es_iterations": ResultField("", "cost evaluations of the refinement (search and ES)"),
    "polish_iterations": ResultField("", "phase-retrieval steps of the run that gave the object"),
    "polish_recipe": ResultField("", "the polish run that gave the object"),
    "support_voxels": ResultField("voxel", "voxels in the support on the input grid"),
    "shape": ResultField("voxel", "shape of the input grid"),
    "latent_xy": ResultField("", "position of the scan on the model card's latent map"),
    "latent_distance": ResultField(
        "",
        "calibrated distance of the CNN's latent to its "
        "training distribution (99% of prior crystals below 1)",
    ),
    "out_of_distribution": ResultField("", "the CNN is out of its training distribution"),
    "quality": ResultField("", "verdict on the result: good, fair or poor"),
    "quality_reasons": ResultField("", "why the verdict is what it is"),
    "expected_chi": ResultField("", "chi that Poisson noise alone would leave (counts only)"),
    "polish_attempts": ResultField("", "chi of each polish run that ran"),
    "coherence_kernel_peak": ResultField(
        "",
        "largest value of the partial-coherence kernel over q (1: a coherent beam; None: "
        "not modelled, setting partial_coherence)",
    ),
    "cut_short": ResultField("", "stages that a wall-time safety cap cut short"),
    "settings": ResultField("", "the ReconstructionSettings the reconstruction ran with"),
    "crystal_volume_nm3": ResultField("nm^3", "crystal volume (with the scan's geometry)"),
    "crystal_extents_nm": ResultField("nm", "principal extents, longest first (with geometry)"),
    "strain_rms": ResultField("", "RMS of the strain along Q over the support (with geometry)"),
    "displacement_rms_nm": ResultField(
        "nm", "RMS of the displacement along Q over the support (with geometry)"
    ),
    "q_bragg_inv_nm": ResultField("1/nm", "Q of the Bragg peak in the lab frame (with geometry)"),
    "voxel_size_nm": ResultField("nm", "spacing of the lab grid (with geometry)"),
}


@dataclass
class ReconstructionResult:
    """A reconstruction on the input grid, in the input's convention.

    ``|fftshift(fftn(object))|^2`` approximates the input intensity (up to scale).
    """

    object: np.ndarray
    support: np.ndarray
    params: np.ndarray
    chi: float
    timings: dict[str, float]
    provider: str
    model_name: str
    crystal_model: CrystalModel
    #: chi after each stage: "cnn", "shape" (the odd-shape search), "es" (model level, on the
    #: model grid) and "polish" (the final object against the input).
    stage_chi: dict[str, float] = field(default_factory=dict)
    #: Refinement costs step by step: the search's best-so-far, then the ES runs.
    es_costs: list[float] = field(default_factory=list)
    polish_errors: list[float] = field(default_factory=list)
    #: Which polish run gave the object (a key of :attr:`polish_attempts`; "" without a
    #: polish).
    polish_recipe: str = ""
    refine: str = "full"
    shift: tuple[int, int, int] = (0, 0, 0)
    #: Position of the CNN's latent on the model card's 2D map, its calibrated distance to the
    #: training distribution (99% of prior crystals below 1), and the flag (distance > 1).
    latent_xy: tuple[float, float] | None = None
    latent_distance: float | None = None
    out_of_distribution: bool = False
    #: How far to trust the result (:func:`~bcdi_bluesky.quality.quality_verdict`): "good",
    #: "fair" or "poor", and why it is not "good".
    quality: str = "good"
    quality_reasons: list[str] = field(default_factory=list)
    #: chi that Poisson noise alone would leave with this result as the truth (None: the data
    #: are not counts); the fit is at the noise when ``chi`` is near it.
    expected_chi: float | None = None
    #: Polish runs tried, with their chi against the data ("ER", "ER/HIO", "model ER/HIO",
    #: "random start 1 ER/HIO", "... +uniform amplitude", "... +ER/HIO to convergence"); the
    #: lowest gave the object.
    polish_attempts: dict[str, float] = field(default_factory=dict)
    #: Stages that a safety wall-time cap cut short ("refine", "polish"): the result then
    #: depends on the machine's load.
    cut_short: list[str] = field(default_factory=list)
    #: The settings the reconstruction ran with.
    settings: ReconstructionSettings = field(default_factory=ReconstructionSettings)
    #: Set by the beamline layer (scan uid and id, recommendation for the next scan...).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The crystal in the lab frame with displacement and strain, when the geometry is known.
    physical: PhysicalResult | None = None
    #: The partial-coherence kernel over q (centred, sums to 1) when the polish modelled it.
    coherence_kernel: np.ndarray | None = None
    #: Where the phase retrieval ran ("cpu", "cuda:0") and with which array library.
    device: str = "cpu"
    array_library: str = "numpy"

    @property
    def params_structured(self) -> dict:
        """A readable view of :attr:`params` (radius, SH by degree, RBFs, phase terms)."""
        return self.crystal_model.structured(self.params)

    @property
    def chi_cnn(self) -> float:
        """chi of the CNN's estimate alone (on the model grid)."""
        return self.stage_chi.get("cnn", float("nan"))

    def summary(self) -> dict[str, Any]:
        """JSON-able figures of the run; with the geometry also ``crystal_volume_nm3``,
        ``crystal_extents_nm``, ``strain_rms``, ``displacement_rms_nm`` (see
        :meth:`~bcdi_bluesky.physics.PhysicalResult.summary`)."""
        physical = self.physical.summary() if self.physical is not None else {}
        return {
            "chi": self.chi,
            "stage_chi": self.stage_chi,
            "timings_s": self.timings,
            "provider": self.provider,
            "device": self.device,
            "array_library": self.array_library,
            "model": self.model_name,
            "refine": self.refine,
            "es_iterations": len(self.es_costs),
            "polish_iterations": len(self.polish_errors),
            "polish_recipe": self.polish_recipe,
            "support_voxels": int(self.support.sum()),
            "shape": list(self.object.shape),
            "latent_xy": list(self.latent_xy) if self.latent_xy is not None else None,
            "latent_distance": self.latent_distance,
            "out_of_distribution": self.out_of_distribution,
            "quality": self.quality,
            "quality_reasons": list(self.quality_reasons),
            "expected_chi": self.expected_chi,
            "polish_attempts": dict(self.polish_attempts),
            "coherence_kernel_peak": (
                None if self.coherence_kernel is None else float(self.coherence_kernel.max())
            ),
            "cut_short": list(self.cut_short),
            "settings": self.settings.as_dict(),
            **physical,
        }


def to_input_grid(
    obj: np.ndarray, prepared: Prepared, shape: tuple[int, ...], backend: ArrayBackend = NUMPY
) -> np.ndarray:
    """Carry an object from the model grid to the input grid.

    The model grid's far field is the input's, rolled by ``prepared.shift`` and cropped at
    ``prepared.crop``: putting it back where it came from (zeros elsewhere) and transforming
    back gives the object on the input grid (Fourier interpolation when the grids differ).
    The transforms run on ``backend``; the object comes back as an array of it.
    """
    n = obj.shape[0]
    xp = backend.xp
    field_model = backend.fftshift(backend.fftn(backend.asarray(obj, dtype=xp.complex64)))
    field_input = backend.zeros(shape, xp.complex64)
    src, dst = [], []
    for size, start, shift in zip(shape, prepared.crop, prepared.shift, strict=True):
        j = np.arange(n)
        rolled = start + j  # index in the rolled input
        keep = (rolled >= 0) & (rolled < size)
        src.append(j[keep])
        dst.append((rolled[keep] - shift) % size)
    put = tuple(backend.asarray(i) for i in np.ix_(*dst))
    take = tuple(backend.asarray(i) for i in np.ix_(*src))
    field_input[put] = field_model[take]
    out = backend.ifftn(backend.ifftshift(field_input), overwrite=True)
    return out * float(np.prod(shape) / n**3)


def to_model_grid(obj: np.ndarray, n: int) -> np.ndarray:
    """The object's far field cropped to the central ``n^3`` of q, back in real space: a
    reconstruction on a larger input grid brought to a model crystal's grid (comparisons)."""
    field_input = scipy.fft.fftshift(scipy.fft.fftn(obj))
    s = [x // 2 - n // 2 for x in field_input.shape]
    crop = field_input[s[0] : s[0] + n, s[1] : s[1] + n, s[2] : s[2] + n]
    return scipy.fft.ifftn(scipy.fft.ifftshift(crop)).astype(np.complex64)


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Measurement:
    """The checked input (:func:`prepare_measurement`)."""

    data: np.ndarray  # float32, the input grid
    valid: np.ndarray | None  # True for valid voxels (hot pixels removed); None: all valid
    prepared: Prepared  # the data centred on the model grid
    noise_floor: float | None  # physics.poisson_chi_floor (None: not counts)
    noise_free: bool  # not counts and without noise (physics.autocorrelation_noise)

    @property
    def counts(self) -> bool:
        """Photon counts (whole numbers): their Poisson noise is known."""
        return self.noise_floor is not None


def oversampling(valid: np.ndarray | None, voxels: int, support: np.ndarray) -> float:
    """Valid measured voxels per voxel of ``support`` (``voxels`` when nothing is masked)."""
    measured = voxels if valid is None else int(np.count_nonzero(valid))
    return measured / max(int(np.count_nonzero(support)), 1)


def prepare_measurement(intensity: np.ndarray, mask: np.ndarray | None, n: int) -> Measurement:
    """Check the volume and mask, mask hot pixels, check the Bragg peak, fit to the ``n^3`` grid;
    tell counts (their Poisson floor), noise-free data and other data apart.

    Raises
    ------
    DataError
        A volume or mask that cannot be reconstructed (wrong rank, NaN, negative...).
    NoBraggPeakError
        Photon counts without a detectable Bragg peak (:func:`~bcdi_bluesky.quality.
        check_bragg_peak`): nothing is reconstructed.
    """
    if isinstance(intensity, np.ma.MaskedArray):
        # numpy's own mask (True = invalid) joins the given one: np.asarray would drop it.
        own = ~np.ma.getmaskarray(intensity)
        intensity = intensity.filled(0)
        if mask is not None:
            own = own & check_mask(mask, intensity.shape)
        mask = own
    unsaturated = saturation_mask(intensity) if isinstance(intensity, np.ndarray) else None
    data = check_volume(intensity)
    valid = check_mask(mask, data.shape)
    if unsaturated is not None:  # 16-bit counts at 65535...: the detector saturated there
        valid = unsaturated if valid is None else valid & unsaturated
    valid = remove_hot_pixels(data, valid)
    if valid.all():
        valid = None
    floor = poisson_chi_floor(data, valid)
    check_bragg_peak(data, valid, counts=floor is not None)
    noise_free = floor is None and autocorrelation_noise(data, valid) < NOISE_FREE_LEVEL
    prepared = fit_to_grid(data, n, valid, hot_pixels_masked=True)
    return Measurement(data, valid, prepared, floor, noise_free)


@dataclass(frozen=True)
class CNNEstimate:
    """The CNN's crystal (:func:`cnn_stage`) and where it stands against its training."""

    params: np.ndarray  # physical parameters
    chi: float  # against the data on the model grid
    latent_xy: tuple[float, float] | None
    distribution: Distribution
    network_s: float = 0.0  # seconds of the network input and the network
    twin_choice_s: float = 0.0  # seconds of the data's choice of the twin-odd signs


def cnn_stage(
    runtime: OnnxCrystalModel,
    model: CrystalModel,
    prepared: Prepared,
    chi_of: ChiCost,
    coarse_chi_of: Callable[[np.ndarray], float] | None = None,
    counts: bool = True,
) -> CNNEstimate:
    """Predict the crystal; the data choose the twin-odd signs (ranked by ``coarse_chi_of``
    when given, :func:`~bcdi_bluesky.tuning.coarse_chi`); place it on the latent map. Data
    that are not ``counts`` reach the network at a trained photon level
    (:func:`~bcdi_bluesky.preprocess.at_photon_level`)."""
    t = time.perf_counter()
    shown = at_photon_level(prepared.intensity, prepared.mask, counts)
    predicted = runtime.predict(network_input(shown, prepared.mask))
    network_s = time.perf_counter() - t
    latent, cnn_chi = best_twin_variant(
        model, runtime.encoding.twin_variants(predicted.astype(np.float64)), chi_of, coarse_chi_of
    )
    twin_choice_s = time.perf_counter() - t - network_s
    latent_map = runtime.latent_map
    latent_xy, distance, chi_mean, chi_sd = None, None, None, None
    if latent_map is not None:
        z = latent_vector(latent, cnn_chi)
        latent_xy = tuple(float(v) for v in latent_map.project(z))
        distance = float(latent_map.distance(z))
        chi_mean, chi_sd = latent_map.chi_distribution()
    return CNNEstimate(
        model.denormalise(latent),
        cnn_chi,
        latent_xy,
        out_of_distribution(distance, cnn_chi, chi_mean, chi_sd),
        network_s,
        twin_choice_s,
    )


def es_budget_scale(distribution: Distribution) -> int:
    """Work factor of the refinement: out of the CNN's depth, lean on the model-free search
    and ES (twice their iterations)."""
    return 2 if distribution.flagged else 1


@dataclass(frozen=True)
class ModelFit:
    """The refined crystal parameters (:func:`refine_stage`)."""

    params: np.ndarray
    chi_shape: float  # after the odd-shape search
    chi: float  # after ES
    costs: list[float]
    cut_short: bool


def refine_stage(
    model: CrystalModel,
    params: np.ndarray,
    prepared: Prepared,
    settings: ReconstructionSettings,
    scale: int = 1,
    hook: Callable[[int, float], None] | None = None,
    backend: ArrayBackend = NUMPY,
) -> ModelFit:
    """Odd-shape search, then ES from the CNN's start and the search's (``scale`` times the
    steps and the safety cap)."""
    started = time.perf_counter()
    budget = settings.es_time_budget_s * scale
    offset = [0]

    def step(iteration: int, cost: float) -> None:
        if hook is not None:
            hook(offset[0] + iteration, cost)

    searched = fit_odd_shape(
        model,
        params,
        prepared.intensity,
        prepared.mask,
        max_evaluations=settings.shape_search_evaluations * scale,
        time_budget_s=budget,
        hook=step,
        backend=backend,
    )
    offset[0] = searched.iterations
    # The search's answer is a second start for ES, not a replacement of the CNN's: on
    # crystals outside the model family it can lead ES to a poorer fit.
    refined = refine_crystal(
        model,
        params,
        prepared.intensity,
        prepared.mask,
        alternatives=[searched.params] if searched.chi < searched.chi_start else [],
        coarse_iterations=settings.es_coarse_iterations * scale,
        fine_iterations=settings.es_fine_iterations * scale,
        fine_subsampling=settings.es_subsampling,
        time_budget_s=max(budget - (time.perf_counter() - started), 0.0),
        seed=settings.seed,
        hook=step,
        backend=backend,
    )
    return ModelFit(
        refined.params,
        searched.chi,
        refined.chi,
        searched.costs + refined.costs,
        searched.cut_short or refined.cut_short,
    )


def fit_at_noise(chi: float, expected_chi: float | None) -> bool:
    """Policy: is a fit as good as the data allow? Counts: chi within :data:`~bcdi_bluesky.
    quality.FIT_GOOD` of what Poisson noise alone leaves; other data (noise-free, corrected):
    chi at most :data:`~bcdi_bluesky.quality.CHI_GOOD`."""
    if expected_chi is not None:
        return chi <= FIT_GOOD * expected_chi
    return chi <= CHI_GOOD


def far_from_noise(chi: float, floor: float | None) -> bool:
    """Policy: is a fit on every other q so far above what the data allow
    (:data:`~bcdi_bluesky.settings.FAR_FROM_NOISE` times the target of :func:`fit_at_noise`,
    against the :func:`~bcdi_bluesky.physics.poisson_chi_floor` of those data, ``floor``, or
    :data:`~bcdi_bluesky.quality.CHI_GOOD` where they are not counts) that ER steps on the
    full grid cannot bring it to the noise?"""
    target = CHI_GOOD if floor is None else FIT_GOOD * floor
    return chi > FAR_FROM_NOISE * target


#: Coarse grids keep at least this many voxels along every axis (else the starts run on the
#: full grid).
MIN_COARSE_EDGE = 16


def starts_factor(downsampling: int, shape: tuple[int, ...]) -> int:
    """The factor k of the further starts' grid (the central 1/k of q) for data of ``shape``.

    ``downsampling`` is the setting: k itself, or 0 for the smallest k that brings every axis
    to at most :data:`~bcdi_bluesky.settings.STARTS_GRID_EDGE` voxels. 1 (the full grid)
    where the coarse grid would have fewer than :data:`MIN_COARSE_EDGE` voxels along an axis.
    """
    factor = downsampling or math.ceil(max(shape) / STARTS_GRID_EDGE)
    return factor if min(coarse_shape(shape, factor)) >= MIN_COARSE_EDGE else 1


@dataclass
class PolishOutcome:
    """The polished object (:func:`polish_stage`) and how it was reached."""

    object: np.ndarray
    chi: float
    expected_chi: float | None
    errors: list[float]
    recipe: str
    attempts: dict[str, float]
    converged: bool
    cut_short: bool
    kernel: CoherenceKernel | None = None


def side_by_side(backend: ArrayBackend, runs: int) -> int:
    """How many of ``runs`` independent polish runs go on at once: on the numpy backend one per
    core that :data:`~bcdi_bluesky.backend.FFT_WORKERS` allows (a 64^3 FFT gains little from
    a second thread, 3.2 -> 3.0 ms on 2 cores, and numpy's element-wise work has one thread:
    two runs side by side on 2 cores take 0.63 of the time of one after the other); on a GPU
    one at a time (a run already fills it)."""
    return max(1, min(runs, FFT_WORKERS)) if backend.is_numpy else 1


class _PolishRuns:
    """The runs of one polish on one backend: their shared step count (for ``hook``), error
    trace and wall-time safety cap (``polish_time_budget_s``, all runs together)."""

    def __init__(
        self,
        settings: ReconstructionSettings,
        backend: ArrayBackend,
        hook: Callable[[int, float], bool | None] | None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.hook = hook
        self.started = time.perf_counter()
        self.steps = 0
        self.errors: list[float] = []
        self.cut = False
        self._lock = threading.Lock()

    def left(self) -> float:
        """Seconds left under the safety cap."""
        elapsed = time.perf_counter() - self.started
        return max(self.settings.polish_time_budget_s - elapsed, 0.0)

    def counted(self, i: int, e: float) -> bool | None:
        """The hook, given the steps of every run so far (runs side by side add to one count,
        and the hook is never called from two threads at once)."""
        if self.hook is None:
            return None
        with self._lock:
            self.steps += 1
            return self.hook(self.steps, e)

    def record(self, run: PolishResult) -> PolishResult:
        """Keep ``run``'s errors, and whether the cap cut it."""
        self.errors.extend(run.errors)
        self.cut = self.cut or run.cut_short
        return run

    def _run(
        self,
        grid_data: Any,
        obj: Any,
        support: Any,
        grid_valid: Any,
        iterations: int,
        cost: ChiCost,
        **options,
    ) -> PolishResult:
        """One ER/HIO run (``adaptive_hio_fraction`` HIO unless ``options`` say otherwise)
        on ``grid_data`` (the full or the coarse grid), its chi against ``cost``; not
        recorded."""
        options.setdefault("hio_fraction", self.settings.adaptive_hio_fraction)
        run = polish(
            grid_data,
            obj,
            support,
            grid_valid,
            iterations=iterations,
            time_budget_s=self.left(),
            hook=self.counted,
            backend=self.backend,
            partial_coherence=self.settings.partial_coherence,
            **options,
        )
        run.chi = cost(run.model_intensity(self.backend))
        return run

    def further(self, *args: Any, **options: Any) -> PolishResult:
        """One more run (the arguments of :meth:`_run`), recorded."""
        return self.record(self._run(*args, **options))

    def further_each(
        self,
        grid_data: Any,
        seeds: Sequence[tuple[Any, Any]],
        grid_valid: Any,
        iterations: int,
        cost: ChiCost,
        **options: Any,
    ) -> list[PolishResult]:
        """:meth:`further` from each (object, support) of ``seeds`` (with ``options``),
        independent runs, side by side where the cores allow (:func:`side_by_side`, the cores
        shared among their FFTs); the runs, their errors and so the result are those of one
        after the other, in the order of ``seeds``. One after the other, no run starts after
        the cap cut one; side by side, the cap cuts them together."""
        lanes = side_by_side(self.backend, len(seeds))
        if lanes == 1:
            done = []
            for obj, support in seeds:
                done.append(
                    self.further(grid_data, obj, support, grid_valid, iterations, cost, **options)
                )
                if self.cut:
                    break
            return done

        def run(seed: tuple[Any, Any]) -> PolishResult:
            with fft_workers_limit(FFT_WORKERS // lanes):
                return self._run(grid_data, *seed, grid_valid, iterations, cost, **options)

        with ThreadPoolExecutor(lanes, thread_name_prefix="bcdi-polish") as pool:
            done = list(pool.map(run, seeds))
        return [self.record(r) for r in done]


#: The label's end of a run on every other q (:func:`subsampling`).
SUBSAMPLED = " on every other q"


def _model_free_starts(
    settings: ReconstructionSettings, sphere: np.ndarray, inside: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The starts a wrong model cannot trap, by label: the flat, uniform ``sphere`` and
    ``random_starts`` of random amplitudes and phases inside it, drawn from ``seed``."""
    starts = {"autocorrelation ER/HIO": (sphere, inside)}
    for k in range(settings.random_starts):
        rng = np.random.default_rng((settings.seed, k))
        starts[f"random start {k + 1} ER/HIO"] = (random_start(inside, rng), inside)
    return starts


def _screened(
    runs: _PolishRuns,
    grid_data: Any,
    grid_valid: Any,
    cost: ChiCost,
    starts: Mapping[str, tuple[Any, Any]],
    suffix: str,
) -> tuple[list[tuple[float, str, PolishResult]], list[tuple[float, str, PolishResult]]]:
    """Every start runs :data:`SCREEN_SHARE` of ``adaptive_iterations`` steps on
    ``grid_data``; the :data:`FINALISTS` of lowest chi run the rest (the same recipe again from
    where they are).

    Returns
    -------
    finalists, dropped : list of (chi, label, PolishResult)
        Lowest chi first; labels end with ``suffix``.
    """
    settings = runs.settings
    screen = max(round(settings.adaptive_iterations * SCREEN_SHARE), 1)
    done = runs.further_each(grid_data, list(starts.values()), grid_valid, screen, cost)
    ranked = sorted(
        ((run.chi, label + suffix, run) for label, run in zip(starts, done, strict=False)),
        key=lambda entry: entry[0],
    )
    rest = settings.adaptive_iterations - screen
    finalists, dropped = ranked[:FINALISTS], ranked[FINALISTS:]
    if rest > 0 and not runs.cut:
        seeds = [(run.object, run.support) for _, _, run in finalists]
        done = runs.further_each(grid_data, seeds, grid_valid, rest, cost)
        finalists = sorted(
            ((run.chi, label, run) for (_, label, _), run in zip(finalists, done, strict=False)),
            key=lambda entry: entry[0],
        )
    return finalists, dropped


def _further_starts(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    model_object: Any,
    seed_support: Any,
) -> tuple[list[tuple[float, str, PolishResult]], dict[str, float]]:
    """Step 2 of :func:`polish_stage` where the starts do not go on every other q
    (:func:`subsampling` None): the model seed again and the model-free starts, on the
    full grid or (:func:`starts_factor` above 1) on the coarse one, screened
    (:func:`_screened`); on a coarse grid the finalists are then refined on the full one.

    Returns
    -------
    runs, attempts : list of (chi, label, PolishResult), dict
        The full-grid runs, lowest chi first, and each one's chi by label.
    """
    settings, backend = runs.settings, runs.backend
    factor = starts_factor(settings.starts_downsampling, data.shape)
    window = central_slices(data.shape, coarse_shape(data.shape, factor))
    coarse_data = data[window]
    coarse_valid = None if valid is None else valid[window]
    if factor == 1:
        coarse_cost, model_start = chi_cost, (model_object, seed_support)
    else:
        coarse_cost = ChiCost(coarse_data, coarse_valid, backend)
        coarse_model = crop_frequencies(model_object, factor, backend)
        model_start = (coarse_model, amplitude_support(coarse_model, SEED_SUPPORT_THRESHOLD))
    # From the host copy of the data: no device -> host transfer.
    sphere, inside = autocorrelation_seed(measurement.data[window])
    starts = {"model ER/HIO": model_start, **_model_free_starts(settings, sphere, inside)}
    suffix = "" if factor == 1 else f" at 1/{factor} resolution"
    finalists, dropped = _screened(runs, coarse_data, coarse_valid, coarse_cost, starts, suffix)
    if factor == 1:  # a coarse chi does not compare with the full grid's
        dropped = [(chi, f"{label}, screened out", run) for chi, label, run in dropped]
        ranked = sorted(finalists + dropped, key=lambda entry: entry[0])
        return ranked, {label: chi for chi, label, _ in ranked}
    if runs.cut:
        return [], {}
    # The finalists are refined at full resolution, where a start that looked second may fit
    # better.
    seeds = []
    for _, _, coarse in finalists:
        obj = pad_frequencies(coarse.object, data.shape, backend)
        seeds.append((obj, shrink_wrap(obj, backend=backend)))
    refined = _refined_at_full_resolution(
        runs, measurement, data, valid, chi_cost, seeds, settings.adaptive_iterations // 2
    )
    return _ranked_refined(finalists, refined)


def refine_subsampling(
    settings: ReconstructionSettings, support: np.ndarray
) -> tuple[int, ...] | None:
    """Policy: the factors of :func:`~bcdi_bluesky.tuning.subsample` for the refinement of a
    coarse start's finalist, from its ``support`` on the full grid; None (the full grid) when
    ``starts_subsampling`` is off, with ``partial_coherence``, or where the support does not
    fit in half the field of view along every axis (:func:`fits_every_other_q`)."""
    return _subsampling_policy(settings.starts_subsampling, settings, support)


def _refined_at_full_resolution(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    seeds: Sequence[tuple[Any, Any]],
    steps: int,
) -> list[tuple[PolishResult, str] | None]:
    """The coarse starts' finalists ``seeds`` (objects and supports on the full grid) refined
    at full resolution by ``steps`` ER/HIO steps: on every other q where a finalist fits
    (:func:`refine_subsampling`), each step up to 8 times cheaper, then carried back
    (:func:`~bcdi_bluesky.tuning.unfold`) and refined by ``subsampled_refine_iterations`` ER
    steps on the full grid; on the full grid where it does not, or where the crystal it found
    on every other q does not fit.

    Returns
    -------
    list of (PolishResult, str) or None
        Per seed, its full-grid run and the label's end; None where the cap stopped the runs
        before it.
    """
    settings, backend = runs.settings, runs.backend
    done: list[tuple[PolishResult, str] | None] = [None] * len(seeds)
    folding = {}
    for i, (_, support) in enumerate(seeds):
        factors = refine_subsampling(settings, backend.to_numpy(support))
        if factors is not None:
            folding.setdefault(factors, []).append(i)
    for factors, which in folding.items():
        small_data, small_valid, _ = _every_other_q(measurement, factors, backend)
        small = runs.further_each(
            small_data,
            [tuple(fold(a, factors, backend) for a in seeds[i]) for i in which],
            small_valid,
            steps,
            ChiCost(small_data, small_valid, backend),
        )
        back = []
        for i, run in zip(which, small, strict=False):
            seed = _carried_back(runs, run.object, data.shape)
            if seed is not None:
                back.append((i, seed))
        refined = runs.further_each(
            data,
            [seed for _, seed in back],
            valid,
            settings.subsampled_refine_iterations,
            chi_cost,
            hio_fraction=0.0,
        )
        for (i, _), run in zip(back, refined, strict=False):
            done[i] = (run, f", refined{SUBSAMPLED}")
    rest = [i for i, entry in enumerate(done) if entry is None]
    if rest and not runs.cut:
        refined = runs.further_each(data, [seeds[i] for i in rest], valid, steps, chi_cost)
        for i, run in zip(rest, refined, strict=False):
            done[i] = (run, ", refined")
    return done


def _ranked_refined(
    finalists: Sequence[tuple[float, str, PolishResult]],
    done: Sequence[tuple[PolishResult, str] | None],
) -> tuple[list[tuple[float, str, PolishResult]], dict[str, float]]:
    """The full-grid refinements ``done`` of ``finalists`` (each run and its label's end;
    None: not run), lowest chi first, and their chi by label."""
    refined = []
    for (_, label, _), entry in zip(finalists, done, strict=False):
        if entry is not None:
            run, end = entry
            refined.append((run.chi, f"{label}{end}", run))
    refined.sort(key=lambda entry: entry[0])
    return refined, {label: chi for chi, label, _ in refined}


def subsampling(settings: ReconstructionSettings, support: np.ndarray) -> tuple[int, ...] | None:
    """Policy: the factors of :func:`~bcdi_bluesky.tuning.subsample` for the further starts, from
    the first run's ``support``; None (the starts run as :func:`_further_starts` does) when
    ``starts_subsampling`` is off, when some axis does not hold the crystal in half its field
    of view, or
    when the starts would run on the coarse grid (:func:`starts_factor` above 1: by default on
    grids above :data:`~bcdi_bluesky.settings.STARTS_GRID_EDGE` voxels). Measured at 128^3 on
    development crystals, the coarse grid's starts (the crystal with its oversampling, at half
    the resolution, then 300 ER/HIO steps on the full grid) ended at a lower chi and a higher
    IoU than every other q's (full resolution, half the oversampling) on 3 of 3. Nor with
    ``partial_coherence``: a blur over q mixes the q between the samples into each one, so
    the data there are no longer the folded crystal's intensity."""
    if starts_factor(settings.starts_downsampling, support.shape) > 1:
        return None
    return _subsampling_policy(settings.starts_subsampling, settings, support)


def _every_other_q(
    measurement: Measurement, factors: tuple[int, ...], backend: ArrayBackend
) -> tuple[Any, Any, float | None]:
    """The data and mask on every other q (:func:`~bcdi_bluesky.tuning.subsample` by
    ``factors``) on ``backend``, and their noise floor (None: not counts)."""
    # From the host copies: slicing with a step is not every array library's.
    data = np.ascontiguousarray(subsample(measurement.data, factors))
    valid = (
        None
        if measurement.valid is None
        else np.ascontiguousarray(subsample(measurement.valid, factors))
    )
    floor = poisson_chi_floor(data, valid) if measurement.counts else None
    return backend.asarray(data), None if valid is None else backend.asarray(valid), floor


def _carried_back(
    runs: _PolishRuns, small_object: Any, shape: tuple[int, ...]
) -> tuple[Any, Any] | None:
    """An object found on every other q on the full grid ``shape``
    (:func:`~bcdi_bluesky.tuning.unfold`) and its shrink-wrap support; None where that support
    does not fit in half the field of view (:func:`fits_every_other_q`: the folded run's
    crystal was larger than the smaller field, so its copies overlapped), unless the safety cap
    already cut the runs (the object then comes back as it is)."""
    backend = runs.backend
    obj = unfold(small_object, shape, backend)
    support = shrink_wrap(obj, backend=backend)
    if runs.cut or fits_every_other_q(backend.to_numpy(support)) is not None:
        return obj, support
    return None


def _subsampling_policy(
    switch: bool, settings: ReconstructionSettings, support: np.ndarray
) -> tuple[int, ...] | None:
    """The factors of every other q where ``switch`` is on, ``partial_coherence`` off (a blur
    over q mixes the q between the samples into each: not the folded crystal's intensity) and
    ``support`` fits in half the field of view along every axis (:func:`fits_every_other_q`);
    else None."""
    if not switch or settings.partial_coherence:
        return None
    return fits_every_other_q(support)


def _subsampled_starts(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    model_object: Any,
    factors: tuple[int, ...],
) -> tuple[list[tuple[float, str, PolishResult]], dict[str, float]]:
    """Step 2 of :func:`polish_stage` on every other q (:func:`subsampling`): the crystal's own
    intensity at the same resolution in a smaller field of view, each step about
    ``prod(factors)`` times cheaper. The model seed and the model-free starts, screened
    (:func:`_screened`); the :data:`FINALISTS` are carried to the full grid
    (:func:`~bcdi_bluesky.tuning.unfold`) and refined by ``subsampled_refine_iterations`` ER
    steps on all the data, where a start that looked second may fit better.

    Returns
    -------
    runs, attempts : list of (chi, label, PolishResult), dict
        The full-grid runs, lowest chi first, and each one's chi by label.
    """
    settings, backend = runs.settings, runs.backend
    small_data, small_valid, _ = _every_other_q(measurement, factors, backend)
    cost = ChiCost(small_data, small_valid, backend)
    model = fold(backend.to_numpy(model_object), factors)
    # The sphere is sized from all the data: the autocorrelation of every other q is folded.
    sphere, _ = autocorrelation_seed(measurement.data)
    sphere = fold(sphere, factors)
    starts = {
        "model ER/HIO": (model, amplitude_support(model, SEED_SUPPORT_THRESHOLD)),
        **_model_free_starts(settings, sphere, np.abs(sphere) > 0),
    }
    finalists, _ = _screened(runs, small_data, small_valid, cost, starts, SUBSAMPLED)
    if runs.cut:
        return [], {}
    seeds = []
    for _, _, small in finalists:
        obj = unfold(small.object, data.shape, backend)
        seeds.append((obj, shrink_wrap(obj, backend=backend)))
    done = runs.further_each(
        data, seeds, valid, settings.subsampled_refine_iterations, chi_cost, hio_fraction=0.0
    )
    return _ranked_refined(finalists, [(run, ", refined") for run in done])


def held_subsampling(
    settings: ReconstructionSettings, support: np.ndarray, noise_free: bool
) -> tuple[int, ...] | None:
    """Policy: the factors of :func:`~bcdi_bluesky.tuning.subsample` for the uniform-amplitude
    run's held steps, from their fixed ``support``; None (the full grid) as for the first run
    (:func:`refined_run_subsampling`), and for ``noise_free`` data (:attr:`Measurement.
    noise_free`): those are fitted far below any noise, and on a noise-free benchmark crystal
    (an edge-dislocated octahedron with a detector gap) the held steps on every other q ended
    at chi 0.078 against 0.015 on the full grid, which the run to convergence did not recover
    (R-factor 0.093). The support is fixed, so the folded run's crystal stays in half the
    field of view: no check after it."""
    if noise_free:
        return None
    return _subsampling_policy(settings.polish_subsampling, settings, support)


def _uniform_amplitude_run(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    best: PolishResult,
) -> PolishResult | None:
    """Step 3 of :func:`polish_stage`: a homogeneous crystal's amplitude held, then freed.

    From ``best``: ``uniform_amplitude_iterations / 2`` HIO steps, then as many ER steps, on
    its shrink-wrap support grown by :data:`~bcdi_bluesky.settings.UNIFORM_AMPLITUDE_GROWTH`
    voxel (fixed), with the amplitude held at its median deeper than
    :data:`~bcdi_bluesky.settings.UNIFORM_AMPLITUDE_DEPTH` voxels inside the crystal (its
    voxels above ``support_threshold``, grown the same way: the shrink-wrap support's halo
    is not crystal); then at most :data:`~bcdi_bluesky.settings.FREE_ER_SHARE` of
    ``uniform_amplitude_iterations`` ER steps, amplitude free, over-relaxed by
    :data:`~bcdi_bluesky.settings.FREE_ER_RELAXATION` (plain ER creeps on a fixed support), on
    that object's shrink-wrap support, stopped once the error falls by less than
    ``converge_tolerance`` over 20 steps (measured with plain ER on the 40 development
    crystals at 64^3: median 39 of the 200 steps, chi at most 0.8% above the full count's, the
    IoU at most 0.01 lower; on the strain benchmark's strongest inclusion chi 3% higher and the
    displacement error 6.8% against 6.1%). The ER refinements of the starts' finalists run all
    their steps: stopped the same way, they ranked the starts differently (mean IoU 0.923 ->
    0.920, 5 crystals 0.02-0.06 lower).

    Where that support fits in half the field of view along every axis
    (:func:`held_subsampling`) the held steps run on every other q, each up to 8 times
    cheaper, and the free ER steps on the full grid from the crystal carried back
    (:func:`~bcdi_bluesky.tuning.unfold`). Measured on the 40 development crystals at 64^3
    with the rest unchanged, against the held steps on the full grid: median wall time 7.4 ->
    6.1 s, mean IoU 0.932 -> 0.929 (3 crystals up and 6 down by more than 0.02 at chi within
    2%), mean phase RMS 0.087 -> 0.080 rad, mean complex overlap 0.979 -> 0.980.

    Why: about a centrosymmetric crystal, a smooth even phase paired with an odd amplitude
    change alters the intensity only at second order, and the free runs end in such pairs
    (measured on inclusions: 12-19% displacement error at a higher chi than this run's).
    Holding the amplitude leaves the phase alone to fit; the free ER then lets the amplitude
    follow the data where they ask for it (a void, a ramp), and the chi decides.

    Returns None, running nothing, for a crystal too thin to have an interior.
    """
    settings, backend = runs.settings, runs.backend
    crystal = scipy.ndimage.binary_dilation(
        backend.to_numpy(amplitude_support(best.object, settings.support_threshold)),
        iterations=UNIFORM_AMPLITUDE_GROWTH,
    )
    interior = scipy.ndimage.binary_erosion(crystal, iterations=UNIFORM_AMPLITUDE_DEPTH)
    support = scipy.ndimage.binary_dilation(
        backend.to_numpy(best.support), iterations=UNIFORM_AMPLITUDE_GROWTH
    )
    interior &= support
    if not interior.any():
        return None
    steps = settings.uniform_amplitude_iterations
    factors = held_subsampling(settings, support, measurement.noise_free)
    grid_data, grid_valid, cost, held = data, valid, chi_cost, best
    if factors is not None:
        grid_data, grid_valid, _ = _every_other_q(measurement, factors, backend)
        cost = ChiCost(grid_data, grid_valid, backend)
        held = PolishResult(fold(best.object, factors, backend), None)
        support, interior = fold(support, factors), fold(interior, factors)
    support, interior = backend.asarray(support), backend.asarray(interior)
    for hio_fraction in (1.0, 0.0):
        held = runs.further(
            grid_data,
            held.object,
            support,
            grid_valid,
            steps // 2,
            cost,
            hio_fraction=hio_fraction,
            shrink_every=0,
            kernel=held.kernel,
            uniform_interior=interior,
        )
        if runs.cut and factors is None:
            return held
    # After a cut on every other q the free run still comes back to the full grid (one step).
    free = held.object if factors is None else unfold(held.object, data.shape, backend)
    return runs.further(
        data,
        free,
        shrink_wrap(free, backend=backend),
        valid,
        round(steps * FREE_ER_SHARE),
        chi_cost,
        hio_fraction=0.0,
        shrink_every=0,
        kernel=held.kernel,
        tolerance=settings.converge_tolerance,
        relaxation=FREE_ER_RELAXATION,
    )


def rescues(settings: ReconstructionSettings, shape: tuple[int, ...]) -> bool:
    """Policy: may a poor fit on a grid of ``shape`` run the rescue starts
    (:func:`_rescue_starts`)? Where ``rescue_starts`` is above 0 and no axis is longer than
    :data:`~bcdi_bluesky.settings.RESCUE_GRID_EDGE` (why: there)."""
    return settings.rescue_starts > 0 and max(shape) <= RESCUE_GRID_EDGE


#: The rescue starts' random draws: ``(seed, RESCUE_SEED_STREAM, k)`` for k from 1, apart from
#: the further starts' ``(seed, k)`` (a trailing 0 would not part them: numpy's SeedSequence
#: pads the entropy with zeros).
RESCUE_SEED_STREAM = 1


def _rescue_starts(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
) -> list[tuple[float, str, PolishResult]]:
    """Step 4 of :func:`polish_stage`: ``rescue_starts`` random starts in the sphere sized from
    the autocorrelation, drawn from ``seed`` apart from the further starts' draws, each run by
    cohere's recipe on the full grid (:data:`~bcdi_bluesky.settings.RESCUE_ITERATIONS` steps,
    :data:`~bcdi_bluesky.settings.RESCUE_HIO_FRACTION` HIO, shrink-wrap after every step) and
    followed by :func:`_uniform_amplitude_run`.

    Why: where the polish ends poor, its runs (shrink-wrap every 10 steps, most of them on
    every other q) have kept part of the crystal; a support shrink-wrapped after every HIO
    step follows the whole crystal (measured: :data:`~bcdi_bluesky.settings.
    RESCUE_ITERATIONS`). Each start's chi is judged after its uniform-amplitude run: on a
    development crystal, with another draw, the start that ended lowest before it ended at IoU
    0.52 after it, another at 0.91.

    Returns
    -------
    list of (chi, label, PolishResult)
        Every run, lowest chi first.
    """
    settings, backend = runs.settings, runs.backend
    _, inside = autocorrelation_seed(measurement.data)
    seeds = []
    for k in range(settings.rescue_starts):
        rng = np.random.default_rng((settings.seed, RESCUE_SEED_STREAM, k + 1))
        seeds.append((backend.asarray(random_start(inside, rng)), backend.asarray(inside)))
    done = runs.further_each(
        data,
        seeds,
        valid,
        RESCUE_ITERATIONS,
        chi_cost,
        hio_fraction=RESCUE_HIO_FRACTION,
        shrink_every=1,
    )
    ranked = []
    for k, run in enumerate(done):
        label = f"rescue start {k + 1} ER/HIO"
        ranked.append((run.chi, label, run))
        if runs.cut:
            continue
        held = _uniform_amplitude_run(runs, measurement, data, valid, chi_cost, run)
        if held is not None:
            ranked.append((held.chi, f"{label} +uniform amplitude", held))
    return sorted(ranked, key=lambda entry: entry[0])


def _converge_run(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    best: PolishResult,
) -> PolishResult:
    """Step 5 of :func:`polish_stage`: ``converge_iterations`` ER/HIO steps from ``best``, the
    final ER block stopped at convergence.

    Where ``best``'s support fits in half the field of view (:func:`refined_run_subsampling`)
    they run on every other q first, each step up to 8 times cheaper, and the crystal is
    carried back (:func:`~bcdi_bluesky.tuning.unfold`) and refined by
    ``polish_er_iterations`` ER steps on the full grid. That is the run if it comes within
    :data:`~bcdi_bluesky.settings.CONVERGED_NEAR` of :data:`~bcdi_bluesky.quality.CHI_GOOD`
    (closer, the full grid's run ended no lower); else (or if the crystal found does not fit)
    the steps run on the full grid too, and the lower chi wins. Half the oversampling finishes a
    fit but repairs less: measured on the 3 of the 11 noise-free development crystals at 64^3
    that ran this step, from the winner of the starts and the uniform-amplitude run (chi
    0.003-0.008), the run on every other q ended at chi 0.0013-0.0027 as the full grid's
    did, 9.6-11.7 s -> 7.6-9.0 s; from a phase-free seed (chi 0.063) it stopped at 0.078
    where the full grid's reached 0.0034."""
    settings, backend = runs.settings, runs.backend
    factors = refined_run_subsampling(settings, backend.to_numpy(best.support))
    folded = None
    if factors is not None:
        small_data, small_valid, _ = _every_other_q(measurement, factors, backend)
        small = runs.further(
            small_data,
            fold(best.object, factors, backend),
            fold(best.support, factors, backend),
            small_valid,
            settings.converge_iterations,
            ChiCost(small_data, small_valid, backend),
            tolerance=settings.converge_tolerance,
        )
        back = _carried_back(runs, small.object, data.shape)
        if back is not None:
            folded = runs.further(
                data, *back, valid, settings.polish_er_iterations, chi_cost, hio_fraction=0.0
            )
            if folded.stopped_by == "iterations":
                folded.stopped_by = small.stopped_by
            if runs.cut or folded.chi <= CONVERGED_NEAR * CHI_GOOD:
                return folded
    whole = runs.further(
        data,
        best.object,
        best.support,
        valid,
        settings.converge_iterations,
        chi_cost,
        tolerance=settings.converge_tolerance,
        kernel=best.kernel,
    )
    return whole if folded is None or whole.chi <= folded.chi else folded


def refined_run_subsampling(
    settings: ReconstructionSettings, support: np.ndarray
) -> tuple[int, ...] | None:
    """Policy: the factors of :func:`~bcdi_bluesky.tuning.subsample` for a polish run that is
    carried back and refined by ``polish_er_iterations`` ER steps on the full grid (the first
    run, from the model seed's ``support``; the run to convergence, from the winner's); None
    (the full grid) when ``polish_subsampling`` is off, with ``partial_coherence`` (a blur
    over q: not the folded crystal's intensity), with no ER steps to refine on the full grid,
    or when some axis does not hold the crystal in half its field of view
    (:func:`fits_every_other_q`, as for the starts). On every grid size, unlike the starts:
    these runs start from a crystal, which a smaller oversampling does not lead astray as it
    does random starts."""
    if settings.polish_er_iterations == 0:
        return None
    return _subsampling_policy(settings.polish_subsampling, settings, support)


def _first_run(
    runs: _PolishRuns,
    measurement: Measurement,
    data: Any,
    valid: Any,
    chi_cost: ChiCost,
    model_object: Any,
    seed_support: Any,
) -> PolishResult:
    """Step 1 of :func:`polish_stage`: :func:`~bcdi_bluesky.tuning.seeded_polish` from the
    model object, recorded.

    Where the model's crystal fits in half the field of view (:func:`refined_run_subsampling`)
    it runs on every other q, each step up to 8 times cheaper, and is carried back
    (:func:`~bcdi_bluesky.tuning.unfold`) and refined by ``polish_er_iterations`` ER steps
    on the full grid. The crystal it found must fit there too (its shrink-wrap support,
    :func:`fits_every_other_q`): a model smaller than the crystal
    would fold a crystal that does not fit, and the run starts again on the full grid
    (measured on the 40 development crystals at 64^3: 5 of 40). Where the fit on every other
    q is far above the noise (:func:`far_from_noise`) and the further starts are on, the
    crystal comes back without the ER steps: the starts follow whatever those steps reach.
    """
    settings, backend = runs.settings, runs.backend
    recipe = {
        "er_iterations": settings.polish_er_iterations,
        "iterations": settings.polish_iterations,
        "hio_fraction": settings.polish_hio_fraction,
        "hook": runs.counted,
        "backend": backend,
        "partial_coherence": settings.partial_coherence,
    }
    factors = refined_run_subsampling(settings, backend.to_numpy(seed_support))
    if factors is not None:
        small_data, small_valid, floor = _every_other_q(measurement, factors, backend)
        seed = fold(backend.to_numpy(model_object), factors)
        small = seeded_polish(
            small_data,
            backend.asarray(seed),
            backend.asarray(amplitude_support(seed, SEED_SUPPORT_THRESHOLD)),
            small_valid,
            time_budget_s=runs.left(),
            chi_cost=ChiCost(small_data, small_valid, backend),
            noise_floor=floor,
            **recipe,
        )
        runs.record(small)
        back = _carried_back(runs, small.object, data.shape)
        if (
            back is not None
            and settings.adaptive_iterations > 0
            and far_from_noise(small.chi, floor)
        ):
            # The further starts follow whatever the full grid's ER steps do: the run comes
            # back as it is, a candidate among them.
            carried = PolishResult(*back, recipe=f"{small.recipe}{SUBSAMPLED}")
            carried.chi = chi_cost(carried.model_intensity(backend))
            carried.stopped_by = small.stopped_by
            return carried
        if back is not None:
            refined = runs.further(
                data, *back, valid, settings.polish_er_iterations, chi_cost, hio_fraction=0.0
            )
            refined.recipe = f"{small.recipe}{SUBSAMPLED}, refined"
            return refined
    return runs.record(
        seeded_polish(
            data,
            model_object,
            seed_support,
            valid,
            time_budget_s=runs.left(),
            chi_cost=chi_cost,
            noise_floor=measurement.noise_floor,
            **recipe,
        )
    )


def polish_stage(
    measurement: Measurement,
    model_object: np.ndarray,
    settings: ReconstructionSettings,
    hook: Callable[[int, float], bool | None] | None = None,
    backend: ArrayBackend = NUMPY,
) -> PolishOutcome:
    """Fit-driven phase retrieval: spend more only while the fit stays above what the data allow.

    1. :func:`~bcdi_bluesky.tuning.seeded_polish` from the model object (ER; ER/HIO unless ER
       fits to the noise), on every other q where the model's crystal fits in half the field
       of view, then refined on the full grid unless its fit there is far above the noise
       (:func:`_first_run`).
    2. If the fit is not at the noise (:func:`fit_at_noise`), more starts of
       ``adaptive_iterations`` ER/HIO steps (``adaptive_hio_fraction`` HIO): the model seed
       again, and model-free ones (a wrong model cannot trap them) in a sphere sized from the
       autocorrelation: flat and uniform (a strain-free crystal's start; it wins on most
       noise-free data), and ``random_starts`` of random amplitudes and phases drawn from
       ``seed`` (they reach the strained and dislocated crystals that the flat start misses).
       Every start runs :data:`SCREEN_SHARE` of its steps; the :data:`FINALISTS` of lowest chi
       run the rest (a second ER/HIO cycle), the others stop there.
       With k = :func:`starts_factor` above 1 (by default on grids above
       :data:`~bcdi_bluesky.settings.STARTS_GRID_EDGE` voxels) they run on the central 1/k of
       q in each direction (the crystal in k times coarser voxels, k^3 fewer, each step about k^3
       times cheaper), ranked by chi there, and the :data:`FINALISTS` best are refined on the
       full grid (``adaptive_iterations // 2`` steps from their band-limited interpolation).
       Before that, where the first run's support fits in half the field of view along an
       axis (:func:`subsampling`, ``starts_subsampling``), the starts run on every other q
       along it instead: the crystal's own intensity at the same resolution, each step up to
       8 times cheaper; the :data:`FINALISTS` are carried back (:func:`~bcdi_bluesky.tuning.
       unfold`) and refined by ``subsampled_refine_iterations`` ER steps on the full grid.
       The lowest chi on the full grid wins, as PyNX and cohere's GA rank their runs.
    3. If the fit is still not at the noise, the uniform-amplitude run from the winner
       (:func:`_uniform_amplitude_run`: a homogeneous crystal's amplitude held inside, then
       free ER); kept if its chi is lower.
    4. If the fit is still poor (:func:`~bcdi_bluesky.quality.poor_fit`, as the quality
       verdict judges it) on a grid where :func:`rescues`, ``rescue_starts`` random starts of
       cohere's recipe on the full grid, each followed by the uniform-amplitude run
       (:func:`_rescue_starts`); the lowest chi is kept if lower.
    5. For noise-free data (:attr:`Measurement.noise_free`: no noise to stop at), if still
       above :data:`~bcdi_bluesky.quality.CHI_GOOD`, an ER/HIO run from the winner
       (``converge_iterations`` steps, ``adaptive_hio_fraction`` HIO) whose final ER block
       stops once the error stops falling (``converge_tolerance`` over 20 steps); kept if its
       chi is lower. On counts this only fits the noise (measured: chi 0.1% lower, IoU
       unchanged), and so on corrected data that carry noise (scan 54: chi 0.0703 -> 0.0775,
       lost).
    6. For data that are not counts, ``loose_support_iterations`` ER steps from the winner on its
       support grown by :data:`~bcdi_bluesky.settings.LOOSE_SUPPORT_DILATION` voxels, fixed: the
       soft edge the shrink-wrap cut is fitted (ER on a support that holds the object's only lowers
       the error). Not on counts: there the halo fits the noise, and the fit against the Poisson
       floor, which the quality verdict reads, would flatter the object.

    Every run stops by step counts or convergence; ``polish_time_budget_s`` caps them
    together as a safety net (``cut_short``). The runs iterate on ``backend``, where the data
    move once; the object comes back as an array of it.
    """
    xp = backend.xp
    data = backend.asarray(measurement.data)
    valid = None if measurement.valid is None else backend.asarray(measurement.valid)
    chi_cost = ChiCost(data, valid, backend)
    runs = _PolishRuns(settings, backend, hook)

    def expected_of(run: PolishResult) -> float | None:
        model_intensity = backend.to_numpy(run.model_intensity(backend))
        return poisson_chi_expected(model_intensity, measurement.data, measurement.valid)

    model_object = backend.asarray(model_object, dtype=xp.complex64)
    seed_support = amplitude_support(model_object, SEED_SUPPORT_THRESHOLD)
    first = _first_run(runs, measurement, data, valid, chi_cost, model_object, seed_support)
    best, best_label = first, first.recipe
    attempts = {first.recipe: first.chi}
    expected = expected_of(best)
    if settings.adaptive_iterations > 0 and not runs.cut and not fit_at_noise(best.chi, expected):
        factors = subsampling(settings, backend.to_numpy(first.support))
        if factors is None:
            ranked, more = _further_starts(
                runs, measurement, data, valid, chi_cost, model_object, seed_support
            )
        else:
            ranked, more = _subsampled_starts(
                runs, measurement, data, valid, chi_cost, model_object, factors
            )
        attempts.update(more)
        for chi, label, run in ranked:
            if chi < best.chi:
                best, best_label = run, label
        expected = expected_of(best)
    if (
        settings.uniform_amplitude_iterations > 0
        and not runs.cut
        and not fit_at_noise(best.chi, expected)
    ):
        run = _uniform_amplitude_run(runs, measurement, data, valid, chi_cost, best)
        if run is not None:
            label = f"{best_label} +uniform amplitude"
            attempts[label] = run.chi
            if run.chi < best.chi:
                best, best_label = run, label
                expected = expected_of(best)
    if rescues(settings, data.shape) and not runs.cut and poor_fit(best.chi, expected):
        rescued = False
        for chi, label, run in _rescue_starts(runs, measurement, data, valid, chi_cost):
            attempts[label] = chi
            if chi < best.chi:
                best, best_label, rescued = run, label, True
        if rescued:
            expected = expected_of(best)
    converged = best.stopped_by == "converged"
    if (
        settings.converge_iterations > 0
        and measurement.noise_free
        and not runs.cut
        and not fit_at_noise(best.chi, expected)
    ):
        run = _converge_run(runs, measurement, data, valid, chi_cost, best)
        converged = run.stopped_by == "converged"
        label = f"{best_label} +ER/HIO to convergence"
        attempts[label] = run.chi
        if run.chi < best.chi:
            best, best_label = run, label
            expected = expected_of(best)
    if settings.loose_support_iterations > 0 and not measurement.counts and not runs.cut:
        grown = scipy.ndimage.binary_dilation(
            backend.to_numpy(best.support), iterations=LOOSE_SUPPORT_DILATION
        )
        run = runs.further(
            data,
            best.object,
            backend.asarray(grown),
            valid,
            settings.loose_support_iterations,
            chi_cost,
            hio_fraction=0.0,
            shrink_every=0,
            kernel=best.kernel,
        )
        label = f"{best_label} +ER on the loosened support"
        attempts[label] = run.chi
        if run.chi < best.chi:
            best, best_label = run, label
    if fit_at_noise(best.chi, expected):
        converged = True
    return PolishOutcome(
        best.object,
        best.chi,
        expected,
        runs.errors,
        best_label,
        attempts,
        converged,
        runs.cut,
        best.kernel,
    )


def _checked_settings(
    settings: ReconstructionSettings | None, default: ReconstructionSettings
) -> ReconstructionSettings:
    """``settings``, or ``default`` for None; anything else is refused before any work."""
    if settings is None:
        return default
    if not isinstance(settings, ReconstructionSettings):
        raise SettingsError(
            "settings must be ReconstructionSettings (ReconstructionSettings(**values), or "
            f"the values as keyword arguments of Reconstructor), got {type(settings).__name__}"
        )
    return settings


def _checked_geometry(geometry: Geometry | Mapping[str, Any] | None) -> Geometry | None:
    """A :class:`Geometry` from itself or its JSON keys; anything else is refused before any
    work (not after the whole reconstruction, where the lab frame is made)."""
    if geometry is None or isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, Mapping):
        try:
            return Geometry.from_dict(geometry)
        except ValueError as exc:
            raise DataError(f"geometry: {exc}") from None
    raise DataError(
        "geometry must be a Geometry or a mapping of its keys (a JSON file: "
        f"Geometry.from_json(path)), got {type(geometry).__name__}"
    )


class Reconstructor:
    """Turns a measured diffraction volume into a 3D crystal, in seconds.

    Parameters
    ----------
    model_path : path-like, optional
        ONNX model (card beside it). Default: the packaged model.
    providers : sequence of str, optional
        ONNX Runtime providers in order of preference (default TensorRT -> CUDA -> CPU).
    threads : int, optional
        ONNX Runtime CPU threads.
    settings : ReconstructionSettings, optional
        How much work each reconstruction may do (default: ``ReconstructionSettings()``).
    device : {"auto", "cpu", "cuda"} or "cuda:N"
        Where the phase retrieval runs: ``"auto"`` takes a GPU when torch or CuPy sees one
        (:func:`~bcdi_bluesky.backend.select_backend`); falling back to the CPU is logged
        once. The crystal-model fit (the search and ES on the model's grid) runs on the host
        numpy on every device, where its many small evaluations are faster. The CNN's device
        is the ONNX Runtime provider's (``providers``).
    array_library : {"numpy", "cupy", "torch"}, optional
        Force the array library (``device="cpu", array_library="torch"`` runs the GPU code
        path on the CPU).
    **overrides
        Settings fields to change from ``settings`` (``Reconstructor(es_time_budget_s=20)``).

    Raises
    ------
    SettingsError
        An unknown setting or a value outside its limits.
    ModelError
        The model or its card cannot be loaded.
    """

    def __init__(
        self,
        model_path=None,
        providers=None,
        threads: int | None = None,
        *,
        settings: ReconstructionSettings | None = None,
        device: str = "auto",
        array_library: str | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = _checked_settings(settings, ReconstructionSettings()).replace(**overrides)
        try:
            self.backend = select_backend(device, array_library)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.runtime = OnnxCrystalModel(model_path, providers=providers, threads=threads)
        self.model = self.runtime.crystal_model
        self.previous_params: np.ndarray | None = None

    @property
    def provider(self) -> str:
        """The ONNX Runtime provider that really runs."""
        return self.runtime.provider

    @property
    def device(self) -> str:
        """Where the phase retrieval runs ("cpu", "cuda:0")."""
        return self.backend.device

    @property
    def model_name(self) -> str:
        """Name of the CNN (from its card)."""
        return self.runtime.name

    def reconstruct(
        self,
        intensity: np.ndarray,
        mask: np.ndarray | None = None,
        refine: str = "full",
        progress: ProgressHook | None = None,
        initial_params: np.ndarray | None = None,
        settings: ReconstructionSettings | None = None,
        geometry: Geometry | Mapping[str, Any] | None = None,
    ) -> ReconstructionResult:
        """Reconstruct a crystal from a diffraction volume.

        Parameters
        ----------
        intensity : array_like
            3D intensity (photon counts or corrected intensities), any shape, centred or not;
            a numpy masked array's masked voxels are invalid (with ``mask``, both count).
        mask : array_like of bool, optional
            True for valid voxels (detector gaps, beamstop and hot pixels False).
        refine : {"none", "es", "full"}
            CNN only; CNN + extremum seeking; CNN + ES + phase-retrieval polish.
        progress : callable, optional
            ``progress(stage, info)`` hook (see :data:`ProgressHook`).
        initial_params : ndarray, optional
            Start ES from these physical parameters instead of (or, in tracking mode, besides)
            the CNN's estimate.
        settings : ReconstructionSettings, optional
            Settings for this call only (default: :attr:`settings`); the result carries them.
        geometry : Geometry or mapping, optional
            The scan's geometry (a :class:`~bcdi_bluesky.physics.Geometry` or its JSON keys):
            the result then carries the crystal in the lab frame with its displacement and
            strain (:attr:`ReconstructionResult.physical`).

        Raises
        ------
        DataError
            Wrong rank, NaN/inf, negative values, an empty volume, a mask of the wrong shape,
            or a geometry that cannot describe a scan (all before any work).
        SettingsError
            An unknown ``refine``, or ``settings`` that are not
            :class:`~bcdi_bluesky.ReconstructionSettings`.
        NoBraggPeakError
            Photon counts without a detectable Bragg peak (raised before any work).
        """
        if refine not in REFINE_MODES:
            raise SettingsError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
        settings = _checked_settings(settings, self.settings)
        geometry = _checked_geometry(geometry)
        backend = self.backend
        notify = progress or (lambda stage, info: None)
        t0 = time.perf_counter()
        timings = dict.fromkeys(TIMING_KEYS, 0.0)

        measurement = prepare_measurement(intensity, mask, self.model.n)
        prepared = measurement.prepared
        timings["preprocess"] = time.perf_counter() - t0
        notify("preprocess", {"seconds": timings["preprocess"], "shift": prepared.shift})

        t = time.perf_counter()
        # The crystal-model fit runs on the host whatever the device: its volumes are the
        # model's 64^3 grid and coarser, and it is hundreds of small evaluations one after
        # another, where a GPU's per-kernel latency costs more than the arithmetic saves
        # (docs/benchmarks.md: 5.4 s on CuPy on an H200, 1.7 s on numpy on the same host).
        fit_backend = NUMPY
        chi_of = ChiCost(prepared.intensity, prepared.mask, fit_backend)
        coarse_chi_of = coarse_chi(self.model, prepared.intensity, prepared.mask, fit_backend)
        cnn = cnn_stage(
            self.runtime, self.model, prepared, chi_of, coarse_chi_of, measurement.counts
        )
        params = cnn.params
        timings["inference"] = time.perf_counter() - t
        timings["network"], timings["twin_choice"] = cnn.network_s, cnn.twin_choice_s
        stage_chi = {"cnn": cnn.chi}
        distribution = cnn.distribution
        scale = es_budget_scale(distribution)
        message = (
            "; ".join(distribution.reasons) + ": doubling the extremum-seeking budget"
            if scale > 1
            else ""
        )
        notify(
            "inference",
            {
                "seconds": timings["inference"],
                "chi": cnn.chi,
                "params": params,
                "latent_distance": distribution.latent_distance,
                "out_of_distribution": distribution.flagged,
                "message": message,
            },
        )

        starts = [params]
        if initial_params is not None:
            starts.append(self.model.clip(np.asarray(initial_params, dtype=np.float64)))
        if settings.track and self.previous_params is not None:
            starts.append(self.previous_params)
        if len(starts) > 1:
            params = starts[best_start(self.model, starts, chi_of)[0]]

        es_costs: list[float] = []
        cut_short: list[str] = []
        if refine in ("es", "full"):
            t = time.perf_counter()
            fitted = refine_stage(
                self.model,
                params,
                prepared,
                settings,
                scale,
                hook=lambda i, c: (
                    notify("es_step", {"iteration": i, "cost": c}) if i % 10 == 0 else None
                ),
                backend=fit_backend,
            )
            params, es_costs = fitted.params, fitted.costs
            stage_chi["shape"], stage_chi["es"] = fitted.chi_shape, fitted.chi
            if fitted.cut_short:
                cut_short.append("refine")
            timings["refine"] = time.perf_counter() - t
            notify("refine", {"seconds": timings["refine"], "chi": fitted.chi, "params": params})
        self.previous_params = params

        obj = to_input_grid(
            self.model.voxelise(params, backend), prepared, measurement.data.shape, backend
        )
        polish_errors: list[float] = []
        polish_recipe = ""
        attempts: dict[str, float] = {}
        final_chi, expected, converged = None, None, False
        coherence_kernel = None
        polishes = settings.polish_er_iterations > 0 or settings.polish_iterations > 0
        if refine == "full" and polishes:
            if progress is not None:  # a host copy only for someone to show it
                preview = backend.to_numpy(obj)
                notify(
                    "preview",
                    {
                        "object": preview,
                        "support": amplitude_support(preview, settings.support_threshold),
                        "chi": stage_chi.get("es", cnn.chi),
                    },
                )
            t = time.perf_counter()
            polished = polish_stage(
                measurement,
                obj,
                settings,
                hook=lambda i, e: (
                    notify("polish_step", {"iteration": i, "error": e}) if i % 10 == 0 else None
                ),
                backend=backend,
            )
            obj, polish_errors = polished.object, polished.errors
            polish_recipe, final_chi = polished.recipe, polished.chi
            attempts, expected, converged = (
                polished.attempts,
                polished.expected_chi,
                polished.converged,
            )
            if polished.kernel is not None:
                coherence_kernel = polished.kernel.centred()
            if polished.cut_short:
                cut_short.append("polish")
            timings["polish"] = time.perf_counter() - t
            notify("polish", {"seconds": timings["polish"], "recipe": polished.recipe})

        obj = backend.to_numpy(obj)
        support = amplitude_support(obj, settings.support_threshold)
        if final_chi is None:
            model_intensity = far_field_intensity(obj)
            final_chi = ChiCost(measurement.data, measurement.valid)(model_intensity)
            expected = poisson_chi_expected(model_intensity, measurement.data, measurement.valid)
        if refine == "full":
            stage_chi["polish"] = final_chi
        quality, reasons = quality_verdict(
            QualityEvidence(
                chi=final_chi,
                expected_chi=expected,
                converged=converged,
                signal_floor=measurement.noise_floor,
                distribution=distribution,
                cut_short=tuple(cut_short),
                oversampling=oversampling(measurement.valid, measurement.data.size, support),
                shape=measurement.data.shape,
                support_voxels=int(np.count_nonzero(support)),
            )
        )
        physical = (
            physical_result(obj, geometry, settings.support_threshold)
            if geometry is not None
            else None
        )
        timings["total"] = time.perf_counter() - t0
        result = ReconstructionResult(
            object=obj,
            support=support,
            params=params,
            chi=final_chi,
            timings=timings,
            provider=self.provider,
            model_name=self.model_name,
            crystal_model=self.model,
            stage_chi=stage_chi,
            es_costs=es_costs,
            polish_errors=polish_errors,
            polish_recipe=polish_recipe,
            refine=refine,
            shift=prepared.shift,
            latent_xy=cnn.latent_xy,
            latent_distance=distribution.latent_distance,
            out_of_distribution=distribution.flagged,
            quality=quality,
            quality_reasons=reasons,
            expected_chi=expected,
            polish_attempts=attempts,
            cut_short=cut_short,
            settings=settings,
            physical=physical,
            device=backend.device,
            array_library=backend.library,
            coherence_kernel=coherence_kernel,
        )
        notify("done", {"seconds": timings["total"], "chi": final_chi, "quality": quality})
        return result
