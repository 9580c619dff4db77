"""Array backends for the numeric stages: numpy on the CPU, torch or CuPy on CUDA.

The forward model, ``chi``, the shape search and extremum seeking's cost evaluations and the
ER/HIO polish are written once against :class:`ArrayBackend`: the array-API namespace of
``array-api-compat`` for element-wise work and reductions, plus the few operations the standard
leaves to each library (FFTs with their thread count, scattering into a flat buffer, host
copies). The same code then runs on numpy, on CuPy, or on torch tensors on either device, and
torch CPU tensors are how the test suite exercises the GPU code path on a machine without one.

No GPU package is imported unless a GPU backend is asked for (:func:`select_backend`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import array_api_compat
import numpy as np
import scipy.fft

logger = logging.getLogger(__name__)


def _fft_workers_from_environment() -> int:
    """``$BCDI_FFT_WORKERS`` (a whole number of at least 1), else every core. A value that is
    not one is named in one warning and the default used: a typo in the environment must
    not stop a service at import."""
    cores = os.cpu_count() or 1
    text = os.environ.get("BCDI_FFT_WORKERS")
    if text is None:
        return cores
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        logger.warning(
            "BCDI_FFT_WORKERS=%r is not a whole number of at least 1: using %d (every core)",
            text,
            cores,
        )
        return cores
    return workers


#: FFT worker threads of the numpy backend (scipy.fft); all cores by default.
FFT_WORKERS = _fft_workers_from_environment()

#: Volumes up to this many voxels are transformed on one thread: for them, handing work to a
#: second thread costs more than it saves (32^3: 0.39 ms on one thread, 0.52 ms on two).
SMALL_FFT_VOXELS = 32**3

#: :meth:`ArrayBackend.fftn_within` and :meth:`~ArrayBackend.ifftn_within` run on volumes up to
#: this many voxels whose support spans at most this share of every axis; beyond, copying the
#: lines costs what leaving out the empty ones saves.
PRUNED_FFT_MAX_VOXELS = 64**3
PRUNED_FFT_MAX_SPAN = 0.7

#: What ``device=`` accepts (besides ``"cuda:N"``).
DEVICES = ("auto", "cpu", "cuda")
#: Array libraries, in the order ``"cuda"`` tries them: torch first, as its element-wise
#: kernels cost less per call (a 64^3 polish step on an H200: 0.20 ms on torch, 1.11 ms on
#: CuPy through array-api-compat; docs/benchmarks.md).
GPU_LIBRARIES = ("torch", "cupy")
LIBRARIES = ("numpy", *GPU_LIBRARIES)

_fallback_logged = False


@dataclass(frozen=True)
class ArrayBackend:
    """One array library on one device.

    Parameters
    ----------
    library : {"numpy", "cupy", "torch"}
        The array library.
    device : str
        ``"cpu"`` or ``"cuda:N"`` (numpy: ``"cpu"`` only; CuPy: CUDA only).
    """

    library: str = "numpy"
    device: str = "cpu"
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"array library must be one of {LIBRARIES}, got {self.library!r}")
        if not (self.device == "cpu" or _cuda_index(self.device) is not None):
            raise ValueError(f"device must be 'cpu' or 'cuda:N', got {self.device!r}")
        if (self.library, self.device == "cpu") in (("numpy", False), ("cupy", True)):
            raise ValueError(f"{self.library} does not run on {self.device}")

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """``"<library> on <device>"`` (logs and reports)."""
        return f"{self.library} on {self.device}"

    @property
    def is_numpy(self) -> bool:
        """The plain CPU path (arrays are numpy arrays)."""
        return self.library == "numpy"

    @cached_property
    def xp(self) -> Any:
        """The array-API namespace of the library: numpy itself (numpy >= 2 implements the
        standard, and its wrapper in ``array_api_compat`` costs time on small arrays), else
        ``array_api_compat``'s."""
        if self.is_numpy:
            return np
        return importlib.import_module(f"array_api_compat.{self.library}")

    @cached_property
    def _native(self) -> Any:
        return importlib.import_module(self.library)

    @cached_property
    def _device(self) -> Any:
        """The library's own device object (for ``device=`` arguments)."""
        if self.library == "torch":
            return self._native.device(self.device)
        if self.library == "cupy":
            return self._native.cuda.Device(_cuda_index(self.device))
        return "cpu"

    # ------------------------------------------------------------------ transfers
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` (numpy or this backend's array) on this backend, as ``dtype`` (an ``xp``
        dtype; None keeps it)."""
        if self.is_numpy:
            return np.asarray(x, dtype=dtype)
        if isinstance(x, np.ndarray) and not (x.dtype.isnative and x.flags.writeable):
            # torch refuses read-only memory (the cached tables) and foreign byte order.
            x = x.astype(x.dtype.newbyteorder("="))
        if self.library == "cupy":
            with self._device:
                out = self._native.asarray(x)
        else:
            out = self._native.as_tensor(x, device=self._device)
        return out if dtype is None else self.xp.astype(out, dtype, copy=False)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A host numpy copy (or ``x`` itself when it is one)."""
        if isinstance(x, np.ndarray):
            return x
        if self.library == "torch":
            return x.detach().cpu().numpy()
        if self.library == "cupy":
            return x.get()
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...] | int, dtype: Any) -> Any:
        """A zero array on this backend."""
        return self.xp.zeros(shape, dtype=dtype, device=self._device)

    def cached(self, key: Any, make: Any) -> Any:
        """``make()`` moved to this backend once per ``key`` (constant tables, masks)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ------------------------------------------------------------------ operations
    def fftn(self, x: Any, overwrite: bool = False) -> Any:
        """Unnormalised forward FFT over every axis (complex64 in, complex64 out)."""
        if self.is_numpy:
            return scipy.fft.fftn(x, workers=fft_workers(x.size), overwrite_x=overwrite)
        return self._native.fft.fftn(x)

    def ifftn(self, x: Any, overwrite: bool = False) -> Any:
        """Inverse FFT over every axis (``1/N`` normalised, as numpy's)."""
        if self.is_numpy:
            return scipy.fft.ifftn(x, workers=fft_workers(x.size), overwrite_x=overwrite)
        return self._native.fft.ifftn(x)

    def support_box(self, support: Any) -> tuple[slice, ...] | None:
        """The bounding box of a boolean ``support`` (slices) where :meth:`prunes` says the
        transforms within it pay, else None (and for an empty support)."""
        if not self.prunes(support.shape, None):
            return None
        box = []
        for axis in range(support.ndim):
            others = tuple(a for a in range(support.ndim) if a != axis)
            occupied = np.flatnonzero(np.any(support, axis=others))
            if occupied.size == 0:
                return None
            box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
        return tuple(box) if self.prunes(support.shape, tuple(box)) else None

    def prunes(self, shape: tuple[int, ...], box: tuple[slice, ...] | None) -> bool:
        """Whether :meth:`fftn_within` and :meth:`ifftn_within` pay for a volume of ``shape``
        that is zero outside ``box`` (None: for some box): on the numpy backend only (a GPU
        runs the whole transform at once), up to :data:`PRUNED_FFT_MAX_VOXELS`, and where
        the box spans at most :data:`PRUNED_FFT_MAX_SPAN` of every axis."""
        if not self.is_numpy or math.prod(shape) > PRUNED_FFT_MAX_VOXELS:
            return False
        return box is None or all(
            s.stop - s.start <= PRUNED_FFT_MAX_SPAN * n for s, n in zip(box, shape, strict=True)
        )

    def fftn_within(self, x: Any, box: tuple[slice, ...]) -> Any:
        """:meth:`fftn` of an ``x`` that is zero outside ``box`` (:meth:`support_box`), the
        same to the bit: the transform runs axis after axis, in the order ``fftn`` takes, and
        leaves out the lines that hold only zeros (a third of the work for a crystal in half
        of each axis). numpy backend only."""
        workers = fft_workers(x.size)
        part = x[(slice(None), *box[1:])]
        for axis in range(x.ndim):
            part = scipy.fft.fft(part, axis=axis, workers=workers, overwrite_x=axis > 0)
            if axis + 1 < x.ndim:
                # The next axis's lines: zero-padded along the axes done, cut along the rest.
                grown = np.zeros(x.shape[: axis + 2] + part.shape[axis + 2 :], dtype=part.dtype)
                grown[(slice(None),) * (axis + 1) + (box[axis + 1],)] = part
                part = grown
        return part

    def ifftn_within(self, f: Any, box: tuple[slice, ...]) -> Any:
        """:meth:`ifftn` of ``f`` on the voxels of ``box`` (:meth:`support_box`), zero
        elsewhere; there the same to the bit: axis after axis, each transform on the lines
        that reach the box only. numpy backend only."""
        workers = fft_workers(f.size)
        part = f
        for axis in range(f.ndim):
            # Unnormalised passes and 1/N once, after the first, as scipy's ifftn scales.
            part = scipy.fft.ifft(
                part, axis=axis, norm="forward", workers=workers, overwrite_x=axis > 0
            )
            part = part[(slice(None),) * axis + (box[axis],)]
            if axis == 0:
                part *= np.float32(1.0 / f.size)
        out = np.zeros(f.shape, dtype=part.dtype)
        out[box] = part
        return out

    def fftshift(self, x: Any) -> Any:
        """Move q = 0 to index ``N // 2`` along every axis."""
        return self.xp.roll(x, tuple(s // 2 for s in x.shape), axis=tuple(range(x.ndim)))

    def ifftshift(self, x: Any) -> Any:
        """Inverse of :meth:`fftshift` (q = 0 back to index 0)."""
        return self.xp.roll(x, tuple(-(s // 2) for s in x.shape), axis=tuple(range(x.ndim)))

    def flatnonzero(self, x: Any) -> Any:
        """Indices of the non-zero entries of a 1D array."""
        return self.xp.nonzero(x)[0]

    def power(self, field_: Any) -> Any:
        """``|field|^2`` as float32, without forming ``|field|``."""
        out = field_.real * field_.real
        out += field_.imag * field_.imag
        return out

    def hio_update(self, previous: Any, projected: Any, support: Any, beta: float) -> Any:
        """The HIO iterate: ``projected`` inside ``support``, ``previous - beta * projected``
        outside (complex64 volumes). The numpy backend writes it into ``previous`` (a 128^3
        ``numpy.where`` on complex64 costs 12 ms, three in-place passes 3 ms)."""
        if self.is_numpy:
            step = np.multiply(projected, np.float32(beta))
            previous -= step
            np.copyto(previous, projected, where=support)
            return previous
        return self.xp.where(support, projected, previous - beta * projected)

    def vdot(self, a: Any, b: Any) -> Any:
        """``sum(a * b)`` accumulated in float64, left on the device (1D real arrays): a GPU
        computes on with it without waiting; :meth:`dot` brings it to the host."""
        xp = self.xp
        if self.is_numpy:
            # einsum, not BLAS: a threaded BLAS call this small stalls on a busy host.
            return np.einsum("i,i->", a, b, dtype=np.float64)
        return xp.sum(xp.astype(a, xp.float64) * xp.astype(b, xp.float64))

    def median(self, x: Any) -> float:
        """The median of the values of the 1D array ``x`` (the lower of the two middle ones
        for an even count, as torch's: one definition on every library)."""
        k = (x.shape[0] - 1) // 2
        if self.is_numpy:  # the same value, without sorting the rest
            return float(np.partition(x, k)[k])
        return float(self.xp.sort(x)[k])

    def dot(self, a: Any, b: Any) -> float:
        """``sum(a * b)`` accumulated in float64, as a Python float (1D real arrays)."""
        return float(self.vdot(a, b))

    def matvec(self, vector: np.ndarray, table: Any) -> Any:
        """``vector @ table`` for a short host vector and a (M, K) table on this backend."""
        if self.is_numpy:
            return np.einsum("i,ij->j", vector.astype(table.dtype), table)
        return self.xp.matmul(self.asarray(vector, dtype=table.dtype), table)

    def gaussian_blur(self, x: Any, sigma: float) -> Any:
        """Periodic Gaussian blur of a real volume (standard deviation ``sigma`` voxels).

        A product in Fourier space: the same result on every backend, and for an object that
        sits inside its box (as a crystal does) the wrap-around never matters. Real
        transforms: half the work of complex ones.
        """
        xp = self.xp
        shape = tuple(x.shape)
        key = ("gaussian", shape, float(sigma))

        def transfer() -> Any:
            frequencies = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
            grids = np.meshgrid(*frequencies, indexing="ij", sparse=True)
            q2 = sum(g * g for g in grids)
            return self.asarray(np.exp(-2.0 * (np.pi * sigma) ** 2 * q2).astype(np.float32))

        kernel = self.cached(key, transfer)
        x = xp.astype(x, xp.float32)
        if self.is_numpy:
            workers = fft_workers(x.size)
            spectrum = scipy.fft.rfftn(x, workers=workers)
            spectrum *= kernel
            return scipy.fft.irfftn(spectrum, shape, workers=workers, overwrite_x=True)
        return self._native.fft.irfftn(self._native.fft.rfftn(x) * kernel, shape)

    def synchronize(self) -> None:
        """Wait for queued GPU work (timings); nothing on the CPU."""
        if self.device == "cpu":
            return
        if self.library == "torch":
            self._native.cuda.synchronize(self._device)
        else:
            self._device.synchronize()

    def reset_memory_peak(self) -> None:
        """Start a new :meth:`memory_peak_bytes` measurement (frees CuPy's cached blocks)."""
        if self.library == "torch" and self.device != "cpu":
            # Before torch has initialised CUDA there is no peak to reset (and it raises).
            if self._native.cuda.is_initialized():
                self._native.cuda.reset_peak_memory_stats(self._device)
        elif self.library == "cupy":
            self._native.get_default_memory_pool().free_all_blocks()

    def memory_peak_bytes(self) -> int | None:
        """Peak GPU memory the library allocated (None on the CPU; CuPy: its memory pool's
        size, which keeps the peak until :meth:`reset_memory_peak`)."""
        if self.device == "cpu":
            return None
        if self.library == "torch":
            return int(self._native.cuda.max_memory_allocated(self._device))
        return int(self._native.get_default_memory_pool().total_bytes())


#: The plain CPU backend.
NUMPY = ArrayBackend()


_thread_limits = threading.local()


def fft_workers(voxels: int) -> int:
    """scipy.fft threads for a volume of ``voxels``: one for small ones, else
    :data:`FFT_WORKERS` (or this thread's :func:`fft_workers_limit`)."""
    if voxels <= SMALL_FFT_VOXELS:
        return 1
    return getattr(_thread_limits, "workers", None) or FFT_WORKERS


@contextlib.contextmanager
def fft_workers_limit(workers: int) -> Iterator[None]:
    """In this thread, FFTs of the numpy backend use at most ``workers`` threads: for runs
    that go on side by side and share the cores."""
    previous = getattr(_thread_limits, "workers", None)
    _thread_limits.workers = max(1, min(workers, FFT_WORKERS))
    try:
        yield
    finally:
        _thread_limits.workers = previous


def _cuda_index(device: str) -> int | None:
    """N of ``"cuda:N"`` (``"cuda"``: 0), else None."""
    if device == "cuda":
        return 0
    head, _, index = device.partition(":")
    return int(index) if head == "cuda" and index.isdigit() else None


def _gpu_visible() -> bool:
    """An NVIDIA device node exists (Linux; WSL's ``/dev/dxg``): ``"auto"`` imports no GPU
    library on a machine without one."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def _gpu_count(library: str) -> int:
    """CUDA devices that ``library`` sees (0 when it is not installed or finds none)."""
    if importlib.util.find_spec(library) is None:
        return 0
    try:
        module = importlib.import_module(library)
        if library == "torch":
            return int(module.cuda.device_count()) if module.cuda.is_available() else 0
        return int(module.cuda.runtime.getDeviceCount())
    except Exception:  # a GPU library without a driver raises its own errors
        return 0


def select_backend(device: str = "auto", library: str | None = None) -> ArrayBackend:
    """The backend for ``device``: numpy on the CPU, torch (else CuPy) on CUDA.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or "cuda:N"
        ``"auto"``: CUDA when a GPU library sees a device, else the CPU.
    library : {"numpy", "cupy", "torch"}, optional
        Force an array library (``device="cpu", library="torch"`` runs the GPU code path on
        the CPU).

    Returns
    -------
    ArrayBackend
        The backend that will run. Asking for CUDA where none is usable falls back to the CPU,
        logged once per process.

    Raises
    ------
    ValueError
        An unknown device or library.
    """
    global _fallback_logged
    if device not in DEVICES and _cuda_index(device) is None:
        raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {device!r}")
    if library is not None and library not in LIBRARIES:
        raise ValueError(f"array library must be one of {LIBRARIES}, got {library!r}")
    if device == "cpu":
        return NUMPY if library in (None, "numpy") else ArrayBackend(library, "cpu")
    if library == "numpy":
        if device != "auto":
            raise ValueError(f"numpy runs on the CPU only, not on {device!r}")
        return NUMPY
    if device == "auto" and not _gpu_visible():
        return NUMPY
    index = _cuda_index(device) or 0
    candidates = [library] if library in GPU_LIBRARIES else list(GPU_LIBRARIES)
    for name in candidates:
        if _gpu_count(name) > index:
            return ArrayBackend(name, f"cuda:{index}")
    if device != "auto" and not _fallback_logged:
        _fallback_logged = True
        logger.warning(
            "no CUDA device usable through %s: the numeric stages run on the CPU (numpy)",
            " or ".join(candidates),
        )
    return NUMPY


def namespace_of(x: Any) -> Any:
    """The array-API namespace of an array (numpy, CuPy or torch)."""
    return array_api_compat.array_namespace(x)
