"""Scans per minute on executors: in-process, a thread pool, and Dask with 1 and 2 workers.

    python benchmarks/bench_scaleout.py [--scans 4] [--refine full]

``--scans`` simulated rocking scans (64^3 volumes with Poisson noise, one hidden crystal each)
are reconstructed, in one run of this script:

- in this process, one after the other (the reference, ratio 1);
- through :func:`~bcdi_bluesky.beamline.scaleout.reconstruct_volume` on a one-thread pool
  (what the callback's worker thread costs);
- on a Dask ``LocalCluster`` of 1 and of 2 worker processes (one thread each, on loopback,
  the model loaded by the worker plugin before the clock starts).

Printed: scans per minute, the median seconds per scan as the tasks report them, the ratio
of throughput to the reference, the per-task overhead of Dask (round trip of a task that
takes a volume and returns an array as large as a result, median of 20), and the load
average before and after (other jobs on the machine share the cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from bcdi_bluesky.beamline.scaleout import (
    ReconstructorSpec,
    dask_executor,
    reconstruct_volume,
    warm_reconstructor,
)
from bcdi_bluesky.beamline.sim import HiddenCrystal


def volumes(count: int) -> list[np.ndarray]:
    """One noisy diffraction volume per hidden crystal (seeds 100, 101, ...)."""
    rng = np.random.default_rng(0)
    return [
        rng.poisson(HiddenCrystal(seed=100 + k).pattern).astype(np.float32) for k in range(count)
    ]


def batch(executor: Executor, data: list[np.ndarray], refine: str) -> tuple[float, list]:
    """Wall seconds for the whole batch, and each task's own total seconds."""
    spec = ReconstructorSpec()
    t = time.perf_counter()
    futures = [executor.submit(reconstruct_volume, spec, v, refine) for v in data]
    results = [f.result(timeout=3600) for f in futures]
    return time.perf_counter() - t, [r.timings["total"] for r in results]


def echo(volume: np.ndarray) -> np.ndarray:
    """A task with no work: a volume in, a result-sized array (complex object) out."""
    return np.zeros(volume.shape, dtype=np.complex64)


def overhead(executor: Executor, volume: np.ndarray, repeats: int = 20) -> float:
    """Median round trip of :func:`echo` on ``executor`` minus the local call (s)."""
    local, remote = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        echo(volume)
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        executor.submit(echo, volume).result(timeout=60)
        remote.append(time.perf_counter() - t)
    return statistics.median(remote) - statistics.median(local)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--refine", choices=("none", "es", "full"), default="full")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    data = volumes(args.scans)
    rows = []

    # Reference: this process, one scan after the other, warm model.
    rec = warm_reconstructor(ReconstructorSpec())
    rec.reconstruct(data[0], refine="none")
    t = time.perf_counter()
    own = [rec.reconstruct(v, refine=args.refine).timings["total"] for v in data]
    reference = time.perf_counter() - t
    rows.append(("in process, serial", reference, own, None))

    with ThreadPoolExecutor(max_workers=1) as pool:
        wall, own = batch(pool, data, args.refine)
        rows.append(("thread pool, 1 thread", wall, own, overhead(pool, data[0])))

    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=40,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            executor = dask_executor(client)  # the plugin loads the model on each worker
            client.submit(
                reconstruct_volume, ReconstructorSpec(), data[0], "none", pure=False
            ).result(timeout=600)
            cost = overhead(executor, data[0])
            wall, own = batch(executor, data, args.refine)
            rows.append((f"Dask, {workers} worker process{'es' * (workers > 1)}", wall, own, cost))

    print(f"refine={args.refine}, {args.scans} scans of 64^3 per configuration")
    print(f"{'executor':<28}{'scans/min':>10}{'s/scan':>9}{'ratio':>8}{'overhead ms':>13}")
    for name, wall, own, cost in rows:
        per_min = 60.0 * len(own) / wall
        ratio = reference / wall
        cost_text = "-" if cost is None else f"{cost * 1e3:.1f}"
        print(
            f"{name:<28}{per_min:>10.2f}{statistics.median(own):>9.2f}{ratio:>8.2f}{cost_text:>13}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
