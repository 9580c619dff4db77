"""Reading and writing files, and the `bcdi-bluesky reconstruct` command as a user runs it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from builders import CLI, free_port, run_cli

from bcdi_bluesky import read_intensity
from bcdi_bluesky.io import DataError
from bcdi_bluesky.pipeline import TIMING_KEYS

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return rng.poisson(5.0, size=(16, 18, 20)).astype(np.float32) + 1


@pytest.fixture
def peaked(volume):
    """``volume`` with a smooth Bragg peak: counts that the pipeline accepts."""
    grids = np.ogrid[tuple(slice(0, s) for s in volume.shape)]
    r2 = sum((g - s // 2) ** 2 for g, s in zip(grids, volume.shape, strict=True))
    return volume + np.round(400 * np.exp(-r2 / 4.0)).astype(np.float32)


def test_every_input_format_reads_the_same_volume(tmp_path, volume):
    mask = np.ones(volume.shape, dtype=bool)
    mask[:, :, 3] = False
    np.save(tmp_path / "a.npy", volume)
    np.savez(tmp_path / "b.npz", intensity=volume, mask=mask)
    np.savez(tmp_path / "b2.npz", intensity=volume, mask=mask[0])  # one frame's mask
    tifffile.imwrite(tmp_path / "c.tif", volume)
    with h5py.File(tmp_path / "d.cxi", "w") as f:
        f["entry_1/data_1/data"] = volume
        f["entry_1/instrument_1/detector_1/mask"] = (~mask[0]).astype(np.uint32)  # CXI: 0 = good
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["scan/frames"] = volume.astype(">f4")  # big-endian, as some writers store it
    cases = [("a.npy", None), ("b.npz", mask), ("b2.npz", mask), ("c.tif", None), ("d.cxi", mask)]
    for name, expect_mask in cases:
        data, m = read_intensity(tmp_path / name)
        np.testing.assert_array_equal(data, volume)
        if expect_mask is None:
            assert m is None
        else:
            np.testing.assert_array_equal(m, expect_mask)
    data, _ = read_intensity(tmp_path / "e.h5", dataset="scan/frames")
    assert data.dtype == np.float32 and data.dtype.byteorder in "=<|"
    np.testing.assert_array_equal(data, volume)


def test_bad_files_are_clear_errors(tmp_path, volume):
    with pytest.raises(DataError, match="no such file"):
        read_intensity(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="unsupported"):
        read_intensity(tmp_path / "x.txt")
    (tmp_path / "broken.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"not a \.npy file"):
        read_intensity(tmp_path / "broken.npy")
    np.savez(tmp_path / "nokey.npz", frames=volume)
    with pytest.raises(DataError, match="no 'intensity'"):
        read_intensity(tmp_path / "nokey.npz")
    for shape in ((2, 2, 2), volume.shape[:2]):  # not the volume's, nor a frame's
        np.savez(tmp_path / "badmask.npz", intensity=volume, mask=np.ones(shape, dtype=bool))
        with pytest.raises(DataError, match="mask has shape"):
            read_intensity(tmp_path / "badmask.npz")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DataError, match="no intensity dataset"):
        read_intensity(tmp_path / "empty.h5")


def test_reconstruct_json_and_outputs(tmp_path, scan54_64):
    np.save(tmp_path / "scan.npy", scan54_64)
    # The budget is a cap (about 1 s is used on an idle 2-core machine): room for a loaded one.
    run = run_cli(
        "reconstruct",
        "scan.npy",
        "--refine",
        "es",
        "--json",
        "--output",
        "r.cxi",
        "--plot",
        "r.png",
        "--es-time-budget-s",
        "30",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout  # exactly one JSON object on stdout
    report = json.loads(lines[0])
    assert tuple(report["timings_s"]) == TIMING_KEYS
    assert report["provider"] == "CPUExecutionProvider" and report["model"] == "bcdi_cnn64"
    assert (report["device"], report["array_library"]) == ("cpu", "numpy")
    assert 0 < report["chi"] < report["stage_chi"]["cnn"]
    assert len(report["latent_xy"]) == 2 and report["latent_distance"] > 0
    # Flagged by the latent distance or by the CNN's fit, and then the verdict says which.
    assert report["out_of_distribution"] is (
        report["latent_distance"] > 1
        or any("CNN fit unusual" in r for r in report["quality_reasons"])
    )
    assert report["quality"] in ("good", "fair", "poor")
    with h5py.File(tmp_path / "r.cxi") as f:
        obj = f["entry_1/image_1/data"][()]
        assert obj.dtype == np.complex64 and obj.shape == scan54_64.shape
        assert f["support"].dtype == bool and f["params"].shape == f["param_names"].shape
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r_latent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = run_cli("reconstruct", "scan.npy", "--refine", "none", "--output", "r.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # The plain report carries the verdict and its reasons too, not only --json.
    with np.load(tmp_path / "r.npz") as z:
        verdict = json.loads(str(z["summary"]))
    assert f"  quality: {verdict['quality']}" in run.stdout.splitlines()
    for reason in verdict["quality_reasons"]:
        assert f"    - {reason}" in run.stdout.splitlines()
    with np.load(tmp_path / "r.npz") as z:
        assert z["object"].dtype == np.complex64 and z["support"].shape == scan54_64.shape
        assert json.loads(str(z["summary"]))["refine"] == "none"


@pytest.mark.parametrize(
    "content, match",
    [
        (np.ones((4, 4)), "3D"),
        (np.full((8, 8, 8), np.nan), "NaN"),
        (-np.ones((8, 8, 8)), "negative"),
        (np.zeros((8, 8, 8)), "empty"),
        (np.full((8, 8, 8), 1e300), "beyond float32's range"),
        (None, "no such file"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, content, match):
    if content is not None:
        np.save(tmp_path / "in.npy", content)
    run = run_cli("reconstruct", "in.npy", "--json", cwd=tmp_path)
    assert run.returncode != 0
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and match in run.stderr


def test_bad_output_suffix_and_missing_model(tmp_path, scan54_64):
    np.save(tmp_path / "scan.npy", scan54_64)
    run = run_cli("reconstruct", "scan.npy", "--refine", "none", "--output", "r.txt", cwd=tmp_path)
    assert run.returncode != 0 and "unsupported output" in run.stderr
    run = run_cli("reconstruct", "scan.npy", "--model", "nothing.onnx", cwd=tmp_path)
    assert run.returncode != 0 and "nothing.onnx" in run.stderr
    assert "Traceback" not in run.stderr


def _one_line_error(run, *words):
    """A refused command: non-zero exit, nothing on stdout, one stderr line naming ``words``."""
    assert run.returncode != 0, run.stdout
    assert run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


def test_output_or_plot_onto_the_input_is_refused_and_the_data_survive(tmp_path, volume):
    with h5py.File(tmp_path / "scan.cxi", "w") as f:
        f["entry_1/data_1/data"] = volume
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    (tmp_path / "geometry.h5").write_bytes((EXAMPLE_DATA / "S0054_geometry.json").read_bytes())
    measured = {
        name: (tmp_path / name).read_bytes() for name in ("scan.cxi", "stack.tif", "geometry.h5")
    }
    for args, words in (
        (("scan.cxi", "-o", "scan.cxi"), ("--output scan.cxi is the input file",)),
        (("scan.cxi", "-o", "./sub/../scan.cxi"), ("is the input file",)),
        (("stack.tif", "--plot", "stack.tif"), ("--plot stack.tif is the input file",)),
        (
            ("scan.cxi", "--geometry", "geometry.h5", "-o", "geometry.h5"),
            ("--output geometry.h5 is the geometry file",),
        ),
    ):
        (tmp_path / "sub").mkdir(exist_ok=True)
        _one_line_error(run_cli("reconstruct", *args, "--refine", "none", cwd=tmp_path), *words)
    assert {name: (tmp_path / name).read_bytes() for name in measured} == measured


def test_plot_and_output_errors_are_one_line_and_leave_no_partial_file(tmp_path, peaked):
    np.save(tmp_path / "in.npy", peaked)
    run = run_cli(
        "reconstruct", "in.npy", "--refine", "none", "-o", "r.npz", "--plot", "r.docx", cwd=tmp_path
    )
    _one_line_error(run, "--plot r.docx: unsupported figure type", ".png")
    assert not (tmp_path / "r.npz").exists()  # refused before any work
    (tmp_path / "taken").write_text("a file, not a folder")
    for option in ("--plot", "-o"):
        name = "taken/fig.png" if option == "--plot" else "taken/r.npz"
        run = run_cli(
            "reconstruct", "in.npy", "--refine", "none", "--json", option, name, cwd=tmp_path
        )
        _one_line_error(run, "taken", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "taken"]


def test_destinations_are_checked_before_any_work(tmp_path, peaked):
    np.save(tmp_path / "in.npy", peaked)
    (tmp_path / "taken").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    (tmp_path / "figure.png").mkdir()
    for args, words in (
        (("-o", "taken/sub/r.npz"), ("--output taken/sub/r.npz: cannot write", "taken is a file")),
        (("--plot", "figure.png"), ("--plot figure.png: is a folder",)),
        (("-o", "folder"), ("--output folder: is a folder",)),
        (("--dataset", "entry_1/data"), ("in.npy", "applies to HDF5 files only")),
    ):
        run = run_cli("reconstruct", "in.npy", "--refine", "none", *args, cwd=tmp_path)
        _one_line_error(run, *words)
    _one_line_error(
        run_cli("reconstruct", "folder", cwd=tmp_path), "folder: is a folder, not a file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "folder", "in.npy", "taken"]


def test_a_figure_that_fails_takes_the_result_file_with_it(tmp_path, peaked, monkeypatch, capsys):
    """The checks pass, then the disk fills while the figure is written: nothing is kept."""
    import bcdi_bluesky.plotting
    from bcdi_bluesky.cli import main

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bcdi_bluesky.plotting, "plot_reconstruction", full_disk)
    np.save(tmp_path / "in.npy", peaked)
    out, fig = tmp_path / "r.npz", tmp_path / "r.png"
    args = ["reconstruct", str(tmp_path / "in.npy"), "--refine", "none", "--json", "-o", str(out)]
    assert main([*args, "--plot", str(fig)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "No space left on device" in line and line.endswith("nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--es-time-budget-s", "-1", "es_time_budget_s = -1.0 is outside its limits 0 .. 30 s"),
        ("--es-time-budget-s", "nan", "es_time_budget_s must be finite"),
        ("--polish-time-budget-s", "5000", "outside its limits"),
        ("--es-coarse-iterations", "100000", "es_coarse_iterations = 100000 is outside"),
    ],
)
def test_settings_options_are_validated_by_the_settings(tmp_path, volume, option, value, words):
    np.save(tmp_path / "in.npy", volume)
    run = run_cli("reconstruct", "in.npy", option, value, "-o", "r.npz", cwd=tmp_path)
    _one_line_error(run, words)
    assert not (tmp_path / "r.npz").exists()


def test_an_unknown_device_is_one_line_and_no_output(tmp_path, volume):
    np.save(tmp_path / "in.npy", volume)
    run = run_cli("reconstruct", "in.npy", "--device", "tpu", "-o", "r.npz", cwd=tmp_path)
    _one_line_error(run, "device must be one of ('auto', 'cpu', 'cuda') or 'cuda:N'")
    assert not (tmp_path / "r.npz").exists()


def test_every_setting_is_an_option_of_reconstruct():
    from bcdi_bluesky import ReconstructionSettings
    from bcdi_bluesky.cli import build_parser, settings_from_args

    parser = build_parser()
    args = parser.parse_args(["reconstruct", "x.npy"])
    assert settings_from_args(args) == ReconstructionSettings()
    given = []
    for info in ReconstructionSettings.fields_info():
        option = "--" + info.name.replace("_", "-")
        given += [option] if info.kind is bool else [option, str(info.high)]
    changed = settings_from_args(parser.parse_args(["reconstruct", "x.npy", *given]))
    for info in ReconstructionSettings.fields_info():
        assert getattr(changed, info.name) == (True if info.kind is bool else info.high)
    # A switch on by default is turned off with --no-NAME.
    flags = [i for i in ReconstructionSettings.fields_info() if i.kind is bool]
    assert any(i.default for i in flags)
    off = ["--no-" + i.name.replace("_", "-") for i in flags]
    cleared = settings_from_args(parser.parse_args(["reconstruct", "x.npy", *off]))
    assert not any(getattr(cleared, i.name) for i in flags)


def test_a_volume_too_large_for_the_memory_left_is_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.ones((128, 128, 128), dtype=np.float32))
    # The address space this process may still use, capped at 64 MiB more than it holds after
    # its imports: less than the ~130 MiB a 128^3 reconstruction needs.
    code = (
        "import resource, sys\n"
        "import h5py, tifffile\n"
        "from bcdi_bluesky import cli\n"
        "import bcdi_bluesky.io\n"
        "pages = int(open('/proc/self/statm').read().split()[0])\n"
        "cap = pages * resource.getpagesize() + 64 * 2**20\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (cap, hard))\n"
        "sys.exit(cli.main(['reconstruct', 'big.npy', '-o', 'r.npz']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    _one_line_error(run, "big.npy: a 128x128x128 volume needs about 0.1 GiB", "--no-memory-check")
    assert not (tmp_path / "r.npz").exists()


def test_only_bcdi_errors_become_one_line_messages(tmp_path, monkeypatch, capsys):
    import bcdi_bluesky.io
    from bcdi_bluesky.cli import main
    from bcdi_bluesky.errors import DataError

    def broken(path, dataset=None):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(bcdi_bluesky.io, "read_intensity", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["reconstruct", str(tmp_path / "x.npy")])

    def refused(path, dataset=None):
        raise DataError(f"{path}: not a diffraction volume")

    monkeypatch.setattr(bcdi_bluesky.io, "read_intensity", refused)
    assert main(["reconstruct", str(tmp_path / "x.npy")]) == 2
    assert capsys.readouterr().err.strip().endswith("x.npy: not a diffraction volume")


def test_the_user_guide_settings_table_is_the_generated_one():
    from pathlib import Path

    from bcdi_bluesky.cli import settings_table

    guide = Path(__file__).resolve().parent.parent / "docs" / "user_guide.md"
    assert settings_table() in guide.read_text(), "regenerate with bcdi_bluesky.cli.settings_table"


def test_sigterm_ends_reconstruct_in_one_line_and_leaves_no_file(tmp_path, scan54_64):
    """A batch system's SIGTERM: the command's cleanup runs (no temporary file beside the
    output), one line says so, exit status 128 + 15."""
    import os
    import signal
    import time

    np.save(tmp_path / "scan.npy", scan54_64)
    proc = subprocess.Popen(
        [*CLI, "reconstruct", "scan.npy", "-o", "r.cxi"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()  # a stage's progress line: the work has begun
        assert first, proc.communicate(timeout=60)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "bcdi-bluesky reconstruct: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npy"]


def test_tiff_frames_appended_one_by_one_are_one_volume(tmp_path, volume):
    """tifffile writes each appended frame as its own series; imread would give frame 0."""
    for frame in volume:
        tifffile.imwrite(tmp_path / "frames.tif", frame, append=True)
    data, _ = read_intensity(tmp_path / "frames.tif")
    np.testing.assert_array_equal(data, volume.astype(np.float32))


def test_hdf5_dataset_takes_only_its_own_mask_and_a_miss_names_the_volumes(tmp_path, volume):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["scan/frames"] = volume
        f["mask"] = np.zeros((2, 2, 2), dtype=bool)  # another dataset's mask, at a usual place
    data, mask = read_intensity(path, "/scan/frames")
    assert data.shape == volume.shape and mask is None
    with h5py.File(path, "a") as f:
        f["scan/mask"] = np.zeros(volume.shape, dtype=np.uint8)  # CXI: 0 = valid
    assert read_intensity(path, "scan/frames")[1].all()
    with pytest.raises(DataError, match=r"--dataset\); 3D datasets in it: scan/frames"):
        read_intensity(path)


def test_a_file_that_is_not_what_its_name_says_is_refused_without_unpickling(tmp_path, volume):
    with h5py.File(tmp_path / "scan.npy", "w") as f:  # an HDF5 file named .npy
        f["data"] = volume
    with pytest.raises(DataError, match=r"not a \.npy file"):
        read_intensity(tmp_path / "scan.npy")


def test_a_numpy_masked_array_keeps_its_mask(scan54_64):
    from bcdi_bluesky.pipeline import prepare_measurement

    hidden = np.zeros(scan54_64.shape, dtype=bool)
    hidden[:, :, :4] = True
    masked = prepare_measurement(np.ma.masked_array(scan54_64, mask=hidden), None, 64)
    assert not masked.valid[:, :, :4].any() and masked.valid[:, :, 4:].any()
    extra = np.ones(scan54_64.shape, dtype=bool)
    extra[:4] = False
    both = prepare_measurement(np.ma.masked_array(scan54_64, mask=hidden), extra, 64)
    assert not both.valid[:4].any() and not both.valid[:, :, :4].any()


def test_the_commands_log_lines_cannot_be_forged():
    """Text from a run or a client with a newline stays on its line of the log."""
    import logging

    from bcdi_bluesky.cli import _OneLineFormatter

    record = logging.LogRecord(
        "bcdi_bluesky", logging.INFO, __file__, 1, "scan %s done", ("7\nERROR: forged",), None
    )
    assert _OneLineFormatter("%(levelname)s: %(message)s").format(record) == (
        "INFO: scan 7\\nERROR: forged done"
    )


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    from bcdi_bluesky.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"bcdi-bluesky {version('bcdi-bluesky')}"


def _commands() -> list[str]:
    from bcdi_bluesky.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if a.choices and a.dest == "command"]
    return sorted(subparsers.choices)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", _commands())
def test_every_command_prints_its_help(command, capsys):
    """Every option's help text formats (argparse reads ``%`` in it as a format code)."""
    from bcdi_bluesky.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: bcdi-bluesky {command} ")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["reconstruct", "x.npy", "--outptu", "x.cxi"],
            "bcdi-bluesky reconstruct: error: unrecognized arguments: --outptu x.cxi",
        ),
        (["reconstruct"], "bcdi-bluesky reconstruct: error: the following arguments are required"),
        (
            ["reprocess", "--tiled", "http://127.0.0.1:9", "--dask", "foo:bar"],
            "bcdi-bluesky reprocess: error: argument --dask: not a scheduler address",
        ),
        (["serve", "--zmq", "127.0.0.1:5578", "--dask", "http://127.0.0.1:8786"], "--dask"),
        (
            ["demo", "--prefix", "bad prefix"],
            "PV prefix 'bad prefix': a PV name holds printable ASCII",
        ),
        (["ioc", "--prefix", "BCDI.X:"], "PV prefix 'BCDI.X:'"),
        (["demo", "--linger", "-5"], "argument --linger: must be finite and at least 0"),
    ],
)
def test_a_mistyped_command_line_is_one_line_from_its_command(argv, expected, capsys):
    """Refused before anything is made (no Tiled or Dask connection): one line, from the
    command's own parser, that points to its --help; exit status 2."""
    from bcdi_bluesky.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert expected in line and line.endswith(f"(bcdi-bluesky {argv[0]} --help lists the options)")


@pytest.mark.timeout(60)
def test_the_demo_refuses_an_output_folder_it_cannot_make_before_any_scan(tmp_path, capsys):
    from bcdi_bluesky.cli import main

    taken = tmp_path / "a_file"
    taken.write_text("kept")
    assert main(["demo", "--output", str(taken)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"bcdi-bluesky demo: error: --output {taken}: cannot make the folder")
    assert taken.read_text() == "kept"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:{port}", "Connection refused"),
        ("127.0.0.1:{port}", "not an http:// or https:// address"),
        ("http://127.0.0.1:99999", "Port out of range"),
    ],
)
def test_a_tiled_address_nobody_answers_at_is_one_line_at_once(url, why, capsys):
    """Told before the tiled client's own retries (tens of seconds, and a line of its own)."""
    from bcdi_bluesky.cli import main

    url = url.format(port=free_port())
    started = time.monotonic()
    assert main(["reprocess", "--tiled", url]) == 2
    assert time.monotonic() - started < 10
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"bcdi-bluesky reprocess: error: cannot connect to Tiled at {url}: ")
    assert why in line
