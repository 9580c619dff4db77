"""The CPU FFTs the polish could run on, against scipy.fft on one thread, in one run.

A phase-retrieval step is an FFT pair on a complex64 grid plus element-wise work; the pair is
about three quarters of a step on the numpy path. This times one pair (``fftn`` then
``ifftn``) per library and thread count, and, for the four further starts of the fit-driven
polish, the three ways to run four independent pairs on this machine's cores: one after the
other, two side by side in threads (what ``pipeline.side_by_side`` does), and one batched
transform of a (4, N, N, N) array. Medians of ``--repeat`` rounds, the candidates timed in
alternation within each round, so that a change of machine load falls on all of them.

    python benchmarks/bench_fft.py [--sizes 64 128] [--repeat 7] [--pairs 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
from bench_pipeline import machine

STARTS = 4


def _scipy_pair(x: np.ndarray, workers: int, axes: tuple[int, ...] | None = None) -> None:
    y = scipy.fft.fftn(x, axes=axes, workers=workers)
    scipy.fft.ifftn(y, axes=axes, workers=workers, overwrite_x=True)


def _numpy_pair(x: np.ndarray) -> None:
    np.fft.ifftn(np.fft.fftn(x))


def _candidates(
    n: int, cores: int, rng: np.random.Generator, pool: ThreadPoolExecutor
) -> dict[str, Callable[[], None]]:
    """name -> one FFT pair (or, for the starts, four) on an n^3 complex64 grid."""
    shape = (n, n, n)
    one = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    four = [np.array(one) for _ in range(STARTS)]
    batch = np.stack(four)
    found: dict[str, Callable[[], None]] = {
        "scipy.fft, 1 thread": lambda: _scipy_pair(one, 1),
        f"scipy.fft, {cores} threads": lambda: _scipy_pair(one, cores),
        "numpy.fft": lambda: _numpy_pair(one),
        "4 starts one after the other": lambda: [_scipy_pair(x, cores) for x in four],
        f"4 starts {min(cores, STARTS)} side by side": lambda: list(
            pool.map(lambda x: _scipy_pair(x, 1), four)
        ),
        "4 starts batched": lambda: _scipy_pair(batch, cores, axes=(1, 2, 3)),
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(cores)
        tensor = torch.from_numpy(one)
        found[f"torch CPU ({cores} threads)"] = lambda: torch.fft.ifftn(torch.fft.fftn(tensor))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeat", type=int, default=7, help="rounds (medians over them)")
    parser.add_argument("--pairs", type=int, default=10, help="calls per candidate per round")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    host = machine()
    print(
        f"machine: {host['processor']}, {host['cpus']} CPUs, load average "
        f"{host['load_average'][0]:.1f}; numpy {np.__version__}, scipy {scipy.__version__}"
    )
    rng = np.random.default_rng(0)
    # The starts side by side use a pool of one thread per core, as the polish does.
    with ThreadPoolExecutor(max_workers=cores) as pool:
        for n in args.sizes:
            _report(n, _measure(_candidates(n, cores, rng, pool), args.repeat, args.pairs))


def _measure(
    candidates: dict[str, Callable[[], None]], repeat: int, pairs: int
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one list entry a round, in alternation."""
    for run in candidates.values():  # warm: plans, thread pools, first-touch memory
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, run in candidates.items():
            started = time.perf_counter()
            for _ in range(pairs):
                run()
            times[name].append((time.perf_counter() - started) / pairs)
    return times


def _report(n: int, times: dict[str, list[float]]) -> None:
    reference = float(np.median(times["scipy.fft, 1 thread"]))
    print(f"\n{n}^3 complex64, one FFT pair (the 4-start rows: four pairs, and per pair)")
    print(f"{'':34s} {'ms':>8s} {'ms/pair':>8s} {'time / scipy 1 thread':>22s}")
    for name, measured in times.items():
        ms = 1e3 * float(np.median(measured))
        per_pair = ms / STARTS if name.startswith("4 starts") else ms
        print(f"{name:34s} {ms:8.2f} {per_pair:8.2f} {per_pair / (1e3 * reference):21.2f}x")


if __name__ == "__main__":
    main()
