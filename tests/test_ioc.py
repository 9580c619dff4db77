"""The caproto IOC on loopback, read and written with two real EPICS clients (pyepics' libca and
caproto's), fed by a real reconstruction through the Bluesky callback."""

import time
import uuid

import numpy as np
import pytest

from bcdi_bluesky.physics import CrystalPrior


@pytest.fixture(scope="module")
def ioc(epics_env):
    from bcdi_bluesky.epics import IOCPublisher

    publisher = IOCPublisher(prefix=f"T{uuid.uuid4().hex[:8]}:", interfaces=["127.0.0.1"])
    yield publisher
    publisher.close()


@pytest.fixture(scope="module")
def caproto_ctx(epics_env):
    from caproto.threading.client import Context

    ctx = Context()
    yield ctx
    ctx.disconnect()


@pytest.fixture(scope="module")
def published(ioc):
    """One scan through the callback with the IOC as publisher."""
    from bcdi_bluesky import BCDIReconstructionCallback, Reconstructor
    from bcdi_bluesky.model.data import TEST_STREAM, make_sample
    from tests.test_beamline import _documents

    rec = Reconstructor(es_time_budget_s=120, polish_time_budget_s=120)
    geometry = {"bcdi": {"energy_kev": 9.0, "detector_distance_m": 1.5, "pixel_size_m": 55e-6,
                         "bragg_angle_deg": 16.1, "rocking_step": 0.005}}
    sample = make_sample(rec.model, CrystalPrior(rec.model), 31, TEST_STREAM, 0, 1e8)
    frames = {0.005 * i: sample.counts[i] for i in range(64)}
    results = []
    cb = BCDIReconstructionCallback(reconstructor=rec, refine="es",
                                    publishers=[ioc, lambda r, s: results.append((r, s))])
    for name, doc in _documents(frames, metadata=geometry):
        cb(name, doc)
    assert cb.wait(timeout=120)
    cb.close()
    return results[0] + (rec, frames)


def _pv(ioc, name):
    return ioc.group.prefix + name


