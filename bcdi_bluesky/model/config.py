"""What defines a training run: :class:`TrainConfig` (no torch, so the CLI can offer its
defaults without importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SettingsError
from ..physics import CrystalModel
from .encoding import TWIN_BLOCKS, make_encoding

#: Recipe of :func:`bcdi_bluesky.model.distil.distil` that its arguments and the CLI share:
#: a fine-tuning learning rate (the teacher ends its cosine schedule near 2e-5) and the
#: teacher's outputs alone as targets (the loss against the true parameters is about 18 times
#: the distillation loss at the start, so even a 10% share of it drowns the teacher's signal).
DISTIL_DEFAULTS = {
    "lr": 5e-5,
    "warmup_steps": 20,
    "truth_share": 0.0,
    "validate_every": 100,
    "checkpoint_every": 100,
    "validation_size": 128,
}

#: Values of features that a checkpoint written before they existed does not name.
ABSENT_MEANS_OFF = {"friedel": False, "zoom": 0, "mirror_copies": 1}


def check_whole_number(name: str, value: object, least: int) -> None:
    """Refuse ``value`` unless it is an int (not a bool) of at least ``least``.

    Raises
    ------
    SettingsError
        One line naming ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SettingsError(f"{name} must be a whole number >= {least}, got {value!r}")


def check_zoom(zoom: int, grid: int) -> None:
    """The zoom encoder's centred crop: 0 (none) or a multiple of 8 up to ``grid``.

    Raises
    ------
    SettingsError
        Any other edge.
    """
    if zoom % 8 or not 0 <= zoom <= grid:
        raise SettingsError(f"zoom must be 0 or a multiple of 8 up to {grid}, got {zoom}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    name: str = "bcdi_cnn64"
    grid: int = 64
    lmax: int = 4
    n_rbf: int = 3
    phase_order: int = 3
    width: int = 16
    hidden: int = 256
    batch_size: int = 16
    steps: int = 4000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    seed: int = 0
    validate_every: int = 250
    checkpoint_every: int = 100
    validation_size: int = 128
    encoding: str = TWIN_BLOCKS
    #: Give the network the Friedel-asymmetry channel I(q) - I(-q) (see ``CrystalCNN``).
    friedel: bool = True
    #: Centred crop edge of the full-resolution encoder (see ``CrystalCNN``); 0: none.
    zoom: int = 32
    #: Mirror images per simulated crystal in a batch (1: every sample a fresh crystal).
    mirror_copies: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a run that cannot train, before any work (a SettingsError, one line)."""
        at_least = {
            "grid": 8,
            "width": 1,
            "hidden": 1,
            "batch_size": 1,
            "steps": 1,
            "warmup_steps": 0,
            "validate_every": 1,
            "checkpoint_every": 1,
            "validation_size": 1,
        }
        for key, least in at_least.items():
            check_whole_number(key, getattr(self, key), least)
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SettingsError(f"{key} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise SettingsError(f"lr must be positive, got {self.lr!r}")
        check_zoom(self.zoom, self.grid)
        if not 1 <= self.mirror_copies <= 8 or self.batch_size % self.mirror_copies:
            raise SettingsError(
                f"mirror_copies must be in [1, 8] and divide the batch size "
                f"{self.batch_size}, got {self.mirror_copies}"
            )

    @classmethod
    def from_checkpoint(cls, stored: dict) -> TrainConfig:
        """The config a checkpoint stored; a key it lacks means the feature was off when it
        was written (:data:`ABSENT_MEANS_OFF`), not today's default."""
        return cls(**{**ABSENT_MEANS_OFF, **stored})

    def crystal_model(self) -> CrystalModel:
        """The parameter layout this run trains on."""
        return CrystalModel(
            n=self.grid, lmax=self.lmax, n_rbf=self.n_rbf, phase_order=self.phase_order
        )

    def output_encoding(self):
        """How the network's outputs encode the parameters."""
        return make_encoding(self.encoding, self.crystal_model())
