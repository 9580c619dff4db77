"""The caproto IOC: every reconstruction as EPICS PVs, and settings the control room can put.

Run it standalone (``bcdi-bluesky ioc``) or in-process beside the Bluesky callback
(:class:`IOCPublisher`, which starts it in a background thread and updates it from the
reconstruction worker).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from ..plotting import central_slices
from ..settings import ReconstructionSettings

STATUS = ("Idle", "Collecting", "Reconstructing", "Refining", "Done", "Error")
#: Side of the square slice images (pixels): the crystal's central planes, zoomed on it.
IMAGE_SIZE = 64
MAX_HISTORY = 2000
MAX_PARAMS = 256


class _Rejected(ValueError):
    """A put the IOC refuses (the client sees the error; the PV keeps its value)."""


def _setting(name: str, value: float, low: float, high: float, integer: bool = False,
             **kwargs: Any) -> pvproperty:
    """A writable setting with its own alarm group (PVs of a PVGroup otherwise share one
    alarm: a rejected put would light up every PV, and a Status write would clear it)."""
    return pvproperty(name=name, value=value, put=_checked(low, high, integer),
                      alarm_group=name, **kwargs)


def _checked(low: float, high: float, integer: bool = False):
    """A putter that accepts finite values in [low, high] and refuses anything else."""

    async def putter(group: PVGroup, instance, value):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        ok = math.isfinite(number) and low <= number <= high
        if ok and integer and number != int(number):
            ok = False
        if not ok:
            # caproto answers the client with ECA_PUTFAIL and raises a WRITE/MAJOR alarm on
            # this PV's own alarm group; the value stays as it was.
            raise _Rejected(f"{instance.pvname}: {value!r} rejected (allowed: "
                            f"{'integer ' if integer else ''}{low} .. {high})")
        await instance.alarm.write(status=AlarmStatus.NO_ALARM,
                                   severity=AlarmSeverity.NO_ALARM)
        return int(number) if integer else number

    return putter


class ReconstructionIOC(PVGroup):
    """PVs of the BCDI reconstruction (prefix default ``BCDI:``). ``docs/pvs.md`` lists them."""

    Status = pvproperty(value=STATUS[0], enum_strings=STATUS, dtype=ChannelType.ENUM,
                        read_only=True, alarm_group="Status", doc="pipeline state")
    StatusMsg = pvproperty(value="", dtype=ChannelType.CHAR, max_length=1024,
                           report_as_string=True, read_only=True, doc="what is happening")
    ScanUID = pvproperty(value="", dtype=ChannelType.STRING, read_only=True)
    ScanID = pvproperty(value=0, read_only=True)
    Count = pvproperty(value=0, read_only=True, doc="reconstructions done")
    Heartbeat = pvproperty(value=0, read_only=True, doc="+1 every second while the IOC runs")

    Chi = pvproperty(value=0.0, record="ai", read_only=True, precision=4, alarm_group="Chi",
                     upper_alarm_limit=0.5, upper_warning_limit=0.3,
                     lower_alarm_limit=-1.0, lower_warning_limit=-1.0,
                     doc="final chi; .HIGH/.HIHI set the warning/alarm limits")
    ChiCNN = pvproperty(value=0.0, read_only=True, precision=4)
    ES_Iteration = pvproperty(name="ES:Iteration", value=0, read_only=True)
    ES_Cost = pvproperty(name="ES:Cost", value=0.0, read_only=True, precision=4)
    ES_CostHistory = pvproperty(name="ES:CostHistory", value=np.zeros(1, dtype=np.float64),
                                dtype=ChannelType.DOUBLE, max_length=MAX_HISTORY, read_only=True)

    Latency_Preprocess = pvproperty(name="Latency:Preprocess", value=0.0, read_only=True,
                                    units="s", precision=3)
    Latency_Inference = pvproperty(name="Latency:Inference", value=0.0, read_only=True,
                                   units="s", precision=3)
    Latency_Refine = pvproperty(name="Latency:Refine", value=0.0, read_only=True, units="s",
                                precision=3)
    Latency_Polish = pvproperty(name="Latency:Polish", value=0.0, read_only=True, units="s",
                                precision=3)
    Latency_Total = pvproperty(name="Latency:Total", value=0.0, read_only=True, units="s",
                               precision=3)

    Params = pvproperty(value=np.zeros(1, dtype=np.float64), dtype=ChannelType.DOUBLE,
                        max_length=MAX_PARAMS, read_only=True)
    Size_X = pvproperty(name="Size:X", value=0, read_only=True, units="voxel")
    Size_Y = pvproperty(name="Size:Y", value=0, read_only=True, units="voxel")
    Size_Z = pvproperty(name="Size:Z", value=0, read_only=True, units="voxel")
    Volume = pvproperty(value=0, read_only=True, units="voxel")
    Volume_NM = pvproperty(name="Volume:NM", value=0.0, read_only=True, units="nm^3",
                           doc="support volume in nm^3 when the scan gives the geometry")
    Voxel_Size = pvproperty(name="Voxel:Size", value=np.zeros(3), dtype=ChannelType.DOUBLE,
                            max_length=3, read_only=True, units="nm")
    Phase_RMS = pvproperty(name="Phase:RMS", value=0.0, read_only=True, units="rad",
                           precision=3)

    Image_Width = pvproperty(name="Image:Width", value=IMAGE_SIZE, read_only=True)
    Image_Height = pvproperty(name="Image:Height", value=IMAGE_SIZE, read_only=True)

    def _image(name: str):
        return pvproperty(name=name, value=np.zeros(IMAGE_SIZE * IMAGE_SIZE, dtype=np.float32),
                          dtype=ChannelType.FLOAT, max_length=IMAGE_SIZE * IMAGE_SIZE,
                          read_only=True)

    Amp_XY, Amp_XZ, Amp_YZ = _image("Amp:XY"), _image("Amp:XZ"), _image("Amp:YZ")
    Phase_XY, Phase_XZ, Phase_YZ = _image("Phase:XY"), _image("Phase:XZ"), _image("Phase:YZ")
    del _image

    Rec_ThetaCenter = pvproperty(name="Rec:ThetaCenter", value=0.0, read_only=True,
                                 units="deg", precision=4)
    Rec_ThetaRange = pvproperty(name="Rec:ThetaRange", value=0.0, read_only=True, units="deg",
                                precision=4)
    Rec_Exposure = pvproperty(name="Rec:Exposure", value=0.0, read_only=True, units="s",
                              precision=4)

    Latent_X = pvproperty(name="Latent:X", value=0.0, read_only=True, precision=3)
    Latent_Y = pvproperty(name="Latent:Y", value=0.0, read_only=True, precision=3)
    Latent_Distance = pvproperty(name="Latent:Distance", value=0.0, read_only=True,
                                 precision=3)
    Latent_OOD = pvproperty(name="Latent:OOD", value=0, read_only=True, alarm_group="Latent:OOD",
                            doc="1 when the CNN is out of its training distribution (MINOR)")

    Model_Name = pvproperty(name="Model:Name", value="", dtype=ChannelType.STRING,
                            read_only=True)
    Model_Provider = pvproperty(name="Model:Provider", value="", dtype=ChannelType.STRING,
                                read_only=True)

    # Settings, applied to the next reconstruction.
    Enable = _setting("Enable", 1, 0, 1, integer=True, doc="1: reconstruct scans")
    ES_Enable = _setting("ES:Enable", 1, 0, 1, integer=True)
    ES_MaxIter = _setting("ES:MaxIter", 400, 0, 100000, integer=True)
    ES_TimeBudget = _setting("ES:TimeBudget", 5.0, 0.0, 600.0, units="s")
    Polish_Iterations = _setting("Polish:Iterations", 150, 0, 10000, integer=True)
    Support_Threshold = _setting("Support:Threshold", 0.2, 0.01, 0.9, precision=3)

    @Heartbeat.scan(period=1.0)
    async def Heartbeat(self, instance, async_lib):
        await instance.write(instance.value + 1)

    @Status.putter
    async def Status(self, instance, value):
        # Error raises a MAJOR alarm; any other state clears it.
        index = value if isinstance(value, int) else STATUS.index(value)
        severity = AlarmSeverity.MAJOR_ALARM if STATUS[index] == "Error" else \
            AlarmSeverity.NO_ALARM
        status = AlarmStatus.STATE if severity else AlarmStatus.NO_ALARM
        await instance.alarm.write(status=status, severity=severity)
        return value

    # ------------------------------------------------------------------ helpers
    def settings(self) -> dict[str, Any]:
        """The current settings (read from any thread: plain attribute reads)."""
        return {
            "enable": bool(self.Enable.value),
            "es_enable": bool(self.ES_Enable.value),
            "es_max_iter": int(self.ES_MaxIter.value),
            "es_time_budget": float(self.ES_TimeBudget.value),
            "polish_iterations": int(self.Polish_Iterations.value),
            "support_threshold": float(self.Support_Threshold.value),
        }


def result_values(result: Any) -> dict[str, Any]:
    """PV name (attribute) -> value for a reconstruction result."""
    support = result.support
    idx = np.argwhere(support)
    extent = (idx.max(axis=0) - idx.min(axis=0) + 1) if idx.size else np.zeros(3, int)
    phase = np.angle(result.object[support]) if idx.size else np.zeros(1)
    phase = np.angle(np.exp(1j * (phase - np.angle(np.mean(np.exp(1j * phase))))))
    values: dict[str, Any] = {
        "Chi": float(result.chi), "ChiCNN": float(result.chi_cnn),
        "Params": np.asarray(result.params, dtype=np.float64)[:MAX_PARAMS],
        "Size_X": int(extent[2]), "Size_Y": int(extent[1]), "Size_Z": int(extent[0]),
        "Volume": int(support.sum()), "Phase_RMS": float(np.sqrt(np.mean(phase**2))),
        "Model_Name": str(result.model_name)[:39], "Model_Provider": str(result.provider)[:39],
        "ES_CostHistory": np.asarray(result.es_costs[-MAX_HISTORY:] or [0.0], dtype=np.float64),
    }
    for key, name in (("preprocess", "Preprocess"), ("inference", "Inference"),
                      ("refine", "Refine"), ("polish", "Polish"), ("total", "Total")):
        values[f"Latency_{name}"] = float(result.timings.get(key, 0.0))
    for plane, image in screen_images(result).items():
        values[plane] = image.ravel()
    meta = getattr(result, "metadata", {}) or {}
    voxel = meta.get("voxel_size_nm")
    if voxel is not None:
        values["Voxel_Size"] = np.asarray(voxel, dtype=np.float64)
        values["Volume_NM"] = float(values["Volume"] * np.prod(voxel))
    if getattr(result, "latent_distance", None) is not None:
        values.update(Latent_X=float(result.latent_xy[0]), Latent_Y=float(result.latent_xy[1]),
                      Latent_Distance=float(result.latent_distance),
                      Latent_OOD=int(result.out_of_distribution))
    rec = meta.get("recommendation")
    if rec:
        values.update(Rec_ThetaCenter=float(rec["theta_center"]),
                      Rec_ThetaRange=float(rec["theta_range"]),
                      Rec_Exposure=float(rec["exposure"]) if math.isfinite(rec["exposure"])
                      else 0.0)
    return values


def screen_images(result: Any, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """The six ``size x size`` float32 slice images (amplitude, phase), centred on the crystal."""
    obj = result.object
    idx = np.argwhere(result.support)
    centre = idx.mean(axis=0).round().astype(int) if idx.size else np.array(obj.shape) // 2
    padded = np.pad(obj, size // 2)
    window = tuple(slice(c, c + size) for c in centre)  # centre + size//2 - size//2 in padded
    crop = padded[window]
    sup = np.pad(result.support, size // 2)[window]
    amp = central_slices(np.abs(crop))
    phase = central_slices(np.where(sup, np.angle(crop), 0.0))
    return {**{f"Amp_{k}": v.astype(np.float32) for k, v in amp.items()},
            **{f"Phase_{k}": v.astype(np.float32) for k, v in phase.items()}}


class IOCServer:
    """Run a :class:`ReconstructionIOC` in a background thread with its own event loop.

    Parameters
    ----------
    prefix : str
        PV prefix (default ``BCDI:``).
    interfaces : list of str, optional
        Network interfaces to serve on (caproto's default: all, or ``EPICS_CAS_INTF_ADDR_LIST``).
    """

    def __init__(self, prefix: str = "BCDI:", interfaces: list[str] | None = None) -> None:
        self.group = ReconstructionIOC(prefix=prefix)
        self.interfaces = interfaces
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="bcdi-ioc", daemon=True)

    def _run(self) -> None:
        from caproto.asyncio.server import Context

        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._task = asyncio.current_task()
            # caproto's queues must be made inside the loop that runs them.
            context = Context(self.group.pvdb, self.interfaces)
            await context.run(log_pv_names=False, startup_hook=self._started)

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        finally:
            # Let caproto's circuit tasks finish cancelling so their sockets close in this
            # loop, not in a garbage-collected closed one.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for transport in list(getattr(self.loop, "_transports", {}).values()):
                transport.close()
            self.loop.run_until_complete(asyncio.sleep(0.05))
            self.loop.close()

    async def _started(self, async_lib) -> None:
        self._ready.set()

    def start(self, timeout: float = 10.0) -> IOCServer:
        """Start serving; returns once the server is up."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"IOC did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread."""
        if self._task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)

    def write(self, values: dict[str, Any], timeout: float = 10.0, wait: bool = True) -> None:
        """Write PV values (attribute names) from any thread; with ``wait``, until they are
        served (without, the caller never blocks: for the RunEngine's thread)."""

        async def apply() -> None:
            for attr, value in values.items():
                pv = getattr(self.group, attr)
                await pv.write(value)
                if attr == "Latent_OOD":  # out of distribution: a MINOR alarm on the flag
                    await pv.alarm.write(
                        status=AlarmStatus.STATE if value else AlarmStatus.NO_ALARM,
                        severity=AlarmSeverity.MINOR_ALARM if value else AlarmSeverity.NO_ALARM)

        future = asyncio.run_coroutine_threadsafe(apply(), self.loop)
        if wait:
            future.result(timeout)

    def set_status(self, state: str, message: str = "") -> None:
        """Set ``Status`` (one of :data:`STATUS`) and ``StatusMsg``."""
        self.write({"Status": state, "StatusMsg": message[:1023]})


class IOCPublisher:
    """Publish the callback's reconstructions through an in-process IOC.

    Give it to :class:`~bcdi_bluesky.beamline.BCDIReconstructionCallback` as a publisher: it
    shows each stage live (Collecting, Reconstructing, Refining with ES:Iteration and ES:Cost,
    Done or Error), writes every result PV, and applies the writable settings to the next
    reconstruction.
    """

    def __init__(self, prefix: str = "BCDI:", interfaces: list[str] | None = None,
                 server: IOCServer | None = None) -> None:
        self.server = server or IOCServer(prefix, interfaces).start()
        self._last_progress = 0.0

    @property
    def group(self) -> ReconstructionIOC:
        """The PVGroup."""
        return self.server.group

    # Hooks the callback calls (duck-typed: plain callables work as publishers too).
    def collecting(self, start_doc: dict) -> None:
        """A run started: show it (called in the RunEngine's thread, so it does not wait)."""
        self.server.write({"Status": "Collecting", "ScanUID": start_doc["uid"][:39],
                           "ScanID": int(start_doc.get("scan_id") or 0),
                           "StatusMsg": f"collecting scan {start_doc.get('scan_id')}"},
                          wait=False)

    def configure(self, settings: Any, start_doc: dict) -> Any:
        """The next scan's settings: ``settings`` changed by the setting PVs; None skips the
        scan (``Enable`` 0). The reconstructor itself is never changed."""
        s = self.group.settings()
        if not s["enable"]:
            self.server.set_status("Idle", "reconstruction disabled (Enable = 0)")
            return None
        if settings is None:  # an engine without settings of its own: start from the defaults
            settings = ReconstructionSettings()
        total = s["es_max_iter"] if s["es_enable"] else 0
        changes = {
            "es_coarse_iterations": total * 3 // 4,
            "es_fine_iterations": total - total * 3 // 4,
            "es_time_budget_s": s["es_time_budget"],
            # Polish:Iterations bounds both polish runs (0: no polish).
            "polish_iterations": s["polish_iterations"],
            "polish_er_iterations": min(settings.polish_er_iterations,
                                        s["polish_iterations"]),
            "support_threshold": s["support_threshold"],
        }
        if not s["es_enable"]:  # no refinement at all: the odd-shape search goes with ES
            changes["shape_search_evaluations"] = 0
        settings = settings.replace(**changes)
        self.server.set_status("Reconstructing", f"reconstructing scan {start_doc.get('scan_id')}")
        return settings

    def progress(self, stage: str, info: dict, start_doc: dict) -> None:
        """Live updates from the pipeline (at most ten a second for ES steps)."""
        if stage == "es_step":
            now = time.monotonic()
            if now - self._last_progress < 0.1:
                return
            self._last_progress = now
            self.server.write({"Status": "Refining", "ES_Iteration": int(info["iteration"]),
                               "ES_Cost": float(info["cost"])})
        elif stage == "inference":
            self.server.write({"ChiCNN": float(info["chi"])})
            if info.get("message"):  # e.g. out of distribution: say how the pipeline reacts
                self.server.write({"StatusMsg": str(info["message"])[:1023]})

    def failure(self, message: str, start_doc: dict) -> None:
        """The reconstruction failed: Error state (MAJOR alarm) with the reason."""
        self.server.set_status("Error", f"scan {start_doc.get('scan_id')}: {message}")

    def __call__(self, result: Any, start_doc: dict) -> None:
        """Write every result PV, then Done."""
        values = result_values(result)
        values["Count"] = int(self.group.Count.value) + 1
        values["ES_Iteration"] = len(result.es_costs)
        self.server.write(values)
        self.server.set_status("Done", f"scan {start_doc.get('scan_id')}: chi {result.chi:.4f}")

    def close(self) -> None:
        """Stop the IOC."""
        self.server.stop()


def pv_table(prefix: str = "BCDI:") -> str:
    """Markdown table of every PV (name, type, units, writable, meaning)."""
    group = ReconstructionIOC(prefix=prefix)
    meaning = {
        "Status": "Idle, Collecting, Reconstructing, Refining, Done, Error (MAJOR alarm)",
        "StatusMsg": "what is happening, or why it failed (long string)",
        "ScanUID": "uid of the scan shown (first 39 characters)", "ScanID": "its scan id",
        "Count": "reconstructions done", "Heartbeat": "+1 every second while the IOC runs",
        "Chi": "final chi; warning/alarm limits in .HIGH/.HIHI (default 0.3/0.5)",
        "ChiCNN": "chi of the CNN's estimate", "ES:Iteration": "ES step (live)",
        "ES:Cost": "ES cost chi (live)", "ES:CostHistory": "chi of every ES step",
        "Params": "crystal parameter vector (names in the model card)",
        "Size:X": "support extent along x (axis 2)", "Size:Y": "along y (axis 1)",
        "Size:Z": "along z (axis 0, rocking)", "Volume": "support volume",
        "Volume:NM": "support volume in nm^3 (0 unless the scan metadata gives the geometry)",
        "Voxel:Size": "voxel size (rocking, row, column) in nm, from the scan metadata",
        "Phase:RMS": "RMS of the phase over the support (strain indicator)",
        "Image:Width": "width of the slice images", "Image:Height": "their height",
        "Rec:ThetaCenter": "recommended rocking centre", "Rec:ThetaRange": "recommended range",
        "Rec:Exposure": "recommended exposure", "Model:Name": "CNN model name",
        "Model:Provider": "ONNX Runtime provider really in use",
        "Latent:X": "the scan on the CNN's latent map (model card), first axis",
        "Latent:Y": "second axis",
        "Latent:Distance": "distance to the training distribution (99% of priors below 1)",
        "Latent:OOD": "1 when the distance exceeds 1 (MINOR alarm): ES budget doubled",
        "Enable": "0 skips reconstructions (0 or 1)",
        "ES:Enable": "0 skips the refinement: odd-shape search and ES (0 or 1)",
        "ES:MaxIter": "ES steps, 0 .. 100000",
        "ES:TimeBudget": "refinement seconds (search and ES), 0 .. 600",
        "Polish:Iterations": "steps of the ER/HIO polish run (the ER run takes at most 50; "
                             "0: no polish), 0 .. 10000",
        "Support:Threshold": "support threshold (fraction of max amplitude), 0.01 .. 0.9",
    }
    for plane in ("XY", "XZ", "YZ"):
        meaning[f"Amp:{plane}"] = f"amplitude, central {plane} plane (flattened, row-major)"
        meaning[f"Phase:{plane}"] = f"phase in radians, central {plane} plane"
    for stage in ("Preprocess", "Inference", "Refine", "Polish", "Total"):
        meaning[f"Latency:{stage}"] = f"seconds of the {stage.lower()} stage"
    rows = ["| PV | type | units | writable | meaning |", "| --- | --- | --- | --- | --- |"]
    for prop in group._pvs_.values():
        name = prop.pvspec.name
        channel = group.pvdb[prefix + name]
        dtype = channel.data_type.name.lower()
        length = getattr(channel, "max_length", 1)
        if length and length > 1 and dtype not in ("char", "string"):
            dtype += f"[{length}]"
        units = getattr(channel, "units", "") or ""
        writable = "no" if prop.pvspec.read_only else "yes"
        rows.append(f"| `{prefix}{name}` | {dtype} | {units} | {writable} | "
                    f"{meaning.get(name, '')} |")
    return "\n".join(rows) + "\n"


def loopback_environment(server_port: int, repeater_port: int) -> dict[str, str]:
    """EPICS variables for Channel Access on 127.0.0.1 only, with the given ports (tests,
    benchmarks, a demo on one machine): set them before any client or server starts."""
    return {
        "EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(server_port), "EPICS_CAS_SERVER_PORT": str(server_port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1", "EPICS_CA_REPEATER_PORT": str(repeater_port),
        "EPICS_CAS_BEACON_PORT": str(repeater_port), "EPICS_CA_MAX_ARRAY_BYTES": "10000000",
    }
