"""ONNX Runtime latency and throughput of the CNN, per execution provider, and the CNN stage.

    python benchmarks/bench_inference.py [MODEL.onnx] [--runs 50] [--threads 2]

Prints a table (median latency of one 64^3 volume over ``--runs`` runs, throughput at batch 8)
for the CPU provider (``--threads`` intra-op threads) and, where onnxruntime-gpu and a GPU are
present, the CUDA and TensorRT providers, with the largest difference of each provider's raw
output from the CPU provider's on the same inputs. On a GPU machine it is the same command.

Then the pipeline's whole CNN stage (:func:`bcdi_bluesky.pipeline.cnn_stage`: network input,
network, the data's choice of the twin-odd signs, latent map) on ``--runs`` crystals of the test
stream at 1e8 photons: medians of the stage, of the network and of the sign choice, and the
ratio of the stage to the bare network.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def _session(path: str, provider: str, threads: int) -> ort.InferenceSession | None:
    if provider not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        s = ort.InferenceSession(
            path,
            sess_options=options,
            providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])),
        )
    except Exception as exc:  # a provider that is listed can still fail to initialise
        print(f"{provider}: failed to start ({str(exc).splitlines()[0][:120]})")
        return None
    return s if s.get_providers()[0] == provider else None


def _median_ms(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    """Measure every available provider and print the table."""
    from bcdi_bluesky.model.runtime import default_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    args = parser.parse_args()
    path = str(args.model or default_model_path())
    rng = np.random.default_rng(0)
    grid = 64
    one = rng.uniform(size=(1, 1, grid, grid, grid)).astype(np.float32)
    eight = rng.uniform(size=(8, 1, grid, grid, grid)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}; available: {ort.get_available_providers()}")
    import os
    import platform

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"CPU threads {args.threads}; model {path}"
    )
    cpu = _session(path, "CPUExecutionProvider", args.threads)
    reference = cpu.run(None, {cpu.get_inputs()[0].name: eight})[0]
    print(
        f"{'provider':<28}{'latency ms (b=1)':>18}{'volumes/s (b=8)':>18}{'max |diff| vs CPU':>20}"
    )
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"):
        s = cpu if provider == "CPUExecutionProvider" else _session(path, provider, args.threads)
        if s is None:
            print(f"{provider:<28}{'not available':>18}")
            continue
        lat = _median_ms(s, one, args.runs)
        thr = 8e3 / _median_ms(s, eight, max(args.runs // 5, 5))
        diff = float(np.abs(s.run(None, {s.get_inputs()[0].name: eight})[0] - reference).max())
        print(f"{provider:<28}{lat:>18.2f}{thr:>18.1f}{diff:>20.2e}")
    cnn_stage_table(path, args.runs, args.threads)


def cnn_stage_table(path: str, runs: int, threads: int) -> None:
    """Median seconds of the CNN stage and its parts on test-stream crystals."""
    from bcdi_bluesky.model.data import TEST_STREAM, make_sample
    from bcdi_bluesky.model.runtime import OnnxCrystalModel
    from bcdi_bluesky.physics import CrystalPrior
    from bcdi_bluesky.pipeline import cnn_stage
    from bcdi_bluesky.preprocess import fit_to_grid
    from bcdi_bluesky.tuning import ChiCost, coarse_chi

    runtime = OnnxCrystalModel(path, providers=["CPUExecutionProvider"], threads=threads)
    model = runtime.crystal_model
    prior = CrystalPrior(model)
    stage, network, choice = [], [], []
    for i in range(runs + 3):
        sample = make_sample(model, prior, 12345, TEST_STREAM, i, 1e8)
        prepared = fit_to_grid(sample.counts, model.n, None)
        t = time.perf_counter()
        estimate = cnn_stage(
            runtime,
            model,
            prepared,
            ChiCost(prepared.intensity, prepared.mask),
            coarse_chi(model, prepared.intensity, prepared.mask),
        )
        if i >= 3:  # the first calls fill caches (grid tables, FFT plans)
            stage.append(time.perf_counter() - t)
            network.append(estimate.network_s)
            choice.append(estimate.twin_choice_s)
    ms = {
        k: statistics.median(v) * 1e3
        for k, v in (("stage", stage), ("net", network), ("choice", choice))
    }
    print(
        f"CNN stage on {runs} test crystals (CPU provider, {threads} threads): median "
        f"{ms['stage']:.1f} ms = network (with its input) {ms['net']:.1f} ms + twin-sign "
        f"choice {ms['choice']:.1f} ms + latent map; stage / network {ms['stage'] / ms['net']:.2f}"
    )


if __name__ == "__main__":
    main()
