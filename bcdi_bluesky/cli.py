"""The ``bcdi-bluesky`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import BCDIError


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, without a traceback."""


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        from .model.train import TrainConfig, train
    except ImportError as exc:
        raise UserError(f"training needs torch: pip install 'bcdi-bluesky[train]' ({exc})"
                        ) from None
    config = TrainConfig(name=args.name, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                         width=args.width, hidden=args.hidden,
                         validate_every=args.validate_every,
                         checkpoint_every=args.checkpoint_every, encoding=args.encoding,
                         friedel=args.friedel, mirror_copies=args.mirror_copies,
                         zoom=args.zoom)
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
        raise UserError(f"export needs torch: pip install 'bcdi-bluesky[train]' ({exc})"
                        ) from None
    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_path(
        Path(args.checkpoints), args.name)
    if not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt}")
    card = export(ckpt, Path(args.models_dir), args.name,
                  validation_count=args.validation_count, latent_count=args.latent_count,
                  symmetry_average=args.symmetry_average)
    print(json.dumps({"name": card["name"], "sha256": card["sha256"],
                      "validation": card["validation"]}))
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .io import RESULT_SUFFIXES, DataError, read_intensity, write_result
    from .model.runtime import ModelError

    if args.output and Path(args.output).suffix.lower() not in RESULT_SUFFIXES:
        raise UserError(f"{args.output}: unsupported output type (use one of "
                        f"{', '.join(RESULT_SUFFIXES)})")
    try:
        data, mask = read_intensity(args.input, args.dataset)
    except DataError as exc:
        raise UserError(str(exc)) from None
    try:
        from .pipeline import Reconstructor

        rec = Reconstructor(args.model, es_time_budget_s=args.es_time_budget,
                            polish_iterations=args.polish_iterations)
    except ModelError as exc:
        raise UserError(str(exc)) from None

    def progress(stage: str, info: dict) -> None:
        if args.json or stage.endswith("_step"):
            return
        figures = ", ".join(f"{k} {v:.3g}" for k, v in info.items()
                            if isinstance(v, float))
        print(f"{stage:>10}: {figures}", file=sys.stderr)

    try:
        result = rec.reconstruct(data, mask, refine=args.refine, progress=progress)
    except ValueError as exc:
        raise UserError(f"{args.input}: {exc}") from None
    outputs = {}
    if args.output:
        try:
            outputs["output"] = str(write_result(result, args.output,
                                                 {"input": str(args.input)}))
        except (DataError, OSError) as exc:
            raise UserError(str(exc)) from None
    if args.plot:
        from .plotting import plot_reconstruction

        outputs["plot"] = str(plot_reconstruction(result, args.plot, title=str(args.input)))
        if rec.runtime.latent_map is not None and result.latent_xy is not None:
            from .plotting import plot_latent_map

            latent_png = Path(args.plot).with_name(Path(args.plot).stem + "_latent.png")
            outputs["latent_plot"] = str(plot_latent_map(
                rec.runtime.latent_map, latent_png,
                scans=[(Path(args.input).name, result.latent_xy, result.out_of_distribution)]))
    summary = {**result.summary(), **outputs, "input": str(args.input)}
    if args.json:
        print(json.dumps(summary))
    else:
        t = result.timings
        print(f"{args.input}: chi {result.chi:.4f} (CNN {result.chi_cnn:.4f}), support "
              f"{int(result.support.sum())} voxels, {t['total']:.2f} s on {result.provider}")
        for key, value in outputs.items():
            print(f"  {key}: {value}")
    return 0


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--zmq wants HOST:PORT (for example 127.0.0.1:5578), got {text!r}")
    return host, int(port)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from bluesky.callbacks.zmq import RemoteDispatcher

    from .beamline import BCDIReconstructionCallback, ResultFileWriter

    host, port = _parse_address(args.zmq)
    publishers: list = [ResultFileWriter(args.output)] if args.output else []
    if args.prefix:
        from .epics import IOCPublisher

        publishers.append(IOCPublisher(prefix=args.prefix))

    def report(result, start) -> None:
        print(json.dumps({"scan_id": start.get("scan_id"), "uid": start["uid"],
                          "chi": result.chi, "timings_s": result.timings}), flush=True)

    callback = BCDIReconstructionCallback(image_key=args.image_key, motor_key=args.motor_key,
                                          on_result=report, publishers=publishers,
                                          refine=args.refine)
    dispatcher = RemoteDispatcher(f"{host}:{port}")
    dispatcher.subscribe(callback)
    # A service manager stops us with SIGTERM: finish the queued reconstructions first.
    signal.signal(signal.SIGTERM, lambda *_: dispatcher.stop())
    print(f"bcdi-bluesky serve: listening to the 0MQ proxy at {host}:{port}", file=sys.stderr,
          flush=True)
    try:
        dispatcher.start()
    finally:
        callback.wait(timeout=120)
        callback.close()
    return 0


