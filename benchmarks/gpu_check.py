"""The whole pipeline on a device against the CPU path and cohere-core, in one prepared run.

    python benchmarks/gpu_check.py [--device cuda] [--output gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --quick          # CI and machines without a GPU

One JSON object, printed and written to ``--output``:

* ``sizes[N]`` for ``N`` = 64, 128, 256 (``--quick``: 64): per-stage timings of the full
  pipeline on the device (medians over ``--repeats`` scans; the first, which compiles kernels and
  fills caches, is left out), scan stop to result (``total_s``), chi, peak GPU memory, and the
  agreement with the CPU path (numpy): ``chi_difference`` of each stage (CNN, search + ES,
  polish with its HIO steps made ER: HIO amplifies rounding) run on both from the same
  input, their largest (``max_chi_difference``), the same
  end to end (one scan through each path: iterative stages let float rounding grow, so this
  one is looser), and the complex overlap and support IoU of the two objects; all with the
  short settings of ``--quick`` (the defaults would meet the CPU's wall-time caps at 128^3). At
  256^3 the CPU reference is left out (minutes on a CPU), and says so.
* ``sizes[N]["step"]``: one polish step (ER/HIO with shrink-wrap) and one bare FFT pair,
  milliseconds, on the device and (up to 128^3, where a GPU is the device) on the host's numpy.
* ``sizes[N]["cohere"]``: cohere-core's default recipe (620 ER/HIO steps from a random start)
  on the same device and data (its ``cp`` or ``torch`` backend on a GPU), after an untimed
  first run (its kernels compile then): seconds, chi and our speed-up.
* ``cnn``: the network's median time through ONNX Runtime's provider, and through torch on
  CUDA as a stand-in where ``onnxruntime-gpu`` is not installed (it then says so).
* ``max_chi_difference``: the largest stage chi difference between the device and the CPU
  path over the sizes.
* ``set``: ``--set-count`` crystals of the out-of-family set at 64^3 (default 8; none with
  ``--quick``), each reconstructed once on the device (default settings, after the warm-up of
  the sizes above) and once by cohere-core on the same device (one random start, seeded per
  crystal): support IoU and complex overlap against the true object, seconds, and the medians
  and the ratio of the median times.

``--device cpu`` runs the GPU code path (torch tensors) on the CPU against numpy: the same code,
the same keys. ``--array-library`` forces CuPy or torch on CUDA (default: what
``select_backend`` takes, torch first). ``--quick``: 64^3 only, shorter step counts, no cohere,
under 2 minutes on two cores. The test crystals are the out-of-family benchmark set's
(``BENCHMARK_SEED``), faceted, strained and noisy, rendered at every size with the same
oversampling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bcdi_bluesky.backend import GPU_LIBRARIES, NUMPY, ArrayBackend, select_backend
from bcdi_bluesky.io import atomic_write_bytes
from bcdi_bluesky.physics import (
    BENCHMARK_SEED,
    complex_overlap,
    out_of_family_crystal,
    support_iou,
)
from bcdi_bluesky.pipeline import (
    Reconstructor,
    cnn_stage,
    polish_stage,
    prepare_measurement,
    refine_stage,
    to_input_grid,
)
from bcdi_bluesky.preprocess import network_input
from bcdi_bluesky.settings import ReconstructionSettings
from bcdi_bluesky.tuning import ChiCost, polish

# bench_pipeline (cohere-core's runs and the figures of merit) sits beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = (64, 128, 256)
#: Crystal of the out-of-family set used at every size (a faceted, strained, noisy one).
CRYSTAL_INDEX = 9
#: Step counts of ``--quick`` (the default settings' take minutes on the torch CPU path).
QUICK_SETTINGS = {
    "shape_search_evaluations": 40,
    "es_coarse_iterations": 100,
    "es_fine_iterations": 30,
    "polish_er_iterations": 50,
    "polish_iterations": 100,
    "adaptive_iterations": 0,
    "converge_iterations": 0,
    "uniform_amplitude_iterations": 0,
}
#: Targets of scan stop -> result on a GPU, seconds.
TARGETS_S = {64: 0.1, 128: 0.3, 256: 3.0}


def machine() -> dict[str, Any]:
    """What ran the check."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in ("onnxruntime", "torch", "cupy", "cohere_core"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    return info


