"""The array backend: the GPU code path (torch tensors, here on the CPU) against numpy."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage

import bcdi_bluesky.backend as backend_module
from bcdi_bluesky import Reconstructor
from bcdi_bluesky.backend import NUMPY, ArrayBackend, select_backend
from bcdi_bluesky.errors import SettingsError
from bcdi_bluesky.physics import (
    DEV_SEED,
    CrystalModel,
    beamstop_mask,
    intensity,
    out_of_family_crystal,
    simulate_counts,
)
from bcdi_bluesky.pipeline import SUBSAMPLED, polish_stage, prepare_measurement
from bcdi_bluesky.settings import FINALISTS, ReconstructionSettings
from bcdi_bluesky.tuning import ChiCost, fit_odd_shape, polish, refine_crystal
from bcdi_bluesky.tuning.phase_retrieval import shrink_wrap

torch = pytest.importorskip("torch")
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils import _pytree  # noqa: E402

TORCH = select_backend("cpu", "torch")


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on a GPU (see :class:`DeviceGuard`)."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("a device tensor converted to numpy implicitly")


class DeviceGuard(TorchFunctionMode):
    """Run the torch code path on CPU tensors as a GPU would hold them: tensors made with an
    explicit ``device=`` (as :class:`ArrayBackend` makes them) and everything computed from them
    are "on the device"; an operation that mixes them with host arrays (a torch tensor made
    without a device, a numpy array) fails, as it would on CUDA, and so does an implicit
    conversion to numpy. Host copies (``.cpu()``) leave the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = _pytree.tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        if on_device:
            if func is torch.Tensor.numpy:
                raise AssertionError(".numpy() of a device tensor")
            if func is torch.Tensor.__getitem__:  # host index tensors are allowed on CUDA
                operands = [args[0]]
            elif func is torch.Tensor.__setitem__:
                operands = [args[0], args[2]]
            else:
                operands = leaves
            host = [
                x
                for x in operands
                if (isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.ndim > 0)
                or (isinstance(x, np.ndarray) and x.ndim > 0)
            ]
            if host:
                raise AssertionError(f"{getattr(func, '__name__', func)} mixes device and host")
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or func is torch.Tensor.cpu:
            return out if type(out) is not OnDevice else out.as_subclass(torch.Tensor)
        if on_device or (not tensors and kwargs.get("device") is not None):
            return out.as_subclass(OnDevice)
        if func is torch.as_tensor and kwargs.get("device") is not None:
            return out.as_subclass(OnDevice)
        return out


@pytest.fixture(scope="module")
def measured(prior64) -> tuple[CrystalModel, np.ndarray, np.ndarray, np.ndarray]:
    """A prior crystal's noisy counts with a beamstop, and its true parameters."""
    model = prior64.model
    params = prior64.sample(np.random.default_rng(5))
    mask = beamstop_mask((64,) * 3, 2.0)
    counts = simulate_counts(model.voxelise(params), 1e8, np.random.default_rng(6), mask)
    return model, params, counts, mask


@pytest.mark.parametrize("n", [64, 33])
def test_forward_model_is_the_same_on_torch(prior64, n):
    model = prior64.model.with_grid(n)
    params = prior64.sample(np.random.default_rng(n))
    on_numpy, on_torch = model.intensity(params), model.intensity(params, TORCH)
    assert type(on_torch).__module__.startswith("torch")
    np.testing.assert_allclose(
        TORCH.to_numpy(on_torch), on_numpy, rtol=0, atol=2e-6 * on_numpy.max()
    )
    obj = model.voxelise(params, TORCH)
    # float32 sums of the shape terms in another order: about 10 units in the last place of
    # values near 1 (1.2e-6 seen on 5 of 262144 voxels).
    np.testing.assert_allclose(TORCH.to_numpy(obj), model.voxelise(params), atol=1e-5)
    far = intensity(obj, backend=TORCH)
    np.testing.assert_allclose(
        TORCH.to_numpy(far),
        intensity(model.voxelise(params)),
        rtol=1e-4,
        atol=2e-6 * on_numpy.max(),
    )


def test_chi_is_the_same_on_torch(measured):
    model, params, counts, mask = measured
    guess = params * 0.97
    numpy_chi = ChiCost(counts, mask)(model.intensity(guess))
    torch_chi = ChiCost(counts, mask, TORCH)(model.intensity(guess, TORCH))
    assert 0.01 < numpy_chi < 1
    assert abs(torch_chi - numpy_chi) < 1e-6


