"""Distillation of a symmetry-averaged model into one network pass (torch; training only).

An exported model that averages its network over a group of grid symmetries
(:class:`~bcdi_bluesky.model.network.SymmetryAverage`) costs one network pass per group
element. :func:`distil` fine-tunes the bare network so that one pass predicts what the average
predicts; the result exports with ``symmetry_average="none"``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, SettingsError
from .config import DISTIL_DEFAULTS, TrainConfig
from .export import INPUT_NAME
from .network import SYMMETRY_GROUPS, CrystalCNN, SymmetryAverage
from .runtime import load_card, sha256_of
from .train import _save, build_network, load_checkpoint, run_checkpoint, train

#: Largest difference between the rebuilt network (averaged as exported) and the ONNX model.
MAX_REBUILD_DIFFERENCE = 1e-4


def _onnx_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def network_from_onnx(path: Path) -> tuple[CrystalCNN, TrainConfig, tuple]:
    """The bare network inside an exported model, its training config and its symmetry group.

    The exporter folds every BatchNorm into the convolution before it (the convolution's
    ``weight`` and a ``weight_bias``); the rebuilt network carries the folded weights and
    BatchNorm layers that are the identity plus that bias, so it computes what the ONNX graph
    computes and trains like the original.

    Parameters
    ----------
    path : Path
        ``<name>.onnx`` with its card ``<name>.json`` beside it.

    Returns
    -------
    net : CrystalCNN
        The bare network, in eval mode.
    config : TrainConfig
        A config that builds this network (:func:`~bcdi_bluesky.model.train.build_network`).
    symmetries : tuple
        The group the model averages over (empty for a bare model).

    Raises
    ------
    ModelError
        When the model's weights do not fit the network its card describes, or the rebuilt
        network (averaged over the group) differs from the ONNX output by more than
        :data:`MAX_REBUILD_DIFFERENCE`.
    """
    path = Path(path)
    card = load_card(path)
    network = dict(card["network"])
    count = int(network.pop("symmetry_average", 1))
    groups = {len(g) or 1: g for g in SYMMETRY_GROUPS.values()}
    if count not in groups:
        raise ModelError(f"{path}: no symmetry group of {count} elements")
    symmetries = groups[count]
    parameters = card["parameters"]
    training = card.get("training", {})
    config = TrainConfig(
        name=card["name"],
        grid=int(parameters["n"]),
        lmax=int(parameters["lmax"]),
        n_rbf=int(parameters["n_rbf"]),
        phase_order=int(parameters["phase_order"]),
        width=int(network["width"]),
        hidden=int(network["hidden"]),
        encoding=card["output"]["encoding"],
        friedel=bool(network.get("friedel", False)),
        zoom=int(network.get("zoom", 0)),
        seed=int(training.get("seed", 0)),
        batch_size=int(training.get("batch_size", TrainConfig.batch_size)),
        mirror_copies=int(training.get("mirror_copies", 1)),
    )
    net = build_network(config).eval()
    if net.config != network:
        raise ModelError(f"{path}: the card's network {network} is not {net.config}")
    weights = _onnx_weights(path)
    prefix = "net." if symmetries else ""
    previous_conv = None

    def weight(name: str, like: torch.Tensor) -> torch.Tensor:
        key = prefix + name
        if key not in weights:
            raise ModelError(f"{path}: no initializer {key!r} (not a CrystalCNN export)")
        value = torch.from_numpy(np.array(weights[key], dtype=np.float32))
        if value.shape != like.shape:
            raise ModelError(f"{path}: {key} has shape {tuple(value.shape)}, not {like.shape}")
        return value

    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.copy_(weight(f"{name}.weight", module.weight))
                previous_conv = name
            elif isinstance(module, torch.nn.BatchNorm3d):
                # Identity: (x - 0) / sqrt((1 - eps) + eps) * 1 + folded bias.
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
                module.weight.fill_(1.0)
                module.bias.copy_(weight(f"{previous_conv}.weight_bias", module.bias))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(weight(f"{name}.weight", module.weight))
                module.bias.copy_(weight(f"{name}.bias", module.bias))
    reference = SymmetryAverage(net, config.output_encoding(), symmetries) if symmetries else net
    x = np.random.default_rng(0).uniform(size=(2, 1) + (config.grid,) * 3).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        got = reference.eval()(torch.from_numpy(x)).numpy()
    difference = float(np.abs(got - expected).max())
    if difference > MAX_REBUILD_DIFFERENCE:
        raise ModelError(
            f"{path}: the rebuilt network differs from the ONNX model by {difference:.2e} "
            f"(more than {MAX_REBUILD_DIFFERENCE:.0e})"
        )
    return net, config, symmetries


class GroupAverageTeacher:
    """The teacher's symmetry average for batches of views that :func:`train` makes.

    A distillation batch holds each crystal seen through every element ``h`` of the group, in
    the group's order (crystal-major). The teacher's average for view ``h x`` is
    ``M_h T(x)`` with ``T(x)`` the average over the group (``M_h`` maps encoded outputs to
    the mirrored crystal; the average is equivariant), so one pass of the bare network per
    view gives the teacher's output for all of them.

    Parameters
    ----------
    net : CrystalCNN
        The teacher's bare network (kept as a frozen copy).
    encoding : TwinInvariantEncoding
        Its output encoding (one with ``symmetry_map``).
    symmetries : sequence of (permutation, flips)
        The group, mirrors only (identity permutation).
    """

    def __init__(self, net: CrystalCNN, encoding, symmetries):
        if any(tuple(p) != (0, 1, 2) for p, _ in symmetries):
            raise ValueError("the views of a distillation batch are mirrors only")
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        model = encoding.model
        matrices = [model.symmetry_matrix(p, f) for p, f in symmetries]
        self.unmaps = torch.tensor(
            np.array([encoding.symmetry_map(a.T) for a in matrices]), dtype=torch.float32
        )
        self.maps = torch.tensor(
            np.array([encoding.symmetry_map(a) for a in matrices]), dtype=torch.float32
        )

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """``(C * G, 1, N, N, N)`` views -> ``(C * G, K)`` the teacher's encoded outputs."""
        g = len(self.maps)
        with torch.no_grad():
            y = self.net(views).reshape(views.shape[0] // g, g, -1)
            mean = torch.einsum("cgk,gjk->cj", y, self.unmaps) / g
            return torch.einsum("cj,gkj->cgk", mean, self.maps).reshape(views.shape[0], -1)


def distil(
    teacher: Path,
    directory: Path,
    *,
    steps: int,
    name: str | None = None,
    lr: float = DISTIL_DEFAULTS["lr"],
    warmup_steps: int = DISTIL_DEFAULTS["warmup_steps"],
    truth_share: float = DISTIL_DEFAULTS["truth_share"],
    batch_size: int | None = None,
    seed: int | None = None,
    validate_every: int = DISTIL_DEFAULTS["validate_every"],
    checkpoint_every: int = DISTIL_DEFAULTS["checkpoint_every"],
    validation_size: int = DISTIL_DEFAULTS["validation_size"],
    resume: bool = False,
    workers: int = 1,
    threads: int | None = None,
    time_limit_s: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fine-tune the teacher's bare network to predict, in one pass, what the teacher predicts.

    The student starts from the teacher's own network (:func:`network_from_onnx`), keeps its
    BatchNorm frozen (folded at export) and learns on fresh crystals of its own stream
    (:data:`~bcdi_bluesky.model.data.DISTIL_STREAM`), generated as training generates them;
    its loss is the weighted MSE of the encoded outputs against the teacher's, plus a share
    ``truth_share`` of the loss against the true parameters. The run is a training run
    (:func:`~bcdi_bluesky.model.train.train`: same schedule, checkpoints, validation and
    resumption), so :func:`~bcdi_bluesky.model.export.export` reads its checkpoint.

    Parameters
    ----------
    teacher : Path
        The exported model (ONNX + card) whose outputs the student learns.
    directory : Path
        Checkpoint folder (``<directory>/<name>/last.pt``).
    steps : int
        Total optimiser steps.
    name : str, optional
        Run name (default: the teacher's name + ``"_distilled"``).
    lr, warmup_steps : float, int
        Peak learning rate and its linear warm-up (then cosine decay, as training).
    truth_share : float
        Weight in [0, 1] of the loss against the true parameters.
    batch_size, seed : int, optional
        Default: the teacher's training recipe.
    validate_every, checkpoint_every, validation_size : int
        As :class:`~bcdi_bluesky.model.config.TrainConfig`.
    resume : bool
        Continue from the run's last checkpoint (its stored recipe; ``steps`` may be raised).
    workers, threads, time_limit_s, progress, overwrite
        As :func:`~bcdi_bluesky.model.train.train`.

    Returns
    -------
    dict
        The final checkpoint state.
    """
    if not 0.0 <= truth_share <= 1.0:
        raise SettingsError(f"truth_share must be in [0, 1], got {truth_share}")
    teacher = Path(teacher).resolve()
    net, config, symmetries = network_from_onnx(teacher)
    if not symmetries:
        raise ModelError(f"{teacher} averages no symmetries: nothing to distil")
    sha256 = sha256_of(teacher)
    config.name = name or f"{config.name}_distilled"
    config.steps = steps
    config.lr = lr
    config.warmup_steps = warmup_steps
    config.batch_size = batch_size or config.batch_size
    config.seed = config.seed if seed is None else seed
    config.validate_every = validate_every
    config.checkpoint_every = checkpoint_every
    config.validation_size = validation_size
    config.mirror_copies = len(symmetries)  # every crystal through each view of the group
    config.__post_init__()  # the batch size must hold whole sets of views
    config.extra["distillation"] = {
        "teacher": str(teacher),
        "teacher_sha256": sha256,
        "symmetry_average": next(k for k, g in SYMMETRY_GROUPS.items() if g == symmetries),
        "truth_share": float(truth_share),
        # The teacher's own recipe, so the student's card keeps the lineage.
        "teacher_training": {
            k: v for k, v in load_card(teacher).get("training", {}).items() if k != "history"
        },
    }
    last = run_checkpoint(directory, config.name, resume, overwrite)
    start = last.with_name("teacher.pt")
    resuming = resume and last.is_file()
    if resuming:
        extra = load_checkpoint(last)["config"].get("extra", {})
        stored = extra.get("distillation", {}).get("teacher_sha256")
        if stored != sha256:
            raise SettingsError(f"{teacher} is not the teacher run {config.name!r} started from")
    else:
        _save(start, {"model": net.state_dict(), "config": asdict(config)})
    return train(
        config,
        Path(directory),
        resume=resume,
        workers=workers,
        time_limit_s=time_limit_s,
        threads=threads,
        progress=progress,
        init_from=None if resuming else start,
        overwrite=overwrite,
        teacher=GroupAverageTeacher(net, config.output_encoding(), symmetries),
    )
