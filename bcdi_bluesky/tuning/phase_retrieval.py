"""Phase-retrieval polish: ER/HIO with shrink-wrap, seeded by the model's object and support.

The low-dimensional model cannot hold facets, defects or fine strain; a short run of iterative
phase retrieval started from it can. Seeded with a good support, a hundred or two iterations do
what a random start needs many hundreds for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.optimize

from ..backend import NUMPY, ArrayBackend
from ..physics import intensity, poisson_chi_floor
from ..settings import ReconstructionSettings
from .refine import ChiCost

#: Fraction of the autocorrelation's maximum that defines its support
#: (:func:`autocorrelation_seed`).
AUTOCORRELATION_THRESHOLD = 0.1

#: Shrink-wrap's blur (voxels) and threshold (fraction of the blurred maximum): cohere's defaults.
SHRINK_SIGMA = 1.0
SHRINK_THRESHOLD = 0.1

#: The pipeline's defaults (one source: :class:`~bcdi_bluesky.ReconstructionSettings`).
_DEFAULTS = ReconstructionSettings()


class CoherenceKernel:
    """Partial coherence: the measured intensity as the coherent one blurred by a kernel ``K``.

    ``I_measured = K * |F|^2`` (a convolution over q), as cohere's Lucy kernel and PyNX's PSF
    model a beam that is not fully coherent. ``K`` starts as a Gaussian of
    :attr:`START_SIGMA` pixels, is kept non-negative, of unit sum and inside a
    ``(2 HALF_WIDTH + 1)^3`` box around q = 0, and is refined by Richardson-Lucy from the
    current model and the data (:meth:`update`). The convolution is periodic (a product in
    Fourier space), so the same kernel blurs a centred intensity or one with q = 0 at index 0.

    Parameters
    ----------
    shape : tuple of int
        The grid of q.
    backend : ArrayBackend
        Where the kernel lives.
    """

    #: Half-width (pixels) of the box the kernel may spread over.
    HALF_WIDTH = 3
    #: Width (pixels) of the Gaussian the kernel starts from.
    START_SIGMA = 0.8
    #: Richardson-Lucy iterations per :meth:`update`.
    RL_ITERATIONS = 5

    def __init__(self, shape: tuple[int, ...], backend: ArrayBackend = NUMPY) -> None:
        self.backend = backend
        grids = np.meshgrid(*(np.fft.fftfreq(n) * n for n in shape), indexing="ij", sparse=True)
        window = np.ones(shape, dtype=bool)
        for g in grids:
            window &= np.abs(g) <= self.HALF_WIDTH
        kernel = np.exp(-0.5 * sum(g * g for g in grids) / self.START_SIGMA**2) * window
        self.window = backend.asarray(window)
        self._set(backend.asarray((kernel / kernel.sum()).astype(np.float32)))

    def _set(self, kernel: Any) -> None:
        self.kernel = kernel
        self.transfer = self.backend.fftn(self.backend.xp.astype(kernel, self.backend.xp.complex64))

    def blur(self, power: Any) -> Any:
        """``K * power`` (float32, non-negative)."""
        xp = self.backend.xp
        spectrum = self.backend.fftn(xp.astype(power, xp.complex64))
        blurred = self.backend.ifftn(spectrum * self.transfer, overwrite=True).real
        return xp.clip(blurred, min=0.0)

    def update(self, power: Any, measured: Any, valid: Any | None = None) -> None:
        """Richardson-Lucy steps for ``K`` given the coherent model ``power`` and the data
        (both with q = 0 at the same index; ``valid``: True where measured)."""
        xp, backend = self.backend.xp, self.backend
        total = float(xp.sum(power))
        if total <= 0:
            return
        spectrum = backend.fftn(xp.astype(power, xp.complex64))
        for _ in range(self.RL_ITERATIONS):
            blurred = xp.clip(backend.ifftn(spectrum * self.transfer).real, min=1e-12)
            ratio = measured / blurred
            if valid is not None:
                ratio = xp.where(valid, ratio, 1.0)
            ratio = backend.fftn(xp.astype(ratio, xp.complex64))
            correlation = backend.ifftn(ratio * xp.conj(spectrum), overwrite=True).real / total
            kernel = xp.clip(self.kernel * correlation, min=0.0) * self.window
            norm = float(xp.sum(kernel))
            if not norm > 0:
                return
            self._set(kernel / norm)

    def centred(self) -> np.ndarray:
        """The kernel on the host with q = 0 at index ``N // 2`` (for files and figures)."""
        return self.backend.to_numpy(self.backend.fftshift(self.kernel))

    def peak(self) -> float:
        """The kernel's central value: 1 for a fully coherent beam, lower as it spreads."""
        return float(self.backend.to_numpy(self.kernel).reshape(-1)[0])


