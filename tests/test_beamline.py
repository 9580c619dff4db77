"""The Bluesky face: a real RunEngine with the simulated ophyd beamline, and document streams."""

import dataclasses
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np
import pytest
from builders import GENEROUS_BUDGETS, documents
from event_model import compose_run

from bcdi_bluesky import BCDIReconstructionCallback, ReconstructionSettings, Reconstructor
from bcdi_bluesky.beamline import Publisher, SimulatedBeamline, rocking_scan
from bcdi_bluesky.physics import Geometry, compare_objects
from bcdi_bluesky.pipeline import to_model_grid


@pytest.fixture(scope="module")
def reconstructor():
    return Reconstructor(**GENEROUS_BUDGETS)


@pytest.fixture
def make_callback():
    made = []

    def make(**kwargs):
        cb = BCDIReconstructionCallback(**kwargs)
        made.append(cb)
        return cb

    yield make
    for cb in made:
        cb.close()


def _scan(beamline, points=64):
    return beamline.rocking_scan(points, geometry=beamline.geometry, sample="hidden crystal")


def test_rocking_scan_is_reconstructed(RE, reconstructor, make_callback):
    beamline = SimulatedBeamline(seed=4)
    beamline.det.max_count.put(1e12)  # no saturation here; the closed loop handles that
    seen = []
    cb = make_callback(
        reconstructor=reconstructor, on_result=lambda result, start: seen.append((result, start))
    )
    RE.subscribe(cb)
    (uid,) = RE(_scan(beamline))
    assert cb.wait(timeout=120)
    record = cb.records[uid]
    assert record.status == "done" and record.frames == 64, record.message
    result, start = seen[0]
    assert start["uid"] == uid and start["bcdi"]["sample"] == "hidden crystal"
    assert result.object.shape == (64, 96, 96)  # the detector is larger than the peak
    # The plan recorded the geometry with this scan's centre and step; the result is in nm.
    recorded = Geometry.from_dict(start["bcdi"]["geometry"])
    assert recorded.sample_angles_deg["theta"] == pytest.approx(beamline.crystal.bragg_theta)
    assert recorded.rocking_step_deg == pytest.approx(beamline.crystal.step)
    assert result.physical is not None
    np.testing.assert_allclose(
        result.physical.voxel_basis_nm, recorded.voxel_basis_nm(result.object.shape), rtol=1e-3
    )
    assert result.metadata["voxel_size_nm"] == pytest.approx(list(result.physical.voxel_size_nm))
    summary = result.summary()
    assert summary["crystal_volume_nm3"] > 0 and len(summary["crystal_extents_nm"]) == 3
    assert compare_objects(beamline.crystal.truth(), to_model_grid(result.object, 64)).iou >= 0.85


