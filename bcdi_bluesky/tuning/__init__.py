"""Adaptive tuning: bounded extremum seeking (generic), its use on crystal parameters, and the
phase-retrieval polish."""

from .extremum_seeking import ESResult, ExtremumSeeker, StepHook
from .phase_retrieval import (
    CoherenceKernel,
    PolishResult,
    autocorrelation_seed,
    circular_extent,
    coarse_shape,
    crop_frequencies,
    fold,
    pad_frequencies,
    polish,
    random_start,
    seeded_polish,
    subsample,
    subsampling_factors,
    unfold,
)
from .refine import (
    ChiCost,
    RefineResult,
    best_start,
    best_twin_variant,
    central_slices,
    coarse_chi,
    fit_odd_shape,
    refine_crystal,
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
    "coarse_shape",
    "crop_frequencies",
    "fit_odd_shape",
    "fold",
    "pad_frequencies",
    "polish",
    "random_start",
    "refine_crystal",
    "seeded_polish",
    "subsample",
    "subsampling_factors",
    "unfold",
]
