"""Export a trained checkpoint to ONNX and write its model card (torch needed)."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import SettingsError
from ..files import atomic_path, atomic_write_bytes, check_destination
from .config import check_whole_number
from .data import DISTIL_STREAM
from .evaluate import training_mean, validate
from .latent import CALIBRATION_STREAM, calibrate
from .network import SYMMETRY_GROUPS, SymmetryAverage
from .runtime import OnnxCrystalModel, sha256_of
from .train import TrainConfig, build_network, load_checkpoint

log = logging.getLogger(__name__)

OPSET = 18
#: Fewest prior crystals that calibrate a latent map (its 2D embedding and distance scale).
MIN_LATENT_COUNT = 10
INPUT_NAME, OUTPUT_NAME = "intensity", "params"


def export_onnx(net: torch.nn.Module, grid: int, path: Path) -> None:
    """Write ``net`` as ONNX (opset 18, dynamic batch axis, float32 in and out)."""
    net = net.eval().cpu()
    example = torch.zeros(2, 1, grid, grid, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter's registry logs one warning per torchvision operator it cannot find: this
    # network uses none of them.
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # The exporter narrates its progress through warnings and prints; neither is a
            # problem.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
                external_data=False,
            )
    finally:
        registry.setLevel(level)
    with atomic_path(path) as tmp:
        program.save(str(tmp))


def _distillation_record(distillation: dict) -> dict:
    """What the card says of a distilled network's teacher (its file name, not a local path)."""
    return {
        **distillation,
        "teacher": Path(distillation["teacher"]).name,
        "stream": f"distillation ({DISTIL_STREAM})",
    }


