"""Scale-out: a Tiled server and a Dask cluster started here, on loopback, ended here.

Runs of the simulated beamline (frames in HDF5 files announced by StreamResource) are written
into Tiled by ``TiledWriter`` from a real RunEngine; ``reprocess`` reads them back through the
server, reconstructs them on two Dask worker processes and writes the results back as derived
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from bluesky import RunEngine
from builders import CLI, Lines, documents, end, free_port
from tiled.queries import Key

from bcdi_bluesky.beamline import SimulatedBeamline
from bcdi_bluesky.beamline import tiled as tiled_runs
from bcdi_bluesky.beamline.publishers import DERIVED_PLAN_NAME
from bcdi_bluesky.beamline.scaleout import ReconstructorSpec, worker_name

API_KEY = secrets.token_hex(16)  # Tiled accepts alphanumeric keys only


@contextlib.contextmanager
def _serve_tiled(tmp_path_factory, *catalog):
    """``tiled serve catalog *catalog`` on loopback with an API key, frames readable from a
    folder of its own; yields (url, frames dir)."""
    frames = tmp_path_factory.mktemp("frames")
    port = free_port()
    home = tmp_path_factory.mktemp("tiled")
    log = open(home / "server.log", "w")
    command = [sys.executable, "-m", "tiled", "serve", "catalog", *catalog, "--api-key", API_KEY]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "-r", str(frames)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        # --temp puts the catalog under $TMPDIR: here, inside the test's folder.
        env={**os.environ, "TMPDIR": str(home)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            tiled_runs.wait_for_server(url, timeout=60)
        except tiled_runs.DataError:
            log.flush()
            pytest.fail((home / "server.log").read_text()[-3000:])
        yield url, frames
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory):
    """A temporary catalog (with tiled's in-memory streaming cache)."""
    with _serve_tiled(tmp_path_factory, "--temp") as served:
        yield served


@pytest.fixture(scope="module")
def client(tiled_server):
    url, _ = tiled_server
    c = tiled_runs.connect(url, API_KEY)
    yield c
    c.context.close()


@pytest.fixture(scope="module")
def engine():
    """A RunEngine for the module, halted and its thread joined at teardown."""
    loop = asyncio.new_event_loop()
    RE = RunEngine({}, loop=loop, context_managers=[])
    yield RE
    loop.call_soon_threadsafe(loop.stop)
    RE._th.join(timeout=10)
    loop.close()


def _write_runs(engine, client, frames, seeds, points=16, md=None):
    """Scan one simulated crystal per seed (``md``: more start metadata); TiledWriter stores
    each run. Returns the uids and the beamlines."""
    writer = tiled_runs.tiled_writer(client)
    token = engine.subscribe(writer)
    uids, beamlines = [], []
    try:
        for seed in seeds:
            beamline = SimulatedBeamline(seed=seed, file_backed="hdf5", save_path=str(frames))
            beamline.det.max_count.put(1e12)
            (uid,) = engine(
                beamline.rocking_scan(points, energy_kev=9.0, geometry=beamline.geometry, md=md)
            )
            uids.append(uid)
            beamlines.append(beamline)
    finally:
        engine.unsubscribe(token)
    return uids, beamlines


def _write_failed_run(engine, client, scan_id: int) -> str:
    """A scan that raised after its first frame (stop document with exit_status 'fail'),
    stored by TiledWriter; its uid."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    beamline = SimulatedBeamline(seed=15)
    token = engine.subscribe(tiled_runs.tiled_writer(client))

    @bpp.run_decorator(md={"scan_id": scan_id})
    def beam_lost():
        yield from bps.trigger_and_read([beamline.det, beamline.theta])
        raise RuntimeError("beam lost")

    try:
        with pytest.raises(RuntimeError, match="beam lost"):
            engine(beam_lost())
    finally:
        engine.unsubscribe(token)
    (uid,) = [u for u in client if client[u].metadata["start"].get("scan_id") == scan_id]
    return uid


def _write_run_in_stream(engine, client, frames, stream: str, seed: int = 17, points=16) -> str:
    """A rocking scan whose frames go to event stream ``stream``, stored by TiledWriter."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    beamline = SimulatedBeamline(seed=seed, file_backed="hdf5", save_path=str(frames))
    beamline.det.max_count.put(1e12)
    step, centre = beamline.crystal.step, beamline.crystal.bragg_theta
    angles = centre + step * (np.arange(points) - (points - 1) / 2)

    @bpp.stage_decorator([beamline.det])
    @bpp.run_decorator(md={"scan_id": 700 + seed})
    def rocking():
        for angle in angles:
            yield from bps.mv(beamline.theta, angle)
            yield from bps.trigger_and_read([beamline.det, beamline.theta], name=stream)

    token = engine.subscribe(tiled_runs.tiled_writer(client))
    try:
        (uid,) = engine(rocking())
    finally:
        engine.unsubscribe(token)
    return uid


@pytest.mark.timeout(120)
def test_run_source_reads_the_frames_of_the_stream_it_is_given(client, engine, tiled_server):
    """Frames in another stream than ``primary`` (``serve --stream``): the source reads that
    stream and a callback of the same stream reconstructs the scan; a source left on
    ``primary`` sends its start and stop only, so the scan is recorded skipped, with why."""
    from bcdi_bluesky import BCDIReconstructionCallback

    _, frames = tiled_server
    uid = _write_run_in_stream(engine, client, frames, "fast")
    for stream, status in (("fast", "done"), ("primary", "skipped")):
        cb = BCDIReconstructionCallback(refine="none", stream_name="fast")
        source = tiled_runs.TiledRunSource(client, stream_name=stream)
        source.subscribe(cb)
        try:
            source._send(uid)
            assert cb.wait(timeout=60)
        finally:
            assert cb.close(timeout=30)
        record = cb.records[uid]
        assert record.status == status, (stream, record.status, record.message)
        if status == "done":
            assert record.frames == 16 and 0 < record.figures["chi"] < 1
        else:
            assert record.frames == 0


@pytest.fixture(scope="module")
def raw_runs(engine, client, tiled_server):
    _, frames = tiled_server
    return _write_runs(engine, client, frames, seeds=(11, 12, 13, 14))


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each, every server on loopback."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
    ) as lc:
        with Client(lc, set_as_default=False) as c:
            yield lc, c


