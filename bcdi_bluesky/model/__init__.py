"""The CNN: what runs at the beamline, and what trains and exports it.

Runtime (numpy and ONNX Runtime, no torch): ``runtime`` (:class:`OnnxCrystalModel`, the model
and its card), ``encoding`` (what the network's output means), ``latent`` (the latent map and
the out-of-distribution distance).

Training and export (torch, extra ``train``): ``data`` and ``evaluate`` (simulated samples and
validation, numpy), ``network``, ``train``, ``export``. The runtime path never imports them
(the import contracts in ``pyproject.toml`` check it).
"""

from .runtime import ModelError, OnnxCrystalModel

__all__ = ["ModelError", "OnnxCrystalModel"]