def test_every_pv_with_pyepics_and_caproto(ioc, published, caproto_ctx):
    import epics

    from bcdi_bluesky.epics import screen_images

    result, start, _, _ = published
    names = sorted(k for k in ioc.group.pvdb if "." not in k)
    pvs = caproto_ctx.get_pvs(*names, timeout=5)
    ours = {pv.name: pv.read(timeout=5).data for pv in pvs}
    libca = {name: epics.caget(name, timeout=5, use_monitor=False) for name in names}
    for name in names:
        assert libca[name] is not None, f"pyepics could not read {name}"
    p = ioc.group.prefix
    for values in (ours, libca):
        chi = values[p + "Chi"]
        assert float(np.ravel(chi)[0]) == pytest.approx(result.chi)
        w = int(np.ravel(values[p + "Image:Width"])[0])
        h = int(np.ravel(values[p + "Image:Height"])[0])
        images = screen_images(result)
        for plane in ("XY", "XZ", "YZ"):
            amp = np.asarray(values[f"{p}Amp:{plane}"], dtype=np.float32).reshape(h, w)
            np.testing.assert_allclose(amp, images[f"Amp_{plane}"], rtol=1e-6)
            phase = np.asarray(values[f"{p}Phase:{plane}"], dtype=np.float32).reshape(h, w)
            np.testing.assert_allclose(phase, images[f"Phase_{plane}"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(values[p + "Params"], dtype=float),
                                   result.params, rtol=1e-12)
        assert float(np.ravel(values[p + "Latency:Total"])[0]) == pytest.approx(
            result.timings["total"])
        assert int(np.ravel(values[p + "Volume"])[0]) == int(result.support.sum())
    assert epics.caget(p + "Status", as_string=True) == "Done"
    assert epics.caget(p + "ScanUID") == start["uid"][:39]
    assert epics.caget(p + "Model:Provider") == "CPUExecutionProvider"
    assert epics.caget(p + "Count") == 1
    assert "chi" in epics.caget(p + "StatusMsg", as_string=True)
    assert epics.caget(p + "Latent:Distance") == pytest.approx(result.latent_distance)
    assert epics.caget(p + "Latent:OOD") == int(result.out_of_distribution)
    voxel = np.asarray(epics.caget(p + "Voxel:Size"))
    np.testing.assert_allclose(voxel, result.metadata["voxel_size_nm"])
    assert epics.caget(p + "Volume:NM") == pytest.approx(result.support.sum() * voxel.prod())
    history = np.asarray(ours[p + "ES:CostHistory"])
    np.testing.assert_allclose(history, result.es_costs[-history.size:])


def test_puts_change_the_next_reconstruction_and_bad_puts_are_rejected(ioc, published,
                                                                       caproto_ctx):
    import epics
    from caproto import AlarmSeverity, CaprotoTimeoutError, ChannelType, ErrorResponseReceived

    p = ioc.group.prefix
    assert epics.caput(p + "ES:MaxIter", 0, wait=True, timeout=5) == 1
    assert epics.caput(p + "Support:Threshold", 0.3, wait=True, timeout=5) == 1
    assert ioc.group.settings()["es_max_iter"] == 0

    from bcdi_bluesky import ReconstructionSettings

    own = ReconstructionSettings(shape_search_evaluations=120, polish_er_iterations=40,
                                 es_time_budget_s=30.0)
    got = ioc.configure(own, {"scan_id": 2})
    assert got.es_coarse_iterations == 0 and got.es_fine_iterations == 0
    assert got.support_threshold == pytest.approx(0.3)
    assert got.shape_search_evaluations == 120 and got.polish_er_iterations == 40
    assert own.es_coarse_iterations == 300  # a new value: what was handed in is unchanged
    # ES:Enable 0 stops the whole refinement (the odd-shape search too); Polish:Iterations
    # bounds the ER run as well; both come back when the PVs do.
    assert epics.caput(p + "ES:Enable", 0, wait=True, timeout=5) == 1
    assert epics.caput(p + "Polish:Iterations", 20, wait=True, timeout=5) == 1
    got = ioc.configure(own, {"scan_id": 2})
    assert got.shape_search_evaluations == 0 and got.polish_er_iterations == 20
    assert epics.caput(p + "ES:Enable", 1, wait=True, timeout=5) == 1
    assert epics.caput(p + "Polish:Iterations", 150, wait=True, timeout=5) == 1
    got = ioc.configure(own, {"scan_id": 2})
    assert got.shape_search_evaluations == 120 and got.polish_er_iterations == 40
    # And for real: the next scan through the callback runs without ES.
    from bcdi_bluesky import BCDIReconstructionCallback
    from tests.test_beamline import _documents

    _, _, rec, frames = published
    again = []
    cb = BCDIReconstructionCallback(reconstructor=rec, refine="es",
                                    publishers=[ioc, lambda r, s: again.append(r)])
    for name, doc in _documents(frames):
        cb(name, doc)
    assert cb.wait(timeout=120)
    cb.close()
    # ES made no step: its chi is the better of its two starts (the CNN's, the search's).
    chi_of = again[0].stage_chi
    assert again[0].settings.es_coarse_iterations == 0  # the PVs' value reached the result
    assert rec.settings.es_coarse_iterations == 300  # and the engine kept its own
    assert len(again[0].es_costs) <= rec.settings.shape_search_evaluations + 2 * rec.model.size
    assert chi_of["es"] == pytest.approx(min(chi_of["cnn"], chi_of["shape"]), rel=1e-6)
    assert epics.caget(p + "Count", use_monitor=False) == 2

    # The server answers a rejected put with ECA_PUTFAIL; caproto's threading client (1.3)
    # surfaces it as a timeout of the write, libca's put callback gets the failure status.
    refused = (ErrorResponseReceived, CaprotoTimeoutError)
    (budget,) = caproto_ctx.get_pvs(p + "ES:TimeBudget", timeout=5)
    for bad in (float("nan"), -1.0, 1e6):
        with pytest.raises(refused):
            budget.write([bad], wait=True, timeout=1)
    reading = budget.read(data_type="time", timeout=5)
    assert reading.data[0] == pytest.approx(5.0)  # unchanged
    assert reading.metadata.severity != AlarmSeverity.NO_ALARM
    epics.caput(p + "ES:TimeBudget", float("nan"), wait=True, timeout=5)
    assert epics.caget(p + "ES:TimeBudget", use_monitor=False) == pytest.approx(5.0)
    (iters,) = caproto_ctx.get_pvs(p + "Polish:Iterations", timeout=5)
    with pytest.raises(refused):
        iters.write([-5], wait=True, timeout=1)
    with pytest.raises(refused):  # the wrong type: text for a number
        iters.write([b"many"], data_type=ChannelType.STRING, wait=True, timeout=1)
    assert ioc.group.settings()["polish_iterations"] == 150
    # Still serving: the heartbeat goes on.
    first = epics.caget(p + "Heartbeat", use_monitor=False)
    time.sleep(1.5)
    assert epics.caget(p + "Heartbeat", use_monitor=False) > first
    assert epics.caput(p + "Enable", 0, wait=True, timeout=5) == 1
    assert ioc.configure(own, {"scan_id": 3}) is None
    epics.caput(p + "Enable", 1, wait=True, timeout=5)


def test_user_set_chi_limits_raise_alarms(ioc, published):
    import epics
    from caproto import AlarmSeverity

    result, start, _, _ = published
    p = ioc.group.prefix
    assert epics.caput(p + "Chi.HIGH", result.chi / 4, wait=True, timeout=5) == 1
    assert epics.caput(p + "Chi.HIHI", result.chi / 2, wait=True, timeout=5) == 1
    ioc(result, start)  # publish again: chi is now above both limits
    pv = epics.PV(p + "Chi", form="time", auto_monitor=False)
    pv.get(timeout=5, use_monitor=False)
    assert pv.severity == AlarmSeverity.MAJOR_ALARM
    epics.caput(p + "Chi.HIHI", 10.0, wait=True, timeout=5)
    ioc(result, start)
    pv.get(timeout=5, use_monitor=False)
    assert pv.severity == AlarmSeverity.MINOR_ALARM


def test_out_of_distribution_flag_raises_a_minor_alarm(ioc, published):
    import dataclasses

    import epics
    from caproto import AlarmSeverity

    result, start, _, _ = published
    p = ioc.group.prefix
    pv = epics.PV(p + "Latent:OOD", form="time", auto_monitor=False)
    ioc(dataclasses.replace(result, out_of_distribution=True, latent_distance=3.0), start)
    assert pv.get(timeout=5, use_monitor=False) == 1
    assert pv.severity == AlarmSeverity.MINOR_ALARM
    ioc(result, start)
    assert pv.get(timeout=5, use_monitor=False) == int(result.out_of_distribution)


def test_error_state_raises_a_major_alarm(ioc, caproto_ctx):
    from caproto import AlarmSeverity

    p = ioc.group.prefix
    ioc.failure("simulated failure", {"scan_id": 9})
    (status,) = caproto_ctx.get_pvs(p + "Status", timeout=5)
    reading = status.read(data_type="time", timeout=5)
    assert reading.metadata.severity == AlarmSeverity.MAJOR_ALARM
    ioc.server.set_status("Idle")
    assert status.read(data_type="time", timeout=5).metadata.severity == \
        AlarmSeverity.NO_ALARM


def test_screen_and_pv_table_name_only_real_pvs():
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from bcdi_bluesky.epics import ReconstructionIOC, pv_table

    repo = Path(__file__).resolve().parent.parent
    names = {k.removeprefix("BCDI:") for k in ReconstructionIOC(prefix="BCDI:").pvdb}
    root = ET.parse(repo / "ioc" / "bcdi.bob").getroot()  # valid XML or this raises
    used = [el.text for el in root.iter() if el.tag in ("pv_name", "y_pv") and el.text]
    assert len(used) >= 30
    for pv in used:
        assert pv.startswith("$(P)") and pv.removeprefix("$(P)") in names, pv
    for required in ("Status", "Chi", "Latency:Total", "Amp:XY", "Phase:YZ"):
        assert f"$(P){required}" in used
    table = pv_table()
    for path in (repo / "docs" / "pvs.md", repo / "ioc" / "pvs.md"):
        assert table in path.read_text(), f"{path} is out of date: regenerate with pv_table()"


def test_standalone_ioc_command(epics_env, monkeypatch):
    import subprocess
    import sys

    from caproto import ChannelType
    from caproto.threading.client import Context

    from tests.conftest import _free_port

    # Its own server port: the in-process IOC of the other tests may still hold the shared one.
    port = str(_free_port())
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", port)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", port)
    prefix = f"S{uuid.uuid4().hex[:6]}:"
    with subprocess.Popen([sys.executable, "-m", "bcdi_bluesky.cli", "ioc", "--prefix", prefix],
                          stderr=subprocess.PIPE, text=True) as proc:
        ctx = Context()
        try:
            assert "serving" in proc.stderr.readline()
            status, max_iter = ctx.get_pvs(prefix + "Status", prefix + "ES:MaxIter", timeout=10)
            assert status.read(data_type=ChannelType.STRING, timeout=10).data[0] == b"Idle"
            max_iter.write([50], wait=True, timeout=5)
            assert max_iter.read(timeout=5).data[0] == 50
        finally:
            ctx.disconnect()
            proc.terminate()
            proc.wait(timeout=20)
    assert proc.returncode == 0
