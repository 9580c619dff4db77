"""The remote service: RunEngine here, 0MQ proxy and `bcdi-bluesky serve` in other processes."""

import json
import socket
import subprocess
import sys
import time

import pytest
from bluesky.callbacks.zmq import Publisher

from bcdi_bluesky.beamline import SimulatedBeamline, rocking_scan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy():
    """A 0MQ proxy bound to loopback only; yields (in_port, out_port)."""
    ports = _free_port(), _free_port()
    code = ("from bluesky.callbacks.zmq import Proxy; "
            f"Proxy('127.0.0.1:{ports[0]}', '127.0.0.1:{ports[1]}').start()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.0)
    assert proc.poll() is None, "proxy did not start"
    yield ports
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.timeout(240)
def test_reconstruction_arrives_through_the_proxy(RE, proxy, tmp_path):
    in_port, out_port = proxy
    serve = subprocess.Popen(
        [sys.executable, "-m", "bcdi_bluesky.cli", "serve", "--zmq", f"127.0.0.1:{out_port}",
         "--refine", "none", "--output", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until it listens, then a little more: PUB/SUB drops what is sent before the
        # subscription has reached the proxy.
        line = serve.stderr.readline()
        assert "listening" in line, line
        time.sleep(2.0)
        publisher = Publisher(f"127.0.0.1:{in_port}")
        RE.subscribe(publisher)
        beamline = SimulatedBeamline(seed=4)
        beamline.det.max_count.put(1e12)
        step = beamline.crystal.step
        (uid,) = RE(rocking_scan(beamline.det, beamline.theta, beamline.crystal.bragg_theta,
                                 31 * step, 32))
        deadline = time.monotonic() + 120
        report = None
        while time.monotonic() < deadline and report is None:
            line = serve.stdout.readline()
            if line.strip():
                report = json.loads(line)
        assert report is not None and report["uid"] == uid
        assert 0 < report["chi"] < 1
        assert len(list(tmp_path.glob("scan_*.cxi"))) == 1
        publisher.close()
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        serve.stdout.close()
        serve.stderr.close()
    assert serve.returncode is not None
