"""The ``bcdi-bluesky`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, without a traceback."""


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        from .model.train import TrainConfig, train
    except ImportError as exc:
        raise UserError(f"training needs torch: pip install 'bcdi-bluesky[train]' ({exc})") from None
    config = TrainConfig(name=args.name, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, width=args.width, hidden=args.hidden,
                         validate_every=args.validate_every,
                         checkpoint_every=args.checkpoint_every)
    state = train(config, Path(args.checkpoints), resume=args.resume, device=args.device,
                  workers=args.workers, time_limit_s=args.time_limit,
                  threads=args.threads, progress=not args.quiet,
                  init_from=Path(args.init_from) if args.init_from else None)
    last = state["history"][-1] if state["history"] else {}
    print(json.dumps({"name": state["config"]["name"], "step": state["step"],
                      "elapsed_s": round(state["elapsed_s"], 1), "last_validation": last}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from .model.export import export
        from .model.train import checkpoint_path
    except ImportError as exc:
        raise UserError(f"export needs torch: pip install 'bcdi-bluesky[train]' ({exc})") from None
    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_path(
        Path(args.checkpoints), args.name)
    if not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt}")
    card = export(ckpt, Path(args.models_dir), args.name,
                  validation_count=args.validation_count)
    print(json.dumps({"name": card["name"], "sha256": card["sha256"],
                      "validation": card["validation"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="bcdi-bluesky",
        description="Real-time BCDI reconstruction for Bluesky beamlines.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the CNN on simulated crystals (needs torch)")
    p.add_argument("--name", default="bcdi_cnn64")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder")
    p.add_argument("--steps", type=int, default=4000, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv stage")
    p.add_argument("--hidden", type=int, default=256, help="units of the dense layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=1, help="data-generation processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop cleanly with a checkpoint after this many seconds")
    p.add_argument("--validate-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--init-from", default=None,
                   help="warm-start a new run from another checkpoint's weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to models/<name>.onnx + card")
    p.add_argument("--name", default="bcdi_cnn64")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--checkpoint", default=None, help="explicit checkpoint file")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--validation-count", type=int, default=500)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcdi-bluesky`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"bcdi-bluesky {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bcdi-bluesky {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