@dataclass
class PolishResult:
    """The polished object (centred-q convention of the input) and its support (arrays of the
    backend the polish ran on)."""

    object: Any
    support: Any
    errors: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    #: Which run gave the result (:func:`seeded_polish`): "ER" or "ER/HIO".
    recipe: str = ""
    #: chi of the result against the measured intensity (:func:`seeded_polish`).
    chi: float = float("nan")
    #: What ended the run: "iterations", "converged" (``tolerance``), "hook" or "time" (the
    #: wall-time cap, a safety net: the result then depends on the machine's load).
    stopped_by: str = "iterations"
    #: The partial-coherence kernel the run fitted (``partial_coherence``), else None.
    kernel: CoherenceKernel | None = None

    def model_intensity(self, backend: ArrayBackend = NUMPY) -> Any:
        """The centred intensity this result models: ``|F|^2``, blurred by its kernel."""
        coherent = intensity(self.object, backend=backend)
        return coherent if self.kernel is None else self.kernel.blur(coherent)

    @property
    def cut_short(self) -> bool:
        """The wall-time cap ended the run before its step count."""
        return self.stopped_by == "time"


def default_recipe(iterations: int, hio_fraction: float) -> list[str]:
    """``iterations`` steps: ER, then ``hio_fraction`` of them HIO, then ER (the first ER block
    is 20% of the steps, or less where HIO takes more; at least one ER at the end)."""
    if iterations <= 0:
        return []
    hio = round(iterations * hio_fraction)
    er1 = min(iterations // 5, iterations - hio)
    er2 = max(iterations - hio - er1, 1)
    hio = max(iterations - er1 - er2, 0)
    return ["ER"] * er1 + ["HIO"] * hio + ["ER"] * er2


def shrink_wrap(
    obj: Any,
    sigma: float = SHRINK_SIGMA,
    threshold: float = SHRINK_THRESHOLD,
    backend: ArrayBackend = NUMPY,
) -> Any:
    """New support: the Gaussian-blurred amplitude above ``threshold`` of its maximum."""
    blurred = backend.gaussian_blur(backend.xp.abs(obj), sigma)
    return blurred > threshold * backend.xp.max(blurred)


def polish(
    measured: Any,
    seed_object: Any,
    seed_support: Any,
    mask: Any | None = None,
    *,
    iterations: int,
    hio_fraction: float,
    beta: float = 0.9,
    shrink_every: int = 10,
    shrink_sigma: float = SHRINK_SIGMA,
    shrink_threshold: float = SHRINK_THRESHOLD,
    max_growth: int | None = None,
    time_budget_s: float | None = None,
    tolerance: float = 0.0,
    window: int = 20,
    hook: Callable[[int, float], bool | None] | None = None,
    backend: ArrayBackend = NUMPY,
    partial_coherence: bool = False,
    kernel: CoherenceKernel | None = None,
    uniform_interior: Any | None = None,
    relaxation: float = 1.0,
) -> PolishResult:
    """Refine ``seed_object`` against ``measured`` by ER/HIO with shrink-wrap.

    Parameters
    ----------
    measured : ndarray
        Centred intensity (``|fftshift(fftn(o))|^2`` convention), any 3D shape.
    seed_object, seed_support : ndarray
        Starting object (complex) and support (bool) on the same grid.
    mask : ndarray of bool, optional
        True for measured voxels; elsewhere the estimate keeps its own modulus.
    iterations : int
        Number of steps (recipe: :func:`default_recipe`).
    beta : float
        HIO feedback.
    hio_fraction : float
        Share of the steps that are HIO (:func:`default_recipe`).
    shrink_every, shrink_sigma, shrink_threshold : float
        Shrink-wrap period (steps), blur and threshold (:data:`SHRINK_SIGMA`,
        :data:`SHRINK_THRESHOLD`).
    max_growth : int or None
        The support never grows beyond the seed support dilated by this many voxels (None:
        no limit, the default: measured on 6 prior crystals and both measured sets, a limit of
        2 or 4 voxels cost more than it saved).
    time_budget_s : float, optional
        Safety cap: stop (after a final ER step) when exceeded (``stopped_by`` "time").
    tolerance, window : float, int
        Convergence: in the final ER block, stop once the error fell by less than
        ``tolerance`` (relative) over the last ``window`` steps (0: run every step). The
        stop depends on the data only, so the same input gives the same result anywhere.
    hook : callable, optional
        ``hook(iteration, error)``; False stops.
    backend : ArrayBackend
        Where the iterations run; inputs may be host numpy or arrays of the backend, the
        result's arrays are the backend's.
    partial_coherence : bool
        Model the data as the coherent intensity blurred by a :class:`CoherenceKernel`: the
        modulus constraint uses the blurred model, and the kernel is refined every
        ``shrink_every`` steps from the first third of the run on (from the start when
        ``kernel`` is given).
    kernel : CoherenceKernel, optional
        A kernel to start from (a previous run's); it is refined in place.
    uniform_interior : ndarray of bool, optional
        Voxels inside the support whose amplitude every step sets to its median over them,
        keeping their phase: a homogeneous crystal, whose density the data alone do not fix
        where an even phase and an odd amplitude change fit them alike.
    relaxation : float
        Over-relaxed ER, for ER-only runs on a fixed support (``hio_fraction`` 0,
        ``shrink_every`` 0): each step moves the estimate ``relaxation`` times the way to its
        projection (1: plain ER). Below 2 the run has the same fixed points as ER and, where ER
        creeps, reaches them in fewer steps; 2 and above are refused (at 2.2 every run tried
        diverged).
    """
    if not 1.0 <= relaxation < 2.0:
        raise ValueError(f"relaxation must be in [1, 2), got {relaxation}")
    if relaxation != 1.0 and (hio_fraction > 0 or shrink_every):
        raise ValueError("relaxation is for ER-only runs on a fixed support")
    started = time.perf_counter()
    xp = backend.xp
    # Work in unshifted q: shift the data once instead of the field at every step.
    amp = backend.ifftshift(xp.sqrt(backend.asarray(measured, dtype=xp.float32)))
    valid = None if mask is None else backend.ifftshift(backend.asarray(mask, dtype=xp.bool))
    invalid = None if valid is None else ~valid
    # numpy: the masked voxels by flat index, set in 0.014 ms per step where the boolean mask
    # takes 0.19 ms (64^3, 2% masked); the same values.
    invalid_at = None if invalid is None or not backend.is_numpy else np.flatnonzero(invalid)
    # The error's masked voxels weighed 0: a product, cheaper than gathering the valid ones.
    weight = None if valid is None else xp.astype(valid, xp.float32)
    support = xp.asarray(backend.asarray(seed_support, dtype=xp.bool), copy=True)
    interior = (
        None if uniform_interior is None else backend.asarray(uniform_interior, dtype=xp.bool)
    )
    if interior is not None and not bool(xp.any(interior)):
        raise ValueError("uniform_interior holds no voxel: nothing to hold uniform")
    # numpy: the held voxels by flat index, their amplitude set where they are (64^3, 7000
    # voxels: 0.16 ms a step against 1.36 ms for the whole volume); the same values.
    interior_at = None if interior is None or not backend.is_numpy else np.flatnonzero(interior)
    limit = (
        None
        if max_growth is None
        else backend.asarray(
            scipy.ndimage.binary_dilation(backend.to_numpy(support), iterations=max_growth)
        )
    )
    obj = backend.asarray(seed_object, dtype=xp.complex64) * support
    f = backend.fftn(obj)
    a = xp.abs(f) if valid is None else xp.abs(f)[valid]
    b = amp if valid is None else amp[valid]
    a, b = xp.reshape(a, (-1,)), xp.reshape(b, (-1,))
    scale = backend.dot(a, b) / max(backend.dot(a, a), 1e-30)
    obj *= scale if scale > 0 else 1.0
    amp_norm = backend.dot(b, b) ** 0.5
    errors: list[float] = []
    recipe = default_recipe(iterations, hio_fraction)
    last_hio = max((i for i, k in enumerate(recipe) if k == "HIO"), default=-1)
    # A given kernel is refined from the first step; a fresh one once the first third of the
    # run has brought the coherent model close (Richardson-Lucy needs a fair model).
    kernel_from = 0 if kernel is not None else len(recipe) // 3
    if not partial_coherence:
        kernel = None
    elif kernel is None:
        kernel = CoherenceKernel(tuple(amp.shape), backend)
    measured_q = amp * amp
    # ER leaves the object zero outside the support: the next forward FFT skips the lines
    # outside its box, and an ER step's inverse FFT computes the box only (numpy, bit for bit
    # the whole transform's; ``support_box`` is None where that does not pay).
    box = backend.support_box(support)
    object_box = box  # where the object is non-zero (None: anywhere, after an HIO step)
    done = 0
    stopped_by = "iterations"
    for i, kind in enumerate(recipe):
        out_of_time = time_budget_s is not None and time.perf_counter() - started > time_budget_s
        if out_of_time and kind == "HIO":
            kind = "ER"
        f = backend.fftn(obj) if object_box is None else backend.fftn_within(obj, object_box)
        if kernel is not None and i >= kernel_from:
            power = backend.power(f)
            if shrink_every and (i - kernel_from) % shrink_every == 0:
                kernel.update(power, measured_q, valid)
            mod = xp.sqrt(kernel.blur(power))
        else:
            mod = xp.abs(f)
        diff = mod - amp
        if weight is not None:
            diff *= weight
        diff *= diff
        # A float32 (pairwise) sum: within 1e-7 of the float64 dot's, 2.5x cheaper.
        errors.append(float(xp.sum(diff)) ** 0.5 / amp_norm)
        # Modulus projection as one real factor per voxel (f * amp / |f|): cheaper than
        # forming the unit phase; where masked the factor is 1 (the estimate keeps its own).
        # |f| + 1e-12, not a clip (4x cheaper): the same value where |f| > 2e-5 (1e-12 is
        # below half the float32 spacing there), and no 0/0 where f is zero.
        mod += 1e-12
        factor = amp / mod
        if invalid_at is not None:
            factor.reshape(-1)[invalid_at] = 1.0
        elif invalid is not None:
            factor[invalid] = 1.0
        f *= factor
        if kind == "ER":
            if box is None:
                new = backend.ifftn(f, overwrite=True)
                new *= support
                if relaxation != 1.0:
                    new = obj + relaxation * (new - obj)
            else:  # zero outside the box already, as the estimate is (a fixed support)
                new = backend.ifftn_within(f, box)
                inside = new[box]
                inside *= support[box]
                if relaxation != 1.0:
                    inside -= obj[box]
                    inside *= np.float32(relaxation)
                    inside += obj[box]
            obj, object_box = new, box
        else:
            new = backend.ifftn(f, overwrite=True)
            obj, object_box = backend.hio_update(obj, new, support, beta), None
        if interior_at is not None:
            obj = np.ascontiguousarray(obj)  # a view of it by flat index below
            held = obj.reshape(-1)[interior_at]
            modulus = np.abs(held)
            level = backend.median(modulus)
            obj.reshape(-1)[interior_at] = held * (level / np.clip(modulus, min=1e-12))
        elif interior is not None:
            modulus = xp.abs(obj)
            level = backend.median(modulus[interior])
            obj = xp.where(interior, obj * (level / xp.clip(modulus, min=1e-12)), obj)
        done += 1
        if shrink_every and (i + 1) % shrink_every == 0 and i + 1 < len(recipe):
            support = shrink_wrap(obj, shrink_sigma, shrink_threshold, backend)
            if limit is not None:
                support &= limit
            box = backend.support_box(support)
        if hook is not None and hook(done, errors[-1]) is False:
            stopped_by = "hook"
            break
        if out_of_time:
            stopped_by = "time"
            break
        if (
            tolerance > 0
            and i - window > last_hio
            and len(errors) > window
            and errors[-1] > (1.0 - tolerance) * errors[-1 - window]
        ):
            stopped_by = "converged"
            break
    obj = obj * support
    return PolishResult(
        obj,
        support,
        errors,
        done,
        time.perf_counter() - started,
        stopped_by=stopped_by,
        kernel=kernel,
    )


def seeded_polish(
    measured: np.ndarray,
    seed_object: np.ndarray,
    seed_support: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    er_iterations: int = _DEFAULTS.polish_er_iterations,
    iterations: int = _DEFAULTS.polish_iterations,
    hio_fraction: float = _DEFAULTS.polish_hio_fraction,
    discrepancy: float = 1.5,
    time_budget_s: float | None = None,
    hook: Callable[[int, float], bool | None] | None = None,
    backend: ArrayBackend = NUMPY,
    chi_cost: ChiCost | None = None,
    noise_floor: float | None = None,
    **options,
) -> PolishResult:
    """A polish that keeps a good seed and falls back to ER/HIO for a poor one.

    ER alone runs first: it only descends, so from a seed close to the answer (a crystal the
    model describes) it converges there, where HIO's feedback would carry the estimate away
    and let the shrink-wrapped support spread (measured on prior crystals at 1e8 photons:
    support IoU 0.95-0.99 after 50 ER steps, 0.89 after the 150-step ER/HIO recipe from the
    same seeds). If ER explains the data down to the Poisson noise (chi at most
    ``discrepancy`` times :func:`~bcdi_bluesky.physics.poisson_chi_floor`: 1.15-1.35 there),
    that is the answer. Otherwise (a measured crystal that the model only approximates, or
    data that are not photon counts) the ER/HIO recipe runs from the seed as well, and the
    result with the lower chi wins: on both measured sets that is ER/HIO.

    Parameters
    ----------
    measured, seed_object, seed_support, mask :
        As for :func:`polish`.
    er_iterations : int
        Steps of the ER-only run.
    iterations, hio_fraction : int, float
        Steps of the ER/HIO run and its share of HIO.
    discrepancy : float
        How close to the noise floor the ER run must come to be kept without the ER/HIO run.
    time_budget_s : float, optional
        For both runs together.
    hook : callable, optional
        ``hook(step, error)``, steps counted across both runs; False stops.
    backend : ArrayBackend
        Where both runs iterate (:func:`polish`).
    chi_cost, noise_floor : ChiCost, float, optional
        A caller that already has the chi of these data and their
        :func:`~bcdi_bluesky.physics.poisson_chi_floor` passes both (``noise_floor`` None then
        means the data are not counts); without ``chi_cost`` both are made from ``measured``.
    **options
        Passed on to :func:`polish` (``beta``, shrink-wrap settings, ``max_growth``,
        ``partial_coherence``).
    """
    started = time.perf_counter()
    if chi_cost is None:
        chi_cost = ChiCost(measured, mask, backend)
        noise_floor = poisson_chi_floor(
            backend.to_numpy(measured), None if mask is None else backend.to_numpy(mask)
        )

    def chi_of(result: PolishResult) -> float:
        return chi_cost(result.model_intensity(backend))

    first = polish(
        measured,
        seed_object,
        seed_support,
        mask,
        iterations=er_iterations,
        hio_fraction=0.0,
        time_budget_s=time_budget_s,
        hook=hook,
        backend=backend,
        **options,
    )
    first.recipe, first.chi = "ER", chi_of(first)
    stopped = first.stopped_by in ("hook", "time")
    at_noise = noise_floor is not None and first.chi <= discrepancy * noise_floor
    if at_noise or stopped or iterations <= 0:
        first.seconds = time.perf_counter() - started
        return first
    left = None if time_budget_s is None else max(time_budget_s - first.seconds, 0.0)
    offset = first.iterations
    second = polish(
        measured,
        seed_object,
        seed_support,
        mask,
        iterations=iterations,
        hio_fraction=hio_fraction,
        time_budget_s=left,
        hook=None if hook is None else lambda i, e: hook(offset + i, e),
        backend=backend,
        **options,
    )
    second.recipe, second.chi = "ER/HIO", chi_of(second)
    best = second if second.chi < first.chi else first
    if "time" in (first.stopped_by, second.stopped_by):
        best.stopped_by = "time"
    best.errors = first.errors + second.errors
    best.iterations = first.iterations + second.iterations
    best.seconds = time.perf_counter() - started
    return best


def ball_overlap_distance(threshold: float) -> float:
    """Where a ball's normalised autocorrelation falls to ``threshold``, in ball diameters.

    Two balls of radius ``R`` at distance ``d = 2 R x`` overlap by ``1 - 3x/2 + x^3/2`` of
    their volume.

    Parameters
    ----------
    threshold : float
        Fraction of the autocorrelation's maximum, in (0, 1).

    Returns
    -------
    float
        ``x`` in (0, 1).
    """
    return float(scipy.optimize.brentq(lambda x: 1 - 1.5 * x + 0.5 * x**3 - threshold, 0, 1))


def autocorrelation_seed(
    measured: np.ndarray, threshold: float = AUTOCORRELATION_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """A model-free seed: a uniform, zero-phase sphere, centred, sized from the autocorrelation.

    ``|ifftn(I)|`` is the object's autocorrelation, whose support is the object's doubled in
    every direction. Thresholded at a fraction of its maximum it is smaller than that (it tapers
    to zero at the edge), so the volume is divided by ``(2 x)^3`` with ``x`` from
    :func:`ball_overlap_distance`, which is exact for a ball, not by 8 (which gave spheres of
    a fifth to a third of the crystal's volume).

    Parameters
    ----------
    measured : ndarray
        Centred intensity.
    threshold : float
        Fraction of the autocorrelation's maximum that defines its support.

    Returns
    -------
    object, support : ndarray
        complex64 sphere and its boolean support.
    """
    autocorrelation = np.abs(scipy.fft.ifftn(np.asarray(measured, dtype=np.float32)))
    volume = np.count_nonzero(autocorrelation > threshold * autocorrelation.max())
    volume /= (2 * ball_overlap_distance(threshold)) ** 3
    radius = (3 * volume / (4 * np.pi)) ** (1 / 3)
    grids = np.ogrid[tuple(slice(0, s) for s in measured.shape)]
    r2 = sum((g - s // 2) ** 2 for g, s in zip(grids, measured.shape, strict=True))
    inside = np.asarray(r2 <= radius * radius)
    return inside.astype(np.complex64), inside


def random_start(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random amplitudes in [0, 1) and phases in [0, 2 pi) inside ``support`` (cohere's and
    PyNX's random start; zero outside).

    From the flat sphere of :func:`autocorrelation_seed` (a strain-free crystal's phase), ER/HIO
    keeps to such solutions on strained crystals; random starts reach other minima, and their
    chi tells which is right.

    Returns
    -------
    ndarray
        complex64 object.
    """
    shape = support.shape
    fill = rng.random(shape) * np.exp(2j * np.pi * rng.random(shape))
    return (fill * support).astype(np.complex64)