class _FailsOnce:
    """A reconstructor that raises on its first call, like a pipeline hitting bad data."""

    def __init__(self, real):
        self.real, self.calls = real, 0
        self.settings = real.settings

    def reconstruct(self, volume, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("simulated analysis failure")
        return self.real.reconstruct(volume, **kwargs)


def test_failing_reconstruction_never_aborts_the_experiment(RE, reconstructor, make_callback):
    beamline = SimulatedBeamline(seed=5)
    beamline.det.max_count.put(1e12)
    cb = make_callback(reconstructor=_FailsOnce(reconstructor), refine="none")
    stops = []
    RE.subscribe(cb)
    RE.subscribe(lambda name, doc: stops.append(doc) if name == "stop" else None)
    (first,) = RE(_scan(beamline, 16))
    (second,) = RE(_scan(beamline, 16))
    assert cb.wait(timeout=60)
    assert [s["exit_status"] for s in stops] == ["success", "success"]
    assert cb.records[first].status == "failed"
    assert "simulated analysis failure" in cb.records[first].message
    assert cb.records[second].status == "done"


def test_aborted_scan_is_not_reconstructed(RE, make_callback):
    beamline = SimulatedBeamline(seed=6)

    class Calls:
        n = 0
        settings = ReconstructionSettings()

        def reconstruct(self, volume, **kwargs):
            Calls.n += 1

    hooks = _Hooks()
    cb = make_callback(reconstructor=Calls(), publishers=[hooks])
    RE.subscribe(cb)

    def plan():
        # The exception inside the run makes the RunEngine close it with exit_status "fail".
        from bluesky.preprocessors import run_wrapper

        yield from run_wrapper(_interrupted(beamline), md={"plan_name": "broken"})

    with pytest.raises(RuntimeError, match="beam lost"):
        RE(plan())
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "skipped" and "fail" in record.message
    assert record.frames >= 1 and Calls.n == 0
    assert ("failure", record.message) in hooks.calls  # the IOC does not stay "Collecting"


def _interrupted(beamline):
    import bluesky.plan_stubs as bps

    yield from bps.declare_stream(beamline.theta, beamline.det, name="primary")
    for theta in (20.0, 20.005):
        yield from bps.mv(beamline.theta, theta)
        yield from bps.trigger_and_read([beamline.theta, beamline.det])
    raise RuntimeError("beam lost")


class _Capture:
    settings = ReconstructionSettings()

    def __init__(self, gate=None):
        self.volumes, self.gate = [], gate

    def reconstruct(self, volume, **kwargs):
        if self.gate is not None:
            self.gate.wait(10)
        self.volumes.append(volume)
        return volume.sum()


class _ExitsOnce(_Capture):
    """A reconstructor whose first scan raises SystemExit (a library calling sys.exit)."""

    def reconstruct(self, volume, **kwargs):
        if not self.volumes:
            self.volumes.append(None)
            raise SystemExit(3)
        return super().reconstruct(volume, **kwargs)


class _Interrupting(Executor):
    """An executor whose first task ends in KeyboardInterrupt, the others in a number."""

    def __init__(self):
        self.tasks = 0

    def submit(self, fn, /, *args, **kwargs):
        self.tasks += 1
        future = Future()
        if self.tasks == 1:
            future.set_exception(KeyboardInterrupt())
        else:
            future.set_result(1.0)
        return future


@pytest.mark.parametrize("where", ["reconstructor", "executor"])
def test_a_scan_that_raises_systemexit_or_keyboardinterrupt_fails_alone(make_callback, where):
    """Raised in the worker's code (not a signal), they fail their scan like any exception:
    the worker and results threads go on with the next scan."""
    rng = np.random.default_rng(2)
    frames = {0.01 * i: rng.poisson(50.0, size=(8, 8)).astype(np.float32) for i in range(6)}
    options = (
        {"reconstructor": _ExitsOnce()}
        if where == "reconstructor"
        else {"reconstructor": _Capture(), "executor": _Interrupting()}
    )
    cb = make_callback(**options)
    for scan_id in (1, 2):
        for name, doc in documents(frames, metadata={"scan_id": scan_id}):
            cb(name, doc)
    assert cb.wait(timeout=10)
    first, second = sorted(cb.records.values(), key=lambda r: r.scan_id)
    assert first.status == "failed" and (
        "SystemExit" in first.message or "KeyboardInterrupt" in first.message
    )
    assert second.status == "done", second.message


@pytest.mark.parametrize(
    ("exposure", "max_count"), [("0.1", True), ([0.1], -1), (float("nan"), "65535")]
)
def test_a_detector_configuration_that_is_not_numbers_is_noted_not_fatal(
    make_callback, exposure, max_count
):
    """Exposure and saturation count of a descriptor's configuration that are not positive
    numbers are left out with a note: the scan is reconstructed, unmasked (a count of -1 or
    True would mask every voxel) and without exposure advice."""
    rng = np.random.default_rng(1)
    frames = {0.01 * i: rng.poisson(50.0, size=(8, 8)).astype(np.float32) for i in range(6)}
    docs = documents(frames)
    ((_, descriptor),) = [(n, d) for n, d in docs if n == "descriptor"]
    data = {"det_exposure": exposure, "det_max_count": max_count}
    descriptor["configuration"] = {
        "det": {"data": data, "timestamps": dict.fromkeys(data, 0.0), "data_keys": {}}
    }
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    for name, doc in docs:
        cb(name, doc)
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "done", record.message
    assert len(capture.volumes) == 1 and record.exposure is None
    for key, value in data.items():
        assert f"detector configuration {key} {value!r} is not a positive number" in record.message


@pytest.mark.parametrize("page", [True, False])
def test_frames_are_stacked_in_motor_order(make_callback, page):
    rng = np.random.default_rng(0)
    thetas = [0.3, 0.1, 0.2, 0.0]  # arrival order is not the rocking order
    frames = {t: rng.uniform(size=(5, 6)).astype(np.float32) for t in thetas}
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    for name, doc in documents(frames, page=page):
        cb(name, doc)
    assert cb.wait(timeout=10)
    expected = np.stack([frames[t] for t in sorted(thetas)])
    np.testing.assert_array_equal(capture.volumes[0], expected)


def test_runs_without_the_keys_are_skipped_with_a_reason(make_callback, caplog):
    capture, hooks = _Capture(), _Hooks()
    cb = make_callback(reconstructor=capture, image_key="eiger_image", publishers=[hooks])
    for name, doc in documents({0.0: np.ones((2, 2))}):
        cb(name, doc)
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "skipped" and "eiger_image" in record.message
    assert capture.volumes == []
    # Often a wrong key: a warning, and the publishers told "collecting" hear why.
    assert "skipped: no frames" in caplog.text and "eiger_image" in caplog.text
    assert [c[0] for c in hooks.calls] == ["collecting", "failure"]
    assert ("failure", record.message) in hooks.calls


def test_start_metadata_can_opt_out(make_callback):
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    docs = documents({0.0: np.ones((2, 2)), 0.1: np.ones((2, 2))})
    docs[0] = ("start", {**docs[0][1], "bcdi_reconstruct": False})
    for name, doc in docs:
        cb(name, doc)
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "skipped" and "bcdi_reconstruct" in record.message
    assert capture.volumes == []


def test_full_queue_drops_the_oldest_and_records_it(make_callback):
    gate = threading.Event()
    capture, hooks = _Capture(gate), _Hooks()
    cb = make_callback(reconstructor=capture, queue_size=1, publishers=[hooks])
    for i in range(4):
        for name, doc in documents({0.0: np.ones((2, 2)), 0.1: np.ones((2, 2))}):
            cb(name, doc)
        if i == 0:  # scans keep coming while the first one is being reconstructed
            for _ in range(1000):
                if next(iter(cb.records.values())).status == "reconstructing":
                    break
                time.sleep(0.005)
    gate.set()
    assert cb.wait(timeout=10)
    statuses = [r.status for r in cb.records.values()]
    # The first was being reconstructed, the last is the newest: both reconstructed.
    assert statuses[0] == "done" and statuses[-1] == "done"
    assert all(s in ("done", "dropped") for s in statuses)
    assert len(cb.dropped) == statuses.count("dropped") >= 1
    assert all("queue was full" in r.message for r in cb.dropped)
    # Each dropped scan reaches the publishers (the IOC, the service's line) with why.
    failures = [c for c in hooks.calls if c[0] == "failure"]
    assert len(failures) == len(cb.dropped)
    assert all("queue was full" in message for _, message in failures)


def test_a_malformed_document_is_logged_not_raised(make_callback, caplog):
    hooks = _Hooks()
    cb = make_callback(reconstructor=_Capture(), publishers=[hooks])
    cb("event", {"descriptor": "unknown", "data": {}})  # no start: ignored
    cb("stop", {"no": "uid"})  # broken: logged
    assert "could not handle" in caplog.text
    # A start without a uid string is passed over in one line, before any publisher.
    caplog.clear()
    cb("start", {"time": 1.0})
    cb("start", {"uid": 5, "time": 1.0})
    lines = [r for r in caplog.records if "ignoring a start document" in r.getMessage()]
    assert len(lines) == 2 and not any(r.exc_info for r in caplog.records)
    assert hooks.calls == [] and cb.records == {}


def test_a_run_joined_mid_way_is_ignored_with_one_line(make_callback, caplog):
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    docs = _small_run(page=False)
    with caplog.at_level("DEBUG", logger="bcdi_bluesky.beamline.callback"):
        _feed(cb, docs[1:])  # subscribed after the start document went by
    assert cb.unrouted == len(docs) - 2  # descriptor and events; the stop is simply unknown
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "start document was not seen" in warnings[0].getMessage()
    uid = _feed(cb, _small_run())
    assert cb.wait(timeout=10) and cb.records[uid].status == "done"
    assert list(cb.records) == [uid]


def test_closed_loop_finds_a_misaligned_saturated_peak(RE, reconstructor, make_callback):
    """Peak 50 steps outside the naive range and an exposure that saturates the detector."""
    from bcdi_bluesky.beamline import ReconstructionAnalysis, closed_loop_scan

    beamline = SimulatedBeamline(seed=6, misalignment=0.25)
    cb = make_callback(reconstructor=reconstructor)
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb)
    step = beamline.crystal.step
    RE(
        closed_loop_scan(
            beamline.det, beamline.theta, analysis, beamline.crystal.bragg_theta, 63 * step, 64
        )
    )
    records = list(cb.records.values())
    assert 2 <= len(records) <= 4
    first, last = records[0].recommendation, records[-1].recommendation
    assert not first.peak_inside
    assert last.peak_inside and not last.saturated
    assert any(r.recommendation.saturated for r in records)
    # The saturated voxels are masked (a lower bound, not a count), and the scan says so.
    for record in records:
        assert ("(saturated) masked" in record.message) is record.recommendation.saturated
    assert abs(last.theta_center - beamline.crystal.peak_theta) < 2 * step
    result = records[-1].result
    assert result.metadata["uid"] == records[-1].uid
    iou = compare_objects(beamline.crystal.truth(), to_model_grid(result.object, 64)).iou
    assert iou >= 0.85


