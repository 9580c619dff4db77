"""The caproto IOC on loopback, read and written with two real EPICS clients (pyepics' libca and
caproto's), fed by a real reconstruction through the Bluesky callback."""

import time
import uuid

import numpy as np
import pytest
from builders import CLI, GENEROUS_BUDGETS, documents, free_port, run_cli

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

    rec = Reconstructor(**GENEROUS_BUDGETS)
    geometry = {
        "bcdi": {
            "geometry": {
                "beamline": "generic",
                "energy_kev": 9.0,
                "detector_distance_m": 1.5,
                "pixel_size_m": [55e-6, 55e-6],
                "sample_angles_deg": {"theta": 16.1},
                "detector_angles_deg": {"delta": 30.0, "gamma": 10.0},
                "rocking_step_deg": 0.005,
            }
        }
    }
    sample = make_sample(rec.model, CrystalPrior(rec.model), 31, TEST_STREAM, 0, 1e8)
    frames = {0.005 * i: sample.counts[i] for i in range(64)}
    results = []
    cb = BCDIReconstructionCallback(
        reconstructor=rec, refine="es", publishers=[ioc, lambda r, s: results.append((r, s))]
    )
    for name, doc in documents(frames, metadata=geometry):
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
            np.testing.assert_allclose(amp.ravel(), images[f"Amp:{plane}"], rtol=1e-6)
            phase = np.asarray(values[f"{p}Phase:{plane}"], dtype=np.float32).reshape(h, w)
            np.testing.assert_allclose(
                phase.ravel(), images[f"Phase:{plane}"], rtol=1e-6, atol=1e-6
            )
        np.testing.assert_allclose(
            np.asarray(values[p + "Params"], dtype=float), result.params, rtol=1e-12
        )
        assert float(np.ravel(values[p + "Latency:Total"])[0]) == pytest.approx(
            result.timings["total"]
        )
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
    # The scan's geometry puts the crystal in nm: its figures reach the PVs.
    figures = result.summary()
    assert epics.caget(p + "Volume:NM") == pytest.approx(figures["crystal_volume_nm3"])
    assert epics.caget(p + "Strain:RMS") == pytest.approx(figures["strain_rms"], rel=1e-5)
    assert epics.caget(p + "Extent:A") == pytest.approx(figures["crystal_extents_nm"][0])
    history = np.asarray(ours[p + "ES:CostHistory"])
    np.testing.assert_allclose(history, result.es_costs[-history.size :])


def _one_line_records(caplog, words):
    """The log records that contain ``words``: each must be one line without a traceback."""
    found = [r for r in caplog.records if words in r.getMessage()]
    for record in found:
        assert record.exc_info is None and "\n" not in record.getMessage(), record.getMessage()
    return found


