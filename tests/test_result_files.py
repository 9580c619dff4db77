"""Result files are written atomically: complete, or not at all, and never a crash."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from bcdi_bluesky import DataError, Reconstructor, write_result
from bcdi_bluesky.io import atomic_write_bytes

SCAN54 = Path(__file__).resolve().parents[1] / "examples" / "data" / "S0054_intensity_64.npy"


@pytest.fixture(scope="module")
def result(scan54_64):
    return Reconstructor().reconstruct(scan54_64, refine="none")


@pytest.mark.parametrize("suffix", [".npz", ".cxi"])
def test_written_files_hold_the_result(tmp_path, result, suffix):
    path = write_result(result, tmp_path / "sub" / f"r{suffix}", {"input": "scan54"})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    if suffix == ".npz":
        with np.load(path) as z:
            obj, support, summary = z["object"], z["support"], str(z["summary"])
    else:
        with h5py.File(path, "r") as f:
            obj, support = f["entry_1/image_1/data"][()], f["entry_1/image_1/mask"][()]
            summary = f["entry_1/image_1/process_1/summary"][()].decode()
    np.testing.assert_array_equal(obj, result.object)
    np.testing.assert_array_equal(support, result.support)
    meta = json.loads(summary)
    assert meta["input"] == "scan54" and meta["chi"] == pytest.approx(result.chi)


def test_replacing_a_file_is_all_or_nothing(tmp_path):
    target = tmp_path / "r.npz"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    # A folder that cannot be made (its parent is a file): one line, nothing written.
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write") as caught:
        atomic_write_bytes(tmp_path / "plain" / "r.npz", b"x" * 10)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.npz"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".npz", ".cxi"])
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, suffix):
    # A file-size limit makes the disk "full" for this process alone; SIGXFSZ is ignored so
    # that the write fails with EFBIG as it would with ENOSPC.
    script = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        from bcdi_bluesky import DataError, Reconstructor, write_result
        result = Reconstructor().reconstruct(np.load(sys.argv[1]), refine="none")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            write_result(result, sys.argv[2])
        except DataError as exc:
            print("DataError:", exc)
            sys.exit(3)
        sys.exit(0)
    """)
    out = tmp_path / f"r{suffix}"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(SCAN54), str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "cannot write" in proc.stdout and "nothing was written" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_of_a_new_file(tmp_path, result, umask, mask, mode):
    """As open() would make them (0o666 less the umask): a beamline group can read the results
    where the umask lets it, a replaced file included."""
    umask(mask)
    written = [
        atomic_write_bytes(tmp_path / "a.json", b"{}"),
        write_result(result, tmp_path / "r.cxi"),
        write_result(result, tmp_path / "r.cxi"),  # replacing an existing file
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_figures_are_written_atomically(tmp_path, result):
    from bcdi_bluesky.plotting import plot_reconstruction

    path = plot_reconstruction(result, tmp_path / "figs" / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["r.png"]  # no temporary left
    svg = plot_reconstruction(result, tmp_path / "figs" / "r.svg")
    assert b"<svg" in svg.read_bytes()[:1000]
    # A folder that cannot be made: one clear error, nothing written, the figure closed.
    (tmp_path / "plain").write_text("not a folder")
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    with pytest.raises(DataError, match="cannot write"):
        plot_reconstruction(result, tmp_path / "plain" / "r.png")
    assert len(plt.get_fignums()) == open_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "plain"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from bcdi_bluesky.files import atomic_path

    target = tmp_path / "last.pt"
    target.write_bytes(b"old checkpoint")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a checkpo")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new checkpoint")
    assert target.read_bytes() == b"new checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
