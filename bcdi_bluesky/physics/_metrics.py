"""Figures of merit, in reciprocal space (against data) and real space (against a truth).

Reciprocal-space metrics compare amplitudes ``sqrt(I)`` with the model's scaled in closed form
and exclude masked voxels. Real-space metrics first resolve what no measurement can: the twin
``conj(o(-r))``, a translation, a global phase and a linear phase ramp (see :func:`align`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage
from scipy.special import gammaln
from scipy.stats import poisson

from ..backend import FFT_WORKERS
from ._validation import check_mask, check_volume


def _amplitudes(model_intensity, measured_intensity, mask):
    model = check_volume(model_intensity, "model intensity", require_signal=False)
    measured = check_volume(measured_intensity, "measured intensity", require_signal=False)
    if model.shape != measured.shape:
        raise ValueError(
            f"model intensity has shape {model.shape} but the measured intensity "
            f"has shape {measured.shape}"
        )
    m = check_mask(mask, measured.shape)
    a = np.sqrt(model, dtype=np.float64)
    b = np.sqrt(measured, dtype=np.float64)
    if m is not None:
        a, b = a[m], b[m]
    return a.ravel(), b.ravel()


def fitted_scale(model_amplitude: np.ndarray, measured_amplitude: np.ndarray) -> float:
    """Least-squares scale ``s`` minimising ``||s a - b||``."""
    # einsum, not np.dot: a BLAS dot of a 64^3 vector fans out to BLAS threads, which spin
    # for CPU whenever other processes keep the cores busy (measured under load: the
    # refinement's CPU time 7.0 s with them, 2.4 s with one BLAS thread).
    den = float(np.einsum("i,i->", model_amplitude, model_amplitude))
    num = float(np.einsum("i,i->", model_amplitude, measured_amplitude))
    return num / den if den > 0 else 0.0


def chi(
    model_intensity: np.ndarray, measured_intensity: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """cohere's error ``||s A_model - sqrt(I)|| / ||sqrt(I)||`` with ``s`` fitted by least squares.

    Parameters
    ----------
    model_intensity, measured_intensity : ndarray
        Intensities on the same grid (the model's scale does not matter).
    mask : ndarray of bool, optional
        True for valid voxels; the others are left out.
    """
    a, b = _amplitudes(model_intensity, measured_intensity, mask)
    norm = float(np.linalg.norm(b))
    if norm == 0:
        raise ValueError("measured intensity has no signal in the valid voxels")
    return float(np.linalg.norm(fitted_scale(a, b) * a - b) / norm)


def r_factor(
    model_intensity: np.ndarray, measured_intensity: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Amplitude R-factor ``sum|sqrt(I) - s A_model| / sum sqrt(I)`` (least-squares ``s``)."""
    a, b = _amplitudes(model_intensity, measured_intensity, mask)
    total = float(b.sum())
    if total == 0:
        raise ValueError("measured intensity has no signal in the valid voxels")
    return float(np.abs(b - fitted_scale(a, b) * a).sum() / total)


#: Photon counts above this are not counts (a 32-bit counter's range).
MAX_COUNT = 2.0**32


def poisson_chi_floor(counts: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """The chi that Poisson noise alone leaves for a perfect model of photon ``counts``.

    ``sqrt(n)`` of a Poisson count has a variance of about 1/4 wherever counts are not tiny,
    so a perfect model still misses by ``sqrt(K / 4) / ||sqrt(n)||`` (``K`` the voxels with
    counts). Voxels with a few photons or none add more than that, so this is an underestimate
    (about 20% at 1e8 photons in 64^3, more with fewer photons): a conservative "down to the
    noise" test. ``None`` when the data are not counts (values that are not whole numbers, as
    after flat-field or absorption corrections): the noise is then unknown.
    """
    n = np.asarray(counts, dtype=np.float64)
    if mask is not None:
        n = n[np.asarray(mask, dtype=bool)]
    if n.size == 0:
        return None
    top = float(n.max())
    # Whole numbers from one photon up to a 32-bit counter's range: values all below one
    # (normalised data round to zero) or beyond it (a float's spacing exceeds one) are not
    # counts, whatever their rounding.
    if not 1.0 <= top < MAX_COUNT or np.any(np.abs(n - np.round(n)) > 1e-6):
        return None
    return float(np.sqrt(0.25 * np.count_nonzero(n)) / np.sqrt(float(n.sum())))


#: :func:`autocorrelation_noise` below this: data without noise. float32 rounding leaves
#: 0.9e-9 to 2.4e-9 (the 24 noise-free crystals of the development and benchmark sets, at
#: 64^3 and 128^3, with and without a detector gap; 2e-8 for a cube half the field of view
#: wide); photon counts about ``1 / sqrt(photons)`` (1.1e-4 to 1.1e-3 for the other 60,
#: 1e5 to 1e7 photons; 4e-6 at 1e10); the measured 64^3 crops of APS 34-ID-C scan 54
#: (corrected, not counts) and of the 3D-CDI-NN example 6.6e-5 and 7.2e-5.
NOISE_FREE_LEVEL = 1e-6

#: The share of the autocorrelation's voxels read by :func:`autocorrelation_noise`, the
#: faintest: outside the autocorrelation's support wherever the crystal is oversampled.
QUIET_SHARE = 0.1


def autocorrelation_noise(intensity: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The noise in an intensity, relative to its signal, read from its autocorrelation.

    ``|ifftn(I)|`` is the crystal's autocorrelation, zero beyond twice the crystal's extent,
    while noise on ``I`` spreads evenly over every voxel of it. Its faintest
    :data:`QUIET_SHARE` (the :data:`QUIET_SHARE` quantile) over its maximum is therefore the
    noise (about ``1 / sqrt(photons)`` for counts) or, for noise-free data, the float
    rounding (:data:`NOISE_FREE_LEVEL`). Masked voxels count as zero: a detector gap spreads
    the autocorrelation along lines and planes only.

    Parameters
    ----------
    intensity : ndarray
        The measured intensity, any units.
    mask : ndarray of bool, optional
        True for valid voxels.
    """
    data = check_volume(intensity, "measured intensity").astype(np.float64)
    m = check_mask(mask, data.shape)
    if m is not None:
        data[~m] = 0.0
    autocorrelation = np.abs(scipy.fft.rfftn(data, workers=FFT_WORKERS))
    # rfftn of a real volume is the conjugate of ifftn's half, times the voxel count: the
    # ratio to the maximum is the same, and the transform half the work.
    quiet = np.quantile(autocorrelation, QUIET_SHARE)
    return float(quiet / autocorrelation.max())


@functools.cache
def _poisson_sqrt_residual_table() -> tuple[np.ndarray, np.ndarray]:
    """``E[(sqrt(n) - sqrt(lam))^2]`` for ``n ~ Poisson(lam)`` on a log grid of ``lam``."""
    lam = np.geomspace(1e-4, 1e4, 321)
    values = np.empty_like(lam)
    for i, mean in enumerate(lam):
        n = np.arange(int(mean + 12 * np.sqrt(mean) + 30) + 1)
        values[i] = np.sum(poisson.pmf(n, mean) * (np.sqrt(n) - np.sqrt(mean)) ** 2)
    return np.log(lam), values


def poisson_chi_expected(
    model_intensity: np.ndarray, counts: np.ndarray, mask: np.ndarray | None = None
) -> float | None:
    """The chi that ``counts`` would leave if ``model_intensity`` were the truth.

    The model is scaled to the measured total; each valid voxel of mean ``lam`` then adds
    ``E[(sqrt(n) - sqrt(lam))^2]`` (``n ~ Poisson(lam)``) to the squared residual: 1/4 where
    counts are large, up to 0.45 near one photon, ``2 lam`` where photons are rare. Unlike
    :func:`poisson_chi_floor` (a data-only lower bound that counts 1/4 per non-zero voxel and
    falls 20-60% short at 1e5-1e8 photons), this is the expected chi of a perfect model: a
    reconstruction at the noise has ``chi / expected`` near 1. ``None`` when the data are not
    counts (as :func:`poisson_chi_floor`).
    """
    if poisson_chi_floor(counts, mask) is None:
        return None
    model = np.asarray(model_intensity, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        model, n = model[m], n[m]
    total = model.sum()
    if total <= 0:
        return None
    lam = model * (n.sum() / total)
    log_lam, table = _poisson_sqrt_residual_table()
    # Below the table 2 lam holds (one photon with probability lam); above it, 1/4.
    expected = np.where(
        lam < 1e-4, 2.0 * lam, np.interp(np.log(np.maximum(lam, 1e-4)), log_lam, table, right=0.25)
    )
    return float(np.sqrt(expected.sum()) / np.linalg.norm(np.sqrt(n)))


def poisson_nll(
    model_intensity: np.ndarray, counts: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Mean Poisson negative log-likelihood per valid voxel of ``counts`` given the model.

    The model is scaled to the measured total (the maximum-likelihood scale); the model
    intensity is floored at 1e-6 photon so that a zero where photons were seen stays finite.
    """
    model = check_volume(model_intensity, "model intensity", require_signal=False)
    n = check_volume(counts, "counts", require_signal=False)
    if model.shape != n.shape:
        raise ValueError(f"model intensity has shape {model.shape} but counts have {n.shape}")
    m = check_mask(mask, n.shape)
    lam = model.astype(np.float64)
    k = n.astype(np.float64)
    if m is not None:
        lam, k = lam[m], k[m]
    total = lam.sum()
    if total <= 0:
        raise ValueError("model intensity has no signal in the valid voxels")
    lam = np.maximum(lam * (k.sum() / total), 1e-6)
    return float(np.mean(lam - k * np.log(lam) + gammaln(k + 1.0)))


# ------------------------------------------------------------------ real space
def mirror(volume: np.ndarray, axes: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Mirror the last three axes of ``volume`` named in ``axes`` (0 = z) about index ``N // 2``.

    Index ``i -> (N - i) mod N`` (index 0, which has no partner, wraps onto itself): the
    mirror of a centred object, and of its centred intensity, on the same grid.
    """
    out = np.asarray(volume)
    for axis in axes:
        a = out.ndim - 3 + axis
        out = np.roll(np.flip(out, a), 1, axis=a)
    return out


def cube_symmetry(
    volume: np.ndarray, permutation: tuple[int, ...] = (0, 1, 2), flips: tuple[int, ...] = ()
) -> np.ndarray:
    """Apply a symmetry of the cube to the last three axes of ``volume``.

    Mirror the axes in ``flips`` about index ``N // 2`` (:func:`mirror`), then transpose the
    axes so that axis ``k`` of the result is axis ``permutation[k]``. The 48 choices are the
    symmetries of a centred cubic grid; on a crystal's parameters the same symmetry is
    :meth:`CrystalModel.symmetry_matrix`.
    """
    out = mirror(volume, tuple(flips))
    lead = out.ndim - 3
    return np.transpose(out, tuple(range(lead)) + tuple(lead + int(a) for a in permutation))


def twin_object(obj: np.ndarray) -> np.ndarray:
    """The twin ``conj(o(-r))`` on the grid (index ``i -> (N - i) mod N`` on every axis)."""
    return np.conj(mirror(obj))


def _axis_frequencies(shape: tuple[int, ...]) -> list[np.ndarray]:
    """``fftfreq`` of every axis, shaped to broadcast along that axis (cycles per voxel)."""
    return [
        np.reshape(scipy.fft.fftfreq(n), [n if k == axis else 1 for k in range(len(shape))])
        for axis, n in enumerate(shape)
    ]


def _best_shift(
    ref_amp: np.ndarray, amp: np.ndarray, subvoxel: bool = False
) -> tuple[tuple[float, ...], float]:
    """Circular shift of ``amp`` that maximises its correlation with ``ref_amp``.

    Integer, or with ``subvoxel`` the maximum of the band-limited correlation
    ``c(s) = sum_k X(k) exp(2 pi i k.s)`` (``X`` the cross-spectrum), found by Newton steps from
    the integer peak: exact for sharp-edged crystals too, whose correlation peak is a cone that
    a parabola through three samples would place short of its top.
    """
    spectrum = scipy.fft.fftn(ref_amp) * np.conj(scipy.fft.fftn(amp))
    xc = scipy.fft.ifftn(spectrum, workers=FFT_WORKERS).real
    peak = np.unravel_index(int(np.argmax(xc)), xc.shape)
    score = float(xc[peak])
    if not subvoxel:
        return tuple(float(i) for i in peak), score
    shape = xc.shape
    shift = np.array([p if p <= n // 2 else p - n for p, n in zip(peak, shape, strict=True)], float)
    freqs = _axis_frequencies(shape)
    for _ in range(8):
        z = spectrum * np.exp(2j * np.pi * sum(f * s for f, s in zip(freqs, shift, strict=True)))
        gradient = np.array([-2 * np.pi * np.sum(f * z.imag) for f in freqs])
        hessian = np.array([[-4 * np.pi**2 * np.sum(f * g * z.real) for g in freqs] for f in freqs])
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            break
        step = np.clip(step, -0.5, 0.5)
        shift -= step
        if np.abs(step).max() < 1e-3:
            break
    return tuple(float(s) % n for s, n in zip(shift, shape, strict=True)), score


def fourier_shift(obj: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """``obj`` moved circularly by ``shift`` voxels (any fraction) through the Fourier shift
    theorem: ``fourier_shift(o, s)[i] == o[i - s]`` for whole shifts.

    Parameters
    ----------
    obj : ndarray
        Complex or real volume.
    shift : sequence of float
        Shift along every axis, in voxels.

    Returns
    -------
    ndarray
        complex64.
    """
    o = np.asarray(obj)
    phase = sum(f * s for f, s in zip(_axis_frequencies(o.shape), shift, strict=True))
    spectrum = scipy.fft.fftn(o, workers=FFT_WORKERS) * np.exp(-2j * np.pi * phase)
    return scipy.fft.ifftn(spectrum, workers=FFT_WORKERS).astype(np.complex64)


def _remove_ramp(ref: np.ndarray, obj: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Remove the linear phase ramp and global phase of ``obj`` relative to ``ref``."""
    z = ref * np.conj(obj)
    n = z.shape
    # Coarse ramp: the peak of the (2x zero-padded) spectrum of ref * conj(obj).
    pad = tuple(2 * s for s in n)
    spec = np.abs(scipy.fft.fftn(z * weight, s=pad, workers=FFT_WORKERS))
    peak = np.unravel_index(int(np.argmax(spec)), pad)
    freq = np.array([(p if p < s // 2 else p - s) / s for p, s in zip(peak, pad, strict=True)])
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in n], indexing="ij")
    ramp = 2 * np.pi * sum(f * g for f, g in zip(freq, grids, strict=True))
    # Refine by weighted least squares on the small residual phase.
    sel = weight > 0
    coords = np.stack([g[sel] for g in grids] + [np.ones(int(sel.sum()))], axis=1)
    w = np.sqrt(weight[sel])
    for _ in range(2):
        resid = np.angle(z[sel] * np.exp(-1j * ramp[sel]))
        sol, *_ = np.linalg.lstsq(coords * w[:, None], resid * w, rcond=None)
        ramp = ramp + sum(c * g for c, g in zip(sol[:3], grids, strict=True)) + sol[3]
    return (obj * np.exp(1j * ramp)).astype(np.complex64)


def align(
    reference: np.ndarray,
    obj: np.ndarray,
    threshold: float = 0.2,
    phase: bool = True,
    subvoxel: bool = False,
) -> np.ndarray:
    """Return ``obj`` or its twin, translated, with phase ramp and offset matched to ``reference``.

    The translation is chosen by the amplitude cross-correlation; the ramp and the global
    phase (unless ``phase`` is False) by a weighted fit over the voxels where both amplitudes
    exceed ``threshold`` of their maxima; the twin by the complex overlap after both (by the
    amplitude cross-correlation when ``phase`` is False).

    Parameters
    ----------
    reference, obj : ndarray
        Objects on the same grid.
    threshold : float
        Fraction of each maximum amplitude that selects the voxels of the phase fit.
    phase : bool
        Match the phase ramp and offset too.
    subvoxel : bool
        Translate by fractions of a voxel as well (:func:`fourier_shift`). A translation is not
        measured in BCDI, sub-voxel ones included; where the phase changes by a radian or more
        per voxel (a strained crystal) a half-voxel offset alone makes a phase error of that
        size, so compare such objects with ``subvoxel=True``.
    """
    ref = check_volume(reference, "reference object", allow_complex=True, allow_negative=True)
    o = check_volume(obj, "object", allow_complex=True, allow_negative=True)
    if ref.shape != o.shape:
        raise ValueError(f"objects differ in shape: {ref.shape} vs {o.shape}")
    ref_amp = np.abs(ref)
    best: tuple[float, np.ndarray] | None = None
    for cand in (o, twin_object(o)):
        shift, score = _best_shift(ref_amp, np.abs(cand), subvoxel)
        if subvoxel:
            moved = fourier_shift(cand, shift)
        else:
            moved = np.roll(cand, tuple(round(s) for s in shift), axis=(0, 1, 2))
        if phase:
            a, b = ref_amp, np.abs(moved)
            weight = a * b * ((a > threshold * a.max()) & (b > threshold * b.max()))
            if weight.any():
                moved = _remove_ramp(ref, moved, weight)
                # A centrosymmetric crystal's amplitude cannot tell an object from its twin;
                # the phase can.
                score = complex_overlap(ref, moved)
        if best is None or score > best[0]:
            best = (score, moved)
    return best[1]


def support(obj: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Voxels whose amplitude exceeds ``threshold`` times the maximum amplitude (an array of
    any library, numpy, CuPy or torch: the mask is of the same library and device)."""
    amp = abs(obj)
    return amp > threshold * amp.max()


def support_iou(
    reference: np.ndarray, obj: np.ndarray, threshold: float = 0.2, aligned: bool = False
) -> float:
    """Intersection over union of the supports (after :func:`align` unless ``aligned``)."""
    o = obj if aligned else align(reference, obj, threshold, phase=False)
    a, b = support(reference, threshold), support(o, threshold)
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def complex_overlap(reference: np.ndarray, obj: np.ndarray) -> float:
    """``|<a, b>| / (||a|| ||b||)`` (1 for identical objects up to a global phase)."""
    a = np.asarray(reference).ravel()
    b = np.asarray(obj).ravel()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.abs(np.vdot(a, b)) / den) if den > 0 else 0.0


def phase_rms(
    reference: np.ndarray, obj: np.ndarray, threshold: float = 0.2, aligned: bool = False
) -> float:
    """Amplitude-weighted RMS phase difference (radians) over the reference's support."""
    o = obj if aligned else align(reference, obj, threshold)
    sel = support(reference, threshold)
    w = np.abs(reference[sel]) * np.abs(o[sel])
    if w.sum() == 0:
        return float(np.pi)
    d = np.angle(reference[sel] * np.conj(o[sel]))
    return float(np.sqrt(np.sum(w * d * d) / np.sum(w)))


def ssim_amplitude(reference: np.ndarray, obj: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity (Gaussian window) of the amplitudes, each scaled to max 1."""
    a = np.abs(reference).astype(np.float64)
    b = np.abs(obj).astype(np.float64)
    a /= a.max() or 1.0
    b /= b.max() or 1.0
    g = lambda x: scipy.ndimage.gaussian_filter(x, sigma)  # noqa: E731
    mu_a, mu_b = g(a), g(b)
    var_a = g(a * a) - mu_a**2
    var_b = g(b * b) - mu_b**2
    cov = g(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim.mean())


@dataclass(frozen=True)
class ObjectComparison:
    """Real-space agreement of a reconstruction with a known object."""

    iou: float
    overlap: float
    phase_rms: float
    ssim: float

    def as_dict(self) -> dict[str, float]:
        """The figures as a plain dict."""
        return {
            "iou": self.iou,
            "overlap": self.overlap,
            "phase_rms": self.phase_rms,
            "ssim": self.ssim,
        }


def compare_objects(
    reference: np.ndarray, obj: np.ndarray, threshold: float = 0.2
) -> ObjectComparison:
    """Align ``obj`` to ``reference`` once and compute IoU, overlap, phase RMS and SSIM."""
    o = align(reference, obj, threshold)
    return ObjectComparison(
        iou=support_iou(reference, o, threshold, aligned=True),
        overlap=complex_overlap(reference, o),
        phase_rms=phase_rms(reference, o, threshold, aligned=True),
        ssim=ssim_amplitude(reference, o),
    )


def central_slices(
    volume: np.ndarray, centre: tuple[int, int, int] | None = None
) -> dict[str, np.ndarray]:
    """The three central planes of a volume: ``XY`` (cut along axis 0), ``XZ``, ``YZ``."""
    c = centre or tuple(s // 2 for s in volume.shape)
    return {"XY": volume[c[0], :, :], "XZ": volume[:, c[1], :], "YZ": volume[:, :, c[2]]}