def crystal(n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Counts and mask of the check's crystal on an ``n^3`` grid."""
    c = out_of_family_crystal(BENCHMARK_SEED, CRYSTAL_INDEX, n=n)
    return c.measured, c.mask


def timed_runs(rec: Reconstructor, counts: np.ndarray, mask, repeats: int) -> tuple[Any, dict]:
    """``repeats + 1`` reconstructions; the medians of the last ``repeats`` timings."""
    runs = []
    for _ in range(repeats + 1):
        runs.append(rec.reconstruct(counts, mask))
    kept = runs[1:] if repeats > 0 else runs
    timings = {
        stage: statistics.median(r.timings[stage] for r in kept) for stage in kept[0].timings
    }
    return runs[-1], timings


def stage_agreement(
    device_rec: Reconstructor, counts: np.ndarray, mask, settings: ReconstructionSettings
) -> dict[str, Any]:
    """chi after each stage run on the device and on numpy *from the same input* (the numpy
    path's previous stage), and their difference: the backends' agreement, without the
    divergence that chaining iterative stages lets grow from float rounding.

    The polish is compared with its HIO steps made ER (``*_hio_fraction`` 0): HIO's feedback
    amplifies rounding, so two ER/HIO runs from the same input part whatever the backends
    (measured on the check's crystal, torch against numpy on the CPU: an error difference of
    7e-9 after 25 steps, 1e-6 after 30, 1e-3 after 35, the objects' overlap 0.85 at the end);
    ER only contracts, so its agreement is the backends' (the rescue starts, HIO by design, are
    left out)."""
    backend = device_rec.backend
    model = device_rec.model
    measurement = prepare_measurement(counts, mask, model.n)
    prepared = measurement.prepared
    chis: dict[str, dict[str, float]] = {}
    costs = {b.library: ChiCost(prepared.intensity, prepared.mask, b) for b in (NUMPY, backend)}
    estimate = cnn_stage(device_rec.runtime, model, prepared, costs[NUMPY.library])
    chis["cnn"] = {
        b.library: costs[b.library](model.intensity(estimate.params, b)) for b in (NUMPY, backend)
    }
    fits = {
        b.library: refine_stage(model, estimate.params, prepared, settings, backend=b)
        for b in (NUMPY, backend)
    }
    chis["es"] = {library: fit.chi for library, fit in fits.items()}
    seed = to_input_grid(
        model.voxelise(fits[NUMPY.library].params), prepared, measurement.data.shape
    )
    # The rescue starts run cohere's recipe, HIO by design: left out here.
    er_only = settings.replace(polish_hio_fraction=0.0, adaptive_hio_fraction=0.0, rescue_starts=0)
    polished = {
        b.library: polish_stage(measurement, seed, er_only, backend=b) for b in (NUMPY, backend)
    }
    chis["polish"] = {library: run.chi for library, run in polished.items()}
    reference, on_device = (
        polished[NUMPY.library].object,
        backend.to_numpy(polished[backend.library].object),
    )
    return {
        "chi_difference": {
            stage: abs(pair[backend.library] - pair[NUMPY.library]) for stage, pair in chis.items()
        },
        "object_overlap": complex_overlap(reference, on_device),
        "support_iou_vs_reference": support_iou(reference, on_device),
    }


def agreement(device_result, reference, per_stage: dict[str, Any]) -> dict[str, Any]:
    """The backends' agreement stage by stage (from the same inputs: ``chi_difference`` and the
    polished objects) and end to end (one scan through each path)."""
    stages = sorted(set(device_result.stage_chi) & set(reference.stage_chi))
    chained = {s: abs(device_result.stage_chi[s] - reference.stage_chi[s]) for s in stages}
    return {
        "reference_chi": reference.chi,
        "reference_stage_chi": reference.stage_chi,
        **per_stage,
        "max_chi_difference": max(per_stage["chi_difference"].values()),
        "end_to_end_chi_difference": chained,
        "end_to_end_object_overlap": complex_overlap(reference.object, device_result.object),
        "end_to_end_support_iou": support_iou(reference.object, device_result.object),
    }


def cnn_timings(rec: Reconstructor, counts: np.ndarray, runs: int) -> dict[str, Any]:
    """The network alone through ONNX Runtime, and through torch on CUDA as a stand-in when
    ONNX Runtime runs it on the CPU while a GPU is there."""
    from bcdi_bluesky.preprocess import fit_to_grid

    prepared = fit_to_grid(counts, rec.model.n, None)
    x = network_input(prepared.intensity, prepared.mask)[None, None]
    times = []
    for _ in range(runs + 3):
        t = time.perf_counter()
        rec.runtime.predict(x)
        times.append(time.perf_counter() - t)
    out: dict[str, Any] = {
        "provider": rec.provider,
        "onnxruntime_ms": statistics.median(times[3:]) * 1e3,
        "torch_cuda_ms": None,
        "note": "",
    }
    if rec.provider == "CPUExecutionProvider" and rec.backend.device != "cpu":
        out.update(torch_stand_in(rec, x, runs))
    return out


def torch_stand_in(rec: Reconstructor, x: np.ndarray, runs: int) -> dict[str, Any]:
    """The exported network rebuilt in torch and timed on CUDA (float32, no autocast)."""
    try:
        import torch

        from bcdi_bluesky.model.distil import network_from_onnx
    except ImportError as exc:
        return {"note": f"no torch stand-in: {exc}"}
    net = network_from_onnx(rec.runtime.path)[0].to("cuda").eval()
    inputs = torch.from_numpy(x).to("cuda")
    times = []
    with torch.no_grad():
        for _ in range(runs + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            net(inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {
        "torch_cuda_ms": statistics.median(times[3:]) * 1e3,
        "note": "onnxruntime-gpu is not installed here: the same network (weights read from "
        "the ONNX file) timed through torch on CUDA as a stand-in",
    }


def cohere_package(device: str) -> tuple[str, int]:
    """cohere-core's array library and device index for ``device`` ("np", -1 on the CPU;
    "cp", else "torch", on CUDA)."""
    if device == "cpu":
        return "np", -1
    index = int(device.partition(":")[2] or 0)
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "torch", index
    return "cp", index


def run_cohere_on(device: str, counts: np.ndarray) -> dict[str, Any]:
    """cohere-core's default recipe on the check's device, or why it did not run."""
    try:
        from bench_pipeline import centre_on_max, run_cohere
    except ImportError as exc:
        return {"skipped": f"cohere-core is not installed ({exc})"}
    package, index = cohere_package(device)
    centred, _ = centre_on_max(counts)
    run = run_cohere(centred, package=package, device=index)
    return {"package": package, "seconds": run.seconds, "chi": run.chi}


def step_timings(
    backend: ArrayBackend, counts: np.ndarray, mask: np.ndarray | None, steps: int = 200
) -> dict[str, Any]:
    """One ER/HIO step of the polish on ``counts`` (shrink-wrap every 10 steps, as the
    pipeline's) and a bare FFT pair (``fftn`` then ``ifftn``) on ``backend``, milliseconds
    (medians of three timed runs after a warm-up): where the step costs many FFT pairs, the
    step's element-wise kernels and their launches, not the transforms, set the pace."""
    n = counts.shape[0]
    rng = np.random.default_rng(0)
    support = np.zeros((n,) * 3, dtype=bool)
    support[(slice(n // 4, 3 * n // 4),) * 3] = True
    seed = (support * np.exp(2j * np.pi * rng.random(support.shape))).astype(np.complex64)

    def run_polish(iterations: int) -> None:
        polish(
            counts, seed, support, mask, iterations=iterations, hio_fraction=0.5, backend=backend
        )
        backend.synchronize()

    def pairs(count: int) -> None:
        x = backend.asarray(seed)
        for _ in range(count):
            x = backend.ifftn(backend.fftn(x))
        backend.synchronize()

    out: dict[str, Any] = {}
    for key, work, count in (("step_ms", run_polish, steps), ("fft_pair_ms", pairs, 50)):
        work(10)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            work(count)
            times.append((time.perf_counter() - t) / count * 1e3)
        out[key] = statistics.median(times)
    out["step_over_fft_pair"] = out["step_ms"] / out["fft_pair_ms"]
    return out


def set_check(rec: Reconstructor, count: int) -> dict[str, Any]:
    """``count`` out-of-family crystals at 64^3 on the device: ours, ours on the host's numpy
    (``ours_cpu``, the same settings; only where the device is a GPU) and cohere-core's (one
    seeded start, the same device), against the truth."""
    from bench_pipeline import figures, run_cohere_starts

    package, index = cohere_package(rec.device)
    ours = {"ours": rec}
    if rec.device != "cpu":
        ours["ours_cpu"] = Reconstructor(settings=rec.settings, device="cpu")
    cases = []
    for i in range(count):
        c = out_of_family_crystal(BENCHMARK_SEED, i, n=64)
        case: dict[str, Any] = {"index": i, "labels": c.labels}
        for name, r in ours.items():
            started = time.perf_counter()
            result = r.reconstruct(c.measured, c.mask)
            case[name] = {
                **figures(result.object, c.measured, c.object, mask=c.mask),
                "seconds": time.perf_counter() - started,
                "timings_s": dict(result.timings),
                "quality": result.quality,
                "cut_short": list(result.cut_short),
            }
        seconds = case["ours"]["seconds"]
        try:
            start, _ = run_cohere_starts(
                c.measured,
                1,
                lambda obj, c=c: figures(obj, c.measured, c.object, mask=c.mask),
                "chi",
                seeds=lambda k, i=i: 1000 * i + k,
                package=package,
                device=index,
            )
        except ImportError as exc:
            case["cohere"] = {"skipped": f"cohere-core is not installed ({exc})"}
        else:
            case["cohere"] = {**start.figures, "seconds": start.run.seconds}
        cases.append(case)
        print(f"set #{i}: ours IoU {case['ours']['iou']:.3f} in {seconds:.2f} s", file=sys.stderr)
    out: dict[str, Any] = {"cohere_package": package, "cases": cases}
    for method in (*ours, "cohere"):
        done = [c[method] for c in cases if "seconds" in c[method]]
        if done:
            out[method] = {
                key: statistics.median(d[key] for d in done)
                for key in ("iou", "overlap", "seconds")
            }
    if "cohere" in out:
        out["time_ratio"] = out["cohere"]["seconds"] / out["ours"]["seconds"]
    if "ours_cpu" in out:
        out["cpu_over_device"] = out["ours_cpu"]["seconds"] / out["ours"]["seconds"]
    return out


def save(report: dict[str, Any], path: str) -> str:
    """Write ``report`` as JSON to ``path`` (atomically); return the text."""
    text = json.dumps(report, indent=1, default=float)
    atomic_write_bytes(Path(path), text.encode())
    return text


def main() -> None:
    """Run the check and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="64^3, short runs, no cohere")
    parser.add_argument("--repeats", type=int, default=None, help="timed scans per size")
    parser.add_argument(
        "--array-library", choices=GPU_LIBRARIES, default=None, help="CuPy or torch on CUDA"
    )
    parser.add_argument(
        "--set-count", type=int, default=None, help="out-of-family crystals timed at 64^3"
    )
    parser.add_argument("--output", default="gpu_check.json")
    args = parser.parse_args()
    started = time.perf_counter()
    library = "torch" if args.device == "cpu" else args.array_library
    backend = select_backend(args.device, library)
    sizes = (64,) if args.quick else SIZES
    repeats = args.repeats if args.repeats is not None else (0 if args.quick else 3)
    # Timed runs: the default settings (--quick: short ones). Agreement runs: the short settings
    # on the device and on the CPU, so that neither meets a wall-time cap on the CPU.
    settings = ReconstructionSettings().replace(**(QUICK_SETTINGS if args.quick else {}))
    short = ReconstructionSettings().replace(**QUICK_SETTINGS)
    device_rec = Reconstructor(
        settings=settings, device=backend.device, array_library=backend.library
    )
    reference_rec = Reconstructor(settings=short, device="cpu")
    report: dict[str, Any] = {
        "machine": machine(),
        "device": backend.device,
        "array_library": backend.library,
        "reference": f"{NUMPY.library} on {NUMPY.device}",
        "quick": args.quick,
        "settings": settings.as_dict(),
        "agreement_settings": short.as_dict(),
        "crystal": f"out_of_family_crystal(BENCHMARK_SEED, {CRYSTAL_INDEX}, n)",
        "sizes": {},
    }
    differences = []
    if not args.quick and backend.device != "cpu":
        # cohere's first run on a GPU compiles its kernels (measured on an H200: 9.7-12.3 s
        # against 0.6-1.0 s for the next 64^3 runs): an untimed run first.
        run_cohere_on(backend.device, crystal(64)[0])
    for n in sizes:
        backend.reset_memory_peak()
        counts, mask = crystal(n)
        result, timings = timed_runs(device_rec, counts, mask, repeats)
        entry: dict[str, Any] = {
            "timings_s": timings,
            "total_s": timings["total"],
            "target_s": TARGETS_S[n] if backend.device != "cpu" else None,
            "chi": result.chi,
            "stage_chi": result.stage_chi,
            "quality": result.quality,
            "memory_peak_bytes": backend.memory_peak_bytes(),
        }
        if args.quick:
            entry["cohere"] = {"skipped": "--quick"}
        else:
            entry["cohere"] = run_cohere_on(backend.device, counts)
            if "seconds" in entry["cohere"]:
                entry["cohere"]["speedup"] = entry["cohere"]["seconds"] / timings["total"]
        if n <= 128:
            compared = (
                result if args.quick else device_rec.reconstruct(counts, mask, settings=short)
            )
            reference = reference_rec.reconstruct(counts, mask)
            per_stage = stage_agreement(device_rec, counts, mask, short)
            entry.update(agreement(compared, reference, per_stage))
            entry["reference_total_s"] = reference.timings["total"]
            differences.append(entry["max_chi_difference"])
        else:
            entry["reference_chi"] = None
            entry["note"] = "no CPU reference at this size (minutes on a CPU)"
        entry["step"] = {backend.name: step_timings(backend, counts, mask)}
        if backend.device != "cpu" and n <= 128:
            entry["step"][NUMPY.name] = step_timings(NUMPY, counts, mask)
        report["sizes"][str(n)] = entry
        save(report, args.output)  # a run stopped later keeps the sizes done
        print(f"{n}^3: total {timings['total']:.3f} s, chi {result.chi:.4f}", file=sys.stderr)
    report["cnn"] = cnn_timings(device_rec, crystal(64)[0], 5 if args.quick else 20)
    report["max_chi_difference"] = max(differences)
    set_count = args.set_count if args.set_count is not None else (0 if args.quick else 8)
    if set_count > 0:
        save(report, args.output)
        report["set"] = set_check(device_rec, set_count)
    report["seconds"] = time.perf_counter() - started
    print(save(report, args.output))


if __name__ == "__main__":
    main()
