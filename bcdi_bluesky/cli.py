"""The ``bcdi-bluesky`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from . import __version__
from .errors import BCDIError, DataError, one_line
from .files import check_destination

if TYPE_CHECKING:
    from .settings import ReconstructionSettings


class UserError(BCDIError):
    """A problem with what the command line asks for (a path, an option): reported in one
    line, without a traceback, like every :class:`~bcdi_bluesky.errors.BCDIError`."""


@contextlib.contextmanager
def _needs_torch(task: str) -> Iterator[None]:
    """Around the import of training code: without torch, one line saying what to install."""
    try:
        yield
    except ImportError as exc:
        raise UserError(f"{task} needs torch: pip install 'bcdi-bluesky[train]' ({exc})") from None


def _cmd_train(args: argparse.Namespace) -> int:
    with _needs_torch("training"):
        from .model.train import TrainConfig, train
    config = TrainConfig(
        name=args.name,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        width=args.width,
        hidden=args.hidden,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        encoding=args.encoding,
        friedel=args.friedel,
        mirror_copies=args.mirror_copies,
        zoom=args.zoom,
    )
    state = train(
        config,
        Path(args.checkpoints),
        resume=args.resume,
        device=args.device,
        workers=args.workers,
        time_limit_s=args.time_limit,
        threads=args.threads,
        progress=not args.quiet,
        init_from=Path(args.init_from) if args.init_from else None,
        overwrite=args.overwrite,
    )
    _print_run_state(state)
    return 0


def _print_run_state(state: dict) -> None:
    """One JSON line: the training run's name, step, seconds and last validation."""
    last = state["history"][-1] if state["history"] else {}
    print(
        json.dumps(
            {
                "name": state["config"]["name"],
                "step": state["step"],
                "elapsed_s": round(state["elapsed_s"], 1),
                "last_validation": last,
            }
        )
    )


