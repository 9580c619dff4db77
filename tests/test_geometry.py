"""The diffraction geometry against an independent implementation (xrayutilities with the circle
conventions of cohere-beamlines), and its contract: presets, JSON keys, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bcdi_bluesky.physics import PRESETS, Geometry, geometry_from_start

# Not imported from conftest: importing it a second time would reset the session's EPICS ports.
REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "data"

SCAN54_GEOMETRY = EXAMPLE_DATA / "S0054_geometry.json"


@pytest.fixture(scope="module")
def scan54() -> Geometry:
    return Geometry.from_json(SCAN54_GEOMETRY)


def _cohere_34idc_axes():
    """The 34-ID-C circles and Timepix pixel orientation as cohere-beamlines defines them
    (read from the package when it is installed; these are its values in 4.5.6)."""
    try:
        from cohere_beamlines.aps_34idc.detectors import Detector_34idcTIM2
        from cohere_beamlines.aps_34idc.diffractometers import Diffractometer
    except ImportError:
        return ("y+", "z-", "y+"), ("y+", "x-"), (0, 0, 1), ("x+", "y-")
    d = Diffractometer()
    return d.sampleaxes, d.detectoraxes, d.incidentaxis, Detector_34idcTIM2.pixelorientation


def _xrayutilities_basis(g: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """cohere's recipe (Trecip from a 2x2-pixel, 2-frame ``QConversion.area``, turned into the
    lab frame, then ``Tdir = 2 pi inv(Trecip)^T``), divided by the shape."""
    xu = pytest.importorskip("xrayutilities")
    sample_axes, detector_axes, incident, pixels = _cohere_34idc_axes()
    qc = xu.experiment.QConversion(sample_axes, detector_axes, incident, en=g.energy_kev * 1000.0)
    # cohere's frames are the transpose of ours: its first pixel axis is our column.
    qc.init_area(
        pixels[0],
        pixels[1],
        cch1=0.5,
        cch2=0.5,
        Nch1=2,
        Nch2=2,
        distance=g.detector_distance_m,
        pwidth1=g.pixel_size_m[1],
        pwidth2=g.pixel_size_m[0],
    )
    a = g.sample_angles_deg
    th = a["theta"]
    q2 = np.array(
        qc.area(
            np.array([th, th + g.rocking_step_deg]),
            a["chi"],
            a["phi"],
            g.detector_angles_deg["delta"],
            g.detector_angles_deg["gamma"],
            deg=True,
        )
    )
    column = q2[:, 0, 1, 0] - q2[:, 0, 0, 0]
    row = q2[:, 0, 0, 1] - q2[:, 0, 0, 0]
    rock = q2[:, 1, 0, 0] - q2[:, 0, 0, 0]
    lab = [qc.transformSample2Lab(v, th, a["chi"], a["phi"]) * 10.0 for v in (rock, row, column)]
    recip = np.stack(lab, axis=1) * np.asarray(shape, dtype=float)[None, :]
    return 2 * math.pi * np.linalg.inv(recip).T


@pytest.mark.parametrize("shape", [(64, 64, 64), (128, 128, 128), (64, 96, 80)])
def test_scan54_voxel_basis_matches_xrayutilities(scan54, shape):
    ours = scan54.voxel_basis_nm(shape)
    ref = _xrayutilities_basis(scan54, shape)
    assert np.linalg.det(ours) == pytest.approx(np.linalg.det(ref), rel=0.02)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=0), np.linalg.norm(ref, axis=0), rtol=0.02)
    # Not only the sizes: the same lab vectors (to 1% of the longest).
    assert np.abs(ours - ref).max() < 0.01 * np.linalg.norm(ref, axis=0).max()


def test_scan54_figures(scan54):
    """The non-orthogonal sampling of 34-ID-C scan 54: Q tilted about 22 degrees out of the
    horizontal plane, in-plane steps of about 20.1 nm (not lambda D / (N p) = 19.6 nm), and
    |Q| consistent with Au 111."""
    q = scan54.q_bragg_inv_nm
    tilt = math.degrees(math.asin(q[1] / np.linalg.norm(q)))
    assert 21 < tilt < 23
    lengths = np.linalg.norm(scan54.voxel_basis_nm((64, 64, 64)), axis=0)
    naive = scan54.wavelength_nm * scan54.detector_distance_m / (64 * 55e-6)
    assert naive == pytest.approx(19.57, abs=0.01)
    assert lengths[1:] == pytest.approx([20.05, 20.17], abs=0.02)
    d111 = scan54.lattice_constant_nm / math.sqrt(3)
    assert scan54.d_spacing_nm() == pytest.approx(d111, rel=0.015)
    # The basis is the dual of the reciprocal steps.
    steps = scan54.q_steps_inv_nm() * 64
    np.testing.assert_allclose(
        scan54.voxel_basis_nm((64, 64, 64)).T @ steps, 2 * math.pi * np.eye(3), atol=1e-9
    )


def test_axis_order_permutes_the_basis(scan54):
    data = scan54.to_dict()
    data["axes"] = ["detector_column", "rocking", "detector_row"]
    permuted = Geometry.from_dict(data).voxel_basis_nm((64, 64, 64))
    base = scan54.voxel_basis_nm((64, 64, 64))
    np.testing.assert_allclose(permuted, base[:, [2, 0, 1]], atol=1e-9)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_a_bragg_geometry(name):
    preset = PRESETS[name]
    sample = {n: 0.0 for n, _ in preset.sample_circles}
    detector = dict(zip([n for n, _ in preset.detector_circles], (30.0, 10.0), strict=False))
    g = Geometry(
        beamline=name,
        energy_kev=9.0,
        detector_distance_m=1.0,
        pixel_size_m=(55e-6, 55e-6),
        sample_angles_deg=sample,
        detector_angles_deg=detector,
        rocking_axis=preset.sample_circles[0][0],
        rocking_step_deg=0.01,
    )
    q = np.linalg.norm(g.q_bragg_inv_nm)
    two_theta = math.acos(math.cos(math.radians(30)) * math.cos(math.radians(10)))
    assert q == pytest.approx(2 * g.k_inv_nm * math.sin(two_theta / 2), rel=1e-9)
    basis = g.voxel_basis_nm((32, 32, 32))
    assert abs(np.linalg.det(basis)) > 0


def test_json_round_trip_and_errors(tmp_path, scan54):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(scan54.to_dict()))
    assert Geometry.from_json(path) == scan54
    with pytest.raises(ValueError, match="unknown geometry keys"):
        Geometry.from_dict({**scan54.to_dict(), "energy": 9})
    with pytest.raises(ValueError, match="not one of"):
        Geometry.from_dict({**scan54.to_dict(), "beamline": "nowhere"})
    with pytest.raises(ValueError, match="energy_kev must be a positive"):
        Geometry.from_dict({**scan54.to_dict(), "energy_kev": -1})
    with pytest.raises(ValueError, match="rocking_axis"):
        Geometry.from_dict({**scan54.to_dict(), "rocking_axis": "delta"})
    with pytest.raises(ValueError, match="lacks"):
        Geometry.from_dict({"beamline": "aps_34idc"})
    with pytest.raises(ValueError, match="direct beam"):
        Geometry.from_dict({**scan54.to_dict(), "detector_angles_deg": {}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Geometry.from_json(bad)
    # A file gives what sets the voxel sizes, each key once.
    for key in ("rocking_step_deg", "rocking_axis", "detector_angles_deg"):
        bad.write_text(json.dumps({k: v for k, v in scan54.to_dict().items() if k != key}))
        with pytest.raises(ValueError, match=rf"geometry lacks \['{key}'\]"):
            Geometry.from_json(bad)
    renamed = {**scan54.to_dict(), "energy_ev": 9000.0}
    del renamed["energy_kev"]
    bad.write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match=r"unknown geometry keys \['energy_ev'\]"):
        Geometry.from_json(bad)  # the unknown name is said first: it is the likely slip
    bad.write_bytes(np.arange(4, dtype=np.float32).tobytes() + b"\x93\xff")
    with pytest.raises(ValueError, match="not a JSON text file"):
        Geometry.from_json(bad)
    bad.write_text('{"energy_kev": 9.0, "energy_kev": 90.0}')
    with pytest.raises(ValueError, match="'energy_kev' given twice"):
        Geometry.from_json(bad)


@pytest.mark.parametrize(
    "change",
    [
        {"detector_angles_deg": {"delta": 180.0, "gamma": 0.0}},  # back-reflection
        {"detector_angles_deg": {"delta": 179.5, "gamma": 0.0}},
    ],
)
def test_a_geometry_without_a_3d_voxel_basis_is_refused(scan54, change):
    """Q steps nearly in one plane: refused when the geometry is built, not as a singular
    matrix after the reconstruction (or a basis of kilometre voxels)."""
    with pytest.raises(ValueError, match="nearly in one plane"):
        Geometry.from_dict({**scan54.to_dict(), **change})


def test_numbers_read_as_arrays_are_numbers(scan54):
    """h5py reads a pair or hkl as an array."""
    g = Geometry.from_dict(
        {**scan54.to_dict(), "pixel_size_m": np.array([55e-6, 55e-6]), "hkl": np.array([1, 1, 1])}
    )
    assert g.pixel_size_m == (55e-6, 55e-6) and g.hkl == (1, 1, 1)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("energy_kev", True, "energy_kev must be a number, got True"),
        ("detector_distance_m", "0.5", "detector_distance_m must be a number"),
        ("pixel_size_m", "55e-6", "pixel_size_m must be a number"),
        ("pixel_size_m", [55e-6, 55e-6, 1.0], "pixel_size_m must be one or two numbers"),
        ("rocking_step_deg", "0.005", "rocking_step_deg must be a number"),
        ("sample_angles_deg", [1, 2], "sample_angles_deg must map circle names"),
        ("detector_angles_deg", {"delta": "x"}, r"detector_angles_deg\['delta'\] must be a"),
        ("beamline", [], "beamline must be a string"),
        ("axes", "rocking", "axes must be a list"),
        ("hkl", [1.7, 1, 1], "hkl must be three whole numbers"),
        ("hkl", [1, 1], "hkl must be three whole numbers"),
        ("hkl", "111", "hkl must be three whole numbers"),
        ("lattice_constant_nm", "0.4", "lattice_constant_nm must be a number"),
    ],
)
def test_a_loosely_typed_value_is_refused_by_its_key(scan54, key, value, match):
    """JSON and run metadata: a bool, a string or a fraction never passes as a number."""
    with pytest.raises(ValueError, match=match):
        Geometry.from_dict({**scan54.to_dict(), key: value})


def test_hkl_and_lattice_constant_are_compared_with_q(scan54, caplog):
    """Scan 54 (Au 111, 0.408 nm) agrees within 1%; a lattice constant that does not fit |Q|
    is logged, and the geometry, whose Q comes from the angles, is kept."""
    assert Geometry.from_dict({**scan54.to_dict(), "hkl": [1.0, 1.0, 1.0]}).hkl == (1, 1, 1)
    assert "lattice" not in caplog.text
    wrong = Geometry.from_dict({**scan54.to_dict(), "lattice_constant_nm": 0.9})
    assert "lattice_constant_nm is wrong" in caplog.text
    np.testing.assert_array_equal(wrong.q_bragg_inv_nm, scan54.q_bragg_inv_nm)


def test_geometry_from_the_start_document(scan54):
    assert geometry_from_start({"uid": "x"}) is None
    start = {"bcdi": {"geometry": scan54.to_dict()}}
    assert geometry_from_start(start) == scan54
    # hklpy2's record of the diffractometer: its energy and lattice take precedence.
    start["diffractometers"] = {
        "fourc": {
            "_header": {"energy": 10.0, "energy_units": "keV", "wavelength": 1.2398},
            "sample_name": "gold",
            "samples": {"gold": {"lattice": {"a": 4.0782, "b": 4.0782, "c": 4.0782}}},
        }
    }
    g = geometry_from_start(start)
    assert g.energy_kev == 10.0 and g.lattice_constant_nm == pytest.approx(0.40782)
    with pytest.raises(ValueError, match="not one of"):
        geometry_from_start({"bcdi": {"geometry": {**scan54.to_dict(), "beamline": "x"}}})


def test_binning_coarsens_the_sampling(scan54):
    """Binning 2 frames and 2x2 pixels: the same field of view on half the grid, so the same
    real-space voxel on a grid of half the size."""
    binned = scan54.with_binning(rocking=2, detector=2)
    assert binned.rocking_step_deg == pytest.approx(2 * scan54.rocking_step_deg)
    np.testing.assert_allclose(
        binned.voxel_basis_nm((32, 32, 32)), scan54.voxel_basis_nm((64, 64, 64)), rtol=1e-3
    )
