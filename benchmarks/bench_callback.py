"""What the reconstruction callback costs the experiment, and how soon its result arrives.

    python benchmarks/bench_callback.py [--runs 5] [--points 64]

Measured in one run on the simulated beamline with a real RunEngine: the wall time of a
``--points`` rocking scan without and with :class:`BCDIReconstructionCallback` subscribed
(median of ``--runs``, alternating), their ratio (target <= 1.1), a scan run while the
worker reconstructs the previous one, the time the RunEngine thread spent inside the callback,
and the time from the run's ``stop`` document to the reconstruction (refine="full") reaching
``on_result``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

from bluesky import RunEngine

from bcdi_bluesky import BCDIReconstructionCallback, Reconstructor
from bcdi_bluesky.beamline import SimulatedBeamline


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--points", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    RE = RunEngine({}, context_managers=[])
    beamline = SimulatedBeamline(seed=4)
    beamline.det.max_count.put(1e12)

    def plan():
        return beamline.rocking_scan(args.points)

    arrived = threading.Event()
    stop_time = {}
    result_time = {}

    def on_result(result, start):
        result_time[start["uid"]] = time.perf_counter()
        arrived.set()

    cb = BCDIReconstructionCallback(reconstructor=Reconstructor(), on_result=on_result)
    cb.reconstructor.reconstruct(
        beamline.det.make_frame()[None].repeat(4, 0) + 1, refine="none"
    )  # warm up ONNX Runtime outside the timing
    RE(plan())  # warm up ophyd and the RunEngine
    bare, with_cb, busy, in_cb, latency = [], [], [], [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        RE(plan())
        bare.append(time.perf_counter() - t)
        tokens = [
            RE.subscribe(cb),
            RE.subscribe(
                lambda name, doc: (
                    stop_time.__setitem__(doc["run_start"], time.perf_counter())
                    if name == "stop"
                    else None
                )
            ),
        ]
        arrived.clear()
        t = time.perf_counter()
        (uid,) = RE(plan())
        with_cb.append(time.perf_counter() - t)
        for token in tokens:
            RE.unsubscribe(token)
        # The next scan runs while the worker reconstructs the last one (both cores busy).
        t = time.perf_counter()
        RE(plan())
        busy.append(time.perf_counter() - t)
        arrived.wait(120)
        in_cb.append(cb.records[uid].seconds_in_callback)
        latency.append(result_time[uid] - stop_time[uid])
    cb.close()
    med = statistics.median
    print(f"{'scan points':<40}{args.points:>10}")
    print(f"{'scan without callback (s)':<40}{med(bare):>10.3f}")
    print(f"{'scan with callback (s)':<40}{med(with_cb):>10.3f}")
    print(f"{'ratio (target <= 1.1)':<40}{med(with_cb) / med(bare):>10.3f}")
    print(f"{'scan during a reconstruction (s)':<40}{med(busy):>10.3f}")
    print(f"{'RunEngine thread inside callback (ms)':<40}{med(in_cb) * 1e3:>10.2f}")
    print(f"{'stop -> result, refine=full (s)':<40}{med(latency):>10.2f}")


if __name__ == "__main__":
    main()
