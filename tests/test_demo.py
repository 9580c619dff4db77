"""`bcdi-bluesky demo --scans 2 --json` as a newcomer runs it."""

import json

import pytest
from builders import run_cli


@pytest.mark.timeout(240)
def test_demo_json_records_and_files(tmp_path, epics_env):
    run = run_cli("demo", "--scans", 2, "--json", "--output", tmp_path / "demo", timeout=200)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout  # nothing but the JSON object on stdout
    summary = json.loads(lines[0])
    assert summary["output"] == str(tmp_path / "demo")
    first, second = summary["scans"]
    for record in (first, second):
        assert set(record) >= {
            "scan_id",
            "chi",
            "iou",
            "theta_center",
            "timings_s",
            "quality",
            "status",
            "message",
        }
    # Starts misaligned (the peak outside the range: a few counts a frame): not reconstructed,
    # and the table says why; then the loop moves onto the peak.
    assert first["chi"] is None and first["quality"] is None
    assert first["status"] != "done" and "no usable Bragg peak" in first["message"]
    assert first["max_count"] <= 20
    assert set(second["timings_s"]) >= {"preprocess", "inference", "refine", "polish", "total"}
    truth = summary["true_peak_theta"]
    assert not first["peak_inside"] and second["peak_inside"]
    assert abs(second["theta_center"] - truth) < abs(first["theta_center"] - truth) / 4
    assert second["iou"] >= 0.8
    assert second["quality"] in ("good", "fair", "poor")
    out = tmp_path / "demo"
    files = [p.name for p in out.glob("scan_*.cxi")]
    assert len(files) == 1 and files[0].startswith("scan_2_")  # nothing for scan 1
    for name in (
        "scan_2.png",
        "truth_vs_reconstruction.png",
        "es_cost.png",
        "closed_loop.png",
        "latent_map.png",
    ):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert "scan 2:" in run.stderr and "ES iteration" in run.stderr