def test_the_ioc_hands_the_next_scan_new_settings_and_never_changes_the_engine(
    ioc, published, caproto_ctx, caplog
):
    import getpass
    import logging

    import epics

    from bcdi_bluesky import BCDIReconstructionCallback, ReconstructionSettings

    caplog.set_level(logging.INFO, logger="bcdi_bluesky.epics.ioc")
    p = ioc.group.prefix
    # Nothing put yet: the running settings pass unchanged, and the PVs show them.
    own = ReconstructionSettings(es_time_budget_s=20, support_threshold=0.35)
    assert ioc.configure(own, {"scan_id": 2}) == own
    assert epics.caget(p + "ES:TimeBudget", use_monitor=False) == pytest.approx(20.0)
    assert epics.caget(p + "Support:Threshold", use_monitor=False) == pytest.approx(0.35)
    assert epics.caget(p + "ES:MaxIter", use_monitor=False) == 400

    assert epics.caput(p + "ES:MaxIter", 0, wait=True, timeout=5) == 1
    assert epics.caput(p + "Support:Threshold", 0.3, wait=True, timeout=5) == 1
    got = ioc.configure(own, {"scan_id": 2})
    assert got == own.replace(
        es_coarse_iterations=0, es_fine_iterations=0, support_threshold=0.3
    )  # and the budget stays 20 s
    assert own.es_coarse_iterations == 300  # a new value: what was handed in is unchanged
    (record,) = _one_line_records(caplog, f"{p}Support:Threshold = 0.3")
    assert f"put by {getpass.getuser()}@" in record.getMessage()
    # ES:Enable 0 stops the whole refinement (the odd-shape search too); it comes back with
    # the PV.
    assert epics.caput(p + "ES:Enable", 0, wait=True, timeout=5) == 1
    assert ioc.configure(own, {"scan_id": 2}).shape_search_evaluations == 0
    assert epics.caput(p + "ES:Enable", 1, wait=True, timeout=5) == 1
    assert ioc.configure(own, {"scan_id": 2}).shape_search_evaluations == 150

    # And for real: the next scan through the callback runs without ES, with the PVs' values
    # in its result, and the engine keeps its own settings.
    result, _, rec, frames = published
    again = []
    cb = BCDIReconstructionCallback(
        reconstructor=rec, refine="es", publishers=[ioc, lambda r, s: again.append(r)]
    )
    for name, doc in documents(frames):
        cb(name, doc)
    assert cb.wait(timeout=120)
    cb.close()
    assert again[0].settings.es_coarse_iterations == 0
    assert again[0].settings.support_threshold == pytest.approx(0.3)
    assert again[0].settings.es_time_budget_s == rec.settings.es_time_budget_s == 30.0
    assert rec.settings == result.settings  # the engine was never changed
    # ES made no step: its chi is the better of its two starts (the CNN's, the search's).
    chi_of = again[0].stage_chi
    assert len(again[0].es_costs) <= rec.settings.shape_search_evaluations + 2 * rec.model.size
    assert chi_of["es"] == pytest.approx(min(chi_of["cnn"], chi_of["shape"]), rel=1e-6)
    assert epics.caget(p + "Count", use_monitor=False) == 2
    assert epics.caput(p + "Enable", 0, wait=True, timeout=5) == 1
    assert ioc.configure(own, {"scan_id": 3}) is None
    assert epics.caput(p + "Enable", 1, wait=True, timeout=5) == 1


