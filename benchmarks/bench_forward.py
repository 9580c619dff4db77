"""Forward model speed: parameters -> voxel object -> centred intensity, against the bare FFT.

    python benchmarks/bench_forward.py [--runs 100]

For each grid size it prints the median wall time of (a) a bare ``scipy.fft.fftn`` of a
complex64 grid, (b) voxelisation alone, (c) the whole forward model
(``CrystalModel.intensity``: render, then the centred ``|fftn|^2``), and the ratio (c)/(a), all
timed in alternation in the same run on prior crystals.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import numpy as np
import scipy.fft

from bcdi_bluesky.physics import FFT_WORKERS, CrystalPrior


def _medians_s(fns, runs: int) -> list[float]:
    """Median seconds of each function, timed in alternation so they share the conditions
    (a virtual machine's speed drifts by tens of per cent from second to second)."""
    for fn in fns:
        fn()  # warm caches (SH tables, FFT plans, scratch buffers)
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t)
    return [statistics.median(b) for b in times]


def main() -> None:
    """Print the table."""
    from bcdi_bluesky.physics import CrystalModel

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"numpy {np.__version__}, scipy {scipy.__version__}; FFT workers {FFT_WORKERS}"
    )
    print(f"{'N':>5}{'bare fftn ms':>14}{'voxelise ms':>13}{'forward ms':>12}{'forward/fft':>13}")
    for n in (64, 128):
        model = CrystalModel(n=n)
        prior = CrystalPrior(model)
        params = [prior.sample(np.random.default_rng(i)) for i in range(8)]
        grid = np.zeros((n, n, n), dtype=np.complex64)
        grid[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1.0
        cycle = itertools.cycle(params)  # a different crystal every run
        fft, vox, fwd = _medians_s(
            [
                lambda g=grid: scipy.fft.fftn(g, workers=FFT_WORKERS),
                lambda m=model, c=cycle: m.voxelise(next(c)),
                lambda m=model, c=cycle: m.intensity(next(c)),
            ],
            args.runs,
        )
        print(f"{n:>5}{fft * 1e3:>14.2f}{vox * 1e3:>13.2f}{fwd * 1e3:>12.2f}{fwd / fft:>13.2f}")


if __name__ == "__main__":
    main()
