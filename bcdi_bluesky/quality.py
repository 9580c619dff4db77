"""How far to trust a reconstruction: the policies, as plain functions of plain numbers.

Three questions, each answered from what the data allow rather than from the pipeline's own
confidence:

* Is there anything to reconstruct? (:func:`check_bragg_peak`: the Rose criterion on the
  brightest voxel's photon count.)
* Is the CNN out of its depth? (:func:`out_of_distribution`: the latent's calibrated distance
  and the CNN's fit against its distribution on the training prior.)
* How good is the result? (:func:`quality_verdict`: the final fit against the chi that Poisson
  noise alone would leave, or convergence where the data are not counts; the signal level; the
  CNN's distance; a run cut short by a safety wall-time cap.)

numpy only: the runtime path imports this without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import NoBraggPeakError
from .physics import poisson_chi_floor

QUALITY_LEVELS = ("good", "fair", "poor")

#: Rose criterion: a feature is detectable when its signal reaches 5 times its noise. The
#: Bragg peak's brightest voxel of ``n`` photons over a background ``b`` has signal ``n - b``
#: and Poisson noise ``sqrt(n)``.
ROSE_SNR = 5.0

#: Fit of photon counts: chi / (chi a perfect model would leave, physics.poisson_chi_expected
#: with the result as the model). At most FIT_GOOD: down to the noise; above FIT_FAIR: the
#: result misses what the data show. A reconstruction that fits the noise itself has more
#: freedom than the truth and its own intensity underweights the rare-photon voxels: on the
#: development crystals (physics.DEV_SEED) those with support IoU 0.87-0.94 ended at
#: 1.11-1.22, those below 0.8 at 1.36-2.3.
FIT_GOOD, FIT_FAIR = 1.15, 1.3
#: Fit of data that are not counts (noise-free or corrected): chi at most CHI_GOOD (an
#: amplitude R-factor of about 0.01) with the phase retrieval converged is good; above
#: CHI_FAIR is poor.
CHI_GOOD, CHI_FAIR = 0.0025, 0.1
#: Data whose Poisson floor (physics.poisson_chi_floor) exceeds this hold too few photons per
#: voxel for fine detail: at best fair.
LOW_SIGNAL_FLOOR = 0.2
#: Data that are not counts: robust standard deviations by which the brightest voxel must
#: stand above the median (:func:`check_bragg_peak`).
PEAK_CONTRAST = 10.0
#: Oversampling below which the data cannot fix the object: a complex object has two unknowns
#: per support voxel and each measured voxel gives one intensity, so the valid voxels must
#: number at least twice the support's (Miao et al.'s criterion, sigma > 2).
MIN_OVERSAMPLING = 2.0
#: Fewest samples along each axis of a volume, and fewest support voxels, of a crystal
#: resolved in 3D: below, a fit can be perfect and say nothing (a 2^3 volume fits to 1e-7).
MIN_EDGE = 8
MIN_SUPPORT_VOXELS = 27
#: The CNN's chi is unusual when it lies this many standard deviations above its mean on the
#: prior (the model card's latent calibration): 2.33 is the one-sided 99% point of a Gaussian,
#: as the latent distance's 1 is the prior's 99th percentile.
CNN_CHI_Z_LIMIT = 2.33


def check_bragg_peak(
    data: np.ndarray, mask: np.ndarray | None = None, counts: bool | None = None
) -> None:
    """Raise :class:`NoBraggPeakError` unless photon counts hold a detectable Bragg peak.

    The valid voxels (hot pixels already masked) must hold some signal, and with photon counts
    the brightest must stand :data:`ROSE_SNR` Poisson standard deviations above the background
    (the median of the valid voxels). Data that are not counts (corrected intensities) have
    no known noise: their brightest voxel must stand out of their own spread
    (:data:`PEAK_CONTRAST`).

    Parameters
    ----------
    data : ndarray
        The intensity.
    mask : ndarray of bool, optional
        True for valid voxels.
    counts : bool, optional
        Whether the data are photon counts, where the caller knows it already (from
        :func:`~bcdi_bluesky.physics.poisson_chi_floor`, which None calls).
    """
    values = data if mask is None else data[mask]
    if values.size == 0 or not float(values.max()) > 0:
        # A dark scan whose one bright voxel (a zinger) was masked as hot, or a mask over all
        # of the signal: whatever the data's kind, nothing to reconstruct.
        raise NoBraggPeakError(
            "no usable Bragg peak: no signal in the valid voxels (hot voxels and the mask "
            "removed all of it)"
        )
    if counts is None:
        counts = poisson_chi_floor(values) is not None
    if not counts:
        _check_peak_contrast(values)
        return
    peak = float(values.max())
    background = float(np.median(values))
    if peak - background < ROSE_SNR * np.sqrt(max(peak, 1.0)):
        raise NoBraggPeakError(
            f"no usable Bragg peak: the brightest voxel holds {peak:.0f} photons over a "
            f"background of {background:.0f}, below {ROSE_SNR:g} Poisson standard deviations "
            "(is the peak inside the scan?)"
        )


def _check_peak_contrast(values: np.ndarray) -> None:
    """Data that are not counts: the brightest voxel must stand :data:`PEAK_CONTRAST` robust
    standard deviations (1.4826 times the median absolute deviation) above the median. Noise
    alone reaches about 5 in a 64^3 volume; measured peaks stand hundreds to tens of
    thousands above. Where most voxels share the median (sparse or thresholded data, weak
    noise on an offset) the deviation is taken over the other voxels."""
    peak, background = float(values.max()), float(np.median(values))
    deviation = np.abs(values - background)
    spread = float(np.median(deviation))
    if spread == 0 and peak > background:
        spread = float(np.median(deviation[deviation > 0]))
    contrast = (peak - background) / (1.4826 * spread) if peak > background else 0.0
    if contrast < PEAK_CONTRAST:
        raise NoBraggPeakError(
            f"no usable Bragg peak: the brightest voxel stands {contrast:.1f} robust standard "
            f"deviations above the median, below {PEAK_CONTRAST:g} (noise or a flat field, "
            "not a peak; data not counts)"
        )


@dataclass(frozen=True)
class Distribution:
    """Where the CNN stands against its training prior."""

    latent_distance: float | None  # calibrated: 99% of prior crystals below 1
    cnn_chi_z: float | None  # (chi - mean) / sd of the CNN's chi on the prior
    flagged: bool
    reasons: tuple[str, ...] = ()


def out_of_distribution(
    latent_distance: float | None, cnn_chi: float, chi_mean: float | None, chi_sd: float | None
) -> Distribution:
    """Flag a scan whose CNN latent or CNN fit is unusual for the training prior.

    Parameters
    ----------
    latent_distance : float or None
        Calibrated latent distance (None without a latent map).
    cnn_chi : float
        chi of the CNN's estimate against the data.
    chi_mean, chi_sd : float or None
        The CNN's chi on prior crystals (None without a latent map).
    """
    reasons = []
    z = None
    if chi_mean is not None and chi_sd:
        z = (cnn_chi - chi_mean) / chi_sd
        if z > CNN_CHI_Z_LIMIT:
            reasons.append(
                f"CNN fit unusual for its training (chi {cnn_chi:.3f}, {z:.1f} sd "
                f"above the prior's mean {chi_mean:.3f})"
            )
    if latent_distance is not None and latent_distance > 1.0:
        reasons.append(f"CNN latent out of distribution (distance {latent_distance:.2f} > 1)")
    return Distribution(latent_distance, z, bool(reasons), tuple(reasons))


@dataclass(frozen=True)
class QualityEvidence:
    """What the verdict weighs (all from the reconstruction and its data)."""

    chi: float  # final fit
    #: chi a perfect model would leave (counts; physics.poisson_chi_expected), else None
    expected_chi: float | None
    #: the last phase-retrieval run stopped by convergence (or fits to the noise)
    converged: bool
    #: physics.poisson_chi_floor of the data (None: not counts)
    signal_floor: float | None
    distribution: Distribution = field(default_factory=lambda: Distribution(None, None, False))
    #: stages that a safety wall-time cap cut short
    cut_short: tuple[str, ...] = ()
    #: valid measured voxels per voxel of the result's support (None: not known)
    oversampling: float | None = None
    #: shape of the measured volume (None: not known)
    shape: tuple[int, ...] | None = None
    #: voxels of the result's support (None: not known)
    support_voxels: int | None = None


def poor_fit(chi: float, expected_chi: float | None) -> bool:
    """Does a fit miss what the data show (the verdict's ``poor`` on the fit)? Counts: chi
    above :data:`FIT_FAIR` times what Poisson noise alone leaves, ``expected_chi``, and above
    :data:`CHI_FAIR` (at 1e8-1e9 photons the noise is so low that a sound reconstruction of a
    measured crystal, whose detector and coherence no model holds exactly, still sits several
    times above it); other data (``expected_chi`` None): chi above :data:`CHI_FAIR`."""
    if expected_chi is not None and expected_chi > 0:
        return chi > FIT_FAIR * expected_chi and chi > CHI_FAIR
    return chi > CHI_FAIR


def quality_verdict(evidence: QualityEvidence) -> tuple[str, list[str]]:
    """``good``, ``fair`` or ``poor``, and the reasons for anything below ``good``.

    The fit decides the level: counts against :data:`FIT_GOOD` / :data:`FIT_FAIR` times the
    chi Poisson noise alone would leave (poor also needs chi above :data:`CHI_FAIR`); other
    data against :data:`CHI_GOOD` / :data:`CHI_FAIR` and convergence. A low signal, an
    out-of-distribution CNN or a run cut short by a wall-time cap each lower ``good`` to
    ``fair`` and add their reason. Fewer valid voxels than :data:`MIN_OVERSAMPLING` times the
    support's (a mask that leaves too little, or a support that fills the grid) is ``poor``
    whatever the fit: the data do not determine the object. So is a volume with fewer than
    :data:`MIN_EDGE` samples along an axis or a support of fewer than
    :data:`MIN_SUPPORT_VOXELS`: no crystal is resolved in 3D there.
    """
    e = evidence
    reasons: list[str] = []
    level = 0
    if e.expected_chi is not None and e.expected_chi > 0:
        ratio = e.chi / e.expected_chi
        if poor_fit(e.chi, e.expected_chi):
            level = 2
        elif ratio > FIT_GOOD:
            level = 1
        if level:
            reasons.append(
                f"fit {ratio:.2f}x the Poisson noise (chi {e.chi:.4f}, noise alone "
                f"{e.expected_chi:.4f})"
            )
    else:
        if poor_fit(e.chi, None):
            level = 2
            reasons.append(f"fit chi {e.chi:.4f} above {CHI_FAIR:g} (data not counts)")
        elif e.chi > CHI_GOOD:
            level = 1
            reasons.append(f"fit chi {e.chi:.4f} above {CHI_GOOD:g} (data not counts)")
        elif not e.converged:
            level = 1
            reasons.append(f"phase retrieval not converged (chi {e.chi:.4f})")
    if e.signal_floor is not None and e.signal_floor > LOW_SIGNAL_FLOOR:
        level = max(level, 1)
        reasons.append(
            f"low signal (Poisson chi floor {e.signal_floor:.2f} > {LOW_SIGNAL_FLOOR:g})"
        )
    if e.distribution.flagged:
        level = max(level, 1)
        reasons.extend(e.distribution.reasons)
    for stage in e.cut_short:
        level = max(level, 1)
        reasons.append(f"{stage} cut short by its wall-time cap")
    if e.oversampling is not None and e.oversampling < MIN_OVERSAMPLING:
        level = 2
        reasons.append(
            f"underdetermined: {e.oversampling:.2f} valid voxels per support voxel, below "
            f"{MIN_OVERSAMPLING:g} (too much masked, or a support that fills the grid)"
        )
    if e.shape is not None and min(e.shape) < MIN_EDGE:
        level = 2
        reasons.append(
            f"a volume of {' x '.join(map(str, e.shape))} samples: fewer than {MIN_EDGE} along "
            f"an axis resolve no crystal in 3D"
        )
    if e.support_voxels is not None and e.support_voxels < MIN_SUPPORT_VOXELS:
        level = 2
        reasons.append(
            f"a support of {e.support_voxels} voxels (fewer than {MIN_SUPPORT_VOXELS}): no "
            f"crystal resolved"
        )
    return QUALITY_LEVELS[level], reasons


__all__ = [
    "CHI_FAIR",
    "CHI_GOOD",
    "CNN_CHI_Z_LIMIT",
    "FIT_FAIR",
    "FIT_GOOD",
    "LOW_SIGNAL_FLOOR",
    "MIN_EDGE",
    "MIN_OVERSAMPLING",
    "MIN_SUPPORT_VOXELS",
    "PEAK_CONTRAST",
    "QUALITY_LEVELS",
    "ROSE_SNR",
    "Distribution",
    "QualityEvidence",
    "check_bragg_peak",
    "out_of_distribution",
    "poor_fit",
    "quality_verdict",
]