def test_recommendation_from_a_rocking_curve():
    from bcdi_bluesky.beamline import recommend

    thetas = np.linspace(-1.0, 1.0, 41)
    curve = np.exp(-0.5 * ((thetas - 0.3) / 0.1) ** 2)
    volume = 1000 * curve[:, None, None] * np.ones((1, 4, 4)) + 1
    rec = recommend(volume, thetas, exposure=2.0, max_count=4000)
    assert rec.peak_inside and not rec.saturated
    assert abs(rec.theta_center - 0.3) < 0.02
    assert rec.fwhm == pytest.approx(0.25, abs=0.06)  # 2.355 sigma, on a 0.05 grid
    assert rec.exposure == pytest.approx(2.0 * 0.5 * 4000 / volume.max())
    saturated = recommend(np.minimum(volume * 10, 4000), thetas, exposure=2.0, max_count=4000)
    assert saturated.saturated and saturated.exposure == pytest.approx(0.2)
    tail = recommend(volume[:12], thetas[:12], exposure=2.0, max_count=4000)
    assert not tail.peak_inside and tail.theta_center > thetas[11]
    assert tail.exposure == 2.0
    with pytest.raises(ValueError, match="frames"):
        recommend(volume, thetas[:3])


def test_derived_run_and_result_files(RE, reconstructor, make_callback, tmp_path):
    from event_model import DocumentNames, schema_validators

    from bcdi_bluesky.beamline import DerivedRunPublisher, ResultFileWriter

    derived = []
    writer = ResultFileWriter(tmp_path / "results")
    beamline = SimulatedBeamline(seed=5)
    beamline.det.max_count.put(1e12)
    cb = make_callback(
        reconstructor=reconstructor,
        refine="none",
        publishers=[DerivedRunPublisher(lambda n, d: derived.append((n, d))), writer],
    )
    RE.subscribe(cb)
    (uid,) = RE(_scan(beamline, 32))
    assert cb.wait(timeout=60)
    names = [n for n, _ in derived]
    assert names == ["start", "descriptor", "event", "stop"]
    for name, doc in derived:
        schema_validators[DocumentNames[name]].validate(doc)
    start, event = derived[0][1], derived[2][1]
    assert start["parent_uid"] == uid and start["model"] == "bcdi_cnn64"
    result = cb.records[uid].result
    assert event["data"]["chi"] == pytest.approx(result.chi)
    assert result.quality in ("good", "fair", "poor")
    assert start["quality"] == event["data"]["quality"] == result.quality
    assert event["data"]["quality_reasons"] == "; ".join(result.quality_reasons)
    assert start["quality_reasons"] == result.quality_reasons
    assert len(event["data"]["params"]) == result.params.size
    assert np.asarray(event["data"]["amp_XY"]).shape == result.object.shape[1:]
    summary = result.summary()
    from bcdi_bluesky.pipeline import RESULT_SCHEMA

    assert set(summary) <= set(RESULT_SCHEMA)  # one schema names every figure
    assert start["settings"] == result.settings.as_dict()
    assert event["data"]["timings_s_total"] == pytest.approx(result.timings["total"])
    assert event["data"]["stage_chi_cnn"] == pytest.approx(result.chi_cnn)
    data_keys = derived[1][1]["data_keys"]
    assert data_keys["timings_s_total"]["units"] == "s"
    assert data_keys["crystal_volume_nm3"]["units"] == "nm^3"
    for key in ("crystal_volume_nm3", "strain_rms", "displacement_rms_nm"):
        assert event["data"][key] == pytest.approx(summary[key])
    assert event["data"]["crystal_extents_nm"] == pytest.approx(summary["crystal_extents_nm"])
    (path,) = writer.written
    assert path.is_file() and path.suffix == ".cxi"
    import h5py

    with h5py.File(path, "r") as f:  # the file names the raw run and holds the lab frame
        assert f["entry_1/experiment_identifier"][()].decode() == uid
        assert f["strain"].shape == result.physical.strain.shape
    # The full pipeline names its polish runs in words ("model ER/HIO", "random start 1
    # ER/HIO +ER on the loosened support"): each becomes a valid data key, and the run is
    # complete.
    labels = {"model ER/HIO": 0.1, "random start 1 ER/HIO +ER on the loosened support": 0.05}
    again = []
    DerivedRunPublisher(lambda n, d: again.append((n, d)))(
        dataclasses.replace(result, polish_attempts=labels), {"uid": uid, "scan_id": 1}
    )
    assert [n for n, _ in again] == ["start", "descriptor", "event", "stop"]
    data = again[2][1]["data"]
    assert data["polish_attempts_model_ER_HIO"] == 0.1
    assert data["polish_attempts_random_start_1_ER_HIO_ER_on_the_loosened_support"] == 0.05


def test_file_backed_detector_gives_the_same_volume(RE, make_callback, tmp_path):
    volumes = {}
    for backed in (False, True):
        beamline = SimulatedBeamline(seed=9, file_backed=backed, save_path=str(tmp_path))
        capture = _Capture()
        cb = make_callback(reconstructor=capture)
        events = []
        RE.subscribe(cb)
        token = RE.subscribe(lambda name, doc, seen=events: seen.append((name, doc)))
        RE(_scan(beamline, 12))
        RE.unsubscribe(token)
        assert cb.wait(timeout=10)
        volumes[backed] = capture.volumes[0]
        if backed:
            names = [n for n, _ in events]
            assert "resource" in names and names.count("datum") == 12
            image = next(d for n, d in events if n == "event")["data"]["det_image"]
            assert isinstance(image, str)  # what other subscribers see is untouched
    assert volumes[True].shape == (12, 96, 96)
    np.testing.assert_array_equal(volumes[True], volumes[False])


def _stream_resource_run(uri: str, dataset: str, frame_shape: list[int], thetas) -> list:
    """The documents of a rocking scan whose frames sit in an HDF5 dataset (``uri``), declared
    by one stream resource and one stream datum: event k (seq_num k + 1) holds row k."""
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "theta": {"source": "sim", "dtype": "number", "shape": []},
            "det_image": {
                "source": "sim",
                "dtype": "array",
                "shape": frame_shape,
                "external": "STREAM:",
            },
        },
    )
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=uri,
        data_key="det_image",
        parameters={"dataset": dataset},
    )
    datum = sres.compose_stream_datum(
        indices={"start": 0, "stop": len(thetas)},
        seq_nums={"start": 1, "stop": len(thetas) + 1},
        descriptor=desc.descriptor_doc,
    )
    events = [
        ("event", desc.compose_event(data={"theta": theta}, timestamps={"theta": 0.0}))
        for theta in thetas
    ]
    return [
        ("start", bundle.start_doc),
        ("descriptor", desc.descriptor_doc),
        ("stream_resource", sres.stream_resource_doc),
        ("stream_datum", datum),
        *events,
        ("stop", bundle.compose_stop()),
    ]


