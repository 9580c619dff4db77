"""Training of the crystal CNN on streamed simulated samples, resumable from checkpoints.

Every sample is a deterministic function of ``(seed, stream, index)``, so a resumed run sees
exactly the data it would have seen without the interruption, and no data set is stored.
"""

from __future__ import annotations

import logging
import math
import platform
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import ModelError, SettingsError
from ..files import atomic_path, check_destination
from ..physics import CrystalPrior
from .config import TrainConfig, check_whole_number
from .data import (
    DISTIL_STREAM,
    MIRROR_STREAM,
    TRAIN_STREAM,
    VALIDATION_STREAM,
    make_batch,
    mirror_views,
    mirrored_copies,
)
from .encoding import TwinInvariantEncoding
from .evaluate import validate
from .network import SYMMETRY_GROUPS, CrystalCNN, WeightedMSE, parameter_weights

log = logging.getLogger(__name__)


class _BatchStream(Dataset):
    """Batch ``i`` of the training stream, generated on demand (workers run this).

    A distillation run (``config.extra["distillation"]``) reads its own stream
    (:data:`~bcdi_bluesky.model.data.DISTIL_STREAM`) and shows each crystal through every
    mirror of the teacher's symmetry group, in the group's order (``mirror_copies`` is the
    group's size): the teacher's average for all of them then costs one pass per view.
    """

    def __init__(self, config: TrainConfig, first_step: int):
        self.config = config
        self.model = config.crystal_model()
        self.prior = CrystalPrior(self.model)
        self.encoding = config.output_encoding()
        self.first_step = first_step
        distillation = config.extra.get("distillation")
        self.stream = DISTIL_STREAM if distillation else TRAIN_STREAM
        self.views = (
            [flips for _, flips in SYMMETRY_GROUPS[distillation["symmetry_average"]]]
            if distillation
            else None
        )

    def __len__(self) -> int:
        return max(self.config.steps - self.first_step, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.first_step + i
        c = self.config
        crystals = c.batch_size // c.mirror_copies
        x, y = make_batch(self.model, self.prior, c.seed, self.stream, step * crystals, crystals)
        if self.views:
            x, y = mirror_views(self.model, x, y, self.views)
        elif c.mirror_copies > 1:
            rng = np.random.default_rng([c.seed, MIRROR_STREAM, step])
            x, y = mirrored_copies(self.model, x, y, c.mirror_copies, rng)
        y = self.encoding.encode(y).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)


def _learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 2% over ``config.steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), 1.0)
    return config.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def checkpoint_path(directory: Path, name: str) -> Path:
    """Where the latest checkpoint of run ``name`` lives."""
    return Path(directory) / name / "last.pt"


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) asks the training loop to stop after its step with a checkpoint; a
    second Ctrl-C acts as before (stops at once). Handlers can be set only from the main
    thread: elsewhere this does nothing."""

    def __enter__(self) -> _StopOnInterrupt:
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        log.warning("Ctrl-C: stopping after this step with a checkpoint (again: stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def _ignore_interrupts(worker_id: int) -> None:
    """Data workers leave Ctrl-C to the training process, which stops with a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _save(path: Path, state: dict) -> None:
    # Atomic: an interrupted save never corrupts the last checkpoint.
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


#: What every checkpoint of :func:`train` holds.
CHECKPOINT_KEYS = ("config", "model", "step")


