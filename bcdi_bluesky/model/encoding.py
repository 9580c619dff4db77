"""Twin-invariant encoding of the crystal parameters: what the CNN regresses (numpy only).

The twin ``conj(o(-r))`` gives the same intensity. It flips the sign of a group of parameters
at once (odd-``l`` surface terms, RBF centres, even-degree phase terms: the "odd" vector ``w``)
and leaves the rest (``e``) alone. No network can tell ``w`` from ``-w``, and no continuous
function can choose one of the two for every input (there is no continuous sign choice on
``w != 0``), so a regression on ``w``, even with a min-over-twins loss, learns little more than
zero for it. Regressing ``e`` and the sign-free matrix ``M = w w^T / |w|`` instead is
continuous and needs no min; ``w`` comes back (up to the unobservable sign) as ``lambda_1 v_1``,
the top eigenpair of ``M``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..physics import CrystalModel

TWIN_INVARIANT = "twin_invariant_v1"
TWIN_BLOCKS = "twin_blocks_v1"
NORMALISED = "normalised_v1"


@dataclass(frozen=True)
class TwinInvariantEncoding:
    """Maps normalised parameter vectors to network targets and back.

    The twin-odd parameters form one vector ``w`` and one matrix ``M`` (``twin_invariant_v1``).
    """

    model: CrystalModel
    name = TWIN_INVARIANT
    #: The loss must take the minimum over the target and its twin (False: invariant already).
    needs_twin_min = False

    @cached_property
    def even(self) -> np.ndarray:
        """Indices of the parameters the twin leaves unchanged."""
        return np.flatnonzero(self.model.twin_signs > 0)

    @cached_property
    def odd(self) -> np.ndarray:
        """Indices of the parameters the twin negates."""
        return np.flatnonzero(self.model.twin_signs < 0)

    @cached_property
    def blocks(self) -> list[np.ndarray]:
        """Groups of twin-odd parameter indices, each regressed as its own matrix."""
        return [self.odd]

    @property
    def n_even(self) -> int:
        """Number of leading outputs that are parameters themselves (bounded by tanh)."""
        return int(self.even.size)

    @property
    def size(self) -> int:
        """Length of the encoded vector."""
        return self.n_even + sum(b.size * (b.size + 1) // 2 for b in self.blocks)

    def encode(self, normalised: np.ndarray) -> np.ndarray:
        """``(..., P)`` normalised parameters -> ``(..., size)`` twin-invariant targets."""
        p = np.asarray(normalised, dtype=np.float64)
        parts = [p[..., self.even]]
        for block in self.blocks:
            w = p[..., block]
            norm = np.linalg.norm(w, axis=-1, keepdims=True)
            scaled = w / np.sqrt(np.where(norm > 0, norm, 1.0))  # M = (w/sqrt|w|)(w/sqrt|w|)^T
            i, j = np.triu_indices(block.size)
            parts.append(scaled[..., i] * scaled[..., j])
        return np.concatenate(parts, axis=-1)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """``(..., size)`` network outputs -> ``(..., P)`` normalised parameters (one twin).

        Each block's vector is ``lambda_1 v_1`` of its matrix, signed so that its largest
        component is positive (the sign itself is not observable).
        """
        y = np.asarray(encoded, dtype=np.float64)
        if y.shape[-1] != self.size:
            raise ValueError(f"encoded vector must have length {self.size}, got {y.shape[-1]}")
        batch = y.shape[:-1]
        y = y.reshape(-1, self.size)
        out = np.empty((y.shape[0], self.model.size))
        out[:, self.even] = y[:, : self.n_even]
        start = self.n_even
        for block in self.blocks:
            k = block.size
            i, j = np.triu_indices(k)
            m = np.zeros((y.shape[0], k, k))
            m[:, i, j] = y[:, start : start + i.size]
            m[:, j, i] = y[:, start : start + i.size]
            start += i.size
            vals, vecs = np.linalg.eigh(m)
            lam = np.maximum(vals[:, -1], 0.0)
            w = vecs[:, :, -1] * lam[:, None]
            flip = np.sign(w[np.arange(w.shape[0]), np.argmax(np.abs(w), axis=1)])
            out[:, block] = w * np.where(flip == 0, 1.0, flip)[:, None]
        return np.clip(out, -1.0, 1.0).reshape(*batch, self.model.size)

    def twin_variants(self, normalised: np.ndarray) -> list[np.ndarray]:
        """The decoded vector with every relative sign of its blocks (the first one kept).

        Flipping all blocks at once is the twin (same intensity); flipping some of them is
        another crystal, which the encoding cannot tell apart: ``2^(blocks - 1)`` candidates
        for the data to choose from.
        """
        p = np.asarray(normalised, dtype=np.float64)
        variants = []
        for flips in range(2 ** (len(self.blocks) - 1)):
            v = p.copy()
            for bit, block in enumerate(self.blocks[1:]):
                if flips >> bit & 1:
                    v[..., block] *= -1.0
            variants.append(v)
        return variants

    def symmetry_map(self, matrix: np.ndarray) -> np.ndarray:
        """The encoded form of a parameter symmetry: ``encode(A p) = E @ encode(p)``.

        Parameters
        ----------
        matrix : ndarray
            ``A``, ``(P, P)``, orthogonal on every block and without mixing twin-even with
            twin-odd parameters or one block with another (as
            :meth:`CrystalModel.symmetry_matrix`).

        Returns
        -------
        ndarray
            ``E``, ``(size, size)``: even part ``A`` itself, each block's matrix ``A M A^T``.
        """
        a = np.asarray(matrix, dtype=np.float64)
        blocks = np.zeros(self.model.size, dtype=int)  # 0: even, k: block k
        for k, block in enumerate(self.blocks, start=1):
            blocks[block] = k
        if np.any(np.abs(a)[blocks[:, None] != blocks[None, :]] > 1e-9):
            raise ValueError(
                "the symmetry mixes twin-even parameters with twin-odd ones, or "
                "one block with another"
            )
        out = np.zeros((self.size, self.size))
        out[: self.n_even, : self.n_even] = a[np.ix_(self.even, self.even)]
        start = self.n_even
        for block in self.blocks:
            ab = a[np.ix_(block, block)]
            i, j = np.triu_indices(block.size)
            for col in range(i.size):
                unit = np.zeros((block.size, block.size))
                unit[i[col], j[col]] = unit[j[col], i[col]] = 1.0
                out[start : start + i.size, start + col] = (ab @ unit @ ab.T)[i, j]
            start += i.size
        return out

    def weights(self, parameter_weights: np.ndarray) -> np.ndarray:
        """Loss weights of the encoded entries from per-parameter weights.

        Off-diagonal entries of ``M`` stand for two matrix elements, so they count twice.
        """
        w = np.asarray(parameter_weights, dtype=np.float64)
        parts = [w[self.even]]
        for block in self.blocks:
            i, j = np.triu_indices(block.size)
            wo = w[block]
            parts.append(np.sqrt(wo[i] * wo[j]) * np.where(i == j, 1.0, 2.0))
        return np.concatenate(parts)


@dataclass(frozen=True)
class TwinBlockEncoding(TwinInvariantEncoding):
    """One matrix per family of twin-odd parameters (``twin_blocks_v1``).

    The odd surface terms, the RBF centres and the even-degree phase terms each get their own
    ``M``. In one joint matrix (``twin_invariant_v1``) the surface terms are a small corner
    next to the RBF centres and the phase, and their signs relative to those (what the joint
    matrix adds) show in the intensity only through the strain. Per family the shape's
    asymmetry is a target of its own, observable in unstrained crystals too; the relative sign
    of the families is lost, and the refinement chooses it against the data
    (:func:`bcdi_bluesky.tuning.best_twin_variant` over :meth:`twin_variants`).
    """

    name = TWIN_BLOCKS

    @cached_property
    def blocks(self) -> list[np.ndarray]:
        """Twin-odd indices grouped by parameter family (surface, RBF centres, phase)."""
        groups = []
        for sl in self.model.slices.values():
            block = self.odd[(self.odd >= sl.start) & (self.odd < sl.stop)]
            if block.size:
                groups.append(block)
        return groups


@dataclass(frozen=True)
class NormalisedEncoding:
    """The normalised parameters themselves (all outputs bounded by ``tanh``).

    The twin ambiguity is left to the loss (minimum over the target and its twin), which
    leaves the twin-odd parameters close to zero (see the module docstring); kept to read
    models trained that way.
    """

    model: CrystalModel
    name = NORMALISED
    needs_twin_min = True

    @property
    def n_even(self) -> int:
        """All outputs are bounded parameters."""
        return self.model.size

    @property
    def size(self) -> int:
        """Length of the encoded vector."""
        return self.model.size

    def encode(self, normalised: np.ndarray) -> np.ndarray:
        """Identity."""
        return np.asarray(normalised, dtype=np.float64)

    def twin_variants(self, normalised: np.ndarray) -> list[np.ndarray]:
        """The vector itself: its twin-odd parameters share one sign."""
        return [np.asarray(normalised, dtype=np.float64)]

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Clip to [-1, 1]."""
        y = np.asarray(encoded, dtype=np.float64)
        if y.shape[-1] != self.size:
            raise ValueError(f"encoded vector must have length {self.size}, got {y.shape[-1]}")
        return np.clip(y, -1.0, 1.0)

    def weights(self, parameter_weights: np.ndarray) -> np.ndarray:
        """The per-parameter weights."""
        return np.asarray(parameter_weights, dtype=np.float64)


ENCODINGS = {
    TWIN_INVARIANT: TwinInvariantEncoding,
    TWIN_BLOCKS: TwinBlockEncoding,
    NORMALISED: NormalisedEncoding,
}


def make_encoding(name: str, model: CrystalModel) -> TwinInvariantEncoding | NormalisedEncoding:
    """The encoding called ``name`` for ``model``; ``ValueError`` for an unknown name."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown output encoding {name!r} (known: {', '.join(ENCODINGS)})")
    return ENCODINGS[name](model)