def test_bad_puts_are_refused_with_an_alarm_and_one_log_line(ioc, caproto_ctx, caplog):
    import logging

    import epics
    from caproto import AlarmSeverity, AlarmStatus, CAStatus, ChannelType

    caplog.set_level(logging.INFO, logger="bcdi_bluesky.epics.ioc")
    p = ioc.group.prefix
    (budget,) = caproto_ctx.get_pvs(p + "ES:TimeBudget", timeout=5)
    before = budget.read(timeout=5).data[0]
    # NaN, below and above the limits (30 s: the settings' hard limit), text.
    for data, kind in (
        ([float("nan")], None),
        ([-1.0], None),
        ([31.0], None),
        ([1e300], None),
        ([b"forever"], ChannelType.STRING),
    ):
        answer = budget.write(data, data_type=kind, wait=True, timeout=5)
        assert answer.status == CAStatus.ECA_PUTFAIL.value, data
        reading = budget.read(data_type="time", timeout=5)
        assert reading.data[0] == before  # unchanged
        assert reading.metadata.severity == AlarmSeverity.MAJOR_ALARM
        assert reading.metadata.status == AlarmStatus.WRITE
    assert len(_one_line_records(caplog, f"{p}ES:TimeBudget: put of")) == 5
    # Integers: fractions and NaN refused, not truncated, whatever the wire type.
    (iters,) = caproto_ctx.get_pvs(p + "Polish:Iterations", timeout=5)
    for data, kind in (
        ([2.5], ChannelType.DOUBLE),
        ([float("nan")], ChannelType.DOUBLE),
        ([b"2.5"], ChannelType.STRING),
        ([b"many"], ChannelType.STRING),
        ([-5], None),
        ([6000], None),
    ):
        assert (
            iters.write(data, data_type=kind, wait=True, timeout=5).status
            == CAStatus.ECA_PUTFAIL.value
        ), data
    assert iters.read(timeout=5).data[0] == 150
    assert (
        iters.write([3.0], data_type=ChannelType.DOUBLE, wait=True, timeout=5).status
        == CAStatus.ECA_NORMAL.value
    )
    assert iters.read(data_type="time", timeout=5).metadata.severity == AlarmSeverity.NO_ALARM
    assert epics.caput(p + "Polish:Iterations", 150, wait=True, timeout=5) == 1
    # A whole number beyond 32 bits is refused as such (caproto would wrap it first).
    (seed,) = caproto_ctx.get_pvs(p + "ES:Seed", timeout=5)
    reply = seed.write([2.0**31], data_type=ChannelType.DOUBLE, wait=True, timeout=5)
    assert reply.status == CAStatus.ECA_PUTFAIL.value
    assert "outside the range of a 32-bit integer" in caplog.text
    # pyepics (libca) meets the same refusals.
    epics.caput(p + "ES:TimeBudget", float("nan"), wait=True, timeout=5)
    assert epics.caget(p + "ES:TimeBudget", use_monitor=False) == before
    # Alarm limits of Chi refuse NaN (it would switch the alarm off).
    (hihi,) = caproto_ctx.get_pvs(p + "Chi.HIHI", timeout=5)
    limit = hihi.read(timeout=5).data[0]
    assert hihi.write([float("nan")], wait=True, timeout=5).status == CAStatus.ECA_PUTFAIL.value
    epics.caput(p + "Chi.HIHI", float("nan"), wait=True, timeout=5)
    assert hihi.read(timeout=5).data[0] == limit
    # Every other field is read-only: the operating range (caproto's control range, which
    # every write of chi must pass), the severities (HHSV NO_ALARM would switch the alarm
    # off), deadbands, the description and the precision.
    for field_, value in (
        ("HOPR", [0.01]),
        ("HHSV", [0]),
        ("HYST", [1.0]),
        ("PREC", [0]),
        ("DESC", [b"hacked"]),
    ):
        (pv,) = caproto_ctx.get_pvs(f"{p}Chi.{field_}", timeout=5)
        before = pv.read(timeout=5).data
        reply = pv.write(value, wait=True, timeout=5)
        assert reply.status == CAStatus.ECA_NOWTACCESS.value, field_
        np.testing.assert_array_equal(pv.read(timeout=5).data, before)
        assert _one_line_records(caplog, f"{p}Chi.{field_}: put of"), field_
    assert "read-only field" in caplog.text
    # A read-only PV refuses too, in one line and without touching its alarm.
    (status,) = caproto_ctx.get_pvs(p + "Status", timeout=5)
    severity = status.read(data_type="time", timeout=5).metadata.severity
    assert status.write([5], wait=True, timeout=5).status == CAStatus.ECA_NOWTACCESS.value
    assert status.read(data_type="time", timeout=5).metadata.severity == severity
    assert _one_line_records(caplog, f"{p}Status: put of 5")
    assert _one_line_records(caplog, f"{p}Chi.HIHI: put of nan")
    assert not [r for r in caplog.records if r.exc_info]
    # Still serving: the heartbeat goes on.
    first = epics.caget(p + "Heartbeat", use_monitor=False)
    time.sleep(1.5)
    assert epics.caget(p + "Heartbeat", use_monitor=False) > first


def test_only_the_write_hosts_may_put_and_read_only_refuses_everyone(ioc, caplog):
    import logging

    import epics
    from caproto import AlarmSeverity, AlarmStatus, CAStatus
    from caproto.threading.client import Context

    from bcdi_bluesky.epics import WriteAccess

    caplog.set_level(logging.INFO, logger="bcdi_bluesky.epics.ioc")
    p = ioc.group.prefix
    # The policy is read at every put and every new channel (one IOC per port on loopback:
    # this test borrows the module's, and gives it back its policy).
    ioc.group.access = WriteAccess.from_options(write_hosts="ctrl-room,Console2")
    allowed, other = Context(host_name="CTRL-ROOM"), Context(host_name="visitor-laptop")
    try:
        (ours,) = allowed.get_pvs(p + "ES:TimeBudget", timeout=5)
        (theirs,) = other.get_pvs(p + "ES:TimeBudget", timeout=5)
        (limit,) = other.get_pvs(p + "Chi.HIGH", timeout=5)
        assert ours.write([2.0], wait=True, timeout=5).status == CAStatus.ECA_NORMAL.value
        assert theirs.write([7.0], wait=True, timeout=5).status == CAStatus.ECA_NOWTACCESS.value
        assert limit.write([9.0], wait=True, timeout=5).status == CAStatus.ECA_NOWTACCESS.value
        reading = theirs.read(data_type="time", timeout=5)
        assert reading.data[0] == 2.0
        assert reading.metadata.status == AlarmStatus.WRITE_ACCESS
        assert reading.metadata.severity == AlarmSeverity.MAJOR_ALARM
        assert ioc.configure(None, {"scan_id": 1}).es_time_budget_s == 2.0
        # libca announces this machine's host name: not on the list, so pyepics is told the
        # channel is read-only and refuses the put itself.
        pv = epics.PV(p + "Chi.LOLO")
        assert pv.wait_for_connection(timeout=5) and not pv.write_access
        with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
            pv.put(-5.0, wait=True, timeout=5)
        (accepted,) = _one_line_records(caplog, f"{p}ES:TimeBudget = 2.0")
        assert accepted.getMessage().endswith("@CTRL-ROOM")
        (refused,) = _one_line_records(caplog, f"{p}ES:TimeBudget: put of 7.0")
        assert (
            "@visitor-laptop refused: settings writable from console2, ctrl-room only"
            in refused.getMessage()
        )

        ioc.group.access = WriteAccess(read_only=True)
        anyone = Context(host_name="ctrl-room")
        try:
            (budget,) = anyone.get_pvs(p + "ES:TimeBudget", timeout=5)
            assert budget.write([3.0], wait=True, timeout=5).status == CAStatus.ECA_NOWTACCESS.value
            assert budget.read(timeout=5).data[0] == 2.0
        finally:
            anyone.disconnect()
    finally:
        allowed.disconnect()
        other.disconnect()
        ioc.group.access = WriteAccess()


