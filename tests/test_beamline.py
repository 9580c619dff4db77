"""The Bluesky face: a real RunEngine with the simulated ophyd beamline, and document streams."""

import threading
import time

import numpy as np
import pytest
from event_model import compose_run

from bcdi_bluesky import BCDIReconstructionCallback, Reconstructor
from bcdi_bluesky.beamline import SimulatedBeamline, rocking_scan
from bcdi_bluesky.physics import compare_objects
from bcdi_bluesky.pipeline import to_model_grid


@pytest.fixture(scope="module")
def reconstructor():
    return Reconstructor(es_time_budget_s=120.0, polish_time_budget_s=120.0)


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
    c = beamline.crystal.bragg_theta
    return rocking_scan(beamline.det, beamline.theta, c, (points - 1) * beamline.crystal.step,
                        points, energy_kev=9.0)


def test_rocking_scan_is_reconstructed(RE, reconstructor, make_callback):
    beamline = SimulatedBeamline(seed=4)
    beamline.det.max_count.put(1e12)  # no saturation here; the closed loop handles that
    seen = []
    cb = make_callback(reconstructor=reconstructor,
                       on_result=lambda result, start: seen.append((result, start)))
    RE.subscribe(cb)
    (uid,) = RE(_scan(beamline))
    assert cb.wait(timeout=120)
    record = cb.records[uid]
    assert record.status == "done" and record.frames == 64, record.message
    result, start = seen[0]
    assert start["uid"] == uid and start["bcdi"]["energy_kev"] == 9.0
    assert result.object.shape == (64, 96, 96)  # the detector is larger than the peak
    assert compare_objects(beamline.crystal.truth(), to_model_grid(result.object, 64)).iou >= 0.85


class _FailsOnce:
    """A reconstructor that raises on its first call, like a pipeline hitting bad data."""

    def __init__(self, real):
        self.real, self.calls = real, 0

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

        def reconstruct(self, volume, **kwargs):
            Calls.n += 1

    cb = make_callback(reconstructor=Calls())
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


def _interrupted(beamline):
    import bluesky.plan_stubs as bps

    yield from bps.declare_stream(beamline.theta, beamline.det, name="primary")
    for theta in (20.0, 20.005):
        yield from bps.mv(beamline.theta, theta)
        yield from bps.trigger_and_read([beamline.theta, beamline.det])
    raise RuntimeError("beam lost")


def _documents(frames_by_theta, image_key="det_image", motor_key="theta", page=True,
               metadata=None):
    """A run made with event_model.compose_run (no RunEngine): fast and deterministic."""
    bundle = compose_run(metadata={"scan_id": 7, **(metadata or {})})
    docs = [("start", bundle.start_doc)]
    shape = list(next(iter(frames_by_theta.values())).shape)
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={motor_key: {"source": "sim", "dtype": "number", "shape": []},
                   image_key: {"source": "sim", "dtype": "array", "shape": shape}})
    docs.append(("descriptor", desc.descriptor_doc))
    thetas = list(frames_by_theta)
    if page:
        docs.append(("event_page", desc.compose_event_page(
            data={motor_key: thetas, image_key: [frames_by_theta[t] for t in thetas]},
            timestamps={motor_key: [0.0] * len(thetas), image_key: [0.0] * len(thetas)},
            seq_num=list(range(1, len(thetas) + 1)))))
    else:
        for t in thetas:
            docs.append(("event", desc.compose_event(
                data={motor_key: t, image_key: frames_by_theta[t]},
                timestamps={motor_key: 0.0, image_key: 0.0})))
    docs.append(("stop", bundle.compose_stop()))
    return docs


class _Capture:
    def __init__(self, gate=None):
        self.volumes, self.gate = [], gate

    def reconstruct(self, volume, **kwargs):
        if self.gate is not None:
            self.gate.wait(10)
        self.volumes.append(volume)
        return volume.sum()