def test_stream_resource_frames_are_read_from_hdf5(make_callback, tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    thetas = [0.2, 0.0, 0.1]
    stack = rng.uniform(size=(3, 4, 5)).astype(np.float32)
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["entry/data/data"] = stack
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    for name, doc in _stream_resource_run(
        f"file://localhost{path}", "/entry/data/data", [4, 5], thetas
    ):
        cb(name, doc)
    assert cb.wait(timeout=10)
    order = np.argsort(thetas)  # event k (seq_num k+1) holds row k
    np.testing.assert_array_equal(capture.volumes[0], stack[order])


def _off_beam(beam_centre):
    """The simulated beamline, its sample off the beam, unsaturated short exposures."""
    beamline = SimulatedBeamline(seed=1, beam_centre=beam_centre)
    beamline.det.max_count.put(1e12)
    beamline.det.exposure.put(0.01)
    return beamline


def _align(RE, beamline, iterations):
    """es_align of the sample stage on the detector's total."""
    from bcdi_bluesky.beamline import es_align

    stage = [beamline.sample_x, beamline.sample_y]
    RE(es_align(stage, [(-3, 3), (-3, 3)], "det_total", [beamline.det], iterations=iterations))


def test_es_align_finds_the_beam(RE):
    """The sample starts 2.5 beam sigmas off centre (4% of the flux on the crystal)."""
    beamline = _off_beam((-2.0, 1.5))
    peak_total = beamline.crystal.pattern[32].sum() * 0.01  # perfectly aligned, no background
    events = []
    RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    _align(RE, beamline, 300)
    assert beamline.illumination() > 0.95
    final = [e["data"]["det_total"] for e in events[-20:]]
    assert np.median(final) > 0.95 * peak_total
    assert len(events) == 300
    xs = np.array([e["data"]["sample_x"] for e in events])
    assert np.all(np.abs(np.diff(xs)) < 0.1)  # bounded steps: no jump of the stage


def test_es_align_ends_on_the_beam_despite_a_zinger_and_dropped_frames(RE):
    from bcdi_bluesky.beamline.plans import _robust_best

    beamline = _off_beam((-1.5, 1.0))
    make_frame, frames = beamline.det.make_frame, []

    def faulty():
        frame = make_frame()
        frames.append(1)
        if len(frames) % 17 == 0:
            frame[:] = np.nan  # a dropped frame
        if len(frames) == 40:
            frame[0, 0] = 1e9  # a cosmic ray, far from the beam
        return frame

    beamline.det.make_frame = faulty
    _align(RE, beamline, 200)
    assert beamline.illumination() > 0.95
    # One spike, even at an end of the run, never picks the end point.
    for spike in (0, 2, 9):
        values = [1.0] * 10
        values[spike] = 1e9
        values[6:9] = [2.0, 2.0, 2.0]  # the real maximum: several measurements near it
        assert _robust_best(values, [[k] for k in range(10)], [0])["positions"] in ([6], [7], [8])
    assert _robust_best([np.nan] * 3, [[1], [2], [3]], [0]) == {
        "objective": -np.inf,
        "positions": [0],
    }


def test_es_under_bluesky_adaptive_optimize(RE):
    """The user guide's bluesky-adaptive example, run as written on the simulated beamline."""
    pytest.importorskip("bluesky_adaptive")
    from bluesky_adaptive.protocols import Optimizer

    beamline = _off_beam((-1.5, 1.0))
    start = beamline.illumination()
    namespace = {
        "RE": RE,
        "det": beamline.det,
        "sample_x": beamline.sample_x,
        "sample_y": beamline.sample_y,
    }
    exec(compile(_user_guide_example("bluesky-adaptive"), "user_guide.md", "exec"), namespace)
    optimizer, best = namespace["optimizer"], namespace["best"]
    assert isinstance(optimizer, Optimizer)
    beamline.sample_x.set(best["sample_x"]).wait()
    beamline.sample_y.set(best["sample_y"]).wait()
    assert start < 0.25 and beamline.illumination() > 0.9
    with pytest.raises(ValueError, match="one point"):
        optimizer.suggest(2)


def test_bad_geometry_is_ignored_not_fatal(RE, reconstructor, make_callback):
    """A start document with a wrong geometry block: the scan is reconstructed in voxels, with
    a warning; the experiment goes on."""
    beamline = SimulatedBeamline(seed=5)
    beamline.det.max_count.put(1e12)
    cb = make_callback(reconstructor=reconstructor)
    RE.subscribe(cb)
    bad = {**beamline.geometry.to_dict(), "beamline": "nowhere"}
    with pytest.raises(ValueError, match="not one of"):
        list(rocking_scan(beamline.det, beamline.theta, 20.0, 0.3, 64, geometry=bad))
    # Written by some other plan, the block reaches the callback.
    (uid,) = RE(
        rocking_scan(
            beamline.det,
            beamline.theta,
            20.0,
            63 * beamline.crystal.step,
            64,
            md={"bcdi": {"geometry": bad}},
        )
    )
    assert cb.wait(timeout=120)
    assert cb.records[uid].status == "done"
    assert cb.records[uid].result.physical is None


# ----------------------------------------------------------------- worker hardening
class _FakeResult:
    """What the worker and its publishers read of a result; the object volume has the size
    of a real 64x96x96 reconstruction (4.5 MiB, every page written)."""

    def __init__(self, volume):
        self.object = np.full((64, 96, 96), 1 + 1j, dtype=np.complex64)
        self.chi = float(volume.mean())
        self.metadata = {}

    def summary(self):
        return {"chi": self.chi, "shape": list(self.object.shape)}


class _Fake:
    """A reconstructor that returns :class:`_FakeResult`, calls the progress hook a few
    times, and raises ``fail`` on its first call when given."""

    settings = ReconstructionSettings()

    def __init__(self, fail=None, gate=None):
        self.fail, self.gate, self.calls, self.settings_seen = fail, gate, 0, []

    def reconstruct(self, volume, progress=None, settings=None, **kwargs):
        self.calls += 1
        self.settings_seen.append(settings)
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail is not None and self.calls == 1:
            raise self.fail
        for i in range(3):
            progress("es_step", {"iteration": i, "cost": 1.0})
        return _FakeResult(volume)


class _Hooks(Publisher):
    """Records every hook call; ``fail`` names a hook that raises on its first call."""

    def __init__(self, fail=None):
        self.fail, self.calls = fail, []

    def _record(self, hook, *args):
        self.calls.append((hook, *args))
        if hook == self.fail and sum(c[0] == hook for c in self.calls) == 1:
            raise ZeroDivisionError(f"{hook} broke")

    def collecting(self, start_doc):
        self._record("collecting", start_doc["uid"])

    def configure(self, settings, start_doc):
        self._record("configure", start_doc["uid"])
        return settings

    def progress(self, stage, info, start_doc):
        self._record("progress", stage)

    def failure(self, message, start_doc):
        self._record("failure", message)

    def __call__(self, result, start_doc):
        self._record("result", start_doc["uid"])


def _small_run(**kwargs):
    frames = {0.0: np.ones((4, 4)), 0.1: 3 * np.ones((4, 4)), 0.2: np.ones((4, 4))}
    return documents(frames, **kwargs)


def _feed(cb, docs):
    for name, doc in docs:
        cb(name, doc)
    return docs[0][1]["uid"]


@pytest.mark.parametrize(
    "step", ["assembly", "recommendation", "configure", "reconstruction", "metadata", "publisher"]
)
def test_a_failing_step_fails_its_scan_and_the_next_proceeds(make_callback, monkeypatch, step):
    from bcdi_bluesky.beamline import callback as callback_module

    def once(real):
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise ZeroDivisionError("float division by zero")
            return real(*args, **kwargs)

        return broken

    if step == "recommendation":  # a division by zero, as bad metadata can cause
        monkeypatch.setattr(callback_module, "recommend", once(callback_module.recommend))
    if step == "metadata":  # the result's figures, read after the reconstruction
        monkeypatch.setattr(_FakeResult, "summary", once(_FakeResult.summary))
    hooks = _Hooks(fail={"configure": "configure", "publisher": "result"}.get(step))
    fake = _Fake(
        fail=RuntimeError("simulated analysis failure") if step == "reconstruction" else None
    )
    cb = make_callback(reconstructor=fake, publishers=[hooks])
    first_docs = _small_run()
    if step == "assembly":  # a detector that changed its frame size mid-scan
        event_page = first_docs[2][1]
        event_page["data"]["det_image"][1] = np.ones((5, 4))
    first = _feed(cb, first_docs)
    second = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    record = cb.records[first]
    assert record.status == "failed", record
    expected = {
        "assembly": "frames of different shapes",
        "recommendation": "division by zero",
        "configure": "configure broke",
        "reconstruction": "simulated analysis failure",
        "metadata": "division by zero",
        "publisher": "result broke",
    }[step]
    assert expected in record.message
    if step != "publisher":
        assert f"{step} failed" in record.message
        assert ("failure", record.message) in hooks.calls
    else:  # the result was made: it is kept, and the other publishers got it
        assert record.result is not None and record.figures["chi"] > 0
    assert cb.records[second].status == "done", cb.records[second]
    assert ("result", second) in hooks.calls


def test_a_failing_progress_hook_is_noted_once(make_callback):
    hooks = _Hooks(fail="progress")
    cb = make_callback(reconstructor=_Fake(), publishers=[hooks])
    uid = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    record = cb.records[uid]
    assert record.status == "done"
    assert record.message.count("progress of") == 1 and "progress broke" in record.message
    assert [c[0] for c in hooks.calls].count("progress") == 3


def test_hooks_are_called_in_order_and_settings_chain(make_callback):
    class Shorter(Publisher):
        def configure(self, settings, start_doc):
            return settings.replace(es_time_budget_s=1.0)

    class SkipDark(Publisher):
        def __init__(self):
            self.seen = []

        def configure(self, settings, start_doc):
            self.seen.append(settings)
            return None if start_doc.get("sample") == "dark" else settings

    hooks, plain = _Hooks(), []
    fake = _Fake()
    skip_dark = SkipDark()
    cb = make_callback(
        reconstructor=fake,
        publishers=[hooks, Shorter(), skip_dark],
        on_result=lambda result, start: plain.append(start["uid"]),
    )
    uid = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    dark = _feed(cb, _small_run(metadata={"sample": "dark"}))
    assert cb.wait(timeout=10)
    assert [c[0] for c in hooks.calls] == [
        "collecting",
        "configure",
        "progress",
        "progress",
        "progress",
        "result",
        "collecting",
        "configure",
        "failure",  # a skipped scan ends, as every scan told "collecting" does
    ]
    assert [s.es_time_budget_s for s in skip_dark.seen] == [1.0, 1.0]
    assert fake.settings_seen == [ReconstructionSettings(es_time_budget_s=1.0)]
    assert plain == [uid]
    assert cb.records[dark].status == "skipped" and "disabled" in cb.records[dark].message


def test_publishers_are_declared_not_probed():
    from bcdi_bluesky.beamline import CallablePublisher, as_publisher

    def plain(result, start_doc):
        return "got it"

    wrapped = as_publisher(plain)
    assert isinstance(wrapped, CallablePublisher) and wrapped(None, {}) == "got it"
    assert wrapped.configure("settings", {}) == "settings"

    class Partial:  # hooks without the base class, some missing: a mistake, said at once
        def __call__(self, result, start_doc): ...

        def failure(self, message, start_doc): ...

    with pytest.raises(TypeError, match=r"subclass bcdi_bluesky\.beamline\.Publisher"):
        BCDIReconstructionCallback(publishers=[Partial()], reconstructor=_Fake()).close()
    with pytest.raises(TypeError, match="callable"):
        as_publisher(42)


def test_no_bragg_peak_skips_the_scan(make_callback):
    from bcdi_bluesky.errors import NoBraggPeakError

    hooks = _Hooks()
    cb = make_callback(
        reconstructor=_Fake(fail=NoBraggPeakError("no Bragg peak: flat")), publishers=[hooks]
    )
    first, second = _feed(cb, _small_run()), _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    assert cb.records[first].status == "skipped"
    assert cb.records[first].message.startswith("no Bragg peak: flat")
    assert ("failure", cb.records[first].message) in hooks.calls
    assert cb.records[second].status == "done"


def test_a_skipped_scan_and_a_failed_one_reach_their_own_hooks(make_callback):
    from bcdi_bluesky.errors import NoBraggPeakError

    class Both(_Hooks):
        def skipped(self, message, start_doc):
            self._record("skipped", message)

    for error, hook, status in (
        (NoBraggPeakError("no Bragg peak: flat"), "skipped", "skipped"),
        (ZeroDivisionError("broke"), "failure", "failed"),
    ):
        hooks = Both()
        cb = make_callback(reconstructor=_Fake(fail=error), publishers=[hooks])
        uid = _feed(cb, _small_run())
        assert cb.wait(timeout=10)
        record = cb.records[uid]
        assert record.status == status
        assert [c for c in hooks.calls if c[0] in ("skipped", "failure")] == [
            (hook, record.message)
        ]


def test_bad_geometry_metadata_gives_no_voxel_size(make_callback):
    geometry = {
        "beamline": "generic",
        "energy_kev": 0,
        "detector_distance_m": 1.5,
        "pixel_size_m": 55e-6,
        "detector_angles_deg": {"delta": 30.0},
    }
    cb = make_callback(reconstructor=_Fake())
    uid = _feed(cb, _small_run(metadata={"bcdi": {"geometry": geometry}}))
    assert cb.wait(timeout=10)
    record = cb.records[uid]
    assert record.status == "done" and record.result.metadata["voxel_size_nm"] is None


def test_close_never_hangs(make_callback):
    gate = threading.Event()  # a reconstruction that does not end
    cb = make_callback(reconstructor=_Fake(gate=gate), queue_size=1)
    for _ in range(3):
        _feed(cb, _small_run())
    started = time.monotonic()
    assert cb.close(timeout=0.5) is False
    assert time.monotonic() - started < 2.0
    assert not cb.wait(timeout=0.1)
    gate.set()


def test_close_cancels_at_the_next_pipeline_step(make_callback):
    class Endless:
        """Refines for 30 s, reporting each step, as the pipeline's ES does."""

        settings = ReconstructionSettings()

        def reconstruct(self, volume, progress=None, **kwargs):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                progress("es_step", {"iteration": 0, "cost": 1.0})
                time.sleep(0.01)

    hooks = _Hooks()
    cb = make_callback(reconstructor=Endless(), publishers=[hooks])
    first, queued = _feed(cb, _small_run()), _feed(cb, _small_run())
    while cb.records[first].status != "reconstructing":
        time.sleep(0.01)
    started = time.monotonic()
    assert cb.close(timeout=2.0) is True
    assert time.monotonic() - started < 2.5
    assert cb.records[first].status == "failed"
    assert "closed before the reconstruction finished" in cb.records[first].message
    assert "_Cancelled" not in cb.records[first].message  # no private name in the line
    assert cb.records[queued].status == "dropped"
    assert [c[0] for c in hooks.calls].count("failure") == 2


def test_a_run_without_stop_is_incomplete_and_freed(make_callback):
    import gc
    import weakref

    hooks = _Hooks()
    cb = make_callback(reconstructor=_Fake(), publishers=[hooks], run_timeout=0.3)
    frame = np.ones((4, 4))
    alive = weakref.ref(frame)
    docs = documents({0.0: frame, 0.1: 2 * frame}, page=False)
    stop = docs.pop()
    uid = _feed(cb, docs)
    del docs, frame
    deadline = time.monotonic() + 10
    while cb.records[uid].status != "incomplete" and time.monotonic() < deadline:
        time.sleep(0.05)
    record = cb.records[uid]
    assert record.status == "incomplete", record
    assert "no stop document within 0.3 s" in record.message and "2 frames freed" in record.message
    assert ("failure", record.message) in hooks.calls
    assert [c[0] for c in hooks.calls].count("failure") == 1
    gc.collect()
    assert alive() is None  # nothing holds the frames any more
    cb(*stop)  # the stop arriving late changes nothing
    later = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    assert record.status == "incomplete" and cb.records[later].status == "done"


def test_starts_without_stops_hold_at_most_max_open_runs(make_callback, monkeypatch):
    """A flood of starts whose stops never come: beyond MAX_OPEN_RUNS the run seen least
    recently is closed as incomplete (its publishers told) at once, not after run_timeout,
    and a run completed in the middle of the flood is reconstructed."""
    from bcdi_bluesky.beamline import callback as callback_module

    monkeypatch.setattr(callback_module, "MAX_OPEN_RUNS", 5)
    hooks = _Hooks()
    cb = make_callback(reconstructor=_Fake(), publishers=[hooks], run_timeout=None)
    unstopped = []
    for i in range(12):
        docs = documents({0.0: np.ones((4, 4)), 0.1: np.ones((4, 4))}, metadata={"scan_id": i})
        docs.pop()  # no stop
        unstopped.append(_feed(cb, docs))
        if i == 6:
            whole = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    assert len(cb._open) == 5
    closed = [uid for uid in unstopped if cb.records[uid].status == "incomplete"]
    assert closed == unstopped[:7]  # the oldest, in order; the 5 latest still collecting
    message = cb.records[closed[0]].message
    assert message == "more than 5 runs open at once; 2 frames freed"
    assert [c[0] for c in hooks.calls].count("failure") == 7
    assert cb.records[whole].status == "done"


def test_opted_out_runs_without_stops_are_forgotten_and_late_stops_are_quiet(
    make_callback, monkeypatch, caplog
):
    """Runs opted out (``bcdi_reconstruct=False``) whose stops never come: beyond
    MAX_OPEN_RUNS the oldest is forgotten by the router too (its later documents are
    unrouted); a stop that comes after its run was closed is one INFO line, not a
    traceback."""
    import logging

    from bcdi_bluesky.beamline import callback as callback_module

    monkeypatch.setattr(callback_module, "MAX_OPEN_RUNS", 5)
    cb = make_callback(reconstructor=_Fake(), run_timeout=None)
    runs = []
    for i in range(8):
        docs = documents({0.0: np.ones((4, 4))}, metadata={"scan_id": i, "bcdi_reconstruct": False})
        runs.append(docs)
        cb(*docs[0])
    with caplog.at_level(logging.INFO, logger="bcdi_bluesky"):
        cb(*runs[0][1])  # the first run's descriptor: the router forgot that run
        assert cb.unrouted == 1
        cb(*runs[0][-1])  # and its stop, late
        cb(*runs[7][1])  # the latest run is still known: routed (and passed over)
        cb(*runs[7][-1])
    assert cb.unrouted == 1
    assert "came after it was closed: ignored" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "stop" in r.message]
    assert all(r.status == "skipped" for r in cb.records.values())


