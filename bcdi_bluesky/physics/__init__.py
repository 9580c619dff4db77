"""Physics core (numpy and scipy only): crystal model, forward model, priors and metrics."""

from ._crystal import CrystalModel, Rendered
from ._forward import (
    beamstop_mask,
    detector_gap_mask,
    far_field,
    intensity,
    poisson_counts,
    scale_to_photons,
    simulate_counts,
)
from ._harmonics import LMAX_LIMIT, grid_table, real_sph_harm, sh_index
from ._metrics import (
    ObjectComparison,
    align,
    chi,
    compare_objects,
    complex_overlap,
    cube_symmetry,
    fitted_scale,
    mirror,
    phase_rms,
    poisson_chi_floor,
    poisson_nll,
    r_factor,
    ssim_amplitude,
    support,
    support_iou,
    twin_object,
)
from ._priors import CrystalPrior
from ._validation import check_mask, check_volume

__all__ = [
    "LMAX_LIMIT",
    "CrystalModel",
    "CrystalPrior",
    "ObjectComparison",
    "Rendered",
    "align",
    "beamstop_mask",
    "check_mask",
    "check_volume",
    "chi",
    "compare_objects",
    "complex_overlap",
    "cube_symmetry",
    "detector_gap_mask",
    "far_field",
    "fitted_scale",
    "grid_table",
    "intensity",
    "mirror",
    "phase_rms",
    "poisson_chi_floor",
    "poisson_counts",
    "poisson_nll",
    "r_factor",
    "real_sph_harm",
    "scale_to_photons",
    "sh_index",
    "simulate_counts",
    "ssim_amplitude",
    "support",
    "support_iou",
    "twin_object",
]
