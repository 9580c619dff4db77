"""Builders shared by the tests: document streams made with event-model, free loopback ports,
the lines of a subprocess's pipe.

A plain module (not a test module), so that tests import it without importing each other.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time

from event_model import compose_run

from bcdi_bluesky import ReconstructionSettings

#: The command line of ``bcdi-bluesky`` run by this interpreter (subprocess tests).
CLI = (sys.executable, "-m", "bcdi_bluesky.cli")


def run_cli(*args: object, cwd: object = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``bcdi-bluesky`` with ``args`` in the folder ``cwd``, its output captured as text
    (bounded by ``timeout`` seconds: a hung command fails the test instead of stalling it)."""
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


#: Every safety cap of the pipeline at its upper limit: the iteration counts, not the load of
#: the test machine, decide the result.
GENEROUS_BUDGETS = ReconstructionSettings.largest_time_budgets()


def free_port() -> int:
    """A port free for both TCP and UDP on loopback."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def documents(frames_by_theta, image_key="det_image", motor_key="theta", page=True, metadata=None):
    """A run made with event_model.compose_run (no RunEngine): fast and deterministic."""
    bundle = compose_run(metadata={"scan_id": 7, **(metadata or {})})
    docs = [("start", bundle.start_doc)]
    shape = list(next(iter(frames_by_theta.values())).shape)
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            motor_key: {"source": "sim", "dtype": "number", "shape": []},
            image_key: {"source": "sim", "dtype": "array", "shape": shape},
        },
    )
    docs.append(("descriptor", desc.descriptor_doc))
    thetas = list(frames_by_theta)
    if page:
        docs.append(
            (
                "event_page",
                desc.compose_event_page(
                    data={motor_key: thetas, image_key: [frames_by_theta[t] for t in thetas]},
                    timestamps={motor_key: [0.0] * len(thetas), image_key: [0.0] * len(thetas)},
                    seq_num=list(range(1, len(thetas) + 1)),
                ),
            )
        )
    else:
        for t in thetas:
            docs.append(
                (
                    "event",
                    desc.compose_event(
                        data={motor_key: t, image_key: frames_by_theta[t]},
                        timestamps={motor_key: 0.0, image_key: 0.0},
                    ),
                )
            )
    docs.append(("stop", bundle.compose_stop()))
    return docs


class Lines:
    """Every line a pipe gives, read in a thread (so that a test never blocks on a pipe)."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for line in pipe:
            self.lines.append(line)
            self._new.put(line)

    def wait_for(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if predicate(line):
                return line
        return None


def end(*processes) -> None:
    """Kill those of ``processes`` still running, reap them and close their pipes; then give
    :class:`Lines` readers a moment to see the pipes' ends."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    time.sleep(0.2)
