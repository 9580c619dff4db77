"""The reconstruction's settings: one frozen, validated value, the single source of every default,
limit and help text.

The CLI's options, the IOC's setting PVs and the user guide's table are generated from
:meth:`ReconstructionSettings.fields_info`; a :class:`~bcdi_bluesky.Reconstructor` holds one value
and each call may be given another (the IOC hands the next scan a new value, it never changes
the engine), which the result carries as ``result.settings``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import SettingsError

#: Voxels by which the last ER steps on data that are not counts grow the polish's support
#: (``loose_support_iterations``). The shrink-wrap support (blurred amplitude above 0.1 of its
#: largest) cuts a crystal's soft edge, which noise-free data still see: on a 128^3
#: noise-free cube 50 such ER steps brought the R-factor from 0.020 to 0.011 (1 voxel) and
#: 0.008 (2 voxels).
LOOSE_SUPPORT_DILATION = 2

#: The uniform-amplitude run (``uniform_amplitude_iterations``) holds the amplitude deeper than
#: this many voxels inside the crystal, and runs on the winner's support grown by
#: :data:`UNIFORM_AMPLITUDE_GROWTH` voxel: the edge, where a real crystal's density falls off
#: over the resolution, stays free. Measured on inclusions through scan 54's grid: a depth of
#: 2 voxels left 12% displacement error where 3 left 7%.
UNIFORM_AMPLITUDE_DEPTH = 3
UNIFORM_AMPLITUDE_GROWTH = 1
#: The free ER steps that end the uniform-amplitude run are over-relaxed
#: (:func:`~bcdi_bluesky.tuning.polish`'s ``relaxation``) by this factor and run at most
#: :data:`FREE_ER_SHARE` of ``uniform_amplitude_iterations``. On a fixed support plain ER creeps
#: (on scan 54 its error still fell 2% every 20 steps at step 200); measured from the
#: uniform-amplitude runs of both measured sets and 5 development crystals, 140 steps at 1.8
#: ended at a chi at or below 200 plain ones on all 7 (1.5 and 1.65 too; from 2.2 on every run
#: diverged), and on the 40 development crystals at 64^3 against plain ER: mean IoU 0.927 ->
#: 0.928, none lower by more than 0.002, the polish's steps 2.7% fewer (10% on the measured
#: sets, whose R-factors fell: 0.1463 -> 0.1461, 0.0682 -> 0.0675).
FREE_ER_RELAXATION = 1.8
FREE_ER_SHARE = 0.7

#: With ``starts_downsampling`` 0 (automatic) the further polish starts run on a grid of at most
#: this many voxels along every axis: every start on the full grid at 64^3, on the central half
#: of q at 128^3. On a 64-voxel grid the crystal (at most half the field of view) keeps the
#: voxels that platelets and rods need; a step at 128^3 costs about 10 times one at 64^3.
STARTS_GRID_EDGE = 64
#: The further starts that run all their steps (the others stop after the screen,
#: :data:`SCREEN_SHARE`), and that are refined on the full grid when they ran on a coarse one
#: (:func:`~bcdi_bluesky.pipeline.starts_factor` above 1). Two, not one: the coarse chi ranks
#: the starts poorly (on the development crystals the one it put second won on the full grid
#: on 7 of 13), and a short run's chi is an early look.
FINALISTS = 2
#: Share of ``adaptive_iterations`` that every further start runs before the
#: :data:`FINALISTS` of lowest chi are chosen to run the rest. Measured on the 28 development
#: crystals at 64^3 that ran the starts, against every start running all its steps: a third
#: took the median wall time from 10.9 to 7.9 s and the mean IoU from 0.918 to 0.929, the worst
#: from 0.58 to 0.81 (the finalist's second ER/HIO cycle leaves a trap the single run stayed
#: in); a half saved less (9.5 s, median IoU 0.923 -> 0.911), a quarter little more (7.5 s,
#: median IoU 0.914).
SCREEN_SHARE = 1 / 3
#: Share of ``es_coarse_iterations`` that each start of the refinement (the CNN's, the shape
#: search's) runs before the one that ends with the lower chi runs the rest (the same ES run,
#: continued: where it is the start that would have won, the result is unchanged). Measured on
#: the 40 development crystals at 64^3, against every start running all its steps: the same
#: result on 38, the refinement's median time 1.14 -> 0.99 s.
ES_SCREEN_SHARE = 0.5
#: The polish's first run on every other q goes to the full grid's ER steps only if its chi
#: there is within this factor of the fit target (the Poisson floor times ``FIT_GOOD``, or
#: ``CHI_GOOD`` for data that are not counts); above it the further starts follow anyway and the
#: run comes back as it is, a candidate among the starts. Measured on the 40 development
#: crystals at 64^3 (counts): the runs whose full-grid fit reached the noise stood at 1.34-1.49
#: times the floor on every other q; those above 1.5 x 1.15 of it ended 1.28-2.08 times the
#: expected chi after the full grid's ER steps, and none of them won.
FAR_FROM_NOISE = 1.5
#: The rescue of a poor fit (``rescue_starts``): cohere's default recipe, 620 ER/HIO steps of
#: which 87% HIO, shrink-wrap after every step, on the full grid, from random starts in the
#: sphere sized from the autocorrelation. Measured on the 3 development crystals among the
#: first 120 at 64^3 whose polish ended poor (a platelet, a rod and a truncated octahedron, all
#: polynomially strained; fits 1.32-1.44 x the noise): the pipeline's shrink-wrap every 10
#: steps and 65% HIO kept half or less of the crystal (support IoU 0.50, 0.53, 0.19); three
#: such runs, each followed by the uniform-amplitude run, ended lower on every one (chi 0.2252
#: -> 0.1949, 0.1349 -> 0.0958, 0.2715 -> 0.2259), the lowest at IoU 0.91, 0.86 and 0.65.
RESCUE_ITERATIONS = 620
RESCUE_HIO_FRACTION = 0.87
#: The rescue runs on grids of at most this many voxels along every axis: it was measured at
#: 64^3 (about 9 s on 2 cores), and its cost grows with the volume (the demo's low-exposure
#: scan, 64 x 96 x 96, fitted 1.31 times the noise at IoU 0.91: 27 s more for a chi 1% lower).
RESCUE_GRID_EDGE = 64

#: The run to convergence on every other q (noise-free data) is kept without the full grid's
#: run where its chi after the full grid's ER steps is at most this factor times ``CHI_GOOD``.
#: Measured on the 30 noise-free development crystals among the first 120 at 64^3: the full
#: grid's run from the same start ended no lower on the 4 whose folded run ended at 1.09-1.14
#: times ``CHI_GOOD`` (chi 0.0028-0.0031 against 0.0027-0.0028, 1.5-2.2 s each), and lower on
#: the one at 1.32 (0.0015 against 0.0033) and the one above its start.
CONVERGED_NEAR = 1.2
#: Voxels kept free between the crystal and the field of view of every other q
#: (``starts_subsampling``, :func:`~bcdi_bluesky.tuning.subsampling_factors`): the
#: shrink-wrap support's halo needs room, and the folded copies of the object must not touch.
SUBSAMPLING_MARGIN = 2
#: A model object's or a seed's support: its voxels above this fraction of its largest
#: amplitude (the polish's seed support, and the crystal whose span decides every other q).
SEED_SUPPORT_THRESHOLD = 0.1


class SettingInfo(NamedTuple):
    """What a front end needs to offer one setting (a CLI option, a PV, a docs row)."""

    name: str
    default: Any
    kind: type  # int, float or bool
    low: float | None
    high: float | None
    units: str
    doc: str


def _setting(
    default: Any, doc: str, *, low: float | None = None, high: float | None = None, units: str = ""
) -> Any:
    return field(default=default, metadata={"doc": doc, "low": low, "high": high, "units": units})


@dataclass(frozen=True)
class ReconstructionSettings:
    """How much work a reconstruction may do, and how it reports the crystal.

    The limits bound one scan's work whoever sets the values (a script, the CLI, a put to the
    IOC): at most 30 s of refinement (60 s for a scan out of the CNN's distribution) and 1800 s
    of polish, whatever the iteration counts.

    Every field is validated on creation (:class:`~bcdi_bluesky.errors.SettingsError` names the
    field and its limits). Make a changed copy with :meth:`replace`.
    """

    shape_search_evaluations: int = _setting(
        150,
        "forward models of the search for the odd-l shape terms before ES (0: no search)",
        low=0,
        high=2000,
    )
    es_coarse_iterations: int = _setting(
        300, "extremum-seeking steps on the central half-size cube of q", low=0, high=5000
    )
    es_fine_iterations: int = _setting(
        100, "extremum-seeking steps on the full grid", low=0, high=5000
    )
    es_subsampling: bool = _setting(
        True,
        "where the crystal model spans at most half the field of view less "
        f"{SUBSAMPLING_MARGIN} voxels along every axis, the fine extremum-seeking steps use "
        "every other q (the crystal folded into half the field of view, its intensity there "
        "exact; each step about 4 times cheaper at 64^3)",
    )
    es_time_budget_s: float = _setting(
        30.0,
        "safety wall-time cap of the refinement stage (shape search and ES together; "
        "doubled for a scan out of the CNN's training distribution): iteration counts end it, "
        "the cap only guards against a stalled machine and is named in the result's quality "
        "when it cuts the run",
        low=0.0,
        high=30.0,
        units="s",
    )
    polish_er_iterations: int = _setting(
        50,
        "steps of the polish's first, ER-only run; kept when it fits the data down to the "
        "Poisson noise; also the full grid's ER steps after a first run on every other q "
        "(polish_subsampling)",
        low=0,
        high=2000,
    )
    polish_iterations: int = _setting(
        150,
        "steps of the polish's ER/HIO run otherwise (0 with polish_er_iterations 0: no polish)",
        low=0,
        high=5000,
    )
    polish_hio_fraction: float = _setting(
        0.3, "share of HIO steps in the ER/HIO run", low=0.0, high=1.0
    )
    polish_subsampling: bool = _setting(
        True,
        "where the model's crystal spans at most half the field of view less "
        f"{SUBSAMPLING_MARGIN} voxels along every axis, the polish's first runs use every other "
        "q (each step up to 8 times cheaper), then polish_er_iterations ER steps on the full "
        "grid (none where their fit is far above the noise and the further starts follow; on "
        "the full grid if the crystal they find does not fit); so do the run to "
        "convergence and the uniform-amplitude run's held steps where the crystal they start "
        "from fits (the free ER steps following on the full grid); never with "
        "partial_coherence",
    )
    polish_time_budget_s: float = _setting(
        300.0,
        "safety wall-time cap of the polish (every run of it together; its longest runs take "
        "about 25 s at 64^3 on an idle 2-core CPU, so a machine 10 times slower still ends by "
        "the counts); named in the result's quality when it cuts the polish",
        low=0.0,
        high=1800.0,
        units="s",
    )
    adaptive_iterations: int = _setting(
        600,
        "steps of each further ER/HIO start (the model seed and the model-free starts) "
        f"when the polished fit stays above the noise: every start runs {SCREEN_SHARE:.0%} of "
        f"them, the {FINALISTS} of lowest chi the rest (0: never spend more)",
        low=0,
        high=5000,
    )
    random_starts: int = _setting(
        2,
        "further starts from random amplitudes and phases in the sphere sized from the "
        "autocorrelation, drawn from the seed (beside the flat, uniform sphere)",
        low=0,
        high=20,
    )
    starts_downsampling: int = _setting(
        0,
        "k above 1: the further starts run on the central 1/k of q in each direction (the "
        f"crystal in k times coarser voxels, k^3 fewer) and the {FINALISTS} with the lowest chi "
        "are refined on the full grid: faster, but thin crystals lose detail; 1: every start on "
        "the full grid (or every other q, starts_subsampling); 0: k the smallest that brings "
        f"every axis to at most {STARTS_GRID_EDGE} voxels (1 at 64^3, 2 at 128^3)",
        low=0,
        high=4,
    )
    starts_subsampling: bool = _setting(
        True,
        "where the crystal (the first run's support) spans at most half the field of view "
        f"less {SUBSAMPLING_MARGIN} voxels along every axis, the further starts use every other "
        "q: the crystal's own intensity, exactly, at the same resolution, each step "
        f"up to 8 times cheaper; the {FINALISTS} of lowest chi are then refined on the full "
        "grid (subsampled_refine_iterations); where the starts run on a coarse grid "
        "(starts_downsampling) they stay there, and each finalist that fits is refined at full "
        "resolution on every other q, then on the full grid; never with partial_coherence",
    )
    subsampled_refine_iterations: int = _setting(
        50,
        "ER steps on the full grid from each finalist refined on every other q",
        low=1,
        high=2000,
    )
    adaptive_hio_fraction: float = _setting(
        0.65, "share of HIO steps in those further starts", low=0.0, high=1.0
    )
    converge_iterations: int = _setting(
        400,
        "most steps of the final ER/HIO run to convergence when the data are noise-free "
        "and the fit is not yet at chi 0.0025 (0: none)",
        low=0,
        high=5000,
    )
    converge_tolerance: float = _setting(
        0.002,
        "convergence: the final run's last ER block, and the free ER steps that end the "
        "uniform-amplitude run, stop once their error fell by less than this (relative) "
        "over 20 steps",
        low=0.0,
        high=0.5,
    )
    loose_support_iterations: int = _setting(
        50,
        f"ER steps that end the polish on its support grown by {LOOSE_SUPPORT_DILATION} "
        "voxels, when the data are "
        "not counts (noise-free or corrected): the crystal's soft edge, which the "
        "shrink-wrap cuts, is fitted (0: none)",
        low=0,
        high=1000,
    )
    uniform_amplitude_iterations: int = _setting(
        200,
        "steps of the uniform-amplitude run when the fit stays above the noise: HIO then "
        f"ER (half each) on the winner's support grown by {UNIFORM_AMPLITUDE_GROWTH} voxel, "
        f"the amplitude deeper than {UNIFORM_AMPLITUDE_DEPTH} voxels inside the crystal "
        "held at its median (a homogeneous crystal), then at most "
        f"{FREE_ER_SHARE:.0%} as many free ER steps, over-relaxed by {FREE_ER_RELAXATION}, on "
        "its shrink-wrap support, to convergence (converge_tolerance); kept if its chi is "
        "lower (0: none)",
        low=0,
        high=2000,
    )
    rescue_starts: int = _setting(
        3,
        "when the polished fit is still poor (as the quality verdict judges a fit) on a grid "
        f"of at most {RESCUE_GRID_EDGE} voxels along every axis, random starts of cohere's "
        "recipe "
        f"({RESCUE_ITERATIONS} steps, {RESCUE_HIO_FRACTION:.0%} HIO, shrink-wrap after every "
        "step) on the full grid, each followed by the uniform-amplitude run; the lowest chi "
        "is kept if lower (0: none)",
        low=0,
        high=20,
    )
    partial_coherence: bool = _setting(
        False,
        "model partial coherence in the polish: the data as the coherent intensity blurred "
        "by a kernel (at most 7 pixels across) refined by Richardson-Lucy",
    )
    support_threshold: float = _setting(
        0.2,
        "fraction of the maximum amplitude that defines the reported support",
        low=0.01,
        high=0.9,
    )
    track: bool = _setting(
        False,
        "start ES from the better (by chi) of the CNN's estimate and the previous "
        "reconstruction, to follow an evolving sample across a series of scans",
    )
    seed: int = _setting(
        0,
        "seed of the ES dither assignment and the random starts (runs are deterministic)",
        low=0,
        high=2**31 - 1,
    )

    def __post_init__(self) -> None:
        for info in self.fields_info():
            value = getattr(self, info.name)
            object.__setattr__(self, info.name, _coerce(info, value))

    @classmethod
    def fields_info(cls) -> list[SettingInfo]:
        """Every setting: name, default, type, limits, units and help, in declaration order."""
        kinds = {"int": int, "float": float, "bool": bool}
        return [
            SettingInfo(
                f.name,
                f.default,
                kinds[str(f.type)],
                f.metadata["low"],
                f.metadata["high"],
                f.metadata["units"],
                f.metadata["doc"],
            )
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def largest_time_budgets(cls) -> dict[str, float]:
        """Every wall-time safety cap (``*_time_budget_s``) at its upper limit: for runs that
        the iteration counts, not the machine's load, must decide."""
        return {
            info.name: info.high
            for info in cls.fields_info()
            if info.name.endswith("_time_budget_s")
        }

    def replace(self, **changes: Any) -> ReconstructionSettings:
        """A validated copy with ``changes`` (field names) applied."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SettingsError(f"unknown reconstruction settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        return dataclasses.asdict(self)


def _coerce(info: SettingInfo, value: Any) -> Any:
    """``value`` as the setting's type, or :class:`SettingsError` naming what is wrong."""
    name = info.name
    if info.kind is bool:
        if isinstance(value, (bool, np.bool_)) or (_is_number(value) and value in (0, 1)):
            return bool(value)
        raise SettingsError(f"{name} must be true or false, got {value!r}")
    if not _is_number(value):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be finite, got {value!r}")
    if info.kind is int:
        if number != int(number):
            raise SettingsError(f"{name} must be a whole number, got {value!r}")
        number = int(number)
    if (info.low is not None and number < info.low) or (
        info.high is not None and number > info.high
    ):
        units = f" {info.units}" if info.units else ""
        raise SettingsError(
            f"{name} = {value!r} is outside its limits "
            f"{_limit_text(info.low)} .. {_limit_text(info.high)}{units}"
        )
    return number


def _limit_text(limit: float) -> str:
    """A limit as people write it: 30, not 30.0; 2147483647, not 2.14748e+09."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


__all__ = ["ReconstructionSettings", "SettingInfo"]