def load_checkpoint(path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """Load a checkpoint written by :func:`train` (CPU tensors) that holds ``keys``.

    Raises
    ------
    ModelError
        No file there, or one that is not such a checkpoint (truncated, another format...).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no checkpoint at {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch reports a bad file with many exception types
        raise ModelError(
            f"{path}: not a checkpoint written by train ({type(exc).__name__}: {exc})"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ModelError(f"{path}: not a checkpoint written by train (no {', '.join(missing)})")
    return state


def run_checkpoint(directory: Path, name: str, resume: bool, overwrite: bool) -> Path:
    """The last checkpoint of run ``name``, checked before any work: writable there, and not
    an existing run unless ``resume`` or ``overwrite`` says what to do with it.

    Raises
    ------
    SettingsError, DataError
        See :func:`train`.
    """
    path = check_destination(checkpoint_path(directory, name))
    if path.exists() and not (resume or overwrite):
        raise SettingsError(
            f"{path} exists: resume (--resume) to continue that run, or overwrite "
            "(--overwrite) to start it again"
        )
    return path


def _warn_ignored_on_resume(
    stored: TrainConfig, given: TrainConfig, init_from: Path | None
) -> None:
    """One warning naming what a resumed run does not take from ``given``."""
    ignored = [
        f"{key} {getattr(stored, key)!r} (given {getattr(given, key)!r})"
        for key in asdict(stored)
        if key not in ("name", "extra")
        and getattr(stored, key) != getattr(given, key)
        and not (key == "steps" and given.steps > stored.steps)
    ]
    if init_from is not None:
        ignored.append(f"the run's own weights (init_from {init_from} not used)")
    if ignored:
        log.warning("resuming %s with its stored %s", stored.name, "; ".join(ignored))


def build_network(config: TrainConfig) -> CrystalCNN:
    """The network a config describes (outputs: the twin-invariant encoding)."""
    enc = config.output_encoding()
    return CrystalCNN(
        enc.size,
        config.grid,
        config.width,
        config.hidden,
        n_bounded=enc.n_even,
        friedel=config.friedel,
        zoom=config.zoom,
    )


def warm_start(net: CrystalCNN, checkpoint: Path, config: TrainConfig) -> int:
    """Initialise ``net`` from another run's weights where they fit; returns tensors copied.

    Every tensor of the same name and shape is copied. The last layer of a network that
    predicted the plain parameter vector gives its rows for the twin-even parameters. A
    network without the Friedel channel gives its first convolution to the intensity channel
    (the new channel starts at zero weight, so the warm-started network computes what the old
    one did). A network without the zoom encoder gives the dense layer's columns for the main
    encoder's features; the zoom features' columns start small.
    """
    old = load_checkpoint(checkpoint, keys=("model",))["model"]
    own = net.state_dict()
    copied = 0
    for key, value in old.items():
        if key in own and own[key].shape == value.shape:
            own[key] = value.clone()
            copied += 1
    first = next(k for k in own if k.startswith("encoder."))
    if (
        first in old
        and own[first].shape[1] == 2
        and old[first].shape[1] == 1
        and own[first].shape[0] == old[first].shape[0]
    ):
        own[first].zero_()
        own[first][:, :1] = old[first]
        copied += 1
    dense = next(k for k in own if k.startswith("head.") and k.endswith("weight"))
    if (
        dense in old
        and own[dense].shape[0] == old[dense].shape[0]
        and own[dense].shape[1] > old[dense].shape[1]
    ):
        columns = old[dense].shape[1]
        own[dense][:, :columns] = old[dense]
        own[dense][:, columns:] *= 0.1
        copied += 1
    enc = config.output_encoding()
    last_w, last_b = [k for k in own if k.startswith("head.")][-2:]
    if (
        isinstance(enc, TwinInvariantEncoding)
        and old[last_w].shape[0] == enc.model.size
        and own[last_w].shape != old[last_w].shape
    ):
        own[last_w][: enc.n_even] = old[last_w][enc.even]
        own[last_b][: enc.n_even] = old[last_b][enc.even]
        # The matrix rows keep a small random start, not zero: zero rows would pass no
        # gradient back into the trunk, which must learn new features for the odd terms.
        own[last_w][enc.n_even :] *= 0.1
        own[last_b][enc.n_even :] = 0.0
        copied += 2
    net.load_state_dict(own)
    return copied


def train(
    config: TrainConfig,
    directory: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    workers: int = 1,
    time_limit_s: float | None = None,
    threads: int | None = None,
    progress: bool = True,
    init_from: Path | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or continue training) and checkpoint; returns the final checkpoint state.

    Parameters
    ----------
    config : TrainConfig
        The run. With ``resume``, the stored config is used, except ``steps`` which may be
        raised to train longer.
    directory : Path
        Checkpoint folder (``<directory>/<name>/last.pt``).
    resume : bool
        Continue from the last checkpoint when there is one. Options of ``config`` that
        differ from the stored ones are named in one logged warning (the stored ones are
        kept, except a larger ``steps``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    workers : int
        Data-generation processes (0: generate in the training process).
    time_limit_s : float, optional
        Stop cleanly (with a checkpoint) after this many seconds of this call.
    threads : int, optional
        Torch intra-op threads on the CPU.
    progress : bool
        Show a progress bar (loss, validation IoU, ETA).
    init_from : Path, optional
        Warm-start a new run from another checkpoint (see :func:`warm_start`).
    teacher : callable, optional
        Encoded targets for a batch of inputs; required by a distillation run, a config with
        ``extra["distillation"]`` (:func:`bcdi_bluesky.model.distil.distil` sets both). Its
        loss is ``(1 - s) L(net, teacher) + s L(net, truth)`` with
        ``s = extra["distillation"]["truth_share"]``; the network stays in eval mode.
    overwrite : bool
        Start again over an existing run of the same name (without it, or ``resume``, an
        existing checkpoint is refused: hours of training are not lost to a missed flag).

    Raises
    ------
    SettingsError
        A checkpoint of this name exists and neither ``resume`` nor ``overwrite`` is given;
        ``workers``, ``threads`` or ``time_limit_s`` is out of range.
    DataError
        The checkpoint cannot be written there (checked before any work).
    ModelError
        The checkpoint to resume or ``init_from`` is not a checkpoint.
    """
    check_whole_number("workers", workers, 0)
    if threads is not None:
        check_whole_number("threads", threads, 1)
    if time_limit_s is not None and not (
        isinstance(time_limit_s, (int, float)) and math.isfinite(time_limit_s) and time_limit_s >= 0
    ):
        raise SettingsError(f"time_limit_s must be a number of seconds >= 0, got {time_limit_s!r}")
    if threads:
        torch.set_num_threads(threads)
    path = run_checkpoint(directory, config.name, resume, overwrite)
    state = None
    if resume and path.is_file():
        state = load_checkpoint(path)
        stored = TrainConfig.from_checkpoint(state["config"])
        _warn_ignored_on_resume(stored, config, init_from)
        stored.steps = max(stored.steps, config.steps)
        config = stored
    distillation = config.extra.get("distillation")
    if distillation and teacher is None:
        raise ValueError(f"run {config.name!r} distils a teacher model: pass teacher")
    torch.manual_seed(config.seed)
    net = build_network(config)
    if init_from is not None and state is None:
        warm_start(net, Path(init_from), config)
        config.extra["warm_start"] = str(init_from)
    net = net.to(device)
    encoding = config.output_encoding()
    loss_fn = WeightedMSE(
        encoding.weights(parameter_weights(encoding.model)),
        encoding.model.twin_signs if encoding.needs_twin_min else None,
    )
    loss_fn = loss_fn.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, elapsed, history, running = 0, 0.0, [], None
    if state is not None:
        net.load_state_dict(state["model"])
        if "optimizer" in state:  # absent in checkpoints trimmed for transfer
            opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed_s"], state["history"]
        running = state.get("running_loss")
        if "torch_rng" in state:  # dropout masks continue as if never interrupted
            torch.set_rng_state(state["torch_rng"])

    model = config.crystal_model()

    def training_mode() -> None:
        # A distilled network learns a deterministic target in eval mode: the teacher's
        # BatchNorm is folded into its convolutions (its statistics stay fixed), and dropout
        # would only add noise to the small differences it learns.
        net.train(not distillation)

    def predict(x: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = net(torch.from_numpy(x[:, None]).to(device)).cpu().numpy()
        training_mode()
        return encoding.decode(out)

    def snapshot(elapsed_s: float) -> dict:
        return {
            "config": asdict(config),
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed_s": elapsed_s,
            "torch_rng": torch.get_rng_state(),
            "history": history,
            # The loss's moving average: a resumed run logs what an uninterrupted one would.
            "running_loss": running,
            "machine": platform.platform(),
            "device": torch.cuda.get_device_name()
            if device.startswith("cuda")
            else platform.processor() or platform.machine(),
        }

    loader = DataLoader(
        _BatchStream(config, step),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_interrupts if workers else None,
        # Its own generator: a loader seeding itself from the global RNG
        # would shift the dropout masks of a resumed run.
        generator=torch.Generator().manual_seed(config.seed),
    )
    started = time.perf_counter()
    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=config.name,
    )
    training_mode()
    truth_share = distillation["truth_share"] if distillation else 1.0
    log.info(
        "training %s from step %d to %d (Ctrl-C stops with a checkpoint)",
        config.name,
        step,
        config.steps,
    )
    with _StopOnInterrupt() as interrupt:
        for x, y in loader:
            lr = _learning_rate(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = net(x)
            loss = loss_fn(out, y) if truth_share else 0.0
            if distillation:
                loss = truth_share * loss + (1.0 - truth_share) * loss_fn(out, teacher(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            now = time.perf_counter()
            total_elapsed = elapsed + (now - started)
            if step % config.validate_every == 0 or step == config.steps:
                v = validate(
                    predict, model, config.validation_size, config.seed, stream=VALIDATION_STREAM
                ).summary()
                history.append({"step": step, "loss": running, "elapsed_s": total_elapsed, **v})
                bar.set_postfix(
                    loss=f"{running:.4f}", val_iou=f"{v['iou_median']:.3f}", lr=f"{lr:.1e}"
                )
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
            bar.update(1)
            out_of_time = time_limit_s is not None and now - started > time_limit_s
            if step % config.checkpoint_every == 0 or out_of_time:
                _save(path, snapshot(total_elapsed))
            if out_of_time or interrupt.requested:
                break
    bar.close()
    final = snapshot(elapsed + time.perf_counter() - started)
    _save(path, final)
    if interrupt.requested:
        log.warning(
            "%s interrupted at step %d: checkpoint %s; continue with --resume",
            config.name,
            step,
            path,
        )
        raise KeyboardInterrupt
    return final