def test_events_without_the_motor_are_counted(make_callback):
    frames = {0.1 * i: np.full((4, 4), i + 1.0) for i in range(5)}
    docs = documents(frames, page=False)
    for _, event in docs[2:4]:
        del event["data"]["theta"]
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    uid = _feed(cb, docs)
    assert cb.wait(timeout=10)
    record = cb.records[uid]
    assert record.status == "done" and record.frames == 3
    assert "2 events without a finite 'theta' readback left out" in record.message
    assert capture.volumes[0].shape == (3, 4, 4)


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.timeout(120)
def test_memory_stays_flat_over_100_scans(make_callback):
    rng = np.random.default_rng(0)

    def scans(cb, n):
        for _ in range(n):
            frames = {0.01 * i: rng.uniform(size=(32, 32)) for i in range(8)}
            _feed(cb, documents(frames))
            assert cb.wait(timeout=10)

    # The measurement sees a leak: records that keep every result grow by ~4.5 MiB a scan.
    # Counted with tracemalloc (numpy reports its buffers there): RSS alone may not grow when
    # the allocator reuses memory that earlier tests freed.
    tracemalloc.start()
    try:
        leaky = make_callback(reconstructor=_Fake(), keep_results=1000)
        before = tracemalloc.get_traced_memory()[0]
        scans(leaky, 20)
        assert (tracemalloc.get_traced_memory()[0] - before) / 2**20 > 50
        leaky.close()
        leaky.records.clear()
        del leaky
        gc.collect()

        cb = make_callback(reconstructor=_Fake(), keep_results=2)
        scans(cb, 10)
        before, rss_before = tracemalloc.get_traced_memory()[0], _rss_mib()
        scans(cb, 100)
        assert (tracemalloc.get_traced_memory()[0] - before) / 2**20 < 20
        assert _rss_mib() - rss_before < 20
    finally:
        tracemalloc.stop()
    records = list(cb.records.values())
    assert len(records) == 110 and all(r.figures["chi"] > 0 for r in records)
    assert [r.result is not None for r in records[-3:]] == [False, True, True]


