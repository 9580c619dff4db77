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
NORMALISED = "normalised_v1"


@dataclass(frozen=True)
class TwinInvariantEncoding:
    """Maps normalised parameter vectors to network targets and back."""

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
    def _triu(self) -> tuple[np.ndarray, np.ndarray]:
        return np.triu_indices(self.odd.size)

    @property
    def n_even(self) -> int:
        """Number of leading outputs that are parameters themselves (bounded by tanh)."""
        return int(self.even.size)

    @property
    def size(self) -> int:
        """Length of the encoded vector."""
        k = self.odd.size
        return self.n_even + k * (k + 1) // 2

    def encode(self, normalised: np.ndarray) -> np.ndarray:
        """``(..., P)`` normalised parameters -> ``(..., size)`` twin-invariant targets."""
        p = np.asarray(normalised, dtype=np.float64)
        w = p[..., self.odd]
        norm = np.linalg.norm(w, axis=-1, keepdims=True)
        scaled = w / np.sqrt(np.where(norm > 0, norm, 1.0))  # M = (w/sqrt|w|)(w/sqrt|w|)^T
        i, j = self._triu
        m = scaled[..., i] * scaled[..., j]
        return np.concatenate([p[..., self.even], m], axis=-1)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """``(..., size)`` network outputs -> ``(..., P)`` normalised parameters (one twin)."""
        y = np.asarray(encoded, dtype=np.float64)
        if y.shape[-1] != self.size:
            raise ValueError(f"encoded vector must have length {self.size}, got {y.shape[-1]}")
        batch = y.shape[:-1]
        y = y.reshape(-1, self.size)
        k = self.odd.size
        out = np.empty((y.shape[0], self.model.size))
        out[:, self.even] = y[:, : self.n_even]
        m = np.zeros((y.shape[0], k, k))
        i, j = self._triu
        m[:, i, j] = y[:, self.n_even:]
        m[:, j, i] = y[:, self.n_even:]
        vals, vecs = np.linalg.eigh(m)
        lam = np.maximum(vals[:, -1], 0.0)
        w = vecs[:, :, -1] * lam[:, None]
        # Fix the arbitrary eigenvector sign so that decoding is deterministic.
        flip = np.sign(w[np.arange(w.shape[0]), np.argmax(np.abs(w), axis=1)])
        out[:, self.odd] = w * np.where(flip == 0, 1.0, flip)[:, None]
        return np.clip(out, -1.0, 1.0).reshape(*batch, self.model.size)

    def weights(self, parameter_weights: np.ndarray) -> np.ndarray:
        """Loss weights of the encoded entries from per-parameter weights.

        Off-diagonal entries of ``M`` stand for two matrix elements, so they count twice.
        """
        w = np.asarray(parameter_weights, dtype=np.float64)
        i, j = self._triu
        wo = w[self.odd]
        pair = np.sqrt(wo[i] * wo[j]) * np.where(i == j, 1.0, 2.0)
        return np.concatenate([w[self.even], pair])


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

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Clip to [-1, 1]."""
        y = np.asarray(encoded, dtype=np.float64)
        if y.shape[-1] != self.size:
            raise ValueError(f"encoded vector must have length {self.size}, got {y.shape[-1]}")
        return np.clip(y, -1.0, 1.0)

    def weights(self, parameter_weights: np.ndarray) -> np.ndarray:
        """The per-parameter weights."""
        return np.asarray(parameter_weights, dtype=np.float64)


ENCODINGS = {TWIN_INVARIANT: TwinInvariantEncoding, NORMALISED: NormalisedEncoding}


def make_encoding(name: str, model: CrystalModel) -> TwinInvariantEncoding | NormalisedEncoding:
    """The encoding called ``name`` for ``model``; ``ValueError`` for an unknown name."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown output encoding {name!r} (known: {', '.join(ENCODINGS)})")
    return ENCODINGS[name](model)