def test_every_setting_has_a_pv_with_the_settings_limits():
    from bcdi_bluesky import ReconstructionSettings
    from bcdi_bluesky.epics import ReconstructionIOC
    from bcdi_bluesky.epics.ioc import ES_MAX_ITER, SETTING_PVS

    fields = {i.name: i for i in ReconstructionSettings.fields_info()}
    assert set(SETTING_PVS) | set(ES_MAX_ITER[1]) == set(fields)
    group = ReconstructionIOC(prefix="X:")
    for field, name in SETTING_PVS.items():
        pv = group.pvdb["X:" + name]
        info = fields[field]
        low, high = (0, 1) if info.kind is bool else (info.low, info.high)
        assert (pv.lower_ctrl_limit, pv.upper_ctrl_limit) == (low, high)
        assert pv.value == info.default and pv.units == info.units
        assert info.doc in pv.pvspec.doc
    coarse, fine = (fields[f] for f in ES_MAX_ITER[1])
    assert group.pvdb["X:ES:MaxIter"].upper_ctrl_limit == coarse.high + fine.high


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


def test_error_raises_a_major_alarm_and_a_skipped_scan_a_minor_one(ioc, caproto_ctx):
    from caproto import AlarmSeverity

    p = ioc.group.prefix
    (status,) = caproto_ctx.get_pvs(p + "Status", timeout=5)
    for hook, state, severity in (
        (ioc.failure, "Error", AlarmSeverity.MAJOR_ALARM),
        (ioc.skipped, "Skipped", AlarmSeverity.MINOR_ALARM),
    ):
        hook("no Bragg peak: at most 3 counts", {"scan_id": 9})
        reading = status.read(data_type="time", timeout=5)
        assert reading.metadata.severity == severity
        assert (
            status.read(data_type="control", timeout=5).metadata.enum_strings[reading.data[0]]
            == state.encode()
        )
    ioc.server.set_status("Idle")
    assert status.read(data_type="time", timeout=5).metadata.severity == AlarmSeverity.NO_ALARM