def test_debug_callbacks_reraises(make_callback, monkeypatch):
    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")
    cb = make_callback(reconstructor=_Fake(fail=RuntimeError("simulated analysis failure")))
    with pytest.raises(KeyError):
        cb("stop", {"no": "uid"})
    _feed(cb, _small_run())
    with pytest.raises(RuntimeError, match="simulated analysis failure"):
        cb.wait(timeout=10)
    assert cb.wait(timeout=10)  # raised once


def test_root_map_reads_files_moved_to_another_mount(RE, make_callback, tmp_path):
    import shutil

    acquisition = tmp_path / "acquisition"
    acquisition.mkdir()
    beamline = SimulatedBeamline(seed=9, file_backed=True, save_path=str(acquisition))
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(_scan(beamline, 6))
    mounted = tmp_path / "mounted"
    shutil.move(acquisition, mounted)
    capture = _Capture()
    cb = make_callback(reconstructor=capture, root_map={str(acquisition): str(mounted)})
    uid = _feed(cb, docs)
    assert cb.wait(timeout=30)
    assert cb.records[uid].status == "done", cb.records[uid]
    assert capture.volumes[0].shape == (6, 96, 96) and capture.volumes[0].sum() > 0


def test_root_map_applies_to_stream_resources(make_callback, tmp_path):
    import h5py

    stack = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["data"] = stack
    capture = _Capture()
    cb = make_callback(reconstructor=capture, root_map={"/beamline/data": str(tmp_path)})
    for name, doc in _stream_resource_run(
        "file://localhost/beamline/data/frames.h5", "/data", [3, 4], (0.0, 0.1)
    ):
        cb(name, doc)
    assert cb.wait(timeout=10)
    np.testing.assert_array_equal(capture.volumes[0], stack)


