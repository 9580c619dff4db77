"""IOC latency: from a reconstruction result to every PV served, and a client's image reads.

    python benchmarks/bench_ioc.py [--runs 20]

Starts the IOC in-process on loopback with non-default ports, publishes a real reconstruction
(the bundled scan 54, refine="es") ``--runs`` times, and prints medians of: the time
``IOCPublisher`` takes to write every result PV (until the IOC serves them), and the time a
pyepics (libca) client takes to read the six slice images.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
import uuid
from pathlib import Path


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from bcdi_bluesky.epics.ioc import loopback_environment

    os.environ.update(loopback_environment(_port(), _port()))
    import subprocess
    import sys

    # A repeater first, or the IOC logs a beacon error every second.
    repeater_proc = subprocess.Popen(
        [sys.executable, "-c", "from caproto.sync.repeater import run; run()"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    import epics
    import numpy as np

    from bcdi_bluesky import Reconstructor
    from bcdi_bluesky.epics import IOCPublisher

    data = np.load(Path(__file__).resolve().parent.parent / "examples/data/S0054_intensity_64.npy")
    result = Reconstructor().reconstruct(data, refine="es")
    ioc = IOCPublisher(prefix=f"B{uuid.uuid4().hex[:6]}:", interfaces=["127.0.0.1"])
    p = ioc.group.prefix
    images = [f"{p}{kind}:{plane}" for kind in ("Amp", "Phase") for plane in ("XY", "XZ", "YZ")]
    pvs = [epics.PV(name, auto_monitor=False) for name in images]
    for pv in pvs:
        pv.wait_for_connection(5)
    publish, read = [], []
    for i in range(args.runs):
        t = time.perf_counter()
        ioc(result, {"uid": str(uuid.uuid4()), "scan_id": i})
        publish.append(time.perf_counter() - t)
        t = time.perf_counter()
        values = [pv.get(timeout=5, use_monitor=False) for pv in pvs]
        read.append(time.perf_counter() - t)
        assert all(v is not None and v.size == 64 * 64 for v in values)
    ioc.close()
    repeater_proc.terminate()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'result -> all PVs served (ms)':<44}{statistics.median(publish) * 1e3:>10.2f}")
    print(f"{'pyepics read of the six images (ms)':<44}{statistics.median(read) * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