def test_refinement_is_the_same_on_torch(measured):
    model, params, counts, mask = measured
    start = model.clip(params + np.random.default_rng(1).normal(0, 0.02, params.size))
    runs = {}
    for backend in (NUMPY, TORCH):
        searched = fit_odd_shape(model, start, counts, mask, max_evaluations=20, backend=backend)
        refined = refine_crystal(
            model,
            searched.params,
            counts,
            mask,
            coarse_iterations=30,
            fine_iterations=10,
            backend=backend,
        )
        runs[backend.library] = (searched.chi, refined.chi)
    assert runs["numpy"][1] < runs["numpy"][0]  # the runs did something
    np.testing.assert_allclose(runs["torch"], runs["numpy"], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("partial_coherence", "hold"), [(False, False), (True, False), (False, True)]
)
def test_phase_retrieval_is_the_same_on_torch(measured, partial_coherence, hold):
    """ER/HIO (with a coherence kernel, or a uniform-amplitude hold) ends at the same fit on
    either library; a held interior ends at one amplitude, its edge keeps its own."""
    model, params, counts, mask = measured
    seed = model.voxelise(model.clip(params * 0.95))
    support = np.abs(seed) > 0.1 * np.abs(seed).max()
    interior = scipy.ndimage.binary_erosion(support, iterations=3) if hold else None
    chis = {}
    for backend in (NUMPY, TORCH):
        run = polish(
            counts,
            seed,
            support,
            mask,
            iterations=60,
            hio_fraction=0.5,
            shrink_every=0 if hold else 10,
            backend=backend,
            partial_coherence=partial_coherence,
            uniform_interior=interior,
        )
        assert run.iterations == 60
        assert (run.kernel is not None) == partial_coherence
        chis[backend.library] = ChiCost(counts, mask, backend)(run.model_intensity(backend))
        assert isinstance(run.object, np.ndarray) == backend.is_numpy
        if hold:
            amplitude = np.abs(backend.to_numpy(run.object))
            held = amplitude[interior]
            assert held.std() <= 1e-5 * held.mean()
            assert amplitude[support & ~interior].std() > 0.1 * held.mean()
    assert chis["numpy"] < 0.2
    assert abs(chis["torch"] - chis["numpy"]) <= 1e-3


def test_over_relaxed_er_fits_further_in_as_many_steps_on_every_library():
    """Noise-free data with a detector gap, from the blurred crystal on its shrink-wrap support
    (fixed), where plain ER creeps: ER over-relaxed by 1.8 ends at a lower chi after the same
    steps, on numpy (the transforms within the support's box) and torch (the whole volume)
    alike; factors from 2 on, and relaxation with HIO or shrink-wrap, are refused."""
    crystal = out_of_family_crystal(DEV_SEED, 3)
    assert crystal.noise_free and crystal.mask is not None
    counts, mask = crystal.measured, crystal.mask
    seed = scipy.ndimage.gaussian_filter(crystal.object.real, 1.0) + 1j * (
        scipy.ndimage.gaussian_filter(crystal.object.imag, 1.0)
    )
    support = shrink_wrap(seed)
    assert NUMPY.support_box(support) is not None  # numpy takes the pruned transforms
    chis = {}
    for backend in (NUMPY, TORCH):
        for relaxation in (1.0, 1.8):
            run = polish(
                counts,
                seed,
                support,
                mask,
                iterations=40,
                hio_fraction=0.0,
                shrink_every=0,
                backend=backend,
                relaxation=relaxation,
            )
            assert run.iterations == 40
            chis[backend.library, relaxation] = ChiCost(counts, mask, backend)(
                run.model_intensity(backend)
            )
    assert chis["numpy", 1.8] < 0.9 * chis["numpy", 1.0]
    for relaxation in (1.0, 1.8):
        assert chis["torch", relaxation] == pytest.approx(chis["numpy", relaxation], rel=1e-3)
    for wrong in (
        {"relaxation": 2.0},
        {"relaxation": 0.5},
        {"relaxation": 1.5, "shrink_every": 10},
    ):
        options = {"hio_fraction": 0.0, "shrink_every": 0, **wrong}
        with pytest.raises(ValueError, match="relaxation"):
            polish(counts, seed, support, mask, iterations=2, **options)
    with pytest.raises(ValueError, match="relaxation"):
        polish(counts, seed, support, mask, iterations=2, hio_fraction=0.5, relaxation=1.5)


