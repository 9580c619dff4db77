"""Adaptive tuning: bounded extremum seeking (generic), its use on crystal parameters, and the
phase-retrieval polish."""

from .extremum_seeking import ESResult, ExtremumSeeker, StepHook
from .phase_retrieval import (
    CoherenceKernel,
    PolishResult,
    autocorrelation_seed,
    polish,
    random_start,
    seeded_polish,
)
from .refine import (
    ChiCost,
    RefineResult,
    best_start,
    best_twin_variant,
    coarse_chi,
    coarse_screen,
    fit_odd_shape,
    folded_chi,
    refine_crystal,
)
from .sampling import (
    central_slices,
    circular_extent,
    coarse_shape,
    crop_frequencies,
    fits_every_other_q,
    fold,
    pad_frequencies,
    subsample,
    subsampling_factors,
    unfold,
)

__all__ = [
    "ChiCost",
    "CoherenceKernel",
    "ESResult",
    "ExtremumSeeker",
    "PolishResult",
    "RefineResult",
    "StepHook",
    "autocorrelation_seed",
    "best_start",
    "best_twin_variant",
    "central_slices",
    "circular_extent",
    "coarse_chi",
    "coarse_screen",
    "coarse_shape",
    "crop_frequencies",
    "fit_odd_shape",
    "fits_every_other_q",
    "fold",
    "folded_chi",
    "pad_frequencies",
    "polish",
    "random_start",
    "refine_crystal",
    "seeded_polish",
    "subsample",
    "subsampling_factors",
    "unfold",
]