def test_es_align_stages_a_file_backed_detector(RE, tmp_path):
    from bcdi_bluesky.beamline import es_align

    beamline = SimulatedBeamline(seed=1, file_backed=True, save_path=str(tmp_path))
    beamline.det.exposure.put(0.01)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(es_align([beamline.sample_x], [(-3, 3)], "det_total", [beamline.det], iterations=5))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 5 and isinstance(events[0]["data"]["det_image"], str)
    assert [n for n, _ in docs].count("datum") == 5
    assert all(e["data"]["det_total"] > 0 for e in events)
    assert beamline.det._resource_uid is None  # unstaged at the end


def _user_guide_example(title):
    """The Python block that follows ``<!-- example: title -->`` in docs/user_guide.md."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "user_guide.md").read_text()
    block = text.split(f"<!-- example: {title} -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.timeout(120)
def test_the_user_guide_publisher_example(make_callback, reconstructor, tmp_path):
    from bcdi_bluesky.beamline import HiddenCrystal

    code = _user_guide_example("custom publisher")
    assert len(code.strip().splitlines()) <= 30
    namespace = {}
    exec(compile(code, "user_guide.md", "exec"), namespace)
    log_path = tmp_path / "scans.jsonl"
    cb = make_callback(
        reconstructor=reconstructor, refine="none", publishers=[namespace["ScanLog"](log_path)]
    )
    pattern = HiddenCrystal(seed=3).pattern
    frames = {0.005 * i: 1e6 * pattern[i] / pattern.max() for i in range(pattern.shape[0])}
    glitch = dict(frames)
    glitch[0.0] = np.full_like(frames[0.0], np.nan)  # a detector glitch: the pipeline refuses
    for i, (run, metadata) in enumerate([(frames, {}), (frames, {"sample": "dark"}), (glitch, {})]):
        _feed(cb, documents(run, metadata={**metadata, "scan_id": i + 1}))
        assert cb.wait(timeout=60)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["scan_id"] for line in lines] == [1, 2, 3]
    assert 0 < lines[0]["chi"] < 1 and lines[0]["es_budget_s"] == 2.0
    assert lines[1] == {"scan_id": 2, "skipped": "a publisher disabled reconstruction"}
    assert "reconstruction failed" in lines[2]["error"] and "NaN" in lines[2]["error"]


@pytest.mark.timeout(120)
def test_a_full_disk_fails_the_scans_not_the_service(tmp_path):
    # A file-size limit makes the disk "full" for this process alone (SIGXFSZ ignored, so the
    # write fails with EFBIG as it would with ENOSPC); each scan's result file then fails.
    script = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        from event_model import compose_run
        from bcdi_bluesky import BCDIReconstructionCallback, Reconstructor
        from bcdi_bluesky.beamline import ResultFileWriter

        volume = np.load(sys.argv[1])
        cb = BCDIReconstructionCallback(reconstructor=Reconstructor(), refine="none",
                                        publishers=[ResultFileWriter(sys.argv[2])])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        n = volume.shape[0]
        for scan_id in (1, 2):
            bundle = compose_run(metadata={"scan_id": scan_id})
            desc = bundle.compose_descriptor(name="primary", data_keys={
                "theta": {"source": "sim", "dtype": "number", "shape": []},
                "det_image": {"source": "sim", "dtype": "array",
                              "shape": list(volume.shape[1:])}})
            cb("start", bundle.start_doc)
            cb("descriptor", desc.descriptor_doc)
            cb("event_page", desc.compose_event_page(
                data={"theta": [0.01 * i for i in range(n)], "det_image": list(volume)},
                timestamps={"theta": [0.0] * n, "det_image": [0.0] * n},
                seq_num=list(range(1, n + 1))))
            cb("stop", bundle.compose_stop())
            assert cb.wait(timeout=60)
        for record in cb.records.values():
            print(record.status, "|", record.message)
        cb.close()
    """)
    scan54 = Path(__file__).resolve().parents[1] / "examples" / "data" / "S0054_intensity_64.npy"
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(scan54), str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        status, message = line.split(" | ")
        assert status == "failed" and "cannot write" in message, line
    assert not out.exists() or list(out.iterdir()) == []  # no partial file, no temporary


# ----------------------------------------------------------------- the closed loop under faults
class _StuckMotor:
    """Makes ``motor`` accept every move and never leave where it is (an amplifier off)."""

    def __init__(self, motor):
        from ophyd.status import Status

        def stay(value, **kwargs):
            status = Status()
            status.set_finished()
            return status

        motor.set = stay


def _closed_loop(RE, beamline, analysis, centre_steps=0, **options):
    """Run ``closed_loop_scan`` (16 frames, 15 steps wide) and return its history."""
    from bcdi_bluesky.beamline import closed_loop_scan

    step = beamline.crystal.step
    centre = beamline.crystal.bragg_theta + centre_steps * step
    history = []

    def plan():
        loop = closed_loop_scan(
            beamline.det, beamline.theta, analysis, centre, 15 * step, 16, **options
        )
        history.extend((yield from loop))

    RE(plan())
    return history


def test_a_motor_that_does_not_rock_stops_the_loop_without_a_move(RE, make_callback):
    from bcdi_bluesky.beamline import ReconstructionAnalysis

    beamline = SimulatedBeamline(seed=6)
    hooks, fake = _Hooks(), _Fake()
    cb = make_callback(reconstructor=fake, publishers=[hooks])
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb, timeout=30)
    _StuckMotor(beamline.theta)
    exposure = beamline.det.exposure.get()
    history = _closed_loop(RE, beamline, analysis, centre_steps=10, adjust_range=True)
    (record,) = cb.records.values()
    assert record.status == "skipped" and fake.calls == 0
    assert "rocking motor did not follow the plan" in record.message
    assert ("failure", record.message) in hooks.calls
    (entry,) = history  # one scan, then the loop stopped: nothing to steer by
    assert not entry["usable"] and not entry["converged"]
    assert entry["scan_status"] == "skipped" and "did not follow" in entry["message"]
    assert entry["scan_uid"] == record.uid
    assert beamline.det.exposure.get() == exposure


