"""The latent map figure: true and predicted positions of simulated crystals, measured scans.

    python benchmarks/latent_map_figure.py [--count 200] [--output docs/img/latent_map.png]

For ``--count`` fresh prior crystals (test stream, prior photons) the latent of the truth
(its normalised parameters and the chi of the truth against the noisy counts) and of the CNN's
prediction are projected on the model card's map and joined by a line; the measured data sets
are marked. Prints the flagged fraction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bcdi_bluesky import Reconstructor
from bcdi_bluesky.model.data import TEST_STREAM, make_sample
from bcdi_bluesky.model.latent import latent_vector
from bcdi_bluesky.physics import CrystalPrior
from bcdi_bluesky.plotting import plot_latent_map
from bcdi_bluesky.preprocess import fit_to_grid
from bcdi_bluesky.tuning.refine import ChiCost

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    """Write the figure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--output", default=str(REPO / "docs/img/latent_map.png"))
    args = parser.parse_args()
    rec = Reconstructor()
    model, latent_map = rec.model, rec.runtime.latent_map
    prior = CrystalPrior(model)
    pairs, flagged = [], 0
    for i in range(args.count):
        sample = make_sample(model, prior, 777, TEST_STREAM, i)
        result = rec.reconstruct(sample.counts, refine="none")
        prepared = fit_to_grid(sample.counts, model.n)
        chi_true = ChiCost(prepared.intensity, prepared.mask)(model.intensity(sample.params))
        truth = latent_map.project(latent_vector(model.normalise(sample.params), chi_true))
        pairs.append((tuple(truth), result.latent_xy))
        flagged += result.out_of_distribution
    scans = []
    for label, path in (
        ("APS scan 54", REPO / "examples/data/S0054_intensity_64.npy"),
        ("3D-CDI-NN", REPO.parent / "shared/data/3dcdinn_example/ft_crop_64_intensity.npy"),
    ):
        if path.is_file():
            r = rec.reconstruct(np.load(path), refine="none")
            scans.append((label, r.latent_xy, r.out_of_distribution))
    plot_latent_map(
        latent_map,
        args.output,
        scans=scans,
        pairs=pairs,
        title=f"CNN latent map, {args.count} simulated crystals",
    )
    print(f"{flagged}/{args.count} simulated crystals flagged; figure: {args.output}")


if __name__ == "__main__":
    main()