def test_the_median_is_the_lower_middle_value_on_every_library():
    """numpy partitions where torch sorts: the same value, the lower middle one for an even
    count."""
    rng = np.random.default_rng(4)
    for count in (1, 2, 7, 8, 1001):
        values = rng.uniform(size=count).astype(np.float32)
        expected = float(np.sort(values)[(count - 1) // 2])
        for backend in (NUMPY, TORCH):
            assert backend.median(backend.asarray(values)) == expected


def test_gaussian_blur_is_scipy_s_for_an_object_inside_its_box():
    rng = np.random.default_rng(2)
    volume = np.zeros((32, 32, 40), dtype=np.float32)
    volume[8:24, 6:26, 10:30] = rng.uniform(size=(16, 20, 20))
    reference = scipy.ndimage.gaussian_filter(volume, 1.0, mode="wrap")
    for backend in (NUMPY, TORCH):
        blurred = backend.to_numpy(backend.gaussian_blur(backend.asarray(volume), 1.0))
        assert np.abs(blurred - reference).max() < 2e-3 * reference.max()


@pytest.mark.timeout(600)
def test_reconstructor_runs_the_gpu_code_path_on_torch(measured):
    _, _, counts, mask = measured
    small = {
        "shape_search_evaluations": 20,
        "es_coarse_iterations": 40,
        "es_fine_iterations": 10,
        "polish_er_iterations": 30,
        "polish_iterations": 40,
        "adaptive_iterations": 0,
        "converge_iterations": 0,
    }
    results = {
        library: Reconstructor(device="cpu", array_library=library, **small).reconstruct(
            counts, mask
        )
        for library in ("numpy", "torch")
    }
    on_numpy, on_torch = results["numpy"], results["torch"]
    summary = on_torch.summary()
    assert (summary["device"], summary["array_library"]) == ("cpu", "torch")
    assert on_numpy.summary()["array_library"] == "numpy"
    assert isinstance(on_torch.object, np.ndarray) and on_torch.object.dtype == np.complex64
    # The crystal-model fit runs on the host whatever the device: the same numbers.
    for stage in ("cnn", "shape", "es"):
        assert on_torch.stage_chi[stage] == on_numpy.stage_chi[stage], stage
    assert abs(on_torch.chi - on_numpy.chi) <= 1e-3
    assert on_torch.timings["network"] > 0 and on_torch.timings["twin_choice"] > 0


def test_the_device_guard_catches_a_host_array_in_device_work():
    with DeviceGuard():
        on_device = TORCH.asarray(np.ones(4, np.float32))
        assert isinstance(on_device * 2, OnDevice)
        with pytest.raises(AssertionError, match="mixes device and host"):
            _ = on_device * torch.ones(4)
        with pytest.raises(AssertionError, match=r"mixes device and host|implicitly"):
            _ = on_device * np.ones(4, np.float32)
        with pytest.raises(AssertionError, match="implicitly"):
            np.asarray(on_device)
        assert not isinstance(TORCH.to_numpy(on_device), OnDevice)


def test_the_gpu_code_path_keeps_its_arrays_on_the_device():
    """Every stage of a reconstruction, the coarse further starts (interpolated back with
    ``pad_frequencies``) and those on every other q included, on torch under
    :class:`DeviceGuard`: no array made on the host enters the device's work."""
    small = {
        "shape_search_evaluations": 10,
        "es_coarse_iterations": 20,
        "es_fine_iterations": 5,
        "polish_er_iterations": 20,
        "polish_iterations": 30,
        "adaptive_iterations": 20,
        "converge_iterations": 20,
        "uniform_amplitude_iterations": 20,
    }
    cases = [
        (1, {"starts_downsampling": 2, "starts_subsampling": False}, "at 1/2 resolution"),
        (2, {}, "on every other q"),
    ]
    for index, extra, path in cases:
        crystal = out_of_family_crystal(DEV_SEED, index, n=48)
        rec = Reconstructor(device="cpu", array_library="torch", **small, **extra)
        with DeviceGuard():
            result = rec.reconstruct(crystal.measured, crystal.mask)
        assert any(path in label for label in result.polish_attempts), result.polish_attempts
        assert isinstance(result.object, np.ndarray) and np.isfinite(result.chi)


def test_asking_for_a_missing_gpu_falls_back_once_with_a_log_line(caplog, monkeypatch):
    monkeypatch.setattr(backend_module, "_gpu_count", lambda library: 0)
    monkeypatch.setattr(backend_module, "_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="bcdi_bluesky.backend"):
        assert select_backend("cuda") is NUMPY
        assert select_backend("cuda:1") is NUMPY
    assert len([r for r in caplog.records if "run on the CPU" in r.getMessage()]) == 1
    assert select_backend("cpu") is NUMPY


@pytest.mark.parametrize(
    ("device", "library"), [("gpu", None), ("cuda:x", None), ("cpu", "jax"), ("cuda", "numpy")]
)
def test_an_unknown_device_is_a_settings_error(device, library):
    with pytest.raises(ValueError, match=r"device|library|numpy runs"):
        select_backend(device, library)
    with pytest.raises(SettingsError):
        Reconstructor(device=device, array_library=library)


def test_a_backend_refuses_a_device_its_library_cannot_use():
    with pytest.raises(ValueError, match="does not run"):
        ArrayBackend("numpy", "cuda:0")
    with pytest.raises(ValueError, match="does not run"):
        ArrayBackend("cupy", "cpu")


def test_the_cnn_runs_through_an_io_binding_with_the_same_output():
    from bcdi_bluesky.model.runtime import OnnxCrystalModel

    runtime = OnnxCrystalModel()
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 64)).astype(np.float32)
    plain = runtime.session.run(None, {runtime.input_name: x[:, None]})[0]
    np.testing.assert_allclose(runtime.predict(x), runtime.encoding.decode(plain), atol=1e-6)
    assert runtime.device == ("cpu", 0)


@pytest.mark.timeout(400)
def test_the_prepared_gpu_check_runs_on_the_cpu(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    output = tmp_path / "check.json"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            *("--device", "cpu", "--quick", "--set-count", "1", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report == json.loads(done.stdout)
    assert (report["device"], report["array_library"]) == ("cpu", "torch")
    entry = report["sizes"]["64"]
    assert set(entry["timings_s"]) >= {"network", "twin_choice", "refine", "polish", "total"}
    assert entry["stage_chi"]["polish"] < entry["stage_chi"]["cnn"]
    assert report["max_chi_difference"] <= 1e-3
    assert entry["object_overlap"] > 0.99 and entry["support_iou_vs_reference"] > 0.95
    assert report["cnn"]["onnxruntime_ms"] > 0
    # The fit runs on the host on every backend: the same stages up to the polish.
    assert all(entry["end_to_end_chi_difference"][s] == 0 for s in ("cnn", "shape", "es"))
    step = entry["step"]["torch on cpu"]
    assert step["step_ms"] > step["fft_pair_ms"] > 0
    ours = report["set"]["cases"][0]["ours"]  # against the true crystal
    assert ours["iou"] > 0.85 and ours["overlap"] > 0.95
    assert report["set"]["ours"]["iou"] == ours["iou"]  # the median of one


def test_hio_update_is_the_hio_formula_on_every_backend():
    rng = np.random.default_rng(5)
    shape = (12, 10, 14)
    previous = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    projected = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    support = rng.uniform(size=shape) < 0.3
    expected = np.where(support, projected, previous - np.float32(0.9) * projected)
    for backend in (NUMPY, TORCH):
        updated = backend.hio_update(
            backend.asarray(previous.copy()),
            backend.asarray(projected),
            backend.asarray(support),
            0.9,
        )
        np.testing.assert_allclose(backend.to_numpy(updated), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5"])
def test_a_bad_fft_worker_count_in_the_environment_is_named_and_every_core_used(value):
    import os

    probe = "import os, bcdi_bluesky.backend as b; print(b.FFT_WORKERS == (os.cpu_count() or 1))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "BCDI_FFT_WORKERS": value},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr
    assert done.stderr == (
        f"BCDI_FFT_WORKERS={value!r} is not a whole number of at least 1: using "
        f"{os.cpu_count() or 1} (every core)\n"
    )


@pytest.mark.timeout(300)
def test_the_starts_on_every_other_q_run_on_torch():
    """The first run and the further starts on every other q (folded seeds, the data
    subsampled on the host, the runs unfolded and refined on the full grid) run on the GPU
    code path to the same fit."""
    crystal = out_of_family_crystal(DEV_SEED, 11)
    measurement = prepare_measurement(crystal.measured, crystal.mask, 64)
    seed = np.abs(crystal.object).astype(np.complex64)  # its strain left out: above the noise
    settings = ReconstructionSettings(
        polish_er_iterations=10,
        polish_iterations=20,
        adaptive_iterations=30,
        subsampled_refine_iterations=10,
        uniform_amplitude_iterations=0,
    )
    outcomes = {
        b.library: polish_stage(measurement, seed, settings, backend=b) for b in (NUMPY, TORCH)
    }
    for outcome in outcomes.values():
        # The first run, far above the noise, comes back without the full grid's steps; the
        # finalists are refined there.
        assert next(iter(outcome.attempts)).endswith(SUBSAMPLED)
        refined = [k for k in outcome.attempts if k.endswith(f"{SUBSAMPLED}, refined")]
        assert len(refined) == FINALISTS
    assert isinstance(outcomes["numpy"].object, np.ndarray)
    assert outcomes["torch"].chi == pytest.approx(outcomes["numpy"].chi, rel=0.05)