def _cmd_distil(args: argparse.Namespace) -> int:
    with _needs_torch("distillation"):
        from .model.distil import distil
    if not Path(args.teacher).is_file():
        raise UserError(f"no teacher model at {args.teacher}")
    state = distil(
        Path(args.teacher),
        Path(args.checkpoints),
        steps=args.steps,
        name=args.name,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        truth_share=args.truth_share,
        batch_size=args.batch_size,
        seed=args.seed,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        validation_size=args.validation_size,
        resume=args.resume,
        workers=args.workers,
        threads=args.threads,
        time_limit_s=args.time_limit,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    _print_run_state(state)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from .model.export import export
        from .model.train import checkpoint_path
    except ImportError as exc:
        raise UserError(f"export needs torch: pip install 'bcdi-bluesky[train]' ({exc})") from None
    ckpt = (
        Path(args.checkpoint)
        if args.checkpoint
        else checkpoint_path(Path(args.checkpoints), args.name)
    )
    card = export(
        ckpt,
        Path(args.models_dir),
        args.name,
        validation_count=args.validation_count,
        latent_count=args.latent_count,
        symmetry_average=args.symmetry_average,
        overwrite=args.overwrite,
    )
    print(
        json.dumps(
            {"name": card["name"], "sha256": card["sha256"], "validation": card["validation"]}
        )
    )
    return 0


#: Bytes of memory a reconstruction needs per voxel of the input volume, beyond the process
#: itself (measured: docs/user_guide.md, "Large volumes").
BYTES_PER_INPUT_VOXEL = 64


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of the system's available memory,
    the cgroup's limit (containers, batch jobs) and the address-space limit (``ulimit -v``);
    None when none is known."""
    import resource

    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        top = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if top.isdigit() and used.isdigit():
            limits.append(int(top) - int(used))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[0])
            limits.append(soft - pages * resource.getpagesize())
        except OSError:
            limits.append(soft)
    return max(min(limits), 0) if limits else None


def check_memory(shape: tuple[int, ...], source: str) -> None:
    """Refuse a volume whose reconstruction would not fit in the memory left (one line)."""
    need = int(np.prod(shape)) * BYTES_PER_INPUT_VOXEL
    free = available_memory()
    if free is not None and need > free:
        raise UserError(
            f"{source}: a {'x'.join(map(str, shape))} volume needs about "
            f"{need / 2**30:.1f} GiB to reconstruct, {free / 2**30:.1f} GiB are "
            f"available (crop or bin it, or pass --no-memory-check)"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links); False when ``a`` does not exist
    yet and resolves elsewhere."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def settings_from_args(args: argparse.Namespace) -> ReconstructionSettings:
    """The reconstruction settings: the defaults with every settings option given (validated:
    a value outside its limits is a one-line SettingsError)."""
    from .settings import ReconstructionSettings

    given = {
        info.name: getattr(args, info.name)
        for info in ReconstructionSettings.fields_info()
        if getattr(args, info.name) is not None
    }
    return ReconstructionSettings().replace(**given)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .io import RESULT_SUFFIXES, check_vtk, read_geometry, read_intensity, write_result

    settings = settings_from_args(args)
    sources = {"input": args.input, "geometry": args.geometry}
    targets = {"--output": args.output, "--plot": args.plot}
    if args.plot:
        targets["--plot (its latent map)"] = _latent_plot_path(args.plot)
    for option, target in targets.items():
        for what, source in sources.items():
            if target and source and _same_file(Path(target), Path(source)):
                raise UserError(
                    f"{option} {target} is the {what} file: it would be overwritten "
                    f"(choose another name)"
                )
        if target:
            try:
                check_destination(target)
            except DataError as exc:
                raise UserError(f"{option} {exc}") from None
    if args.output and Path(args.output).suffix.lower() not in RESULT_SUFFIXES:
        raise UserError(
            f"{args.output}: unsupported output type (use one of {', '.join(RESULT_SUFFIXES)})"
        )
    if args.output and Path(args.output).suffix.lower() == ".vti":
        if not args.geometry:
            raise UserError(f"{args.output}: a .vti file is on the lab grid: give --geometry")
        check_vtk()
    if args.plot:
        _check_plot_path(Path(args.plot))
    data, mask = read_intensity(args.input, args.dataset)
    geometry = read_geometry(args.geometry) if args.geometry else None
    if not args.no_memory_check:
        check_memory(data.shape, str(args.input))
    from .pipeline import Reconstructor

    rec = Reconstructor(args.model, settings=settings, device=args.device)

    def progress(stage: str, info: dict) -> None:
        if args.json or stage.endswith("_step"):
            return
        figures = ", ".join(f"{k} {v:.3g}" for k, v in info.items() if isinstance(v, float))
        print(f"{stage:>10}: {figures}", file=sys.stderr)

    result = rec.reconstruct(data, mask, refine=args.refine, progress=progress, geometry=geometry)
    outputs = {}
    if args.output:
        outputs["output"] = str(write_result(result, args.output, {"input": str(args.input)}))
    if args.plot:
        try:
            outputs.update(_plots(args, rec, result))
        except UserError as exc:
            # All or nothing: the result file written a moment ago goes too.
            for written in outputs.values():
                Path(written).unlink(missing_ok=True)
            text = str(exc)
            if not text.endswith("nothing was written"):
                text += "; nothing was written"
            raise UserError(text) from None
    summary = {**result.summary(), **outputs, "input": str(args.input)}
    if args.json:
        print(json.dumps(summary))
    else:
        t = result.timings
        print(
            f"{args.input}: chi {result.chi:.4f} (CNN {result.chi_cnn:.4f}), support "
            f"{int(result.support.sum())} voxels, {t['total']:.2f} s on {result.provider}"
        )
        print(f"  quality: {result.quality}")
        for reason in result.quality_reasons:
            print(f"    - {reason}")
        for key, value in outputs.items():
            print(f"  {key}: {value}")
    return 0


def _latent_plot_path(plot: str) -> Path:
    """Where ``--plot`` puts the latent map beside the figure: ``NAME_latent`` with the
    figure's type."""
    return Path(plot).with_name(Path(plot).stem + "_latent" + Path(plot).suffix)


def _check_plot_path(path: Path) -> None:
    """Refuse a figure path matplotlib cannot write before any work is done (one line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = path.suffix.lower().lstrip(".")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if kind not in formats:
        raise UserError(
            f"--plot {path}: unsupported figure type (use one of "
            f"{', '.join('.' + k for k in sorted(formats))})"
        )


def _plots(args: argparse.Namespace, rec, result) -> dict[str, str]:
    """Write the figure (and the latent map beside it); an error is one line."""
    from .plotting import plot_latent_map, plot_reconstruction

    try:
        outputs = {"plot": str(plot_reconstruction(result, args.plot, title=str(args.input)))}
        if rec.runtime.latent_map is not None and result.latent_xy is not None:
            outputs["latent_plot"] = str(
                plot_latent_map(
                    rec.runtime.latent_map,
                    _latent_plot_path(args.plot),
                    scans=[(Path(args.input).name, result.latent_xy, result.out_of_distribution)],
                )
            )
    except OSError as exc:  # the folder cannot be made or written, the disk is full
        raise UserError(f"--plot {args.plot}: cannot write ({exc.strerror or exc})") from None
    except DataError as exc:  # the atomic write's own one line, which names the file
        raise UserError(f"--plot: {exc}") from None
    return outputs


#: Exit status of ``serve`` when its Dask client is closed for good: a failure at run time
#: (as ``reprocess`` with a failed run), not a bad command line (2), so that a service
#: manager's restart-on-failure starts it again.
SCHEDULER_LOST = 1


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import pickle

    from .beamline import BCDIReconstructionCallback, Publisher, ResultFileWriter
    from .errors import ModelError
    from .remote import RemoteDispatcher, deserializer

    class Report(Publisher):
        """stdout: one JSON line per scan that reached the worker."""

        def __call__(self, result, start_doc: dict) -> None:
            print(
                json.dumps(
                    {
                        "uid": start_doc["uid"],
                        "scan_id": start_doc.get("scan_id"),
                        "status": "done",
                        **result.summary(),
                    }
                ),
                flush=True,
            )

        def skipped(self, message: str, start_doc: dict) -> None:
            self._not_reconstructed("skipped", message, start_doc)

        def failure(self, message: str, start_doc: dict) -> None:
            self._not_reconstructed("not reconstructed", message, start_doc)

        @staticmethod
        def _not_reconstructed(status: str, message: str, start_doc: dict) -> None:
            print(
                json.dumps(
                    {
                        "uid": start_doc["uid"],
                        "scan_id": start_doc.get("scan_id"),
                        "status": status,
                        "message": message,
                    }
                ),
                flush=True,
            )

    if args.output:
        check_destination(args.output, folder=True)
    if args.prefix:  # before the model loads and the sockets open
        _refuse_a_served_prefix(args.prefix)
    if args.tiled:  # the runs completed on a Tiled server, frames read through it
        from .beamline.tiled import TiledRunSource, connect

        dispatcher = TiledRunSource(
            connect(args.tiled, args.api_key), args.image_key, args.motor_key, args.stream
        )
    else:
        try:
            dispatcher = RemoteDispatcher(
                args.zmq,
                deserializer=pickle.loads if args.allow_pickle else deserializer,
                max_message_bytes=int(args.max_message_mb * 2**20),
            )
        except ValueError as exc:
            raise UserError(f"--zmq: {exc}") from None
    try:
        from .pipeline import Reconstructor

        reconstructor = Reconstructor(args.model, device=args.device)
    except ModelError as exc:
        raise UserError(str(exc)) from None
    # stdout carries the JSON lines only; everything else goes to stderr through logging.
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    publishers: list = [ResultFileWriter(args.output)] if args.output else []
    if args.prefix:
        from .epics import IOCPublisher

        publishers.append(
            IOCPublisher(
                prefix=args.prefix, access=_write_access(args), settings=reconstructor.settings
            )
        )
    publishers.append(Report())  # last: its line says that the other publishers are done
    dask_client, executor = _dask(args.dask, reconstructor) if args.dask else (None, None)
    callback = BCDIReconstructionCallback(
        image_key=args.image_key,
        motor_key=args.motor_key,
        stream_name=args.stream,
        publishers=publishers,
        reconstructor=reconstructor,
        refine=args.refine,
        run_timeout=args.run_timeout,
        root_map=dict(args.root_map),
        executor=executor,
    )
    dispatcher.subscribe(callback)
    # A service manager stops us with SIGTERM: stop listening, give the scan in hand the rest
    # of the stop budget, exit.
    terminated = []

    def on_sigterm(*_: object) -> None:
        terminated.append(True)
        dispatcher.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    watch = None
    if dask_client is not None:
        from .beamline.scaleout import ClientWatch

        # A client that lost its scheduler for good fails every later scan: stop listening
        # and exit non-zero, so that the service manager starts serve again.
        watch = ClientWatch(dask_client, dispatcher.stop)
    if args.allow_pickle:
        print(
            "bcdi-bluesky serve: --allow-pickle: every sender to the proxy can run code here",
            file=sys.stderr,
            flush=True,
        )
    source = (
        f"Tiled at {args.tiled}"
        if args.tiled
        else f"the 0MQ proxy at {dispatcher.host}:{dispatcher.port}"
    )
    print(f"bcdi-bluesky serve: listening to {source}", file=sys.stderr, flush=True)
    finished = False
    try:
        dispatcher.start()
    finally:
        if watch is not None:
            watch.stop()
        # The scans in hand are reported as not reconstructed here, also when the scheduler
        # is gone (Dask cancelled their tasks, or left those it never sent waiting).
        finished = callback.close(timeout=args.stop_timeout)
        if dask_client is not None:
            dask_client.close()
        if getattr(dispatcher, "dropped", 0) or getattr(dispatcher, "reconnects", 0):
            print(
                f"bcdi-bluesky serve: {dispatcher.dropped} of {dispatcher.received} "
                f"messages dropped, connection to the proxy made again "
                f"{dispatcher.reconnects} times",
                file=sys.stderr,
                flush=True,
            )
    status = 0
    if terminated:
        print("bcdi-bluesky serve: stopped by SIGTERM", file=sys.stderr, flush=True)
    elif watch is not None and watch.lost:
        print(
            f"bcdi-bluesky serve: {_lost_scheduler(watch, args.dask)}; exiting so the "
            "service manager can restart serve",
            file=sys.stderr,
            flush=True,
        )
        status = SCHEDULER_LOST
    if not finished:
        # A reconstruction is still running in the worker thread (its abandonment is logged):
        # the interpreter's teardown under it would abort the process ("terminate called
        # without an active exception" from ONNX Runtime's threads), so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _write_access(args: argparse.Namespace):
    """The IOC's write policy from ``--read-only`` and ``--write-hosts``."""
    from .epics import WriteAccess

    return WriteAccess.from_options(args.read_only, args.write_hosts)


def _dask(address: str, reconstructor=None, spec=None):
    """``(client, executor)`` on the Dask scheduler at ``address``, workers warmed with the
    model of ``reconstructor`` (or ``spec``)."""
    from .beamline.scaleout import ReconstructorSpec, connect_dask, dask_executor

    try:
        client = connect_dask(address)
    except (ImportError, OSError, ValueError) as exc:
        raise UserError(f"--dask {address}: {type(exc).__name__}: {exc}") from None
    return client, dask_executor(client, spec or ReconstructorSpec.of(reconstructor))


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from .beamline import tiled as tiled_runs

    if args.overwrite and not args.write_back:
        raise UserError("--overwrite goes with --write-back (it writes derived runs again)")
    client = tiled_runs.connect(args.tiled, args.api_key)
    try:
        return _reprocess_from(client, args)
    finally:
        client.context.close()


def _reprocess_from(client: Any, args: argparse.Namespace) -> int:
    """``reprocess`` on a connected Tiled client: one JSON line per run; 1 when any failed."""
    from concurrent.futures import ThreadPoolExecutor

    from .beamline import ResultFileWriter
    from .beamline import tiled as tiled_runs
    from .beamline.scaleout import ReconstructorSpec

    uids = args.uids or tiled_runs.recent_runs(client, args.last, args.stream, args.image_key)
    if not uids:
        print(
            f"bcdi-bluesky reprocess: no completed runs with {args.image_key!r} in "
            f"{args.stream!r} among the last ones: nothing to do",
            file=sys.stderr,
        )
        return 0
    spec = ReconstructorSpec(model_path=args.model)
    dask_client = watch = None
    if args.dask:
        from .beamline.scaleout import ClientWatch

        dask_client, executor = _dask(args.dask, spec=spec)
        # Two runs per worker in hand: the next is queued there while one computes.
        window = 2 * max(len(dask_client.scheduler_info()["workers"]), 1)
        watch = ClientWatch(dask_client, lambda: None)
    else:
        executor, window = ThreadPoolExecutor(max_workers=1), 2
    # (JSON key of what a publisher writes, publisher: result, start -> fields of the line)
    publishers: list[tuple[str, Callable[[Any, dict], dict]]] = []
    if args.output:
        to_file = ResultFileWriter(args.output)
        publishers.append(("output", lambda result, start: {"output": str(to_file(result, start))}))
    if args.write_back:
        publishers.append(
            ("derived_uid", _write_back(tiled_runs.WriteBack(client, args.overwrite)))
        )
    failed = 0
    try:
        for outcome in tiled_runs.reprocess(
            client,
            uids,
            executor,
            spec,
            refine=args.refine,
            image_key=args.image_key,
            motor_key=args.motor_key,
            stream_name=args.stream,
            window=window,
            timeout=args.timeout,
            lost=None if watch is None else lambda: _lost_scheduler(watch, args.dask),
        ):
            line = {"uid": outcome.uid, "scan_id": outcome.start.get("scan_id")}
            if outcome.skipped:  # not reconstructed by design: not a failure
                line.update(status="skipped", message=outcome.error)
            elif outcome.error:
                failed += 1
                line.update(status="failed", message=outcome.error)
            else:
                line.update(
                    status="done",
                    **outcome.result.summary(),
                    worker=outcome.result.metadata.get("worker"),
                )
                for key, publish in publishers:
                    try:
                        line.update(publish(outcome.result, outcome.start))
                    except Exception as exc:  # a full disk, a refused write: the next run
                        if line["status"] == "done":  # count each run once
                            failed += 1
                        line.update(status="failed", message=f"{key}: {type(exc).__name__}: {exc}")
            print(json.dumps(line), flush=True)
    finally:
        if dask_client is None:
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            watch.stop()
            lost = _lost_scheduler(watch, args.dask)
            dask_client.close()
            if lost is not None:
                print(f"bcdi-bluesky reprocess: {lost}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _lost_scheduler(watch: Any, address: str) -> str | None:
    """Why no task can run on the watched Dask client any more (its scheduler is lost: a
    :class:`~bcdi_bluesky.beamline.scaleout.ClientWatch` says why), or None."""
    reason = watch.lost_reason()
    return None if reason is None else f"lost the Dask scheduler at {address} ({reason})"


def _write_back(write: Callable[[Any, dict], tuple[str, bool]]) -> Callable[[Any, dict], dict]:
    """``reprocess --write-back``'s fields of a run's line: the derived run's uid, and a
    message when the catalog had it already (nothing written)."""

    def publish(result: Any, start: dict) -> dict:
        uid, written = write(result, start)
        fields = {"derived_uid": uid}
        if not written:
            fields["message"] = (
                f"derived run {uid} of this run is already in the catalog: not written again "
                "(--overwrite writes another)"
            )
        return fields

    return publish


def _refuse_a_served_prefix(prefix: str) -> None:
    """UserError where another IOC already serves ``prefix`` (clients would reach either)."""
    from .epics.ioc import serving_address

    elsewhere = serving_address(prefix)
    if elsewhere is not None:
        host, port = elsewhere
        raise UserError(
            f"another IOC already serves {prefix}Status at {host}:{port}: clients would "
            "reach either; stop it or choose another --prefix"
        )


def _cmd_ioc(args: argparse.Namespace) -> int:
    import threading

    from .epics import IOCServer

    access = _write_access(args)
    _refuse_a_served_prefix(args.prefix)
    server = IOCServer(prefix=args.prefix, access=access).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(
        f"bcdi-bluesky ioc: serving {len(server.group.pvdb)} PVs with prefix {args.prefix} "
        f"({access.describe()})",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    print("bcdi-bluesky ioc: stopped by SIGTERM", file=sys.stderr, flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.output is not None:  # made before the first scan, not after it
        try:
            Path(args.output).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--output {args.output}: cannot make the folder: {exc}") from None
    run_demo(
        scans=args.scans,
        output=args.output,
        prefix=args.prefix,
        linger=args.linger,
        seed=args.seed,
        as_json=args.json,
    )
    return 0


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def _finite_number(*, zero_allowed: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above zero (or from zero, with ``zero_allowed``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
            least = "at least 0" if zero_allowed else "positive"
            raise argparse.ArgumentTypeError(f"must be finite and {least}, got {text}")
        return value

    return parse


_at_least_one = _whole_number(1)
_non_negative_int = _whole_number(0)
_positive_number = _finite_number(zero_allowed=False)
_non_negative_number = _finite_number(zero_allowed=True)


def _pv_prefix(text: str) -> str:
    """``--prefix``: a prefix that makes valid PV names."""
    from .epics import check_pv_prefix

    try:
        return check_pv_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scheduler_address(text: str) -> str:
    """``--dask``: checked when the options are read, before any connection is made."""
    from .beamline.scaleout import check_scheduler_address

    try:
        return check_scheduler_address(text)
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"needs the distributed package: {exc}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_settings_options(p: argparse.ArgumentParser) -> None:
    """One option per reconstruction setting, generated from
    :meth:`ReconstructionSettings.fields_info` (unset: the setting's default)."""
    from .settings import ReconstructionSettings

    group = p.add_argument_group("reconstruction settings (docs/user_guide.md)")
    for info in ReconstructionSettings.fields_info():
        option = "--" + info.name.replace("_", "-")
        doc = info.doc.replace("%", "%%")  # argparse formats help text with %
        if info.kind is bool:  # --name sets it, --no-name clears it
            group.add_argument(
                option, action=argparse.BooleanOptionalAction, default=None, help=doc
            )
            continue
        units = f" {info.units}" if info.units else ""
        group.add_argument(
            option,
            type=info.kind,
            default=None,
            metavar=info.kind.__name__.upper(),
            help=f"{doc} ({info.low} .. {info.high}{units}; default {info.default})",
        )


def settings_table() -> str:
    """The user guide's table of the reconstruction settings (generated: a test checks the
    guide against it): each with its default, limits, the ``reconstruct`` option and the IOC
    PV that set it."""
    from .epics.ioc import ES_MAX_ITER, SETTING_PVS
    from .settings import ReconstructionSettings

    rows = [
        "| setting | default | limits | `reconstruct` option | IOC PV | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for info in ReconstructionSettings.fields_info():
        units = f" {info.units}" if info.units else ""
        limits = "true, false" if info.kind is bool else f"{info.low} .. {info.high}{units}"
        pv = (
            f"`{SETTING_PVS[info.name]}`"
            if info.name in SETTING_PVS
            else f"`{ES_MAX_ITER[0]}` (both ES counts)"
            if info.name in ES_MAX_ITER[1]
            else "none"
        )
        flag = info.name.replace("_", "-")
        option = f"`--{flag}`, `--no-{flag}`" if info.kind is bool else f"`--{flag}`"
        rows.append(
            f"| `{info.name}` | {info.default}{units} | {limits} | {option} | {pv} | {info.doc} |"
        )
    return "\n".join(rows) + "\n"


def _add_access_options(p: argparse.ArgumentParser) -> None:
    """Who may put the IOC's settings (docs/reliability.md: who may write which PV)."""
    access = p.add_mutually_exclusive_group()
    access.add_argument(
        "--read-only", action="store_true", help="refuse every put to the settings PVs"
    )
    access.add_argument(
        "--write-hosts",
        default=None,
        metavar="HOST[,HOST...]",
        help="accept puts only from Channel Access clients announcing one of these host names",
    )


def _root_pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise argparse.ArgumentTypeError(f"want OLD=NEW, got {text!r}")
    return old, new


def _add_training_run_options(
    p: argparse.ArgumentParser, validate_every: int, checkpoint_every: int
) -> None:
    """The options every resumable training run takes (``train``, ``distil``)."""
    p.add_argument("--workers", type=_non_negative_int, default=1, help="data-generation processes")
    p.add_argument("--threads", type=_at_least_one, default=None, help="torch CPU threads")
    p.add_argument(
        "--time-limit",
        type=_non_negative_number,
        default=None,
        help="stop cleanly with a checkpoint after this many seconds",
    )
    p.add_argument("--validate-every", type=int, default=validate_every)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    runs.add_argument(
        "--overwrite",
        action="store_true",
        help="start the run again over an existing one of the same name (without --resume or "
        "this, an existing run is refused)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line that points to ``--help`` (the full usage
    of ``reconstruct`` and ``serve`` is some 30 lines, above the line that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(
        prog="bcdi-bluesky", description="Real-time BCDI reconstruction for Bluesky beamlines."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="closed-loop scans on the simulated beamline, with the IOC")
    p.add_argument("--scans", type=_at_least_one, default=3, help="rocking scans (default: 3)")
    p.add_argument("--output", default=None, help="output folder (default: a new temp folder)")
    p.add_argument(
        "--prefix", type=_pv_prefix, default=None, help="IOC prefix (default: a random DEMOxxxx:)"
    )
    p.add_argument(
        "--linger",
        type=_non_negative_number,
        default=0.0,
        help="keep the IOC serving this many seconds after the last scan",
    )
    p.add_argument("--seed", type=int, default=0, help="the hidden crystal (default: 0)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout at the end")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("reconstruct", help="reconstruct a crystal from a diffraction volume")
    p.add_argument("input", help=".npy, .npz (intensity, mask), .h5/.cxi/.nxs or TIFF stack")
    p.add_argument(
        "--output",
        "-o",
        default=None,
        help="result file (.npz, .cxi, .h5 or .hdf5; .vti with --geometry); an existing one is "
        "replaced once the new result is complete",
    )
    p.add_argument("--refine", choices=("none", "es", "full"), default="full")
    p.add_argument(
        "--geometry",
        default=None,
        metavar="GEOM.json",
        help="the scan's geometry: results in nm, displacement and strain",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a figure of the result")
    p.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    _add_device_argument(p)
    p.add_argument("--dataset", default=None, help="HDF5 dataset holding the intensity")
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="reconstruct even when the volume seems too large for the memory left",
    )
    _add_settings_options(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("serve", help="reconstruct the runs published by a Bluesky 0MQ proxy")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tiled",
        default=None,
        metavar="URL",
        help="follow the runs completed on this Tiled server (frames read through it)",
    )
    source.add_argument(
        "--zmq",
        metavar="HOST:PORT",
        help="the proxy's output address (bluesky-0MQ-proxy IN OUT: OUT)",
    )
    p.add_argument(
        "--api-key", default=None, help="with --tiled: the Tiled API key (default: $TILED_API_KEY)"
    )
    p.add_argument(
        "--dask",
        default=None,
        type=_scheduler_address,
        metavar="SCHEDULER",
        help="run the reconstructions on this Dask scheduler (tcp://HOST:PORT)",
    )
    _add_run_keys(p)
    p.add_argument("--refine", choices=("none", "es", "full"), default="full")
    p.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    _add_device_argument(p)
    p.add_argument("--output", default=None, help="folder for one CXI result file per scan")
    p.add_argument(
        "--prefix", type=_pv_prefix, default=None, help="also serve the results as PVs (e.g. BCDI:)"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="UNSAFE: read bluesky's default pickled messages, which run any code a "
        "sender puts in them (only where every sender is trusted)",
    )
    p.add_argument(
        "--run-timeout",
        type=_positive_number,
        default=3600.0,
        metavar="S",
        help="a run with no document for S seconds is recorded incomplete and its frames freed",
    )
    p.add_argument(
        "--stop-timeout",
        type=_positive_number,
        default=5.0,
        metavar="S",
        help="on SIGTERM, seconds left to the queued reconstructions (then the "
        "one in hand is cancelled)",
    )
    p.add_argument(
        "--max-message-mb",
        type=_positive_number,
        default=1024.0,
        metavar="MB",
        help="0MQ drops longer messages unread",
    )
    p.add_argument(
        "--root-map",
        type=_root_pair,
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="read files written under OLD from NEW (repeatable)",
    )
    _add_access_options(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("reprocess", help="reconstruct runs stored in a Tiled server")
    p.add_argument("--tiled", required=True, metavar="URL", help="the Tiled server")
    p.add_argument("--api-key", default=None, help="Tiled API key (default: $TILED_API_KEY)")
    p.add_argument(
        "uids",
        nargs="*",
        metavar="UID",
        help="runs to reconstruct (default: the --last most recent raw runs)",
    )
    p.add_argument(
        "--last",
        type=_at_least_one,
        default=10,
        help="without UIDs: this many of the most recent completed runs that have "
        "frames and are not themselves reconstructions",
    )
    p.add_argument(
        "--dask",
        default=None,
        type=_scheduler_address,
        metavar="SCHEDULER",
        help="run the reconstructions on this Dask scheduler (tcp://HOST:PORT)",
    )
    p.add_argument("--output", default=None, help="folder for one CXI result file per run")
    p.add_argument(
        "--write-back",
        action="store_true",
        help="write each result into the same server as a run with parent_uid, unless the "
        "server has one of that run already",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --write-back: write a derived run also for a run that has one already "
        "(the earlier ones stay)",
    )
    p.add_argument("--refine", choices=("none", "es", "full"), default="full")
    _add_run_keys(p)
    p.add_argument("--model", default=None, help="ONNX model (default: the packaged one)")
    p.add_argument(
        "--timeout",
        type=_positive_number,
        default=3600.0,
        metavar="S",
        help="a run with no result S seconds after its submission is reported failed",
    )
    p.set_defaults(func=_cmd_reprocess)

    p = sub.add_parser("ioc", help="run the reconstruction IOC alone (its settings PVs)")
    p.add_argument("--prefix", type=_pv_prefix, default="BCDI:", help="PV prefix (default: BCDI:)")
    _add_access_options(p)
    p.set_defaults(func=_cmd_ioc)

    # Training defaults come from TrainConfig (torch-free), so the CLI and Python train the
    # same network.
    from .model.config import DISTIL_DEFAULTS, TrainConfig

    t = TrainConfig()
    p = sub.add_parser("train", help="train the CNN on simulated crystals (needs torch)")
    p.add_argument("--name", default=t.name)
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder")
    p.add_argument("--steps", type=int, default=t.steps, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--width", type=int, default=t.width, help="channels of the first conv stage")
    p.add_argument("--hidden", type=int, default=t.hidden, help="units of the dense layer")
    p.add_argument(
        "--encoding",
        default=t.encoding,
        choices=("twin_blocks_v1", "twin_invariant_v1", "normalised_v1"),
        help="what the network regresses (see bcdi_bluesky.model.encoding)",
    )
    p.add_argument(
        "--no-friedel",
        dest="friedel",
        action="store_false",
        help="leave out the network's I(q) - I(-q) input channel",
    )
    p.add_argument(
        "--zoom",
        type=int,
        default=t.zoom,
        help="centred crop edge seen by a full-resolution encoder (0: none)",
    )
    p.add_argument(
        "--mirror-copies",
        type=int,
        default=t.mirror_copies,
        help="mirror images of each simulated crystal per batch (1-8; more trains "
        "faster where simulating the crystals is the bottleneck, as on a CPU)",
    )
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_training_run_options(p, t.validate_every, t.checkpoint_every)
    p.add_argument(
        "--init-from", default=None, help="warm-start a new run from another checkpoint's weights"
    )
    p.set_defaults(func=_cmd_train)

    d = DISTIL_DEFAULTS
    p = sub.add_parser(
        "distil",
        help="fine-tune an exported model's network to predict its symmetry average in one "
        "pass (needs torch)",
    )
    p.add_argument("--teacher", required=True, help="exported model (.onnx with its card)")
    p.add_argument("--name", default=None, help="run name (default: <teacher>_distilled)")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder")
    p.add_argument("--steps", type=int, required=True, help="total optimiser steps")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument(
        "--truth-share",
        type=float,
        default=d["truth_share"],
        help="weight in [0, 1] of the loss against the true parameters (the rest: the teacher)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the teacher's")
    p.add_argument("--seed", type=int, default=None, help="default: the teacher's")
    _add_training_run_options(p, d["validate_every"], d["checkpoint_every"])
    p.add_argument(
        "--validation-size", type=int, default=d["validation_size"], help="crystals per check"
    )
    p.set_defaults(func=_cmd_distil)

    p = sub.add_parser("export", help="export a checkpoint to models/<name>.onnx + card")
    p.add_argument("--name", default="bcdi_cnn64")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--checkpoint", default=None, help="explicit checkpoint file")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--validation-count", type=_at_least_one, default=500)
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing model of this name"
    )
    p.add_argument(
        "--symmetry-average",
        default="half_turns",
        choices=("half_turn_y", "half_turns", "mirrors", "none"),
        help="average the exported network over these grid symmetries (cost: 2x, 4x, "
        "8x, 1x the bare network)",
    )
    p.add_argument(
        "--latent-count",
        type=int,
        default=2000,
        help="prior crystals that calibrate the latent map (0: none)",
    )
    p.set_defaults(func=_cmd_export)
    return parser


def _add_run_keys(p: argparse.ArgumentParser) -> None:
    """Where a run keeps its frames: the options of every command that reads runs."""
    p.add_argument("--image-key", default="det_image", help="data key of the detector frames")
    p.add_argument("--motor-key", default="theta", help="data key of the rocking angle")
    p.add_argument("--stream", default="primary", help="event stream holding the frames")


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``: where the phase retrieval runs (:class:`~bcdi_bluesky.Reconstructor`)."""
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where the forward model, refinement and phase retrieval run (auto: a GPU when "
        "CuPy or torch sees one; the CNN's device is ONNX Runtime's provider)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcdi-bluesky`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser: its options are the ones to look up
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # The project's log lines (puts to the IOC, dropped scans) on stderr, one per event;
    # stdout stays for the commands' results.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("bcdi_bluesky").setLevel(logging.INFO)
    previous = _terminate_as_exception()
    try:
        return int(args.func(args))
    except BCDIError as exc:  # what was given is wrong; anything else is a bug: traceback
        print(f"bcdi-bluesky {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print(f"bcdi-bluesky {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"bcdi-bluesky {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _OneLineFormatter(logging.Formatter):
    """Each log record's message on one line (control characters escaped): text a client or
    a run's metadata put in a message cannot forge a line of the audit log. A traceback
    keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is so that its cleanup runs (a half-written file's
    temporary is removed); ``serve`` and ``ioc`` set their own handler."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _terminate_as_exception() -> Any:
    """Make SIGTERM raise :class:`_Terminated` (main thread only); the previous handler, or
    None where none could be set."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: the caller's handlers stay
        return None


if __name__ == "__main__":
    sys.exit(main())
