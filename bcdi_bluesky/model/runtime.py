"""ONNX Runtime inference of the exported CNN (no torch on this path).

A model is a pair ``<name>.onnx`` + ``<name>.json`` (the model card). The card names the input
convention and the crystal-parameter layout of the output; its ``sha256`` must match the ONNX
file, so a model and a card that do not belong together are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..physics import CrystalModel
from .encoding import NormalisedEncoding, TwinInvariantEncoding, make_encoding
from .latent import LatentMap

DEFAULT_MODEL_NAME = "bcdi_cnn64"
#: Providers tried in this order when the caller does not choose.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

__all__ = [
    "DEFAULT_MODEL_NAME",
    "PREFERRED_PROVIDERS",
    "ModelError",
    "OnnxCrystalModel",
    "models_dir",
]


def models_dir() -> Path:
    """Folder of the packaged models: inside the installed wheel, else the source tree's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise ModelError(
        f"no models folder found (looked in {here / '_models'} and {here.parent / 'models'})"
    )


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
    """Read the model card beside ``onnx_path`` and check it (see :func:`check_card`).

    Raises
    ------
    ModelError
        One line naming the card and its first defect: missing, not UTF-8 JSON, not an
        object, a field missing or of the wrong type, or a ``sha256`` that is not the file's.
    """
    onnx_path = Path(onnx_path)
    card_path = onnx_path.with_suffix(".json")
    if not onnx_path.is_file():
        raise ModelError(f"model file not found: {onnx_path}")
    if not card_path.is_file():
        raise ModelError(f"model card not found: {card_path}")
    try:
        card = json.loads(card_path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelError(f"model card {card_path} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ModelError(f"model card {card_path} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {card_path} is not valid JSON: {exc}") from None
    check_card(card, card_path)
    digest = sha256_of(onnx_path)
    if digest != card["sha256"]:
        raise ModelError(
            f"model file {onnx_path} does not match its card {card_path} "
            f"(sha256 {digest[:12]}... vs {card['sha256'][:12]}...)"
        )
    return card


def _field(card: dict, dotted: str, kind: type | tuple[type, ...], card_path: Path):
    """``card[a][b]...`` for ``dotted = "a.b"``, of type ``kind``; else one ModelError line."""
    value: object = card
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ModelError(f"model card {card_path} lacks the field {dotted!r}")
        value = value[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python, never to a card.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ModelError(
            f"model card {card_path}: {dotted!r} must be {names}, got "
            f"{type(value).__name__} {str(value)[:40]!r}"
        )
    return value


def check_card(card: object, card_path: Path) -> None:
    """Check the structure of a model card (everything but the ONNX graph: see
    :class:`OnnxCrystalModel`, which compares the card with the graph it loads).

    Parameters
    ----------
    card : object
        The decoded JSON.
    card_path : Path
        Named in the error.

    Raises
    ------
    ModelError
        One line naming the first defect.
    """
    if not isinstance(card, dict):
        raise ModelError(f"model card {card_path} must be a JSON object, got {type(card).__name__}")
    _field(card, "sha256", str, card_path)
    shape = _field(card, "input.shape", list, card_path)
    if (
        len(shape) != 5
        or shape[1] != 1
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape[1:])
        or len(set(shape[2:])) != 1
    ):
        raise ModelError(
            f"model card {card_path}: 'input.shape' must be [batch, 1, N, N, N], got {shape!r}"
        )
    for key in ("n", "lmax", "n_rbf", "phase_order"):
        _field(card, f"parameters.{key}", int, card_path)
    _field(card, "parameters.names", list, card_path)
    _field(card, "output.encoding", str, card_path)
    if "latent" in card:
        _field(card, "latent", dict, card_path)
        for key in ("mean", "precision", "components", "points"):
            _field(card, f"latent.{key}", list, card_path)
        _field(card, "latent.scale", (int, float), card_path)


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

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        providers: list[str] | tuple[str, ...] | None = None,
        threads: int | None = None,
        warmup: bool = True,
    ) -> None:
        import onnxruntime as ort  # deferred: importing the package should stay cheap

        self.path = Path(path) if path is not None else default_model_path()
        self.card = load_card(self.path)
        available = ort.get_available_providers()
        wanted = list(providers) if providers is not None else list(PREFERRED_PROVIDERS)
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise ModelError(
                f"none of the providers {wanted} is available (this onnxruntime offers {available})"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=chosen
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load model {self.path}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.grid = int(self.card["input"]["shape"][-1])
        self.crystal_model, self.encoding, self.latent_map = self._layout()
        if warmup:
            self.predict(np.zeros((1, 1, *(self.grid,) * 3), dtype=np.float32))

    def _layout(
        self,
    ) -> tuple[CrystalModel, TwinInvariantEncoding | NormalisedEncoding, LatentMap | None]:
        """The parameter layout, output encoding and latent map the card describes, checked
        against each other and against the graph's input and output shapes."""
        card, card_path = self.card, self.path.with_suffix(".json")
        graph_in = self.session.get_inputs()[0].shape
        # Only the named batch axis may be symbolic; every other axis is a number to compare.
        if list(graph_in[1:]) != list(card["input"]["shape"][1:]):
            raise ModelError(
                f"model {self.path} takes input shape {graph_in}, its card "
                f"{card_path} says {card['input']['shape']}"
            )
        try:
            crystal_model = CrystalModel.from_dict(card["parameters"])
            encoding = make_encoding(card["output"]["encoding"], crystal_model)
            latent_map = LatentMap.from_dict(card["latent"]) if "latent" in card else None
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ModelError(f"model card {card_path}: {exc}") from None
        graph_out = self.session.get_outputs()[0].shape
        if not graph_out or graph_out[-1] != encoding.size:
            raise ModelError(
                f"model {self.path} outputs shape {graph_out}, but the card's "
                f"parameter layout ({crystal_model.size} parameters, encoding "
                f"{encoding.name}) needs {encoding.size} outputs"
            )
        shape = card["output"].get("shape")  # optional; when given, it must be right
        if shape is not None and (not isinstance(shape, list) or shape[1:] != [encoding.size]):
            raise ModelError(
                f"model card {card_path}: 'output.shape' {shape} is not "
                f"[batch, {encoding.size}] ({encoding.name} of {crystal_model.size} parameters)"
            )
        if latent_map is not None:
            size = crystal_model.size + 1  # the parameters and the prediction's chi
            shapes = {
                "mean": ((size,), latent_map.mean.shape),
                "precision": ((size, size), latent_map.precision.shape),
                "components": ((2, size), latent_map.components.shape),
            }
            for key, (want, got) in shapes.items():
                if want != got:
                    raise ModelError(
                        f"model card {card_path}: 'latent.{key}' has shape {got}, "
                        f"the parameter layout needs {want}"
                    )
            if (
                latent_map.points.ndim != 2
                or latent_map.points.shape[1:] != (2,)
                or not (math.isfinite(latent_map.scale) and latent_map.scale > 0)
            ):
                raise ModelError(
                    f"model card {card_path}: 'latent' needs points of shape "
                    f"(K, 2) and a positive scale"
                )
        return crystal_model, encoding, latent_map

    @property
    def name(self) -> str:
        """The model's name (from its card)."""
        return str(self.card.get("name", self.path.stem))

    @property
    def provider(self) -> str:
        """The execution provider that really runs (the CPU wheel silently ignores CUDA)."""
        return self.session.get_providers()[0]

    @property
    def device(self) -> tuple[str, int]:
        """ONNX Runtime's ``(device_type, device_id)`` of the provider that runs."""
        if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            options = self.session.get_provider_options().get(self.provider, {})
            return "cuda", int(options.get("device_id", 0))
        return "cpu", 0

    def predict(self, inputs: Any) -> np.ndarray:
        """Normalised parameters for network inputs.

        The network runs through an IO binding: an input that already lives on the provider's
        device (a CuPy array or a torch tensor on that GPU) is read in place, with no trip
        through the host; anything else is checked and handed over as a host array.

        Parameters
        ----------
        inputs : array_like
            ``(N, N, N)``, ``(B, N, N, N)`` or ``(B, 1, N, N, N)`` network inputs (see
            :func:`bcdi_bluesky.preprocess.network_input`), any dtype or byte order.

        Returns
        -------
        ndarray
            ``(P,)`` for a single volume, else ``(B, P)``, float32 in [-1, 1].
        """
        single = len(inputs.shape) == 3
        device_input = _device_buffer(inputs, self.device)
        binding = self.session.io_binding()
        if device_input is not None:
            shape = self._batch_shape(inputs.shape)
            kind, index = self.device
            binding.bind_input(self.input_name, kind, index, np.float32, list(shape), device_input)
        else:
            binding.bind_cpu_input(self.input_name, self._host_input(inputs))
        binding.bind_output(self.session.get_outputs()[0].name, "cpu")
        self.session.run_with_iobinding(binding)
        raw = binding.copy_outputs_to_cpu()[0]
        out = self.encoding.decode(raw).astype(np.float32)
        return out[0] if single else out

    def _batch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(B, 1, N, N, N)`` of an input shape, or ValueError."""
        full = {3: (1, 1, *shape), 4: (shape[0], 1, *shape[1:]), 5: tuple(shape)}.get(len(shape))
        if full is None or full[1] != 1 or full[2:] != (self.grid,) * 3:
            raise ValueError(
                f"network input must be ({self.grid},)*3 per volume, got shape {tuple(shape)}"
            )
        return full

    def _host_input(self, inputs: Any) -> np.ndarray:
        """A checked, native-endian, contiguous float32 host copy of ``inputs``."""
        x = np.asarray(inputs)
        x = x.reshape(self._batch_shape(x.shape))
        # EPICS clients hand out big-endian arrays, on which ONNX Runtime silently computes NaN.
        x = np.ascontiguousarray(x, dtype=np.dtype(np.float32).newbyteorder("="))
        if not np.all(np.isfinite(x)):
            raise ValueError("network input contains NaN or inf")
        return x


def _device_buffer(inputs: Any, device: tuple[str, int]) -> int | None:
    """The data pointer of a contiguous float32 GPU array on ``device`` (CuPy or torch), else
    None (host arrays, other devices and dtypes go through the host)."""
    kind, index = device
    if kind != "cuda" or isinstance(inputs, np.ndarray):
        return None
    module = type(inputs).__module__.split(".")[0]
    if module == "cupy":
        if str(inputs.dtype) == "float32" and inputs.flags.c_contiguous:
            if inputs.device.id == index:
                return int(inputs.data.ptr)
    elif module == "torch":
        on = inputs.device
        if on.type == "cuda" and (on.index or 0) == index and str(inputs.dtype) == "torch.float32":
            if inputs.is_contiguous():
                return int(inputs.data_ptr())
    return None