def _cmd_ioc(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .epics import IOCServer

    server = IOCServer(prefix=args.prefix).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"bcdi-bluesky ioc: serving {len(server.group.pvdb)} PVs with prefix {args.prefix}",
          file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        run_demo(scans=args.scans, output=args.output, prefix=args.prefix, linger=args.linger,
                 seed=args.seed, as_json=args.json)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="bcdi-bluesky",
        description="Real-time BCDI reconstruction for Bluesky beamlines.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="closed-loop scans on the simulated beamline, with the IOC")
    p.add_argument("--scans", type=int, default=3)
    p.add_argument("--output", default=None, help="output folder (default: a new temp folder)")
    p.add_argument("--prefix", default=None, help="IOC prefix (default: a random DEMOxxxx:)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="keep the IOC serving this many seconds after the last scan")
    p.add_argument("--seed", type=int, default=0, help="the hidden crystal")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout at the end")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("reconstruct", help="reconstruct a crystal from a diffraction volume")
    p.add_argument("input", help=".npy, .npz (intensity, mask), .h5/.cxi/.nxs or TIFF stack")
    p.add_argument("--output", "-o", default=None, help="result file (.npz, .cxi or .h5)")
    p.add_argument("--refine", choices=("none", "es", "full"), default="full")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a figure of the result")
    p.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    p.add_argument("--dataset", default=None, help="HDF5 dataset holding the intensity")
    p.add_argument("--es-time-budget", type=float, default=5.0,
                   help="seconds for the refinement (odd-shape search and ES)")
    p.add_argument("--polish-iterations", type=int, default=150,
                   help="steps of the polish's ER/HIO run (after 50 ER steps)")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("serve", help="reconstruct the runs published by a Bluesky 0MQ proxy")
    p.add_argument("--zmq", required=True, metavar="HOST:PORT",
                   help="the proxy's output address (bluesky-0MQ-proxy IN OUT: OUT)")
    p.add_argument("--image-key", default="det_image")
    p.add_argument("--motor-key", default="theta")
    p.add_argument("--refine", choices=("none", "es", "full"), default="full")
    p.add_argument("--output", default=None, help="folder for one CXI result file per scan")
    p.add_argument("--prefix", default=None, help="also serve the results as PVs (e.g. BCDI:)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("ioc", help="run the reconstruction IOC alone")
    p.add_argument("--prefix", default="BCDI:")
    p.set_defaults(func=_cmd_ioc)

    p = sub.add_parser("train", help="train the CNN on simulated crystals (needs torch)")
    p.add_argument("--name", default="bcdi_cnn64")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder")
    p.add_argument("--steps", type=int, default=4000, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv stage")
    p.add_argument("--hidden", type=int, default=256, help="units of the dense layer")
    p.add_argument("--encoding", default="twin_blocks_v1",
                   choices=("twin_blocks_v1", "twin_invariant_v1", "normalised_v1"),
                   help="what the network regresses (see bcdi_bluesky.model.encoding)")
    p.add_argument("--no-friedel", dest="friedel", action="store_false",
                   help="leave out the network's I(q) - I(-q) input channel")
    p.add_argument("--zoom", type=int, default=32,
                   help="centred crop edge seen by a full-resolution encoder (0: none)")
    p.add_argument("--mirror-copies", type=int, default=2,
                   help="mirror images of each simulated crystal per batch (1-8; more trains "
                        "faster where simulating the crystals is the bottleneck, as on a CPU)")
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
    p.add_argument("--symmetry-average", default="half_turns",
                   choices=("half_turns", "mirrors", "none"),
                   help="average the exported network over these grid symmetries (cost: 4x, "
                        "8x, 1x the bare network)")
    p.add_argument("--latent-count", type=int, default=2000,
                   help="prior crystals that calibrate the latent map (0: none)")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcdi-bluesky`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UserError, BCDIError) as exc:
        print(f"bcdi-bluesky {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bcdi-bluesky {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