@pytest.mark.timeout(120)
def test_frames_come_through_tiled_not_the_file_system(client, raw_runs, monkeypatch):
    uids, beamlines = raw_runs
    source = client[uids[0]]["primary"]["det_image"].data_sources()[0]
    assert source.assets[0].data_uri.endswith(".h5")  # stored externally, by StreamResource
    # The server reads the HDF5 file; this process may not open any.
    import h5py

    def no_files(*args, **kwargs):
        raise AssertionError("an HDF5 file was opened by the client")

    monkeypatch.setattr(h5py, "File", no_files)
    run = tiled_runs.read_run(client, uids[0])
    monkeypatch.undo()
    assert run.volume.shape == (16, 96, 96) and run.volume.dtype == np.float32
    assert np.all(np.diff(run.thetas) > 0)
    # The frames are the detector's: the brightest one sits at the Bragg angle.
    peak = run.thetas[np.argmax(run.volume.sum(axis=(1, 2)))]
    assert abs(peak - beamlines[0].crystal.peak_theta) <= beamlines[0].crystal.step
    assert tiled_runs.recent_runs(client, 2) == uids[-2:]
    with pytest.raises(tiled_runs.DataError, match="no run"):
        tiled_runs.read_run(client, "no-such-uid")
    with pytest.raises(tiled_runs.DataError, match="no not_a_key"):
        tiled_runs.read_run(client, uids[0], image_key="not_a_key")


def _reprocess_on_dask(url, uids, address, *more) -> list[str]:
    """The command line of ``reprocess`` of ``uids`` from the Tiled server at ``url`` on the
    Dask scheduler at ``address`` (CNN only), then ``more``."""
    return [
        *CLI,
        "reprocess",
        "--tiled",
        url,
        "--api-key",
        API_KEY,
        *uids,
        "--dask",
        address,
        "--refine",
        "none",
        *map(str, more),
    ]


