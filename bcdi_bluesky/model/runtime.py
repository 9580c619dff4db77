"""ONNX Runtime inference of the exported CNN (no torch on this path).

A model is a pair ``<name>.onnx`` + ``<name>.json`` (the model card). The card names the input
convention and the crystal-parameter layout of the output; its ``sha256`` must match the ONNX
file, so a model and a card that do not belong together are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..physics import CrystalModel
from .encoding import NormalisedEncoding, TwinInvariantEncoding, make_encoding

DEFAULT_MODEL_NAME = "bcdi_cnn64"
#: Providers tried in this order when the caller does not choose.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider")

__all__ = ["DEFAULT_MODEL_NAME", "PREFERRED_PROVIDERS", "ModelError", "OnnxCrystalModel",
           "models_dir"]


def models_dir() -> Path:
    """Folder of the packaged models: inside the installed wheel, else the source tree's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise ModelError(f"no models folder found (looked in {here / '_models'} and "
                     f"{here.parent / 'models'})")


def default_model_path() -> Path:
    """Path of the default ONNX model (``$BCDI_BLUESKY_MODEL`` overrides it)."""
    env = os.environ.get("BCDI_BLUESKY_MODEL")
    if env:
        return Path(env)
    return models_dir() / f"{DEFAULT_MODEL_NAME}.onnx"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(onnx_path: Path) -> dict:
    """Read and check the model card beside ``onnx_path``."""
    onnx_path = Path(onnx_path)
    card_path = onnx_path.with_suffix(".json")
    if not onnx_path.is_file():
        raise ModelError(f"model file not found: {onnx_path}")
    if not card_path.is_file():
        raise ModelError(f"model card not found: {card_path}")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {card_path} is not valid JSON: {exc}") from None
    for key in ("sha256", "input", "parameters"):
        if key not in card:
            raise ModelError(f"model card {card_path} lacks the field {key!r}")
    digest = sha256_of(onnx_path)
    if digest != card["sha256"]:
        raise ModelError(f"model file {onnx_path} does not match its card {card_path} "
                         f"(sha256 {digest[:12]}... vs {str(card['sha256'])[:12]}...)")
    return card


class OnnxCrystalModel:
    """The CNN on ONNX Runtime: network inputs -> normalised crystal parameters.

    Parameters
    ----------
    path : path-like, optional
        The ``.onnx`` file (its card sits beside it). Default: the packaged model.
    providers : sequence of str, optional
        Execution providers in order of preference; default TensorRT -> CUDA -> CPU, keeping
        those this onnxruntime build offers.
    threads : int, optional
        Intra-op threads for the CPU provider (default: all cores).
    warmup : bool
        Run one inference at load so the first scan does not pay for initialisation.
    """

    def __init__(self, path: str | os.PathLike | None = None,
                 providers: list[str] | tuple[str, ...] | None = None,
                 threads: int | None = None, warmup: bool = True) -> None:
        import onnxruntime as ort  # deferred: importing the package should stay cheap

        self.path = Path(path) if path is not None else default_model_path()
        self.card = load_card(self.path)
        available = ort.get_available_providers()
        wanted = list(providers) if providers is not None else list(PREFERRED_PROVIDERS)
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise ModelError(f"none of the providers {wanted} is available "
                             f"(this onnxruntime offers {available})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load model {self.path}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.grid = int(self.card["input"]["shape"][-1])
        if warmup:
            self.predict(np.zeros((1, 1, *(self.grid,) * 3), dtype=np.float32))

    @property
    def name(self) -> str:
        """The model's name (from its card)."""
        return str(self.card.get("name", self.path.stem))

    @property
    def provider(self) -> str:
        """The execution provider that really runs (the CPU wheel silently ignores CUDA)."""
        return self.session.get_providers()[0]

    @cached_property
    def crystal_model(self) -> CrystalModel:
        """The crystal-parameter layout the network predicts."""
        return CrystalModel.from_dict(self.card["parameters"])

    @cached_property
    def latent_map(self):
        """The training distribution of the latent (None for a card without one)."""
        from .latent import LatentMap

        return LatentMap.from_dict(self.card["latent"]) if "latent" in self.card else None

    @cached_property
    def encoding(self) -> TwinInvariantEncoding | NormalisedEncoding:
        """How the network's outputs encode the parameters (named in the card)."""
        name = self.card.get("output", {}).get("encoding")
        try:
            return make_encoding(name, self.crystal_model)
        except ValueError as exc:
            raise ModelError(f"model card {self.path.with_suffix('.json')}: {exc}") from None

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Normalised parameters for network inputs.

        Parameters
        ----------
        inputs : ndarray
            ``(N, N, N)``, ``(B, N, N, N)`` or ``(B, 1, N, N, N)`` network inputs (see
            :func:`bcdi_bluesky.preprocess.network_input`), any dtype or byte order.

        Returns
        -------
        ndarray
            ``(P,)`` for a single volume, else ``(B, P)``, float32 in [-1, 1].
        """
        x = np.asarray(inputs)
        single = x.ndim == 3
        if single:
            x = x[None, None]
        elif x.ndim == 4:
            x = x[:, None]
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2:] != (self.grid,) * 3:
            raise ValueError(f"network input must be ({self.grid},)*3 per volume, got shape "
                             f"{np.asarray(inputs).shape}")
        # Native-endian, contiguous float32: EPICS clients hand out big-endian arrays, on
        # which ONNX Runtime silently computes NaN.
        x = np.ascontiguousarray(x, dtype=np.dtype(np.float32).newbyteorder("="))
        if not np.all(np.isfinite(x)):
            raise ValueError("network input contains NaN or inf")
        out = self.encoding.decode(self.session.run(None, {self.input_name: x})[0])
        out = out.astype(np.float32)
        return out[0] if single else out
