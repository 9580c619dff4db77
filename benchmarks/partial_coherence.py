"""Does modelling partial coherence lower R? The measured sets and a blurred simulated crystal.

    python benchmarks/partial_coherence.py [--data-dir ../shared/data]

``Reconstructor()`` with and without ``partial_coherence`` (:class:`~bcdi_bluesky.tuning.
CoherenceKernel`) on the 64^3 crops of APS scan 54 and of the 3D-CDI-NN example, and on an
out-of-family crystal whose intensity was blurred by a Gaussian of 1 pixel before the Poisson
noise (a partially coherent beam, known truth). Prints R (against the model the run fitted:
the coherent intensity, or the blurred one), chi, the kernel's peak, the support IoU with the
truth where there is one, and seconds: the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.ndimage

from bcdi_bluesky import Reconstructor
from bcdi_bluesky.physics import (
    BENCHMARK_SEED,
    intensity,
    out_of_family_crystal,
    r_factor,
    support_iou,
)
from bcdi_bluesky.tuning import CoherenceKernel

REPO = Path(__file__).resolve().parents[1]


def blurred_case(index: int = 2, sigma: float = 1.0, photons: float = 1e8):
    """An out-of-family crystal measured with a partially coherent beam (Gaussian blur)."""
    crystal = out_of_family_crystal(BENCHMARK_SEED, index, n=64)
    coherent = intensity(crystal.object).astype(np.float64)
    blurred = scipy.ndimage.gaussian_filter(coherent, sigma, mode="wrap")
    blurred *= photons / blurred.sum()
    counts = np.random.default_rng(index).poisson(blurred).astype(np.float32)
    return counts, crystal.object


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    data = Path(args.data_dir)
    cases = {
        "APS scan 54": (np.load(REPO / "examples" / "data" / "S0054_intensity_64.npy"), None),
        "3D-CDI-NN example": (
            np.load(data / "3dcdinn_example" / "ft_crop_64_intensity.npy"),
            None,
        ),
        "blurred out-of-family crystal (sigma 1 px)": blurred_case(),
    }
    print(
        f"partial coherence: kernel within {2 * CoherenceKernel.HALF_WIDTH + 1}^3 pixels, "
        f"from a Gaussian of {CoherenceKernel.START_SIGMA} px, "
        f"{CoherenceKernel.RL_ITERATIONS} Richardson-Lucy steps every 10 polish steps"
    )
    print("| data | partial coherence | R | chi | kernel peak | IoU with truth | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (measured, truth) in cases.items():
        measured = np.asarray(measured, dtype=np.float32)
        for modelled in (False, True):
            rec = Reconstructor(device="cpu", partial_coherence=modelled)
            t = time.perf_counter()
            result = rec.reconstruct(measured)
            seconds = time.perf_counter() - t
            model = intensity(result.object)
            if result.coherence_kernel is not None:  # the periodic convolution the run fitted
                transfer = np.fft.fftn(np.fft.ifftshift(result.coherence_kernel))
                model = np.clip(np.fft.ifftn(np.fft.fftn(model) * transfer).real, 0, None)
            peak = result.summary()["coherence_kernel_peak"]
            iou = "-" if truth is None else f"{support_iou(truth, result.object):.3f}"
            print(
                f"| {name} | {'yes' if modelled else 'no'} | {r_factor(model, measured):.4f} | "
                f"{result.chi:.4f} | {'-' if peak is None else f'{peak:.3f}'} | {iou} | "
                f"{seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
