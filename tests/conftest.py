"""Shared fixtures: the measured data sets and small crystal models."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import TransitionError
from builders import free_port

from bcdi_bluesky.epics.ioc import loopback_environment
from bcdi_bluesky.physics import CrystalModel, CrystalPrior

# Channel Access on loopback with non-default ports, set before anything imports ophyd (whose
# pyepics control layer may start libca, which reads these once) or starts an IOC.
_SERVER_PORT, _REPEATER_PORT = free_port(), free_port()
EPICS_ENV = loopback_environment(_SERVER_PORT, _REPEATER_PORT)
os.environ.update(EPICS_ENV)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLE_DATA = REPO / "examples" / "data"


@pytest.fixture(scope="session")
def model64() -> CrystalModel:
    """The default crystal model on a 64^3 grid."""
    return CrystalModel()


@pytest.fixture(scope="session")
def prior64(model64: CrystalModel) -> CrystalPrior:
    """The default prior."""
    return CrystalPrior(model64)


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test."""
    return np.random.default_rng(20261126)


@pytest.fixture(scope="session")
def scan54_64() -> np.ndarray:
    """APS 34-ID-C scan 54, 64^3 crop (shipped in examples/data)."""
    return np.load(EXAMPLE_DATA / "S0054_intensity_64.npy")


@pytest.fixture(scope="session")
def cdinn_64() -> np.ndarray:
    """The 3D-CDI-NN example crop (measured counts, one voxel off centre)."""
    path = SHARED_DATA / "3dcdinn_example" / "ft_crop_64_intensity.npy"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return np.load(path)


@pytest.fixture
def RE():
    """A fresh RunEngine on its own loop, halted and its thread joined at teardown."""
    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop, context_managers=[])
    yield engine
    if engine.state not in ("idle", "panicked"):
        try:
            engine.halt()
        except TransitionError:
            pass
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join(timeout=10)
    loop.close()


@pytest.fixture(scope="session")
def epics_env():
    """The loopback Channel Access environment, with a repeater running (started first, or
    the IOC logs a beacon error every second)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from caproto.sync.repeater import run; run()"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    yield EPICS_ENV
    proc.terminate()
    proc.wait(timeout=10)