def test_a_message_longer_than_the_pv_is_cut_not_lost(ioc, caproto_ctx):
    """A traceback-sized failure reason reaches both clients whole up to the long string's
    1023 characters (not a DBR_STRING's 40), and the IOC goes on serving."""
    import epics
    from caproto import AlarmSeverity

    from bcdi_bluesky.epics.ioc import LONG_STRING_LENGTH

    p = ioc.group.prefix
    reason = "worker failed: " + "x" * 5000
    ioc.failure(reason, {"scan_id": 10})
    status, message = caproto_ctx.get_pvs(p + "Status", p + "StatusMsg", timeout=5)

    def text() -> str:  # the CHAR waveform, as caproto's client reads it
        return bytes(message.read(timeout=5).data).split(b"\0")[0].decode()

    assert "worker failed" in text() and len(text()) == LONG_STRING_LENGTH - 1
    assert epics.caget(p + "StatusMsg", as_string=True, use_monitor=False, timeout=5) == text()
    assert status.read(data_type="time", timeout=5).metadata.severity == AlarmSeverity.MAJOR_ALARM
    ioc.server.set_status("Idle", "ready")
    assert text() == "ready"


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

    from caproto import CAStatus, ChannelType
    from caproto.threading.client import Context

    # Its own server port: the in-process IOC of the other tests may still hold the shared one.
    port = str(free_port())
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", port)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", port)
    prefix = f"S{uuid.uuid4().hex[:6]}:"
    with subprocess.Popen(
        [
            *CLI,
            "ioc",
            "--prefix",
            prefix,
            "--write-hosts",
            "ctrl-room",
        ],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        ctx, visitor = Context(host_name="ctrl-room"), Context(host_name="visitor")
        try:
            assert "settings writable from ctrl-room only" in proc.stderr.readline()
            status, max_iter = ctx.get_pvs(prefix + "Status", prefix + "ES:MaxIter", timeout=10)
            (theirs,) = visitor.get_pvs(prefix + "ES:MaxIter", timeout=10)
            assert status.read(data_type=ChannelType.STRING, timeout=10).data[0] == b"Idle"
            assert max_iter.write([50], wait=True, timeout=5).status == CAStatus.ECA_NORMAL.value
            assert theirs.write([60], wait=True, timeout=5).status == CAStatus.ECA_NOWTACCESS.value
            assert max_iter.read(timeout=5).data[0] == 50
            # A second IOC with the same prefix is refused before it serves anything.
            second = run_cli("ioc", "--prefix", prefix, timeout=60)
            assert second.returncode == 2
            assert f"another IOC already serves {prefix}Status at 127.0.0.1:" in second.stderr
            assert "Traceback" not in second.stderr
            serve = run_cli(
                "serve", "--zmq", f"127.0.0.1:{free_port()}", "--prefix", prefix, timeout=60
            )
            assert serve.returncode == 2
            assert f"another IOC already serves {prefix}Status" in serve.stderr
        finally:
            ctx.disconnect()
            visitor.disconnect()
            proc.terminate()
            log = proc.stderr.read()
            proc.wait(timeout=20)
    assert proc.returncode == 0
    assert log.rstrip().endswith("bcdi-bluesky ioc: stopped by SIGTERM")
    assert f"{prefix}ES:MaxIter = 50 (was 400), put by" in log
    # The refusal is one line, not caproto's "Invalid write request" and its traceback.
    assert f"{prefix}ES:MaxIter: put of 60 by" in log and "Invalid write request" not in log


def test_result_schema_pvs_and_the_quality_alarm(ioc, published, caproto_ctx):
    import epics
    from caproto import AlarmSeverity, ChannelType

    result, start, _, _ = published

    class WithSchema:
        """The published result with the schema's physical and quality keys."""

        def __init__(self, quality, reasons):
            self.extra = {
                "quality": quality,
                "quality_reasons": reasons,
                "strain_rms": 3.2e-4,
                "displacement_rms_nm": 0.041,
                "crystal_extents_nm": [180.0, 410.5, 95.25],
                "crystal_volume_nm3": 4.2e6,
            }

        def __getattr__(self, name):
            return getattr(result, name)

        def summary(self):
            return {**result.summary(), **self.extra}

    p = ioc.group.prefix
    names = (
        "Quality",
        "Quality:Reasons",
        "Strain:RMS",
        "Displacement:RMS",
        "Extent:A",
        "Extent:B",
        "Extent:C",
        "Volume:NM",
    )
    pvs = dict(zip(names, caproto_ctx.get_pvs(*(p + n for n in names), timeout=5), strict=True))
    for quality, severity in (
        ("poor", AlarmSeverity.MAJOR_ALARM),
        ("fair", AlarmSeverity.MINOR_ALARM),
        ("good", AlarmSeverity.NO_ALARM),
    ):
        reasons = [] if quality == "good" else ["chi above 0.3", "support touches the edge"]
        ioc(WithSchema(quality, reasons), start)
        reading = pvs["Quality"].read(data_type="time", timeout=5)
        assert reading.metadata.severity == severity
        assert (
            pvs["Quality"].read(data_type=ChannelType.STRING, timeout=5).data[0] == quality.encode()
        )
        text = epics.caget(p + "Quality:Reasons", as_string=True, use_monitor=False)
        assert text == "; ".join(reasons)
    values = {n: float(pvs[n].read(timeout=5).data[0]) for n in names[2:]}
    assert values == pytest.approx(
        {
            "Strain:RMS": 3.2e-4,
            "Displacement:RMS": 0.041,
            "Extent:A": 410.5,
            "Extent:B": 180.0,
            "Extent:C": 95.25,
            "Volume:NM": 4.2e6,
        }
    )
    ioc(result, start)  # back to the plain result for the tests after this one


def test_the_model_fit_is_shown_while_the_polish_runs(ioc, caproto_ctx):
    """The pipeline's "preview" puts the model fit's slices on the screen PVs at once, with a
    message, before the result replaces them."""
    from types import SimpleNamespace

    from bcdi_bluesky.epics import screen_images

    p = ioc.group.prefix
    grid = np.indices((40, 48, 44)) - np.array([20, 24, 22])[:, None, None, None]
    inside = ((grid / np.array([9, 12, 7])[:, None, None, None]) ** 2).sum(axis=0) <= 1
    obj = (inside * np.exp(0.1j * grid[0])).astype(np.complex64)
    ioc.progress("preview", {"object": obj, "support": inside, "chi": 0.2468}, {"scan_id": 11})
    expected = screen_images(SimpleNamespace(object=obj, support=inside))
    amp, phase = caproto_ctx.get_pvs(p + "Amp:XY", p + "Phase:YZ", timeout=5)
    np.testing.assert_allclose(amp.read(timeout=5).data, expected["Amp:XY"], atol=1e-6)
    np.testing.assert_allclose(phase.read(timeout=5).data, expected["Phase:YZ"], atol=1e-6)
    assert np.abs(expected["Amp:XY"]).max() == pytest.approx(1.0)  # the crystal is on screen
    (message,) = caproto_ctx.get_pvs(p + "StatusMsg", timeout=5)
    text = bytes(message.read(timeout=5).data).split(b"\0")[0].decode()
    assert text.startswith("scan 11: model fit shown (chi 0.2468)")


def test_client_text_cannot_forge_an_audit_line_and_empty_text_is_no_number(ioc, caplog):
    """A host name with a newline and a fake log line in it is logged escaped, on one line;
    an empty string put to a floating-point setting is refused (caproto would read 0)."""
    import logging

    from caproto import CAStatus
    from caproto.threading.client import Context

    caplog.set_level(logging.INFO, logger="bcdi_bluesky.epics.ioc")
    p = ioc.group.prefix
    forger = Context(host_name="vm\n2026-12-02 bcdi_bluesky.epics.ioc INFO: Enable = 1, put by me")
    try:
        (budget,) = forger.get_pvs(p + "ES:TimeBudget", timeout=5)
        assert budget.write([3.0], wait=True, timeout=5).status == CAStatus.ECA_NORMAL.value
        (line,) = _one_line_records(caplog, f"{p}ES:TimeBudget = 3.0")
        assert "@vm\\n2026-12-02 bcdi_bluesky" in line.getMessage()  # escaped, and cut short
        assert line.getMessage().endswith("...")
        for name in ("ES:TimeBudget", "Polish:HIOFraction"):
            (pv,) = forger.get_pvs(p + name, timeout=5)
            before = pv.read(timeout=5).data
            reply = pv.write([b""], data_type=0, wait=True, timeout=5)  # DBR_STRING
            assert reply.status == CAStatus.ECA_PUTFAIL.value, name
            np.testing.assert_array_equal(pv.read(timeout=5).data, before)
            assert _one_line_records(caplog, "empty text is not a number")
    finally:
        forger.disconnect()


def test_result_pvs_name_the_scan_they_belong_to(ioc, published):
    """Scan 2 starts collecting while scan 1's result is published: ScanID and ScanUID go
    back to scan 1 with its result; a scan id no 32-bit PV holds reads 0."""
    from bcdi_bluesky.epics.ioc import scan_identity

    result, start, _, _ = published
    ioc.collecting({"uid": "second-scan", "scan_id": 2})
    ioc(result, {**start, "scan_id": 1})
    assert ioc.group.ScanID.value == 1
    assert ioc.group.ScanUID.value == start["uid"][:39]
    for scan_id, shown in ((2**31 + 5, 0), (3.7, 0), ("abc", 0), (True, 0), (-7, -7)):
        assert scan_identity({"uid": "u", "scan_id": scan_id})["ScanID"] == shown


def test_refining_is_posted_once_per_scan_not_at_every_es_step(ioc, caproto_ctx):
    """Monitors and archivers see one Refining update while ES runs, and every ES cost."""
    import threading

    p = ioc.group.prefix
    ioc.server.set_status("Reconstructing")
    status, cost = caproto_ctx.get_pvs(p + "Status", p + "ES:Cost", timeout=5)
    updates = {"status": [], "cost": []}
    seen = threading.Event()

    def on_status(sub, response):
        updates["status"].append(response.data[0])

    def on_cost(sub, response):
        updates["cost"].append(float(response.data[0]))
        if float(response.data[0]) == 4.0:
            seen.set()

    subs = [status.subscribe(), cost.subscribe()]
    subs[0].add_callback(on_status)
    subs[1].add_callback(on_cost)
    try:
        time.sleep(0.5)  # the first (current) value of each
        for i in range(5):
            ioc._last_progress = 0.0  # as if 0.1 s had passed
            ioc.progress("es_step", {"iteration": i, "cost": float(i)}, {"scan_id": 1})
        assert seen.wait(5)
        time.sleep(0.3)
    finally:
        for sub in subs:
            sub.clear()
    from bcdi_bluesky.epics.ioc import STATUS

    refining = STATUS.index("Refining")
    assert updates["status"].count(refining) == 1, updates["status"]
    assert updates["cost"][-5:] == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("prefix", ["a b:", "BCDI.X:", "BCDI:'", "B\nC:", "XF:{Det}", "B$:"])
def test_a_prefix_that_makes_no_valid_pv_name_is_refused(prefix):
    from bcdi_bluesky.epics import ReconstructionIOC
    from bcdi_bluesky.errors import SettingsError

    with pytest.raises(SettingsError, match="printable ASCII"):
        ReconstructionIOC(prefix=prefix)
    facility = "XF:34IDC-ES<BCDI:1>;[b]+_#%&()*,/=?@^`|~"
    group = ReconstructionIOC(prefix=facility)
    assert group.prefix == facility and f"{facility}Status" in group.pvdb


@pytest.mark.timeout(60)
def test_text_that_latin1_cannot_hold_stays_readable(ioc, caproto_ctx):
    """caproto encodes a text PV as Latin-1 when a client reads it: a message with '≤' (an
    exception's text, a path, a scan id from a run's metadata) is served with that character
    escaped, and read by both clients, instead of failing every read until the next write."""
    import epics

    p = ioc.group.prefix
    names = ("Status", "StatusMsg", "ScanUID", "ScanID")
    before = {name: ioc.group.pvdb[p + name].value for name in names}
    try:
        ioc.failure("limit 0.3 ≤ chi, björn", {"uid": "€" * 50, "scan_id": "Ω-7"})
        message = epics.caget(p + "StatusMsg", as_string=True, timeout=5, use_monitor=False)
        assert message is not None and "limit 0.3 \\u2264 chi, björn" in message
        assert "\\u03a9-7" in message
        (uid,) = caproto_ctx.get_pvs(p + "ScanUID", timeout=5)
        assert uid.read(timeout=5).data[0].decode("latin-1") == ("\\u20ac" * 7)[:39]
        status = epics.caget(p + "Status", as_string=True, timeout=5, use_monitor=False)
        assert status == "Error"
    finally:  # the module's IOC as the other tests left it
        ioc.server.write({name: value for name, value in before.items() if name != "StatusMsg"})
        ioc.server.write({"StatusMsg": before["StatusMsg"].rstrip("\0")})


# caproto leaves the sockets of its failed binds to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(30)
def test_an_ioc_that_cannot_bind_says_why_at_once(epics_env):
    """An interface this host does not have (TEST-NET-1): the reason, not a wait for the
    timeout followed by a generic line."""
    import gc

    from bcdi_bluesky.epics import IOCServer, IOCStartError

    started = time.monotonic()
    with pytest.raises(IOCStartError, match=r"could not start: .*bind failed"):
        IOCServer(f"N{uuid.uuid4().hex[:8]}:", interfaces=["192.0.2.1"]).start(timeout=20)
    assert time.monotonic() - started < 10
    gc.collect()  # those sockets' warnings here, where they are expected