@pytest.mark.parametrize("page", [True, False])
def test_frames_are_stacked_in_motor_order(make_callback, page):
    rng = np.random.default_rng(0)
    thetas = [0.3, 0.1, 0.2, 0.0]  # arrival order is not the rocking order
    frames = {t: rng.uniform(size=(5, 6)).astype(np.float32) for t in thetas}
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    for name, doc in _documents(frames, page=page):
        cb(name, doc)
    assert cb.wait(timeout=10)
    expected = np.stack([frames[t] for t in sorted(thetas)])
    np.testing.assert_array_equal(capture.volumes[0], expected)


def test_runs_without_the_keys_are_skipped_with_a_reason(make_callback):
    capture = _Capture()
    cb = make_callback(reconstructor=capture, image_key="eiger_image")
    for name, doc in _documents({0.0: np.ones((2, 2))}):
        cb(name, doc)
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "skipped" and "eiger_image" in record.message
    assert capture.volumes == []


def test_start_metadata_can_opt_out(make_callback):
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    docs = _documents({0.0: np.ones((2, 2)), 0.1: np.ones((2, 2))})
    docs[0] = ("start", {**docs[0][1], "bcdi_reconstruct": False})
    for name, doc in docs:
        cb(name, doc)
    assert cb.wait(timeout=10)
    (record,) = cb.records.values()
    assert record.status == "skipped" and "bcdi_reconstruct" in record.message
    assert capture.volumes == []


def test_full_queue_drops_the_oldest_and_records_it(make_callback):
    gate = threading.Event()
    capture = _Capture(gate)
    cb = make_callback(reconstructor=capture, queue_size=1)
    for i in range(4):
        for name, doc in _documents({0.0: np.ones((2, 2)), 0.1: np.ones((2, 2))}):
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


def test_a_malformed_document_is_logged_not_raised(make_callback, caplog):
    cb = make_callback(reconstructor=_Capture())
    cb("event", {"descriptor": "unknown", "data": {}})  # no start: ignored
    cb("stop", {"no": "uid"})  # broken: logged
    assert "could not handle" in caplog.text


def test_closed_loop_finds_a_misaligned_saturated_peak(RE, reconstructor, make_callback):
    """Peak 50 steps outside the naive range and an exposure that saturates the detector."""
    from bcdi_bluesky.beamline import ReconstructionAnalysis, closed_loop_scan

    beamline = SimulatedBeamline(seed=6, misalignment=0.25)
    cb = make_callback(reconstructor=reconstructor)
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb)
    step = beamline.crystal.step
    RE(closed_loop_scan(beamline.det, beamline.theta, analysis, beamline.crystal.bragg_theta,
                        63 * step, 64))
    records = list(cb.records.values())
    assert 2 <= len(records) <= 4
    first, last = records[0].recommendation, records[-1].recommendation
    assert not first.peak_inside
    assert last.peak_inside and not last.saturated
    assert any(r.recommendation.saturated for r in records)
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
    cb = make_callback(reconstructor=reconstructor, refine="none",
                       publishers=[DerivedRunPublisher(lambda n, d: derived.append((n, d))),
                                   writer])
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
    (path,) = writer.written
    assert path.is_file() and path.suffix == ".cxi"


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


def test_stream_resource_frames_are_read_from_hdf5(make_callback, tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    thetas = [0.2, 0.0, 0.1]
    stack = rng.uniform(size=(3, 4, 5)).astype(np.float32)
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["entry/data/data"] = stack
    bundle = compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "theta": {"source": "sim", "dtype": "number", "shape": []},
        "det_image": {"source": "sim", "dtype": "array", "shape": [4, 5],
                      "external": "STREAM:"}})
    sres = bundle.compose_stream_resource(mimetype="application/x-hdf5",
                                          uri=f"file://localhost{path}", data_key="det_image",
                                          parameters={"dataset": "/entry/data/data"})
    capture = _Capture()
    cb = make_callback(reconstructor=capture)
    cb("start", bundle.start_doc)
    cb("descriptor", desc.descriptor_doc)
    cb("stream_resource", sres.stream_resource_doc)
    cb("stream_datum", sres.compose_stream_datum(indices={"start": 0, "stop": 3},
                                                 seq_nums={"start": 1, "stop": 4},
                                                 descriptor=desc.descriptor_doc))
    for theta in thetas:
        cb("event", desc.compose_event(data={"theta": theta}, timestamps={"theta": 0.0}))
    cb("stop", bundle.compose_stop())
    assert cb.wait(timeout=10)
    order = np.argsort(thetas)  # event k (seq_num k+1) holds row k
    np.testing.assert_array_equal(capture.volumes[0], stack[order])