def _started_with_a_short_reconnect(command):
    """``command`` started with Dask's reconnect window at 3 s (30 s by default), and readers
    of its stdout and stderr."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"},
    )
    return process, Lines(process.stdout), Lines(process.stderr)


def _kill_a_busy_worker(dask_client, deadline_s=60.0):
    """SIGKILL the process of a worker that holds a task; returns its pid."""
    pids = dask_client.run(os.getpid)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        busy = [address for address, keys in dask_client.processing().items() if keys]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            return pids[busy[0]]
        time.sleep(0.05)
    raise AssertionError("no task reached a worker")


@pytest.mark.timeout(240)
def test_reprocess_on_dask_writes_back_and_survives_a_lost_worker(
    client, raw_runs, cluster, tiled_server, tmp_path
):
    url, _ = tiled_server
    uids, _ = raw_runs
    lc, dask_client = cluster
    proc = subprocess.Popen(
        _reprocess_on_dask(url, uids, lc.scheduler_address, "--output", tmp_path, "--write-back"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed = _kill_a_busy_worker(dask_client)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in out.splitlines()]
    # Every run, in the order asked, each reconstructed: the lost worker lost none.
    assert [line["uid"] for line in lines] == uids
    assert all(line["status"] == "done" for line in lines), lines
    assert all(0 < line["chi"] < 1 for line in lines)
    assert not any(line["worker"].endswith(f":{killed}") for line in lines)
    assert len(list(tmp_path.glob("scan_*.cxi"))) == len(uids)
    # The derived runs, read back from Tiled, name their parents and carry the figures.
    for line in lines:
        derived = client.search(Key("start.parent_uid") == line["uid"])
        assert len(derived) == 1
        (key,) = derived.keys()
        assert key == line["derived_uid"]
        run = derived[key]
        assert run.metadata["start"]["plan_name"] == DERIVED_PLAN_NAME
        assert run.metadata["stop"]["exit_status"] == "success"
        chi = float(np.asarray(run["primary"]["chi"].read())[0])
        assert chi == pytest.approx(line["chi"], rel=1e-6)
        support = int(np.asarray(run["primary"]["support_voxels"].read())[0])
        assert support == line["support_voxels"] > 0
    # Derived runs are not offered again as raw runs.
    assert set(tiled_runs.recent_runs(client, 100)) == set(uids)


@pytest.mark.timeout(180)
def test_write_back_writes_one_derived_run_per_run_unless_told_to_overwrite(
    client, engine, tiled_server, capsys
):
    """``reprocess --write-back`` run again on a run that has its reconstruction in the
    catalog prints the result and the derived run already there, and writes nothing;
    ``--overwrite`` writes another, and the first stays."""
    from bcdi_bluesky.cli import main

    url, frames = tiled_server
    (uid,), _ = _write_runs(engine, client, frames, seeds=(71,))
    command = ["reprocess", "--tiled", url, "--api-key", API_KEY, uid, "--refine", "none"]

    def reprocess(*options):
        assert main([*command, "--write-back", *options]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        line = json.loads(line)
        assert line["uid"] == uid and line["status"] == "done" and 0 < line["chi"] < 1
        return line

    def derived():
        return list(client.search(Key("start.parent_uid") == uid).keys())

    first = reprocess()
    assert "message" not in first and derived() == [first["derived_uid"]]
    again = reprocess()
    assert again["derived_uid"] == first["derived_uid"]
    assert again["message"] == (
        f"derived run {first['derived_uid']} of this run is already in the catalog: "
        "not written again (--overwrite writes another)"
    )
    assert derived() == [first["derived_uid"]]
    overwritten = reprocess("--overwrite")
    assert "message" not in overwritten
    assert derived() == [first["derived_uid"], overwritten["derived_uid"]]
    # The latest reconstruction is the one a later run finds.
    assert tiled_runs.derived_run(client, uid) == overwritten["derived_uid"]
    assert main([*command, "--overwrite"]) == 2
    assert "--overwrite goes with --write-back" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_two_write_backs_of_one_run_at_once_leave_one_derived_run(
    client, engine, tiled_server, monkeypatch
):
    """Two processes that each find no reconstruction of a run and write one: the server
    refuses the second start (the first derived run's uid is the run's own), the second
    waits for the first's stop and reports it; a cut-off write-back under that uid is an
    error that names --overwrite, which still writes."""
    from concurrent.futures import ThreadPoolExecutor

    from event_model import compose_run

    url, frames = tiled_server
    (uid,), _ = _write_runs(engine, client, frames, seeds=(73,))
    with ThreadPoolExecutor(max_workers=1) as pool:
        (outcome,) = tiled_runs.reprocess(client, [uid], pool, refine="none")
    assert outcome.result is not None, outcome.error

    # Both look before either writes: each finds nothing and goes on to write.
    looked = threading.Barrier(2, timeout=30)
    found = tiled_runs.derived_run

    def derived_run_then_wait(c, parent):
        answer = found(c, parent)
        looked.wait()
        return answer

    monkeypatch.setattr(tiled_runs, "derived_run", derived_run_then_wait)
    clients = [tiled_runs.connect(url, API_KEY) for _ in range(2)]  # one per process
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(
                pool.map(lambda c: tiled_runs.WriteBack(c)(outcome.result, outcome.start), clients)
            )
    finally:
        for c in clients:
            c.context.close()
    monkeypatch.undo()
    expected = tiled_runs.derived_uid(uid)
    assert sorted(answers, key=lambda a: a[1]) == [(expected, False), (expected, True)]
    assert list(client.search(Key("start.parent_uid") == uid).keys()) == [expected]
    assert tiled_runs.derived_run(client, uid) == expected

    # A write-back cut off after its start: the next one says so and writes nothing.
    (cut,), _ = _write_runs(engine, client, frames, seeds=(74,))
    start = {**outcome.start, "uid": cut}
    bundle = compose_run(
        uid=tiled_runs.derived_uid(cut),
        metadata={"parent_uid": cut, "plan_name": DERIVED_PLAN_NAME},
    )
    tiled_runs.tiled_writer(client)("start", bundle.start_doc)
    with pytest.raises(tiled_runs.WriteConflict, match=r"not complete after 0\.5 s.*--overwrite"):
        tiled_runs.WriteBack(client, settle_s=0.5)(outcome.result, start)
    assert list(client.search(Key("start.parent_uid") == cut).keys()) == [bundle.start_doc["uid"]]
    written, fresh = tiled_runs.WriteBack(client, overwrite=True)(outcome.result, start)
    assert fresh and written != bundle.start_doc["uid"]
    assert tiled_runs.derived_run(client, cut) == written


@pytest.mark.timeout(300)
def test_reprocess_names_the_scan_of_a_run_it_cannot_read(client, raw_runs):
    from concurrent.futures import ThreadPoolExecutor

    uids, _ = raw_runs
    with ThreadPoolExecutor(max_workers=1) as pool:
        (outcome,) = tiled_runs.reprocess(
            client, uids[:1], pool, ReconstructorSpec(), refine="none", image_key="eiger_image"
        )
    assert outcome.result is None and "eiger_image" in outcome.error
    assert outcome.start["scan_id"] == client[uids[0]].metadata["start"]["scan_id"]


@pytest.mark.timeout(120)
def test_a_failed_run_is_skipped_and_a_lost_server_fails_only_its_runs(client, raw_runs, engine):
    """A scan that ended in an exception is skipped with its exit status (as the live callback
    does) and left out of the default selection; a run the server cannot give (the
    connection broken) is one failed outcome and the batch goes on."""
    from concurrent.futures import ThreadPoolExecutor

    failed_uid = _write_failed_run(engine, client, scan_id=99)
    assert failed_uid not in tiled_runs.recent_runs(client, 50)

    class Unreachable:
        def __getitem__(self, uid):
            if uid == "gone":
                raise ConnectionError("[Errno 111] Connection refused")
            return client[uid]

    uids, _ = raw_runs
    with ThreadPoolExecutor(max_workers=1) as pool:
        skipped, gone, done = tiled_runs.reprocess(
            Unreachable(), [failed_uid, "gone", uids[0]], pool, refine="none"
        )
    assert skipped.skipped and "exit_status 'fail'" in skipped.error
    assert skipped.start["scan_id"] == 99
    assert not gone.skipped and "cannot reach it (ConnectionError" in gone.error
    assert done.result is not None and not done.error


@pytest.mark.timeout(120)
def test_a_refused_submission_fails_its_run_and_a_lost_executor_reads_no_more(client, raw_runs):
    """A submission that raises (here a shut-down pool; a closed Dask client raises
    ClosedClientError) is that run's failed outcome; once ``lost`` says why, the runs left
    fail with that reason, unread."""
    from concurrent.futures import ThreadPoolExecutor

    uids, _ = raw_runs
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    outcomes = list(tiled_runs.reprocess(client, uids[:2], pool, refine="none"))
    assert [o.uid for o in outcomes] == uids[:2]
    for outcome in outcomes:
        assert outcome.result is None and not outcome.skipped
        assert outcome.error == (
            "not submitted: RuntimeError: cannot schedule new futures after shutdown"
        )
    gone, answers = [False], []

    def lost():
        answers.append("lost the executor" if gone[0] else None)
        return answers[-1]

    with ThreadPoolExecutor(max_workers=1) as pool:
        outcomes = tiled_runs.reprocess(client, uids, pool, refine="none", lost=lost, window=1)
        done = next(outcomes)
        gone[0] = True
        left = list(outcomes)
    assert done.result is not None and not done.error
    assert [(o.uid, o.error) for o in left] == [(uid, "lost the executor") for uid in uids[1:]]
    assert [o.start["scan_id"] for o in left] == [
        client[uid].metadata["start"]["scan_id"] for uid in uids[1:]
    ]
    assert answers.count("lost the executor") == 1  # asked until it said so, then never again


@pytest.mark.timeout(60)
def test_reprocess_gives_up_a_result_that_a_lost_executor_will_never_give(client, raw_runs):
    """A task in hand when its executor is lost (a frozen scheduler keeps it for ever): the
    run fails with the reason within about LOST_CHECK_S of it, not after ``timeout``."""
    from concurrent.futures import Executor, Future

    class Stalled(Executor):
        """Takes every task and never runs it."""

        def __init__(self):
            self.futures = []

        def submit(self, fn, /, *args, **kwargs):
            self.futures.append(Future())
            return self.futures[-1]

    uids, _ = raw_runs
    asked = []

    def lost():
        asked.append(time.monotonic())
        return "lost the scheduler" if len(asked) > 3 else None

    executor = Stalled()
    started = time.monotonic()
    outcomes = list(
        tiled_runs.reprocess(client, uids[:2], executor, refine="none", timeout=600, lost=lost)
    )
    assert [(o.uid, o.error) for o in outcomes] == [(u, "lost the scheduler") for u in uids[:2]]
    assert time.monotonic() - started < 2 * tiled_runs.LOST_CHECK_S + 10
    assert all(f.cancelled() for f in executor.futures) and len(executor.futures) == 2


@pytest.mark.timeout(90)
def test_reprocess_reports_every_run_when_the_dask_scheduler_is_gone(
    client, raw_runs, tiled_server
):
    """``reprocess --dask`` whose scheduler is killed mid-batch: one failed line per run
    asked (the runs in hand cancelled, those left not read), one line on stderr saying the
    scheduler was lost, exit status 1, and no traceback."""
    from distributed import Client

    url, _ = tiled_server
    uids = raw_runs[0] * 3  # more runs than the window and the reconnect window take
    scheduler, address = _scheduler_without_workers()
    proc, out, err = _started_with_a_short_reconnect(_reprocess_on_dask(url, uids, address))
    try:
        _wait_for_a_task(Client, address)
        scheduler.kill()
        scheduler.wait(timeout=10)
        proc.wait(timeout=40)
    finally:
        end(proc, scheduler)
    assert proc.returncode == 1, err.lines
    lines = [json.loads(line) for line in out.lines]
    assert [line["uid"] for line in lines] == uids
    assert all(line["status"] == "failed" for line in lines), lines
    assert lines[-1]["message"] == (
        f"lost the Dask scheduler at {address} (no answer within the client's reconnect window)"
    )
    assert not any("Traceback" in line for line in err.lines), "".join(err.lines)
    assert err.lines[-1] == f"bcdi-bluesky reprocess: {lines[-1]['message']}\n"


@pytest.mark.timeout(90)
def test_a_scheduler_that_answers_nothing_counts_as_lost():
    """A frozen scheduler process keeps its connection open and the client ``running``:
    only the watch's questions show it, and after ``silent_s`` without an answer it counts
    as lost, with the reason."""
    from distributed import Client

    from bcdi_bluesky.beamline.scaleout import ClientWatch

    scheduler, address = _scheduler_without_workers()
    try:
        with Client(address, set_as_default=False, timeout=30) as dask_client:
            lost = threading.Event()
            watch = ClientWatch(dask_client, lost.set, interval=0.1, silent_s=2.0, ask_s=0.5)
            try:
                time.sleep(3.0)  # it answers: not lost
                assert not watch.lost and watch.lost_reason() is None
                os.kill(scheduler.pid, signal.SIGSTOP)
                frozen = time.monotonic()
                assert lost.wait(20), "the frozen scheduler was not noticed"
                # Counted from its last answer, up to one question (0.5 s) before the freeze.
                assert 1.4 <= time.monotonic() - frozen < 15
                assert str(dask_client.status) == "running"
                assert watch.lost_reason() == watch.reason == "no answer to any question for 2 s"
            finally:
                watch.stop()
                os.kill(scheduler.pid, signal.SIGCONT)
    finally:
        end(scheduler)


def _scheduler_without_workers():
    """A Dask scheduler in a subprocess on loopback, without workers (a task submitted to it
    stays in hand until it goes); returns the process and its address."""
    port = free_port()
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return scheduler, f"tcp://127.0.0.1:{port}"


def _wait_for_a_task(client_class, address, timeout=30.0):
    """Block until the scheduler at ``address`` holds a task."""
    with client_class(address, set_as_default=False, timeout=timeout) as observer:
        deadline = time.monotonic() + timeout
        while not observer.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            assert time.monotonic() < deadline, "no task reached the scheduler"
            time.sleep(0.2)


def test_a_malformed_scheduler_address_is_refused_at_once():
    from bcdi_bluesky.beamline.scaleout import connect_dask

    for address in ("not a scheduler", "http://127.0.0.1:8786", "foo:bar"):
        started = time.monotonic()
        with pytest.raises(ValueError, match="not a scheduler address"):
            connect_dask(address)
        assert time.monotonic() - started < 5


def test_reprocess_full_pipeline_against_the_truth(client, raw_runs, engine, tiled_server):
    """The real full pipeline, here on a thread pool: reading through Tiled keeps the scan
    good enough to recover the hidden crystal."""
    from concurrent.futures import ThreadPoolExecutor

    from bcdi_bluesky.physics import compare_objects
    from bcdi_bluesky.pipeline import to_model_grid

    _, frames = tiled_server
    (uid,), (beamline,) = _write_runs(engine, client, frames, seeds=(4,), points=64)
    with ThreadPoolExecutor(max_workers=1) as pool:
        outcome, missing = tiled_runs.reprocess(
            client, [uid, "no-such-uid"], pool, ReconstructorSpec(), refine="full"
        )
    assert missing.uid == "no-such-uid" and "no run" in missing.error
    assert missing.result is None
    assert outcome.error == "" and outcome.uid == uid
    result = outcome.result
    assert result.refine == "full" and result.metadata["worker"] == worker_name()
    assert result.metadata["scan_id"] == outcome.start["scan_id"]
    iou = compare_objects(beamline.crystal.truth(), to_model_grid(result.object, 64)).iou
    assert iou >= 0.85
    # The start document's geometry reached the worker: results in nm, as the live callback's.
    used = result.physical.geometry.to_dict()
    sent = beamline.geometry.to_dict()
    assert (used["beamline"], used["energy_kev"]) == (sent["beamline"], sent["energy_kev"])
    assert used["rocking_step_deg"] == pytest.approx(sent["rocking_step_deg"], rel=1e-6)
    assert result.summary()["crystal_extents_nm"][0] > 0


# tiled 0.2.20's client opens its WebSocket the way websockets 17 deprecates; the warning is
# harmless, but as an error it would end the subscription's thread.
@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
@pytest.mark.timeout(120)
def test_follower_sees_each_completed_run_live(client, engine, tiled_server):
    _, frames = tiled_server
    seen, arrived = [], threading.Event()

    def on_run(uid):
        seen.append(uid)
        arrived.set()

    with tiled_runs.RunFollower(client, on_run):
        (uid,), _ = _write_runs(engine, client, frames, seeds=(21,))
        assert arrived.wait(30), "no stop arrived through the subscription"
    assert seen == [uid]


@pytest.mark.timeout(120)
def test_a_server_without_a_stream_is_followed_through_its_catalog(
    tmp_path_factory, engine, monkeypatch, caplog
):
    """A catalog served without a streaming cache answers HTTP but refuses the WebSocket
    stream: the follower says so at once instead of waiting for ever, and the live source
    sends each completed run all the same, found by asking the catalog at each check."""
    monkeypatch.setattr(tiled_runs, "SERVER_CHECK_S", 0.3)
    home = tmp_path_factory.mktemp("uncached")
    tables = f"duckdb:///{home / 'tables.duckdb'}"
    catalog = (str(home / "catalog.db"), "--init", "-w", str(home / "data"), "-w", tables)
    with _serve_tiled(tmp_path_factory, *catalog) as (url, frames):
        client = tiled_runs.connect(url, API_KEY)
        try:
            started = time.monotonic()
            with pytest.raises(tiled_runs.SubscriptionFailed, match="streaming cache"):
                tiled_runs.RunFollower(client, lambda uid: None)
            assert time.monotonic() - started < 20
            source = tiled_runs.TiledRunSource(client)
            sent = []

            def record(name, doc):
                if name != "event":
                    sent.append((name, doc.get("run_start", doc["uid"])))

            source.subscribe(record)
            thread = threading.Thread(target=source.start, daemon=True)
            thread.start()
            try:
                _wait_until(
                    lambda: "cannot subscribe to the Tiled server" in caplog.text,
                    30,
                    "no line about the refused subscription",
                )
                (uid,), _ = _write_runs(engine, client, frames, seeds=(27,))
                _wait_until(lambda: ("stop", uid) in sent, 30, "the run was not sent")
                time.sleep(1.0)  # later checks find it again: not sent twice
            finally:
                source.stop()
                thread.join(timeout=10)
            assert not thread.is_alive()
            assert sent == [("start", uid), ("descriptor", uid), ("stop", uid)]
            assert source.follower is None
            assert caplog.text.count("cannot subscribe to the Tiled server") == 1
        finally:
            client.context.close()


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
@pytest.mark.timeout(120)
def test_run_source_subscribes_again_after_an_update_too_long(client, engine, tiled_server):
    """tiled ends a subscription for good on a message over its size limit: the source
    subscribes again, and the next run still arrives."""
    _, frames = tiled_server
    source = tiled_runs.TiledRunSource(client, max_update_bytes=50_000)
    started = []
    source.subscribe(lambda name, doc: started.append(doc["uid"]) if name == "start" else None)
    follower = threading.Thread(target=source.start, daemon=True)
    follower.start()
    try:
        deadline = time.monotonic() + 30
        while source.follower is None:
            assert time.monotonic() < deadline, "the source never subscribed"
            time.sleep(0.1)
        _write_runs(engine, client, frames, seeds=(22,), md={"notes": "x" * 100_000})
        while source.resubscriptions == 0:
            assert time.monotonic() < deadline, "the ended subscription was not made again"
            time.sleep(0.1)
        (uid,), _ = _write_runs(engine, client, frames, seeds=(23,))
        while uid not in started:
            assert time.monotonic() < deadline + 30, "the next run never arrived"
            time.sleep(0.1)
    finally:
        source.stop()
        follower.join(timeout=10)
    assert not follower.is_alive()


def _refuse_lookups(monkeypatch, client, refuse):
    """Runs looked up in ``client`` fail with a connection error (the server restarting)
    where ``refuse(key, refused)`` says so (``refused``: the keys refused so far). Returns
    the lists of the keys requested and of those refused, filled as the lookups come."""
    import httpx

    container = type(client)
    real_getitem = container.__getitem__
    requested, refused = [], []

    def restarting(self, key, *args, **kwargs):
        requested.append(key)
        if refuse(key, refused):
            refused.append(key)
            raise httpx.ConnectError("the server is restarting")
        return real_getitem(self, key, *args, **kwargs)

    monkeypatch.setattr(container, "__getitem__", restarting)
    return requested, refused


@pytest.mark.timeout(60)
def test_run_source_reads_again_a_run_whose_read_failed_on_the_way(client, raw_runs, monkeypatch):
    """The server unreachable for a moment (the first request of a run's read fails): the
    run is read again after a pause and sent whole; a run that is not there is not retried."""
    uids, _ = raw_runs
    monkeypatch.setattr(tiled_runs, "READ_RETRY_DELAYS_S", (0.2, 0.2))
    # The first request only.
    requests, _ = _refuse_lookups(monkeypatch, client, lambda key, refused: not refused)
    source = tiled_runs.TiledRunSource(client)
    names = []
    source.subscribe(lambda name, doc: names.append(name))
    source._send(uids[0])
    # The failed lookup, then one that serves the frames, the descriptors and the stop.
    assert requests.count(uids[0]) == 2
    assert names[0] == "start" and names[-1] == "stop" and names.count("event") == 16
    requests.clear()
    names.clear()
    source._send("no-such-run")
    assert requests.count("no-such-run") <= 2  # the read and the start-and-stop lookup
    assert names == []


def _start_source(source, timeout=30):
    """Run ``source.start`` in a thread; return the thread once it follows the server."""
    thread = threading.Thread(target=source.start, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while source.follower is None:
        assert time.monotonic() < deadline, "the source never subscribed"
        assert thread.is_alive(), "start() returned"
        time.sleep(0.05)
    return thread


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
@pytest.mark.timeout(120)
def test_run_source_sends_the_runs_completed_while_the_subscription_was_down(
    client, engine, tiled_server, monkeypatch
):
    """tiled ends the subscription (an update too long) while the server looks away: the
    run whose update was too long, and one completed before the subscription is made
    again, are asked from the catalog when it answers, and sent once each, in order."""
    _, frames = tiled_server
    monkeypatch.setattr(tiled_runs, "SERVER_CHECK_S", 0.2)
    monkeypatch.setattr(tiled_runs, "CATCH_UP_EVERY_S", 600.0)  # only after interruptions
    answers = [True]
    real_answers = tiled_runs.server_answers
    monkeypatch.setattr(tiled_runs, "server_answers", lambda url: answers[0] and real_answers(url))
    source = tiled_runs.TiledRunSource(client, max_update_bytes=50_000)
    started = []
    source.subscribe(lambda name, doc: started.append(doc["uid"]) if name == "start" else None)
    thread = _start_source(source)
    try:
        answers[0] = False  # no subscription made again until the runs are written
        (long,), _ = _write_runs(engine, client, frames, seeds=(24,), md={"notes": "x" * 100_000})
        _wait_until(lambda: not source.follower.alive, 30, "the subscription did not end")
        (meanwhile,), _ = _write_runs(engine, client, frames, seeds=(25,))
        time.sleep(0.5)
        assert started == [] and source.resubscriptions == 0
        answers[0] = True
        _wait_until(lambda: meanwhile in started, 30, "the runs completed meanwhile not sent")
        (live,), _ = _write_runs(engine, client, frames, seeds=(26,))
        _wait_until(lambda: live in started, 30, "the next live run never arrived")
        time.sleep(1.0)  # a second catch-up or live delivery would show now
    finally:
        source.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert started == [long, meanwhile, live]
    assert source.resubscriptions == 1


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
@pytest.mark.timeout(60)
def test_run_source_keeps_a_run_whose_read_keeps_failing_and_sends_it_later(
    client, raw_runs, monkeypatch, caplog
):
    """The server unreachable for longer than the retries: the run is kept and tried again
    on later polls, sent whole, once, when its read works again; a run unread past the bound
    is sent as its start and stop; on stop() the runs still pending are named."""
    uids, _ = raw_runs
    monkeypatch.setattr(tiled_runs, "READ_RETRY_DELAYS_S", (0.1,))
    monkeypatch.setattr(tiled_runs, "SERVER_CHECK_S", 0.2)
    monkeypatch.setattr(tiled_runs, "PENDING_RETRY_S", 0.3)
    monkeypatch.setattr(tiled_runs, "PENDING_GIVE_UP_S", 30.0)
    failing = {uids[0]}
    _, tries = _refuse_lookups(monkeypatch, client, lambda key, refused: key in failing)
    source = tiled_runs.TiledRunSource(client)
    sent = []
    source.subscribe(lambda name, doc: sent.append((name, doc.get("run_start", doc.get("uid")))))
    thread = _start_source(source)
    try:
        source._queue.put(uids[0])  # as the follower does when the stop arrives
        _wait_until(lambda: len(tries) >= 5, 20, "the run was not tried on later polls")
        assert sent == []
        failing.clear()
        _wait_until(lambda: ("stop", uids[0]) in [(n, u) for n, u in sent], 20, "never sent")
        source._queue.put(uids[0])  # its stop again: not sent twice
        time.sleep(1.0)
        assert [n for n, _ in sent] == ["start", "descriptor", *["event"] * 16, "stop"]
        assert sent[0] == ("start", uids[0])
        # Past the bound: start and stop only.
        monkeypatch.setattr(tiled_runs, "PENDING_GIVE_UP_S", 0.5)
        real_documents = tiled_runs.run_documents

        def frames_unreadable(client, uid, *args):
            if uid == uids[1]:
                raise tiled_runs.ReadFailure(f"run {uid}: cannot read the frames: timeout")
            return real_documents(client, uid, *args)

        monkeypatch.setattr(tiled_runs, "run_documents", frames_unreadable)
        sent.clear()
        source._queue.put(uids[1])
        _wait_until(lambda: len(sent) == 2, 20, "the start and stop were not sent")
        assert sent == [("start", uids[1]), ("stop", uids[1])]
        # Not even its start and stop readable past the bound: logged once, with its uid.
        failing.add(uids[3])
        source._queue.put(uids[3])

        def given_up():
            return [
                r for r in caplog.records if r.levelname == "ERROR" and uids[3] in r.getMessage()
            ]

        _wait_until(given_up, 20, "the unreadable run was not given up")
        time.sleep(1.0)
        assert len(given_up()) == 1 and "reprocess" in given_up()[0].getMessage()
        assert len(sent) == 2
        # Pending at stop(): named in one line.
        monkeypatch.setattr(tiled_runs, "PENDING_GIVE_UP_S", 600.0)
        failing.add(uids[2])
        source._queue.put(uids[2])
        _wait_until(lambda: uids[2] in tries, 20, "the third run was not tried")
    finally:
        source.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(sent) == 2
    (line,) = [r.getMessage() for r in caplog.records if "stopped with" in r.getMessage()]
    assert uids[2] in line


# A Tiled server whose catalog outlives it (``--temp`` makes a new one at each start), with
# the in-memory streaming cache that ``--temp`` sets up (``--cache memory`` fails outside it
# with tiled 0.2.20).
_PERSISTENT_SERVER = """
import sys
import uvicorn
from tiled.catalog import from_uri
from tiled.config import Authentication, StreamingCacheConfig
from tiled.server.app import build_app

home, frames, key, port = sys.argv[1:]
tree = from_uri(
    f"sqlite:///{home}/catalog.db",
    writable_storage=[f"{home}/data", f"duckdb:///{home}/tables.duckdb"],
    readable_storage=[frames],
    init_if_not_exists=True,
    cache_config=StreamingCacheConfig(uri="memory").model_dump(),
)
app = build_app(tree, Authentication(single_user_api_key=key))
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
# A subscription stopped while tiled's own thread is between reconnection tries ends that
# thread with "Cannot be restarted once stopped" (tiled's retry, in its daemon thread): the
# source has re-subscribed by then, and what it sends is asserted below.
@pytest.mark.filterwarnings(
    "ignore:Exception in thread tiled-subscription:pytest.PytestUnhandledThreadExceptionWarning"
)
@pytest.mark.timeout(180)
def test_run_source_outlives_a_server_restart(engine, tmp_path, monkeypatch, caplog):
    """The server stopped and started again on its catalog: start() goes on, with one
    warning for the outage, and the runs completed after it came back are sent once each."""
    monkeypatch.setattr(tiled_runs, "SERVER_CHECK_S", 0.3)
    (tmp_path / "data").mkdir()
    frames = tmp_path / "frames"
    frames.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", _PERSISTENT_SERVER, str(tmp_path), str(frames), API_KEY]

    def serve():
        server = subprocess.Popen(
            [*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        tiled_runs.wait_for_server(url, timeout=60)
        return server

    server = serve()
    client = tiled_runs.connect(url, API_KEY)
    source = tiled_runs.TiledRunSource(client)
    started = []
    source.subscribe(lambda name, doc: started.append(doc["uid"]) if name == "start" else None)
    thread = _start_source(source)
    try:
        (before,), _ = _write_runs(engine, client, frames, seeds=(27,), points=8)
        _wait_until(lambda: before in started, 30, "the first run never arrived")
        server.terminate()
        server.wait(timeout=20)
        time.sleep(2.0)  # several checks while it is away
        assert thread.is_alive()
        server = serve()
        uids, _ = _write_runs(engine, client, frames, seeds=(28, 29), points=8)
        _wait_until(lambda: set(uids) <= set(started), 60, "the runs after the restart not sent")
        time.sleep(1.0)
    finally:
        source.stop()
        thread.join(timeout=10)
        server.terminate()
        server.wait(timeout=20)
        client.context.close()
    assert not thread.is_alive()
    # Each once; the order of two runs is kept only when both came the same way.
    assert started[0] == before and sorted(started[1:]) == sorted(uids)
    away = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(away) == 1


@pytest.mark.timeout(180)
def test_callback_on_dask_keeps_scan_order_and_records(RE, cluster):
    """Three scans reconstructed on two Dask workers: results and hooks arrive in the order
    the scans stopped, and the scan whose task fails on the worker is recorded with why."""
    from bcdi_bluesky import BCDIReconstructionCallback
    from bcdi_bluesky.beamline import Publisher
    from bcdi_bluesky.beamline.scaleout import dask_executor

    _, dask_client = cluster

    class Log(Publisher):
        def __init__(self):
            self.events = []

        def __call__(self, result, start_doc):
            self.events.append(("result", start_doc["uid"], result.metadata["worker"]))

        def failure(self, message, start_doc):
            self.events.append(("failure", start_doc["uid"], message))

    log = Log()
    cb = BCDIReconstructionCallback(
        publishers=[log], refine="none", queue_size=8, executor=dask_executor(dask_client)
    )
    try:
        RE.subscribe(cb)
        uids = []
        for seed, points, exposure in ((31, 32, 1.0), (32, 16, 0.0), (33, 16, 1.0)):
            beamline = SimulatedBeamline(seed=seed)
            beamline.det.max_count.put(1e12)
            beamline.det.exposure.put(exposure)  # 0 s: nothing but zeros, a task that fails
            beamline.det.background = 0.0
            (uid,) = RE(beamline.rocking_scan(points))
            uids.append(uid)
        assert cb.wait(timeout=150)
    finally:
        assert cb.close(timeout=30)
    assert [e[1] for e in log.events] == uids
    assert [e[0] for e in log.events] == ["result", "failure", "result"]
    workers = set(dask_client.run(worker_name).values())
    assert {log.events[0][2], log.events[2][2]} <= workers
    first, empty, last = (cb.records[u] for u in uids)
    assert first.status == last.status == "done"
    assert first.frames == 32 and 0 < first.figures["chi"] < 1
    assert first.result is not None and first.result.metadata["uid"] == uids[0]
    assert empty.status == "failed" and "reconstruction failed" in empty.message
    assert "empty" in empty.message.lower() or "zero" in empty.message.lower(), empty.message


@pytest.mark.timeout(240)
def test_serve_follows_tiled_and_reconstructs_on_dask(client, engine, tiled_server, cluster):
    """``serve --tiled URL --dask SCHEDULER``: a run written into Tiled after the service
    started comes out as one JSON line, reconstructed on the cluster."""
    url, frames = tiled_server
    lc, _ = cluster
    serve = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--tiled",
            url,
            "--api-key",
            API_KEY,
            "--dask",
            lc.scheduler_address,
            "--refine",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "listening" not in line and time.monotonic() < deadline:
            line = serve.stderr.readline()
            assert line or serve.poll() is None, "serve ended before listening"
        assert "listening to Tiled" in line, line
        (uid,), _ = _write_runs(engine, client, frames, seeds=(41,))
        report = json.loads(serve.stdout.readline())
        assert report["uid"] == uid and report["status"] == "done", report
        assert 0 < report["chi"] < 1 and report["refine"] == "none"
        # A scan that ended in an exception: its line says skipped, and why.
        failed = _write_failed_run(engine, client, scan_id=98)
        report = json.loads(serve.stdout.readline())
        assert (report["uid"], report["status"]) == (failed, "skipped"), report
        assert "exit_status 'fail'" in report["message"]
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.communicate()
    assert serve.returncode == 0


@pytest.mark.timeout(120)
def test_callback_publishes_in_scan_order_when_a_later_scan_finishes_first(RE):
    """A thread pool of two where the first scan's task waits for the second's: the second
    result is ready first, yet the publishers see the first scan first."""
    from concurrent.futures import ThreadPoolExecutor

    from bcdi_bluesky import BCDIReconstructionCallback

    finished = []
    second_done = threading.Event()

    class HoldFirst(ThreadPoolExecutor):
        """The first task starts only once the second has finished."""

        submitted = 0

        def submit(self, fn, *args, **kwargs):
            HoldFirst.submitted += 1
            first = HoldFirst.submitted == 1

            def task(*a, **k):
                if first:
                    assert second_done.wait(60)
                result = fn(*a, **k)
                finished.append(result)
                if not first:
                    second_done.set()
                return result

            return super().submit(task, *args, **kwargs)

    seen = []
    with HoldFirst(max_workers=2) as pool:
        cb = BCDIReconstructionCallback(
            on_result=lambda result, start: seen.append((start["uid"], result)),
            refine="none",
            queue_size=4,
            executor=pool,
        )
        try:
            RE.subscribe(cb)
            uids = []
            for seed in (51, 52):
                beamline = SimulatedBeamline(seed=seed)
                beamline.det.max_count.put(1e12)
                (uid,) = RE(beamline.rocking_scan(16))
                uids.append(uid)
            assert cb.wait(timeout=90)
        finally:
            assert cb.close(timeout=30)
    assert [u for u, _ in seen] == uids  # scan order ...
    assert finished[0] is seen[1][1]  # ... although the second scan's result came first
    assert all(cb.records[u].status == "done" for u in uids)
    assert all(r.metadata["worker"] == worker_name() for _, r in seen)


@pytest.mark.timeout(60)
def test_close_cancels_a_result_the_executor_never_gives(RE):
    """An executor whose task hangs: close() returns within its timeout, the scan is recorded
    failed, and the failure hook is told."""
    from concurrent.futures import ThreadPoolExecutor

    from bcdi_bluesky import BCDIReconstructionCallback
    from bcdi_bluesky.beamline import Publisher

    release = threading.Event()

    class Hangs(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            return super().submit(release.wait, 60)

    failures = []

    class Failures(Publisher):
        def failure(self, message, start_doc):
            failures.append((start_doc["uid"], message))

    with Hangs(max_workers=1) as pool:
        try:
            cb = BCDIReconstructionCallback(publishers=[Failures()], refine="none", executor=pool)
            RE.subscribe(cb)
            beamline = SimulatedBeamline(seed=61)
            (uid,) = RE(beamline.rocking_scan(8))
            assert not cb.wait(timeout=1.0)
            started = time.monotonic()
            assert cb.close(timeout=2.0)
            assert time.monotonic() - started < 3.0
        finally:
            release.set()
    record = cb.records[uid]
    assert record.status == "failed" and "closed before" in record.message
    assert failures == [(uid, record.message)]


@pytest.mark.timeout(90)
def test_serve_exits_when_the_dask_scheduler_is_gone_for_good(tmp_path):
    """``serve --dask``: the scheduler killed with a scan in hand. The scan is reported not
    reconstructed, and once the client's reconnect window (3 s here) has passed, serve
    exits non-zero with one line saying why, for its service manager to start it again."""
    import zmq
    from distributed import Client

    from bcdi_bluesky.cli import SCHEDULER_LOST
    from bcdi_bluesky.remote import serializer

    zmq_port = free_port()
    scheduler, address = _scheduler_without_workers()
    context = zmq.Context()
    sender = context.socket(zmq.PUB)
    sender.bind(f"tcp://127.0.0.1:{zmq_port}")
    serve, out, err = _started_with_a_short_reconnect(
        [
            *CLI,
            "serve",
            "--zmq",
            f"127.0.0.1:{zmq_port}",
            "--dask",
            address,
            "--refine",
            "none",
            "--stop-timeout",
            "2",
        ]
    )
    try:
        assert err.wait_for(lambda line: "listening" in line, 40), err.lines
        time.sleep(1.0)  # PUB/SUB drops what is sent before the subscription is made
        rng = np.random.default_rng(0)
        frames = {0.01 * k: rng.poisson(5.0, (32, 32)).astype(np.float32) for k in range(8)}
        docs = documents(frames)
        for name, doc in docs:
            sender.send(b" " + name.encode() + b" " + serializer(doc))
        _wait_for_a_task(Client, address)
        scheduler.kill()
        scheduler.wait(timeout=10)
        killed = time.monotonic()
        serve.wait(timeout=30)
        assert time.monotonic() - killed < 20
    finally:
        sender.close(linger=0)
        context.term()
        end(serve, scheduler)
    assert serve.returncode == SCHEDULER_LOST != 0, err.lines
    (line,) = out.lines  # the scan in hand, reported through the publishers' failure hook
    report = json.loads(line)
    assert report["uid"] == docs[0][1]["uid"] and report["status"] == "not reconstructed"
    assert "CancelledError" in report["message"] and "scheduler" in report["message"]
    lost = [line for line in err.lines if "lost the Dask scheduler" in line]
    assert lost == [
        f"bcdi-bluesky serve: lost the Dask scheduler at {address} (no answer within the "
        "client's reconnect window); exiting so the service manager can restart serve\n"
    ], err.lines
