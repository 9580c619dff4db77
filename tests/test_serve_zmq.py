"""The remote service: RunEngine here, 0MQ proxy and `bcdi-bluesky serve` in other processes."""

import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from builders import CLI, Lines, end, free_port

from bcdi_bluesky.beamline import SimulatedBeamline
from bcdi_bluesky.cli import main
from bcdi_bluesky.remote import serializer


@pytest.fixture
def proxy():
    """A 0MQ proxy bound to loopback only; yields (in_port, out_port)."""
    ports = free_port(), free_port()
    code = (
        "from bluesky.callbacks.zmq import Proxy; "
        f"Proxy('127.0.0.1:{ports[0]}', '127.0.0.1:{ports[1]}').start()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.0)
    assert proc.poll() is None, "proxy did not start"
    yield ports
    proc.terminate()
    proc.wait(timeout=10)


class _Marker:
    """Unpickling this creates ``path``: the proof that code from the network ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(240)
def test_serve_reconstructs_drops_bad_messages_and_stops_on_sigterm(RE, proxy, tmp_path):
    in_port, out_port = proxy
    marker = tmp_path / "code_ran_in_serve"
    serve = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--zmq",
            f"127.0.0.1:{out_port}",
            "--output",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = Lines(serve.stdout), Lines(serve.stderr)
    context = zmq.Context()
    raw = context.socket(zmq.PUB)
    publisher = None
    try:
        assert err.wait_for(lambda line: "listening" in line, 60), err.lines
        # PUB/SUB drops what is sent before the subscription has reached the proxy.
        raw.connect(f"tcp://127.0.0.1:{in_port}")
        time.sleep(2.0)
        # What any client of the proxy's input may send: a pickle that would run code,
        # an unknown document name, bytes that are no message at all.
        raw.send(b" start " + pickle.dumps({"uid": _Marker(marker), "time": 0.0}))
        raw.send(b" no_such_document " + serializer({"uid": "x"}))
        raw.send(b"\x00\x01 random bytes")
        publisher = Publisher(f"127.0.0.1:{in_port}", serializer=serializer)
        RE.subscribe(publisher)
        beamline = SimulatedBeamline(seed=4)
        beamline.det.max_count.put(1e12)
        (uid,) = RE(beamline.rocking_scan(32))
        line = out.wait_for(lambda line: line.strip(), 120)
        assert line is not None, err.lines
        report = json.loads(line)
        assert report["uid"] == uid and report["status"] == "done"
        assert 0 < report["chi"] < 1 and set(report["timings_s"]) >= {"total", "refine"}
        assert len(list(tmp_path.glob("scan_*.cxi"))) == 1
        assert not marker.exists()
        assert sum("dropped 0MQ message" in line for line in err.lines) == 3
        # A second scan, and SIGTERM while it is being reconstructed.
        RE(beamline.rocking_scan(32))
        time.sleep(1.0)
        stopped = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        assert time.monotonic() - stopped < 10
        assert serve.returncode == 0, err.lines
    finally:
        if publisher is not None:
            publisher.close()
        raw.close(linger=0)
        context.term()
        end(serve)
    for line in out.lines:  # stdout carries JSON lines only
        json.loads(line)
    assert any("messages dropped" in line for line in err.lines)
    assert "bcdi-bluesky serve: stopped by SIGTERM\n" in err.lines


def _refused_at_start(capsys, args: list[str]) -> str:
    """``serve ARGS`` exits 2 before listening, with nothing on stdout and one stderr line,
    which it returns."""
    assert main(["serve", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("bcdi-bluesky serve: error:")
    return line


@pytest.mark.parametrize(
    "address, words",
    [("127.0.0.1:99999", "out of range"), ("no-such-host.invalid:5578", "cannot resolve")],
)
def test_serve_bad_address_is_one_line(capsys, address, words):
    line = _refused_at_start(capsys, ["--zmq", address])
    assert words in line and line.startswith("bcdi-bluesky serve: error: --zmq")


def test_serve_loads_the_model_at_start(capsys, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_text("not a model")
    line = _refused_at_start(capsys, ["--zmq", "127.0.0.1:5578", "--model", str(broken)])
    assert "broken" in line


def test_serve_checks_its_output_folder_at_start(capsys, tmp_path):
    """A result folder that cannot be one is refused before listening, not at every scan."""
    taken = tmp_path / "results"
    taken.write_text("a file, not a folder")
    line = _refused_at_start(capsys, ["--zmq", "127.0.0.1:5578", "--output", str(taken)])
    assert "is a file, not a folder" in line


def test_read_only_and_write_hosts_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--zmq", "127.0.0.1:5578", "--read-only", "--write-hosts", "opi1"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
