"""Random crystals that cover what beamlines measure: the CNN's training distribution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._crystal import CrystalModel
from ._harmonics import sh_index

#: Range of total photon counts the prior draws from (log-uniform), and so the photon levels
#: the packaged network was trained on.
PRIOR_PHOTONS = (1e6, 1e9)


@dataclass(frozen=True)
class CrystalPrior:
    """A seeded generator of random crystal parameter vectors.

    Shapes: mean diameters from ``N / 5`` to ``N / 2.2`` with the largest extent kept at or
    below ``N / 2`` (oversampling >= 2 on every axis); ``l = 2`` deformations of random
    orientation and strength (elongated needles to flat platelets); ``l = 3`` asymmetry;
    ``l = 4`` roughness and, for a share of crystals, cube-like faceting. Interiors: uniform,
    or with Gaussian voids and density ramps. Phase: from flat to ``max_phase_ptp``
    peak-to-peak. Photons: log-uniform over ``photons``.

    Parameters
    ----------
    model : CrystalModel
        The parameter layout.
    photons : tuple of float
        Range of total photon counts.
    rbf_probability : float
        Chance that each RBF of the density is present.
    faceted_probability : float
        Chance of adding a cubic (faceting) ``l = 4`` term.
    max_phase_ptp : float
        Largest phase peak-to-peak over the crystal, in radians.
    flat_phase_probability : float
        Chance of a crystal without strain.
    """

    model: CrystalModel
    photons: tuple[float, float] = PRIOR_PHOTONS
    rbf_probability: float = 0.35
    faceted_probability: float = 0.3
    max_phase_ptp: float = 2.0 * np.pi
    flat_phase_probability: float = 0.1

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one physical parameter vector."""
        m = self.model
        s = m.slices
        lo, hi = m.bounds
        p = np.zeros(m.size)
        deg = m.sh_degrees

        sh = np.zeros(len(deg))
        # l = 2 spans the traceless symmetric tensors: a random direction there is a random
        # orientation and biaxiality of the elongation/flattening.
        v = rng.normal(size=5)
        sh[deg == 2] = v / np.linalg.norm(v) * 0.33 * rng.uniform() ** 0.7
        sh[deg == 3] = rng.normal(0.0, 0.05, size=7)
        if m.lmax >= 4:
            sh[deg == 4] = rng.normal(0.0, 0.035, size=9)
            if rng.uniform() < self.faceted_probability:
                # Cubic harmonic Y40 + sqrt(5/7) Y44: positive gives cube corners along the axes'
                # diagonals (a rounded cube), negative an octahedron-like shape.
                base = sh_index(4, 0) - 4
                amp = rng.uniform(0.05, 0.14) * rng.choice([-1.0, 1.0])
                sh[base] += amp * np.sqrt(7.0 / 12.0)
                sh[base + 4] += amp * np.sqrt(5.0 / 12.0)
        sh[deg >= 5] = rng.normal(0.0, 0.02, size=int(np.sum(deg >= 5)))
        p[s["sh"]] = np.clip(sh, lo[s["sh"]], hi[s["sh"]])

        # Mean diameter uniform in [N/5, N/2.2]; then shrink so the largest extent is <= N/2.
        p[0] = rng.uniform(1 / 10, 1 / 4.4)
        extent = m._max_extent(p) / m.n  # largest radius as a fraction of N
        if extent > 0.25:
            p[0] *= 0.25 / extent
        p[0] = np.clip(p[0], lo[0], hi[0])

        present = rng.uniform(size=m.n_rbf) < self.rbf_probability
        amps = np.where(present, rng.uniform(-1.0, 0.6, size=m.n_rbf), 0.0)
        centres = np.zeros((m.n_rbf, 3))
        widths = np.full(m.n_rbf, lo[s["rbf_width"]][0] if m.n_rbf else 0.0)
        for k in np.flatnonzero(present):
            direction = rng.normal(size=3)
            centres[k] = direction / np.linalg.norm(direction) * 0.7 * rng.uniform() ** (1 / 3)
            widths[k] = rng.uniform(0.15, 0.6)
        # Canonical order (strongest void first, absent ones last) removes the RBFs' permutation
        # symmetry, which a regression could not otherwise resolve.
        order = np.lexsort((amps, ~present))
        p[s["rbf_centre"]] = centres[order].ravel()
        p[s["rbf_amplitude"]] = amps[order]
        p[s["rbf_width"]] = widths[order]

        n_phase = s["phase"].stop - s["phase"].start
        if n_phase and rng.uniform() >= self.flat_phase_probability:
            coeffs = rng.normal(size=n_phase)
            rendered = m.render(np.concatenate([p[: s["phase"].start], coeffs]))
            ptp = float(np.ptp(rendered.phase)) if rendered.phase.size else 0.0
            if ptp > 0:
                coeffs *= rng.uniform(0.0, self.max_phase_ptp) / ptp
            p[s["phase"]] = np.clip(coeffs, lo[s["phase"]], hi[s["phase"]])
        return p

    def sample_photons(self, rng: np.random.Generator) -> float:
        """Draw a total photon count, log-uniform over :attr:`photons`."""
        a, b = np.log10(self.photons[0]), np.log10(self.photons[1])
        return float(10.0 ** rng.uniform(a, b))