def test_the_loop_never_steers_by_an_older_scan(RE, make_callback):
    """Scan 2's readbacks are all NaN (an encoder lost): the analysis reports on scan 2,
    not on scan 1, and the loop stops after it."""
    from bcdi_bluesky.beamline import ReconstructionAnalysis

    beamline = SimulatedBeamline(seed=6)
    cb = make_callback(reconstructor=_Fake())
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb, timeout=30)
    scans = []
    RE.subscribe(lambda name, doc: scans.append(doc["uid"]) if name == "start" else None)
    read = beamline.theta.read

    def lost_in_scan_2():
        out = read()
        if len(scans) == 2:
            out["theta"] = {**out["theta"], "value": float("nan")}
        return out

    beamline.theta.read = lost_in_scan_2
    history = _closed_loop(RE, beamline, analysis, until_converged=False)
    assert len(scans) == 2 and [h["scan_uid"] for h in history] == scans
    assert history[0]["usable"] and history[0]["scan_status"] == "done"
    assert not history[1]["usable"] and not history[1]["converged"]
    assert "no frames" in history[1]["message"] and np.isnan(history[1]["theta_center"])


def test_a_slow_publisher_does_not_abort_the_loop(RE, make_callback):
    """The analysis waits ``timeout`` s, then steers from the frames' recommendation."""
    from bcdi_bluesky.beamline import ReconstructionAnalysis

    release = threading.Event()

    class Stalled(Publisher):
        def __call__(self, result, start_doc):
            release.wait(30)

    beamline = SimulatedBeamline(seed=6)
    cb = make_callback(reconstructor=_Fake(), publishers=[Stalled()])
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb, timeout=1.0)
    try:
        history = _closed_loop(RE, beamline, analysis, max_iterations=1, until_converged=False)
    finally:
        release.set()
    (entry,) = history
    # The reconstruction is done (its chi is known), the publishers are not: it steers.
    assert entry["usable"] and np.isfinite(entry["theta_center"])
    assert "analysis not finished within 1 s" in entry["message"]
    assert entry["scan_status"] == "reconstructing"


def test_rocking_problem_needs_the_motor_to_rock():
    from bcdi_bluesky.beamline.callback import rocking_problem

    planned = {"bcdi": {"rocking_step": 0.01}}
    assert rocking_problem(np.linspace(0, 0.63, 64), planned) is None
    assert "did not follow" in rocking_problem(np.full(64, 20.0), planned)
    assert "did not follow" in rocking_problem(np.linspace(0, 0.2, 64), planned)  # 3x short
    assert rocking_problem(np.linspace(0, 0.2, 64), {}) is None  # no plan: it moved
    assert "did not move" in rocking_problem(np.full(8, 1.5), {})
    assert "at least 2" in rocking_problem(np.array([1.0]), {})


def test_a_run_stopped_early_says_how_many_frames_it_holds(make_callback):
    cb = make_callback(reconstructor=_Fake())
    uid = _feed(cb, _small_run(metadata={"num_points": 10}))
    assert cb.wait(timeout=10)
    record = cb.records[uid]
    assert record.status == "done" and "3 of the 10 planned frames" in record.message


def test_failing_collecting_and_failure_hooks_are_in_the_message(make_callback):
    collecting = _Hooks(fail="collecting")
    cb = make_callback(reconstructor=_Fake(), publishers=[collecting])
    uid = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    assert cb.records[uid].status == "done"
    assert "collecting of" in cb.records[uid].message
    failing = _Hooks(fail="failure")
    cb = make_callback(reconstructor=_Fake(fail=RuntimeError("no")), publishers=[failing])
    uid = _feed(cb, _small_run())
    assert cb.wait(timeout=10)
    message = cb.records[uid].message
    assert message.startswith("reconstruction failed") and "failure of" in message


def test_rocking_scan_merges_md_bcdi(RE):
    beamline = SimulatedBeamline(seed=6)
    starts = []
    RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
    scan = beamline.rocking_scan(
        4, geometry=beamline.geometry, md={"bcdi": {"sample": "A"}, "user": "x"}
    )
    RE(scan)
    bcdi = starts[0]["bcdi"]
    assert bcdi["sample"] == "A" and "geometry" in bcdi and starts[0]["user"] == "x"
    with pytest.raises(ValueError, match="rocking_step given both"):
        list(
            rocking_scan(
                beamline.det, beamline.theta, 0.0, 1.0, 4, md={"bcdi": {"rocking_step": 1}}
            )
        )


@pytest.mark.parametrize(
    "start",
    [
        {"bcdi": "geometry"},
        {"bcdi": {"geometry": 5}},
        {"bcdi": {"geometry": {"beamline": "aps_34idc"}}, "diffractometers": {"e4cv": [1]}},
        {"bcdi": {"geometry": {}}, "diffractometers": {"e4cv": {"samples": [1]}}},
    ],
)
def test_malformed_geometry_metadata_is_a_value_error(start):
    from bcdi_bluesky.physics import geometry_from_start

    if start["bcdi"] == {"geometry": {}}:
        start["bcdi"]["geometry"] = {"beamline": "aps_34idc", "energy_kev": 9.0}
    with pytest.raises(ValueError, match="must be a mapping"):
        geometry_from_start(start)


def test_network_metadata_cannot_flood_the_records_or_forge_log_lines(make_callback, monkeypatch):
    """Malformed events are counted in one note, a text scan_id is kept as one short line,
    and the records stop at MAX_RECORDS (the oldest finished ones go)."""
    from bcdi_bluesky.beamline import callback as callback_module

    monkeypatch.setattr(callback_module, "MAX_RECORDS", 5)
    cb = make_callback(reconstructor=_Fake())
    docs = _small_run()
    docs[0][1]["scan_id"] = "7\n2026-12-02 bcdi INFO: forged"  # not event-model's schema
    for name, doc in docs:
        if name == "event_page":
            doc = {**doc, "seq_num": ["abc", 2, 3]}
        cb(name, doc)
    assert cb.wait(timeout=10)
    record = cb.records[docs[0][1]["uid"]]
    assert record.scan_id == "7\\n2026-12-02 bcdi INFO: forged"
    assert record.status == "done" and record.frames == 2
    assert "1 events with a malformed seq_num left out" in record.message
    uids = []
    for _ in range(8):
        # One at a time: a busy worker would drop queued scans (a policy of its own) and
        # keep unfinished ones, which are never forgotten.
        uids.append(_feed(cb, _small_run()))
        assert cb.wait(timeout=10)
    assert len(cb.records) == 5 and list(cb.records) == uids[-5:]
