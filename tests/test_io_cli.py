"""Reading and writing files, and the `bcdi-bluesky reconstruct` command as a user runs it."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile

from bcdi_bluesky import read_intensity
from bcdi_bluesky.io import DataError


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return rng.poisson(5.0, size=(16, 18, 20)).astype(np.float32) + 1


def test_every_input_format_reads_the_same_volume(tmp_path, volume):
    mask = np.ones(volume.shape, dtype=bool)
    mask[:, :, 3] = False
    np.save(tmp_path / "a.npy", volume)
    np.savez(tmp_path / "b.npz", intensity=volume, mask=mask)
    tifffile.imwrite(tmp_path / "c.tif", volume)
    with h5py.File(tmp_path / "d.cxi", "w") as f:
        f["entry_1/data_1/data"] = volume
        f["entry_1/instrument_1/detector_1/mask"] = (~mask[0]).astype(np.uint32)  # CXI: 0 = good
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["scan/frames"] = volume.astype(">f4")  # big-endian, as some writers store it
    for name, expect_mask in (("a.npy", None), ("b.npz", mask), ("c.tif", None),
                              ("d.cxi", mask)):
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
    with pytest.raises(DataError, match="cannot read"):
        read_intensity(tmp_path / "broken.npy")
    np.savez(tmp_path / "nokey.npz", frames=volume)
    with pytest.raises(DataError, match="no 'intensity'"):
        read_intensity(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badmask.npz", intensity=volume, mask=np.ones((2, 2, 2), dtype=bool))
    with pytest.raises(DataError, match="mask"):
        read_intensity(tmp_path / "badmask.npz")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DataError, match="no intensity dataset"):
        read_intensity(tmp_path / "empty.h5")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bcdi_bluesky.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=240, cwd=cwd)


def test_reconstruct_json_and_outputs(tmp_path, scan54_64):
    np.save(tmp_path / "scan.npy", scan54_64)
    run = _cli("reconstruct", "scan.npy", "--refine", "es", "--json", "--output", "r.cxi",
               "--plot", "r.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout  # exactly one JSON object on stdout
    report = json.loads(lines[0])
    assert set(report["timings_s"]) == {"preprocess", "inference", "refine", "polish", "total"}
    assert report["provider"] == "CPUExecutionProvider" and report["model"] == "bcdi_cnn64"
    assert 0 < report["chi"] < report["stage_chi"]["cnn"]
    assert len(report["latent_xy"]) == 2 and report["latent_distance"] > 0
    assert report["out_of_distribution"] is (report["latent_distance"] > 1)
    with h5py.File(tmp_path / "r.cxi") as f:
        obj = f["entry_1/image_1/data"][()]
        assert obj.dtype == np.complex64 and obj.shape == scan54_64.shape
        assert f["support"].dtype == bool and f["params"].shape == f["param_names"].shape
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r_latent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = _cli("reconstruct", "scan.npy", "--refine", "none", "--output", "r.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "r.npz") as z:
        assert z["object"].dtype == np.complex64 and z["support"].shape == scan54_64.shape
        assert json.loads(str(z["summary"]))["refine"] == "none"


@pytest.mark.parametrize("content, match", [
    (np.ones((4, 4)), "3D"),
    (np.full((8, 8, 8), np.nan), "NaN"),
    (-np.ones((8, 8, 8)), "negative"),
    (np.zeros((8, 8, 8)), "empty"),
    (None, "no such file"),
])
def test_bad_input_exits_nonzero_with_one_line(tmp_path, content, match):
    if content is not None:
        np.save(tmp_path / "in.npy", content)
    run = _cli("reconstruct", "in.npy", "--json", cwd=tmp_path)
    assert run.returncode != 0
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and match in run.stderr


def test_bad_output_suffix_and_missing_model(tmp_path, scan54_64):
    np.save(tmp_path / "scan.npy", scan54_64)
    run = _cli("reconstruct", "scan.npy", "--refine", "none", "--output", "r.txt",
               cwd=tmp_path)
    assert run.returncode != 0 and "unsupported output" in run.stderr
    run = _cli("reconstruct", "scan.npy", "--model", "nothing.onnx", cwd=tmp_path)
    assert run.returncode != 0 and "nothing.onnx" in run.stderr
    assert "Traceback" not in run.stderr