def test_es_align_finds_the_beam(RE):
    """The sample starts 2.5 beam sigmas off centre (4% of the flux on the crystal)."""
    from bcdi_bluesky.beamline import es_align

    beamline = SimulatedBeamline(seed=1, beam_centre=(-2.0, 1.5))
    beamline.det.max_count.put(1e12)
    beamline.det.exposure.put(0.01)
    peak_total = beamline.crystal.pattern[32].sum() * 0.01  # perfectly aligned, no background
    events = []
    RE.subscribe(lambda name, doc: events.append(doc) if name == "event" else None)
    RE(es_align([beamline.sample_x, beamline.sample_y], [(-3, 3), (-3, 3)], "det_total",
                [beamline.det], iterations=300))
    assert beamline.illumination() > 0.95
    final = [e["data"]["det_total"] for e in events[-20:]]
    assert np.median(final) > 0.95 * peak_total
    assert len(events) == 300
    xs = np.array([e["data"]["sample_x"] for e in events])
    assert np.all(np.abs(np.diff(xs)) < 0.1)  # bounded steps: no jump of the stage


def test_es_under_bluesky_adaptive_optimize(RE):
    pytest.importorskip("bluesky_adaptive")
    from bluesky_adaptive.plans import optimize
    from bluesky_adaptive.protocols import OptimizationProblem, Optimizer

    from bcdi_bluesky.beamline.adaptive import ExtremumSeekingOptimizer

    beamline = SimulatedBeamline(seed=1, beam_centre=(-1.5, 1.0))
    beamline.det.max_count.put(1e12)
    beamline.det.exposure.put(0.01)
    runs: dict[str, list] = {}  # run uid -> its events, for the evaluation function
    run_of_descriptor: dict[str, str] = {}

    def collect(name, doc):
        if name == "descriptor":
            run_of_descriptor[doc["uid"]] = doc["run_start"]
        elif name == "event":
            runs.setdefault(run_of_descriptor[doc["descriptor"]], []).append(doc)

    RE.subscribe(collect)

    def evaluate(uid, suggestions):
        events = runs[uid]
        return [{"det_total": events[i]["data"]["det_total"], "_id": s["_id"]}
                for i, s in enumerate(suggestions)]

    optimizer = ExtremumSeekingOptimizer({"sample_x": (-3, 3), "sample_y": (-3, 3)},
                                         "det_total", initial={"sample_x": 0.0,
                                                               "sample_y": 0.0})
    assert isinstance(optimizer, Optimizer)
    problem = OptimizationProblem(optimizer=optimizer,
                                  actuators=[beamline.sample_x, beamline.sample_y],
                                  sensors=[beamline.det], evaluation_function=evaluate)
    start = beamline.illumination()
    RE(optimize(problem, iterations=250))
    ((_, params, _outcome),) = optimizer.get_best_points()
    beamline.sample_x.set(params["sample_x"]).wait()
    beamline.sample_y.set(params["sample_y"]).wait()
    assert start < 0.25 and beamline.illumination() > 0.9
    with pytest.raises(ValueError, match="one point"):
        optimizer.suggest(2)


def test_voxel_size_from_the_scan_geometry():
    from bcdi_bluesky.beamline.recommend import voxel_size_nm

    md = {"energy_kev": 9.0, "detector_distance_m": 1.5, "pixel_size_m": 55e-6,
          "bragg_angle_deg": 16.087, "rocking_step": 0.005}
    size = voxel_size_nm(md, (64, 64, 64))
    wavelength = 1.239841984 / 9.0  # nm
    assert size[1] == pytest.approx(wavelength * 1.5 / (64 * 55e-6))  # 58.7 nm
    assert size[0] == pytest.approx(wavelength / (2 * 64 * np.sin(np.deg2rad(16.087))
                                                  * np.deg2rad(0.005)))
    assert voxel_size_nm({"energy_kev": 9.0}, (64, 64, 64)) is None
