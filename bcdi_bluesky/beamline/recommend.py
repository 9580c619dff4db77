"""What the next scan should be, read off the last one: rocking centre, range and exposure.

Computed from the measured frames (cheap, before and whatever the reconstruction does), so
the closed loop keeps steering even when a reconstruction fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Recommendation:
    """Settings for the next rocking scan.

    ``peak_inside`` is False when the rocking curve still rises at an end of the scan (the
    Bragg peak is outside or at the edge of the range); ``saturated`` when any pixel reached
    the detector's maximum count.
    """

    theta_center: float
    theta_range: float
    exposure: float
    peak_inside: bool
    saturated: bool
    max_count_observed: float
    fwhm: float

    def as_dict(self) -> dict:
        """Plain dict (for documents and PVs)."""
        return asdict(self)


def recommend(
    volume: np.ndarray,
    thetas: np.ndarray,
    exposure: float | None = None,
    max_count: float | None = None,
    target_fraction: float = 0.5,
    range_per_fwhm: float = 16.0,
) -> Recommendation:
    """Recommend the next scan from a rocking scan's frames.

    Parameters
    ----------
    volume : ndarray
        Frames stacked along axis 0 in rocking order.
    thetas : ndarray
        Rocking angle of each frame.
    exposure : float, optional
        Exposure time of these frames (s); None: no exposure recommendation (returned as nan).
    max_count : float, optional
        The detector's saturation count.
    target_fraction : float
        Aim for a brightest pixel at this fraction of ``max_count``.
    range_per_fwhm : float
        Rocking range as a multiple of the rocking curve's FWHM: about 16 covers the fringes of
        a crystal sampled at oversampling 2.

    Returns
    -------
    Recommendation
    """
    thetas = np.asarray(thetas, dtype=np.float64)
    if volume.shape[0] != thetas.size or thetas.size < 2:
        raise ValueError(f"{volume.shape[0]} frames but {thetas.size} angles (need >= 2)")
    curve = volume.reshape(volume.shape[0], -1).sum(axis=1).astype(np.float64)
    if not np.all(np.isfinite(thetas)):
        raise ValueError("rocking angles must be finite")
    step = float(np.median(np.abs(np.diff(thetas))))
    if step <= 0:
        raise ValueError(f"the rocking angles do not change (every frame at {thetas[0]:g})")
    width = float(thetas.max() - thetas.min())
    baseline = float(np.percentile(curve, 10))
    signal = np.maximum(curve - baseline, 0.0)
    top = int(np.argmax(curve))
    edge = max(1, thetas.size // 16)
    peak_inside = edge <= top < thetas.size - edge and signal.max() > 0
    if not peak_inside:
        # The peak is beyond the end where the curve rises: move most of a range that way.
        direction = 1.0 if top >= thetas.size // 2 else -1.0
        order = np.argsort(thetas)
        end = thetas[order[-1]] if direction > 0 else thetas[order[0]]
        centre = float(end + direction * 0.4 * width)
        fwhm = float("nan")
        new_range = width
    else:
        above = signal >= 0.5 * signal[top]
        fwhm = float(max(np.count_nonzero(above), 1) * step)
        # Centroid of the top of the curve: robust to fringes and noise in the tails.
        weights = np.where(signal >= 0.1 * signal[top], signal, 0.0)
        centre = float(np.sum(weights * thetas) / np.sum(weights))
        new_range = float(max(range_per_fwhm * fwhm, 8 * step))
    brightest = float(volume.max())
    saturated = max_count is not None and brightest >= max_count
    if exposure is None or max_count is None:
        new_exposure = float("nan")
    elif saturated:
        new_exposure = exposure * 0.1  # the true peak is unknown: back off a decade
    elif not peak_inside:
        new_exposure = exposure  # only a tail was seen: it says nothing of the peak's counts
    else:
        factor = target_fraction * max_count / max(brightest, 1.0)
        new_exposure = exposure * float(np.clip(factor, 0.1, 10.0))
    return Recommendation(
        centre, new_range, new_exposure, bool(peak_inside), bool(saturated), brightest, fwhm
    )


def annotate_result(result, start: dict, recommendation: Recommendation | None = None) -> None:
    """Write the scan's identity, the recommendation for the next scan (a
    :class:`Recommendation`, or None) and the voxel size (from the result's physical view, when
    the scan had a geometry) into ``result.metadata``.
    """
    physical = getattr(result, "physical", None)
    voxel = None if physical is None else physical.voxel_size_nm
    result.metadata.update(
        uid=start.get("uid"),
        scan_id=start.get("scan_id"),
        recommendation=recommendation,
        voxel_size_nm=None if voxel is None else np.asarray(voxel).tolist(),
    )