def export(
    checkpoint: Path,
    models_dir: Path,
    name: str | None = None,
    validation_count: int = 500,
    validation_seed: int = 12345,
    latent_count: int = 2000,
    symmetry_average: str = "half_turns",
    overwrite: bool = False,
) -> dict:
    """Export ``checkpoint`` to ``models_dir/<name>.onnx`` and write ``<name>.json``.

    The card records the input convention, the parameter layout, the training recipe, the
    validation of the exported ONNX model (not the torch one) on ``validation_count`` fresh
    crystals from the priors at 1e8 photons, CNN only, and the latent map calibrated on
    ``latent_count`` more (0: no map; the pipeline then reports no latent). With a
    ``symmetry_average`` other than ``"none"`` (and a matrix encoding) the exported graph
    averages the network over that group of grid symmetries
    (:data:`~bcdi_bluesky.model.network.SYMMETRY_GROUPS`,
    :class:`~bcdi_bluesky.model.network.SymmetryAverage`).

    The model and its card are made and validated in a staging folder inside ``models_dir``
    and moved into place together at the end: an export that fails or is interrupted leaves
    ``models_dir`` as it was. An existing model of that name is replaced only with
    ``overwrite``.

    Raises
    ------
    SettingsError
        A bad count or symmetry group, or a model of that name exists without ``overwrite``
        (all checked before any work).
    ModelError
        ``checkpoint`` is not a checkpoint of :func:`~bcdi_bluesky.model.train.train`.
    DataError
        ``models_dir`` cannot be written.
    """
    if symmetry_average not in SYMMETRY_GROUPS:
        raise SettingsError(
            f"symmetry_average must be one of {', '.join(SYMMETRY_GROUPS)}, got "
            f"{symmetry_average!r}"
        )
    check_whole_number("validation_count", validation_count, 1)
    check_whole_number("latent_count", latent_count, 0)
    if latent_count != 0 and latent_count < MIN_LATENT_COUNT:
        raise SettingsError(
            f"latent_count must be 0 (no latent map) or at least {MIN_LATENT_COUNT}, "
            f"got {latent_count}"
        )
    models_dir = check_destination(models_dir, folder=True)
    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_checkpoint(state["config"])
    name = name or config.name
    final = models_dir / f"{name}.onnx"
    if not overwrite and (final.exists() or final.with_suffix(".json").exists()):
        raise SettingsError(f"{final} exists: overwrite (--overwrite) to replace that model")
    net = build_network(config)
    net.load_state_dict(state["model"])
    encoding = config.output_encoding()
    group = SYMMETRY_GROUPS[symmetry_average]
    if group and hasattr(encoding, "symmetry_map"):
        net = SymmetryAverage(net, encoding, group)
    elif group:
        log.warning(
            "symmetry_average %s not applied: the %s encoding has no symmetry map; "
            "the model is the bare network",
            symmetry_average,
            config.encoding,
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.export-", dir=models_dir) as staging:
        card = _export_staged(
            state,
            config,
            net,
            Path(staging) / final.name,
            validation_count,
            validation_seed,
            latent_count,
        )
        # The card last: a reader that finds the new card finds the new model with it.
        os.replace(Path(staging) / final.name, final)
        os.replace((Path(staging) / final.name).with_suffix(".json"), final.with_suffix(".json"))
    return card


def _export_staged(
    state: dict,
    config: TrainConfig,
    net: torch.nn.Module,
    onnx_path: Path,
    validation_count: int,
    validation_seed: int,
    latent_count: int,
) -> dict:
    """:func:`export`'s work, in its staging folder: the ONNX file and its complete card."""
    name = onnx_path.stem
    export_onnx(net, config.grid, onnx_path)
    model = config.crystal_model()
    distillation = config.extra.get("distillation")
    if config.output_encoding().needs_twin_min:
        loss = "weighted MSE, minimum over the target and its twin"
    else:
        loss = "weighted MSE on the twin-invariant encoding"
    if distillation:
        loss = (
            f"{loss}: {1 - distillation['truth_share']:g} x against the teacher's "
            f"{distillation['symmetry_average']} symmetry average, "
            f"{distillation['truth_share']:g} x against the true parameters"
        )
    card = {
        "name": name,
        "format": "onnx",
        "opset": OPSET,
        "sha256": sha256_of(onnx_path),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, config.grid, config.grid, config.grid],
            "dtype": "float32",
            "normalisation": "log(1 + I) / max(log(1 + I)) after rolling the Bragg peak "
            "(smoothed maximum) to index N//2; masked voxels 0",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", config.output_encoding().size],
            "dtype": "float32",
            "encoding": config.encoding,
            "meaning": "crystal parameters normalised to [-1, 1] by the bounds below, "
            "in the named encoding (bcdi_bluesky.model.encoding): "
            "normalised_v1 = the vector itself; twin_invariant_v1 = the "
            "twin-even parameters, then the upper triangle of w w^T / |w| "
            "for the twin-odd ones; twin_blocks_v1 = the same with one "
            "matrix per family of twin-odd parameters (odd surface terms, "
            "RBF centres, phase), whose relative signs the data choose",
        },
        "parameters": model.to_dict(),
        "network": net.config,
        "training": {
            "samples": int(state["step"]) * config.batch_size,
            "crystals": int(state["step"]) * config.batch_size // config.mirror_copies,
            "mirror_copies": config.mirror_copies,
            "steps": int(state["step"]),
            "batch_size": config.batch_size,
            "epochs": "1 (every crystal is fresh: streamed from the priors, never repeated; "
            "each is seen as mirror_copies mirror images in its batch)",
            "seed": config.seed,
            "wall_time_s": round(float(state["elapsed_s"]), 1),
            "machine": state.get("machine", ""),
            "device": state.get("device", ""),
            "optimiser": f"AdamW lr {config.lr} (warm-up {config.warmup_steps} steps, cosine), "
            f"weight decay {config.weight_decay}",
            "loss": loss,
            "warm_start": config.extra.get("warm_start", ""),
            "history": state.get("history", [])[-10:],
            **({"distillation": _distillation_record(distillation)} if distillation else {}),
        },
        "training_mean": training_mean(model, config.seed).round(6).tolist(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_machine": platform.platform(),
    }
    card_path = onnx_path.with_suffix(".json")
    atomic_write_bytes(card_path, json.dumps(card, indent=1).encode())
    runtime = OnnxCrystalModel(onnx_path, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    result = validate(runtime.predict, model, validation_count, validation_seed).summary()
    trivial = validate(
        lambda x: np.tile(card["training_mean"], (len(x), 1)),
        model,
        min(validation_count, 100),
        validation_seed,
    ).summary()
    card["validation"] = {
        **result,
        "photons": 1e8,
        "seed": validation_seed,
        "stream": "test (disjoint from training and validation streams)",
        "support_threshold": 0.2,
        "method": "ONNX Runtime CPU, CNN only (no refinement); IoU after resolving twin and "
        "translation; chi of the predicted object's intensity against the noisy counts",
        "trivial_predictor": {k: v for k, v in trivial.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if latent_count:
        calibration_seed = 0
        latent = calibrate(
            runtime.predict,
            model,
            count=latent_count,
            seed=calibration_seed,
            twin_variants=runtime.encoding.twin_variants,
        )
        card["latent"] = {
            **latent.to_dict(),
            "calibration": {
                "crystals": latent_count,
                "seed": calibration_seed,
                "stream": f"calibration ({CALIBRATION_STREAM})",
                "photons": "drawn from the prior (1e6-1e9)",
                "shrinkage": 0.05,
            },
        }
    atomic_write_bytes(card_path, json.dumps(card, indent=1).encode())
    return card
