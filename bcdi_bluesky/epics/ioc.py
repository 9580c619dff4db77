"""The caproto IOC: every reconstruction as EPICS PVs, and settings the control room can put.

Run it standalone (``bcdi-bluesky ioc``) or in-process beside the Bluesky callback
(:class:`IOCPublisher`, which starts it in a background thread and updates it from the
reconstruction worker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from caproto import (
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    CAStatus,
    ChannelData,
    ChannelType,
    native_type,
)
from caproto.server import (
    PVGroup,
    PvpropertyData,
    PvpropertyDouble,
    PvpropertyInteger,
    SubGroup,
    pvproperty,
)
from caproto.server.records import AiFields

from ..errors import BCDIError, SettingsError, one_line
from ..physics import central_slices
from ..settings import ReconstructionSettings

log = logging.getLogger(__name__)

#: Appended states keep the earlier ones' enum indices (screens and archivers store them).
STATUS = ("Idle", "Collecting", "Reconstructing", "Refining", "Done", "Error", "Skipped")
#: The alarm of each state that raises one: a failure MAJOR, a scan not reconstructed by
#: design (no Bragg peak, a motor that did not rock) MINOR.
STATUS_SEVERITY = {"Error": AlarmSeverity.MAJOR_ALARM, "Skipped": AlarmSeverity.MINOR_ALARM}
#: States of the ``Quality`` PV: a result's own grade, or unknown.
QUALITY = ("good", "fair", "poor", "unknown")
QUALITY_SEVERITY = {
    "good": AlarmSeverity.NO_ALARM,
    "fair": AlarmSeverity.MINOR_ALARM,
    "poor": AlarmSeverity.MAJOR_ALARM,
}
#: Side of the square slice images (pixels): the crystal's central planes, zoomed on it.
IMAGE_SIZE = 64
MAX_HISTORY = 2000
#: The result's ``timings`` keys shown as ``Latency:<Stage>`` PVs (the last: the whole run).
TIMED_STAGES = ("preprocess", "inference", "refine", "polish", "total")
MAX_PARAMS = 256


@dataclass(frozen=True)
class WriteAccess:
    """Who may put the writable PVs (the settings).

    Channel Access identifies a client by the host name and user name it announces; the IOC
    trusts them as EPICS access security does (``asg`` host lists): this keeps honest clients
    on other hosts from changing a running experiment; it is no defence against a client
    that lies about its host.

    Parameters
    ----------
    read_only : bool
        No client may put any setting.
    hosts : frozenset of str, optional
        Host names (compared without case) whose clients may put; None: any host.
    """

    read_only: bool = False
    hosts: frozenset[str] | None = None

    @classmethod
    def from_options(
        cls, read_only: bool = False, write_hosts: str | Sequence[str] | None = None
    ) -> WriteAccess:
        """From the command line's ``--read-only`` and ``--write-hosts HOST[,HOST...]``."""
        if write_hosts is None:
            return cls(read_only=read_only)
        names = write_hosts.split(",") if isinstance(write_hosts, str) else write_hosts
        hosts = frozenset(name.strip().lower() for name in names if name.strip())
        if not hosts:
            raise SettingsError("--write-hosts needs at least one host name")
        return cls(read_only=read_only, hosts=hosts)

    def allows(self, host: str | None) -> bool:
        """Whether a client announcing ``host`` may put settings."""
        if self.read_only:
            return False
        return self.hosts is None or (host or "").lower() in self.hosts

    def describe(self) -> str:
        """One phrase for the start-up line and refusals."""
        if self.read_only:
            return "settings are read-only"
        if self.hosts is None:
            return "settings writable from any host"
        return "settings writable from " + ", ".join(sorted(self.hosts)) + " only"


class _Audited(PvpropertyData):
    """Every Channel Access put to a PV of the IOC (settings, read-only PVs, the alarm limits
    of ``Chi``) passes here: refused when the client's host may not write, checked (caproto's
    control limits, whole numbers for integers, the PV's putter), and logged in one line with
    the client's user and host, accepted or refused; a refused put answers the client with
    ECA_NOWTACCESS or ECA_PUTFAIL, never a traceback."""

    #: A setting: a refused put raises a MAJOR alarm on it, an accepted one goes to the next
    #: scan. Other PVs keep their own alarms.
    setting = False
    #: A record field no client may change (:data:`WRITABLE_FIELDS` are the exceptions).
    locked = False

    @property
    def ioc(self) -> ReconstructionIOC:
        """The IOC's group this PV belongs to (through sub-groups and record fields)."""
        node: Any = self.group
        while not isinstance(node, ReconstructionIOC):
            node = node.parent if isinstance(node, PVGroup) else node.group
        return node

    @property
    def full_name(self) -> str:
        """The PV name a client uses (a record field's includes its record)."""
        if isinstance(self.group, PVGroup) and isinstance(self.group.parent, ChannelData):
            return f"{self.group.parent.pvname}.{self.pvname}"
        return self.pvname

    def check_access(self, hostname: str, username: str) -> AccessRights:
        # Announced to the client when it connects: libca (pyepics) then refuses the put
        # locally; a client that sends it anyway meets the same check in auth_write.
        rights = super().check_access(hostname, username)
        if self.locked or not self.ioc.access.allows(hostname):
            rights &= ~AccessRights.WRITE
        return rights

    async def auth_write(
        self, hostname, username, data, data_type, metadata, *, flags=0, user_address=None
    ):
        # Both are the client's own words: escaped, so no line of the audit log is forged.
        who = f"{one_line(username, 64)}@{one_line(hostname, 64)}"
        if AccessRights.WRITE not in self.check_access(hostname, username):
            reason = (
                "read-only field"
                if self.locked
                else "read-only PV"
                if self.pvspec.read_only
                else self.ioc.access.describe()
            )
            return await self._refuse(
                data, who, reason, AlarmStatus.WRITE_ACCESS, CAStatus.ECA_NOWTACCESS
            )
        before = self.value
        try:
            if self.data_type in (ChannelType.LONG, ChannelType.DOUBLE):
                _check_number_text(data, data_type)
            if self.data_type == ChannelType.LONG:
                _check_whole_numbers(data, data_type)
            await self.write_from_dbr(data, data_type, metadata, flags=flags)
        except Exception as exc:  # a bad value of any kind: the client gets ECA_PUTFAIL
            # caproto's conversion errors carry no text: say what could not be read as what.
            reason = str(exc) or (
                f"{type(exc).__name__}: {_shown(data)!r} is not a {self.data_type.name.lower()}"
            )
            return await self._refuse(data, who, reason, AlarmStatus.WRITE, CAStatus.ECA_PUTFAIL)
        if self.setting:
            await self.alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
            self.ioc.note_put(self)
        log.info("%s = %s (was %s), put by %s", self.full_name, self.value, before, who)
        return True

    async def _refuse(
        self, data, who: str, reason: str, status: AlarmStatus, ca_status: CAStatus
    ) -> CAStatus:
        log.warning("%s: put of %s by %s refused: %s", self.full_name, _shown(data), who, reason)
        if self.setting:
            await self.alarm.write(status=status, severity=AlarmSeverity.MAJOR_ALARM)
        return ca_status


def _check_number_text(data: Any, data_type: ChannelType) -> None:
    """Refuse empty text sent to a number PV: caproto (as EPICS base) reads it as 0, so a
    cleared field on a screen would set a time cap or a fraction to 0."""
    if native_type(data_type) != ChannelType.STRING:
        return
    for value in np.ravel(data):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if not text.strip("\0 \t"):
            raise ValueError("empty text is not a number")


def _check_whole_numbers(data: Any, data_type: ChannelType) -> None:
    """Refuse a fraction or NaN sent to an integer PV (caproto would truncate 0.5 to 0 before
    any check could see it); integers arrive as such."""
    kind = native_type(data_type)
    if kind == ChannelType.STRING:
        numbers = np.array(
            [float(v.decode() if isinstance(v, bytes) else v) for v in np.ravel(data)]
        )
    elif kind in (ChannelType.DOUBLE, ChannelType.FLOAT):
        numbers = np.asarray(data, dtype=np.float64)
    else:
        return
    if not (np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers))):
        raise ValueError("a whole number is needed")
    # A LONG holds 32 bits: caproto would wrap 2147483648 to -2147483648 before the limits.
    if np.any(np.abs(numbers) > np.iinfo(np.int32).max):
        raise ValueError("outside the range of a 32-bit integer")


def _shown(data: Any) -> str:
    """A short text of a put's payload for the log."""
    values = list(np.ravel(np.asarray(data, dtype=object)))[:4]
    text = ", ".join(v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values)
    return one_line(text, 80)


def _audited(classes: dict) -> dict:
    """caproto's type map with every data class made :class:`_Audited`."""
    return {dtype: type(cls.__name__, (_Audited, cls), {}) for dtype, cls in classes.items()}


#: The record fields a client may put (to those the IOC's write access allows): the alarm
#: limits of ``Chi``. Every other field (severities, deadbands, DESC, EGU, PREC, links...)
#: is read-only, so no client can switch an alarm off or relabel a PV.
WRITABLE_FIELDS = ("HIGH", "HIHI", "LOW", "LOLO")


class _AuditedAiFields(AiFields):
    """The fields of an ai record (``Chi.HIHI`` ...): every put audited like the PVs', and
    only :data:`WRITABLE_FIELDS` writable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The fields come from several caproto classes (the ai record's and the base
        # record's), each with its own data classes: each instance gets an audited class.
        for field_ in self.attr_pvdb.values():
            field_.__class__ = _locked(type(field_), field_.pvname not in WRITABLE_FIELDS)


@functools.cache
def _locked(cls: type, locked: bool) -> type:
    """``cls`` audited, and read-only to every client when ``locked`` (one class per pair,
    shared by every IOC)."""
    name = ("Locked" if locked else "Audited") + cls.__name__
    return type(name, (_Audited, cls), {"locked": locked})


class _SettingInteger(_Audited, PvpropertyInteger):
    """A writable LONG setting."""

    setting = True


class _SettingDouble(_Audited, PvpropertyDouble):
    """A writable DOUBLE setting."""

    setting = True


def _setting(
    name: str, value: float, low: float, high: float, integer: bool = False, **kwargs: Any
) -> pvproperty:
    """A writable setting within [low, high] (caproto's control limits), with its own alarm
    group (PVs of a PVGroup otherwise share one alarm: a refused put would light up every PV,
    and a Status write would clear it)."""
    if integer:
        return pvproperty(
            name=name,
            value=int(value),
            dtype=_SettingInteger,
            lower_ctrl_limit=int(low),
            upper_ctrl_limit=int(high),
            alarm_group=name,
            **kwargs,
        )
    return pvproperty(
        name=name,
        value=float(value),
        dtype=_SettingDouble,
        precision=3,
        lower_ctrl_limit=float(low),
        upper_ctrl_limit=float(high),
        alarm_group=name,
        **kwargs,
    )


def _reading(name: str, value: Any = 0.0, **kwargs: Any) -> pvproperty:
    """A read-only PV (what the IOC publishes)."""
    return pvproperty(name=name, value=value, read_only=True, **kwargs)


#: Characters a long-string PV holds (a CHAR waveform, with its terminating NUL).
LONG_STRING_LENGTH = 1024


def _long_string(name: str, doc: str) -> pvproperty:
    """A read-only long string: a CHAR waveform, as EPICS records hold text longer than a
    DBR_STRING's 40 characters (``caget -S``, pyepics ``as_string=True``, a Phoebus text
    update with the string format read all of it; :meth:`IOCServer.write` fits any text to
    it with :func:`_long_text`).
    Reported as a CHAR array, not as a string: caproto would then hand DBR_STRING clients
    the first 40 characters and fail DBR_CHAR reads."""
    return _reading(
        name,
        _long_text(""),
        dtype=ChannelType.CHAR,
        max_length=LONG_STRING_LENGTH,
        report_as_string=False,
        doc=doc,
    )


#: Characters a STRING PV holds (EPICS: 40 bytes with the closing NUL).
STRING_LENGTH = 39


def _latin1(text: Any) -> str:
    """``text`` with what Latin-1 cannot hold written as escapes (``\\u2264``): caproto keeps
    any text but encodes it as Latin-1 when a client reads, so one such character (in an
    exception's message, a path, a scan id) would make every read of the PV fail."""
    return str(text).encode("latin-1", "backslashreplace").decode("latin-1")


def _long_text(message: Any) -> str:
    """``message`` (in Latin-1) cut to what a long-string PV holds and padded with NULs to its
    full length, as an EPICS waveform keeps its element count: a client that connected while
    the text was short then still reads all of a longer one (text readers stop at the first
    NUL)."""
    return _latin1(message)[: LONG_STRING_LENGTH - 1].ljust(LONG_STRING_LENGTH, "\0")


def _image(plane: str, what: str, doc: str) -> pvproperty:
    return _reading(
        f"{what}:{plane}",
        np.zeros(IMAGE_SIZE * IMAGE_SIZE, dtype=np.float32),
        dtype=ChannelType.FLOAT,
        max_length=IMAGE_SIZE * IMAGE_SIZE,
        doc=f"{doc}, central {plane} plane (flattened, row-major)",
    )


def _finite_limit(field: str, linked: str):
    """A putter for an alarm-limit field of a record: finite numbers only (a NaN limit
    silently switches the alarm off)."""

    async def putter(fields, instance, value):
        if not math.isfinite(float(value)):
            raise ValueError("alarm limits must be finite numbers")
        await fields.parent.write_metadata(**{linked: value})

    putter.__name__ = f"_{field}"
    return putter


#: The setting PVs that are one field of :class:`~bcdi_bluesky.ReconstructionSettings` each
#: (field -> PV name); the ES iteration counts share ``ES:MaxIter`` (see :data:`ES_MAX_ITER`).
SETTING_PVS = {
    "shape_search_evaluations": "Search:Evaluations",
    "es_subsampling": "ES:Subsampling",
    "es_time_budget_s": "ES:TimeBudget",
    "polish_er_iterations": "Polish:ERIterations",
    "polish_iterations": "Polish:Iterations",
    "polish_hio_fraction": "Polish:HIOFraction",
    "polish_subsampling": "Polish:Subsampling",
    "polish_time_budget_s": "Polish:TimeBudget",
    "adaptive_iterations": "Polish:AdaptiveIterations",
    "adaptive_hio_fraction": "Polish:AdaptiveHIOFraction",
    "random_starts": "Polish:RandomStarts",
    "starts_downsampling": "Polish:StartsDownsampling",
    "starts_subsampling": "Polish:StartsSubsampling",
    "subsampled_refine_iterations": "Polish:SubsampledRefineIterations",
    "converge_iterations": "Polish:ConvergeIterations",
    "converge_tolerance": "Polish:ConvergeTolerance",
    "loose_support_iterations": "Polish:LooseSupportIterations",
    "uniform_amplitude_iterations": "Polish:UniformAmplitudeIterations",
    "rescue_starts": "Polish:RescueStarts",
    "partial_coherence": "Polish:PartialCoherence",
    "support_threshold": "Support:Threshold",
    "track": "Track",
    "seed": "ES:Seed",
}
#: The ES steps of both grids (coarse then fine) in one PV, split in the running settings'
#: proportion.
ES_MAX_ITER = ("ES:MaxIter", ("es_coarse_iterations", "es_fine_iterations"))


def _attr(pv_name: str) -> str:
    return pv_name.replace(":", "_")


def _settings_group() -> type[PVGroup]:
    """The setting PVs, generated from :meth:`ReconstructionSettings.fields_info`: initial
    value, control limits, units and help of each come from the settings object."""
    info = {i.name: i for i in ReconstructionSettings.fields_info()}
    attrs: dict[str, Any] = {
        "Enable": _setting("Enable", 1, 0, 1, integer=True, doc="0 skips reconstructions"),
        "ES_Enable": _setting(
            "ES:Enable",
            1,
            0,
            1,
            integer=True,
            doc="0 skips the refinement: odd-shape search and ES",
        ),
    }
    name, (coarse, fine) = ES_MAX_ITER
    attrs[_attr(name)] = _setting(
        name,
        info[coarse].default + info[fine].default,
        0,
        info[coarse].high + info[fine].high,
        integer=True,
        doc=f"ES steps: {coarse} + {fine}, split as in the running settings",
    )
    for field, pv_name in SETTING_PVS.items():
        i = info[field]
        low, high = (0, 1) if i.kind is bool else (i.low, i.high)
        attrs[_attr(pv_name)] = _setting(
            pv_name,
            i.default,
            low,
            high,
            integer=i.kind is not float,
            units=i.units,
            doc=f"{field}: {i.doc}",
        )
    return type("ReconstructionSettingsPVs", (PVGroup,), attrs)


def _latency_group() -> type[PVGroup]:
    """``Latency:<Stage>``: seconds of each stage (the result's ``timings`` keys)."""
    attrs = {
        stage.capitalize(): _reading(
            stage.capitalize(), units="s", precision=3, doc=f"seconds of the {stage} stage"
        )
        for stage in TIMED_STAGES[:-1]
    }
    attrs["Total"] = _reading(
        "Total", units="s", precision=3, doc="seconds of the whole reconstruction"
    )
    return type("LatencyPVs", (PVGroup,), attrs)


#: The characters of a PV name here: printable ASCII except quotes and ``$`` (EPICS record
#: names), ``.`` (it separates a record's name from its field's) and braces (caproto reads
#: ``{name}`` in a prefix as a macro).
_PV_NAME_CHARACTERS = re.compile(r"[!#%&(-\-/-z|~]*")


def check_pv_prefix(prefix: str) -> str:
    """``prefix`` when every PV name made with it is a valid EPICS record name.

    Raises
    ------
    SettingsError
        It holds another character (a space, a dot, a quote, ``$``, a brace, a control or
        non-ASCII character).
    """
    if not isinstance(prefix, str) or not _PV_NAME_CHARACTERS.fullmatch(prefix):
        raise SettingsError(
            f"PV prefix {prefix!r}: a PV name holds printable ASCII characters other than "
            "space, quotes, braces, . and $"
        )
    return prefix


class ReconstructionIOC(PVGroup):
    """PVs of the BCDI reconstruction (prefix default ``BCDI:``). ``docs/pvs.md`` lists them.

    Every PV is :class:`_Audited`: who may put is decided by ``access``, and every put is
    logged in one line.

    Parameters
    ----------
    prefix : str
        PV prefix.
    access : WriteAccess, optional
        Who may put the settings (default: any client).
    """

    Status = pvproperty(
        value=STATUS[0],
        enum_strings=STATUS,
        dtype=ChannelType.ENUM,
        read_only=True,
        alarm_group="Status",
        doc="Idle, Collecting, Reconstructing, Refining, Done, Error (MAJOR), Skipped (MINOR)",
    )
    StatusMsg = _long_string("StatusMsg", "what is happening, or why it failed")
    ScanUID = _reading(
        "ScanUID", "", dtype=ChannelType.STRING, doc="uid of the scan shown (first 39 characters)"
    )
    ScanID = _reading("ScanID", 0, doc="its scan id (0 if not a 32-bit whole number)")
    Count = _reading("Count", 0, doc="reconstructions done")
    Heartbeat = _reading("Heartbeat", 0, doc="+1 every second while the IOC runs")

    Chi = pvproperty(
        value=0.0,
        record=_AuditedAiFields,
        read_only=True,
        precision=4,
        alarm_group="Chi",
        upper_alarm_limit=0.5,
        upper_warning_limit=0.3,
        lower_alarm_limit=-1.0,
        lower_warning_limit=-1.0,
        doc="final chi; warning/alarm limits in .HIGH/.HIHI (default 0.3/0.5)",
    )
    Chi = Chi.fields.hihi_alarm_limit.putter(_finite_limit("hihi", "upper_alarm_limit"))
    Chi = Chi.fields.high_alarm_limit.putter(_finite_limit("high", "upper_warning_limit"))
    Chi = Chi.fields.low_alarm_limit.putter(_finite_limit("low", "lower_warning_limit"))
    Chi = Chi.fields.lolo_alarm_limit.putter(_finite_limit("lolo", "lower_alarm_limit"))
    ChiCNN = _reading("ChiCNN", precision=4, doc="chi of the CNN's estimate")
    ES_Iteration = _reading("ES:Iteration", 0, doc="ES step (live)")
    ES_Cost = _reading("ES:Cost", precision=4, doc="ES cost chi (live)")
    ES_CostHistory = _reading(
        "ES:CostHistory",
        np.zeros(1, dtype=np.float64),
        dtype=ChannelType.DOUBLE,
        max_length=MAX_HISTORY,
        doc="chi of every ES step",
    )

    latency = SubGroup(
        _latency_group(), prefix="Latency:", doc="seconds of each stage of the last reconstruction"
    )

    Params = _reading(
        "Params",
        np.zeros(1, dtype=np.float64),
        dtype=ChannelType.DOUBLE,
        max_length=MAX_PARAMS,
        doc="crystal parameter vector (names in the model card)",
    )
    Size_X = _reading("Size:X", 0, units="voxel", doc="support extent along x (axis 2)")
    Size_Y = _reading("Size:Y", 0, units="voxel", doc="along y (axis 1)")
    Size_Z = _reading("Size:Z", 0, units="voxel", doc="along z (axis 0, rocking)")
    Volume = _reading("Volume", 0, units="voxel", doc="support volume")
    Volume_NM = _reading(
        "Volume:NM",
        units="nm^3",
        doc="crystal volume in nm^3 (0 unless the scan gives the geometry)",
    )
    Voxel_Size = _reading(
        "Voxel:Size",
        np.zeros(3),
        dtype=ChannelType.DOUBLE,
        max_length=3,
        units="nm",
        doc="lab-grid voxel size (x, y, z) in nm (0 without geometry)",
    )
    Extent_A = _reading(
        "Extent:A", units="nm", doc="largest principal extent of the crystal (0 without geometry)"
    )
    Extent_B = _reading("Extent:B", units="nm", doc="middle principal extent")
    Extent_C = _reading("Extent:C", units="nm", doc="smallest principal extent")
    Phase_RMS = _reading(
        "Phase:RMS",
        units="rad",
        precision=3,
        doc="RMS of the phase over the support (strain indicator)",
    )
    Strain_RMS = _reading(
        "Strain:RMS", precision=6, doc="RMS of the strain over the support (0 without geometry)"
    )
    Displacement_RMS = _reading(
        "Displacement:RMS",
        units="nm",
        precision=4,
        doc="RMS of the displacement over the support (0 without geometry)",
    )
    Quality = pvproperty(
        value=QUALITY[-1],
        enum_strings=QUALITY,
        dtype=ChannelType.ENUM,
        read_only=True,
        alarm_group="Quality",
        doc="good, fair (MINOR alarm), poor (MAJOR alarm); unknown before a "
        "result that grades itself",
    )
    Quality_Reasons = _long_string("Quality:Reasons", "why the quality is not good")

    Image_Width = _reading("Image:Width", IMAGE_SIZE, doc="width of the slice images")
    Image_Height = _reading("Image:Height", IMAGE_SIZE, doc="their height")
    Amp_XY = _image("XY", "Amp", "amplitude")
    Amp_XZ = _image("XZ", "Amp", "amplitude")
    Amp_YZ = _image("YZ", "Amp", "amplitude")
    Phase_XY = _image("XY", "Phase", "phase in radians")
    Phase_XZ = _image("XZ", "Phase", "phase in radians")
    Phase_YZ = _image("YZ", "Phase", "phase in radians")

    Rec_ThetaCenter = _reading(
        "Rec:ThetaCenter", units="deg", precision=4, doc="recommended rocking centre"
    )
    Rec_ThetaRange = _reading("Rec:ThetaRange", units="deg", precision=4, doc="recommended range")
    Rec_Exposure = _reading("Rec:Exposure", units="s", precision=4, doc="recommended exposure")

    Latent_X = _reading(
        "Latent:X", precision=3, doc="the scan on the CNN's latent map (model card), first axis"
    )
    Latent_Y = _reading("Latent:Y", precision=3, doc="second axis")
    Latent_Distance = _reading(
        "Latent:Distance",
        precision=3,
        doc="distance to the training distribution (99% of priors below 1)",
    )
    # The flag's MINOR alarm comes from caproto's alarm limits (HIGH above 0.5).
    Latent_OOD = _reading(
        "Latent:OOD",
        0,
        alarm_group="Latent:OOD",
        upper_warning_limit=0.5,
        upper_alarm_limit=2,
        lower_warning_limit=-1,
        lower_alarm_limit=-1,
        doc="1 when the distance exceeds 1 (MINOR alarm): ES budget doubled",
    )

    Model_Name = _reading("Model:Name", "", dtype=ChannelType.STRING, doc="CNN model name")
    Model_Provider = _reading(
        "Model:Provider", "", dtype=ChannelType.STRING, doc="ONNX Runtime provider really in use"
    )

    settings = SubGroup(
        _settings_group(), prefix="", doc="the settings the next reconstruction runs with"
    )

    type_map_read_only = _audited(PVGroup.type_map_read_only)

    def __init__(
        self, prefix: str = "BCDI:", *, access: WriteAccess | None = None, **kwargs: Any
    ) -> None:
        check_pv_prefix(prefix)
        self.access = access or WriteAccess()
        #: PV name -> value of every setting a client put (applied on top of the running
        #: settings at the next scan).
        self.puts: dict[str, Any] = {}
        super().__init__(prefix, **kwargs)

    def note_put(self, pv: PvpropertyData) -> None:
        """Remember a client's accepted put of a setting (called in the IOC's loop)."""
        self.puts[pv.pvname.removeprefix(self.prefix)] = pv.value

    @Heartbeat.scan(period=1.0)
    async def Heartbeat(self, instance, async_lib):
        await instance.write(instance.value + 1)

    @Status.putter
    async def Status(self, instance, value):
        # Error and Skipped raise their alarm; any other state clears it.
        name = STATUS[value] if isinstance(value, int) else value
        await _state_alarm(instance, STATUS_SEVERITY.get(name, AlarmSeverity.NO_ALARM))
        return value

    @Quality.putter
    async def Quality(self, instance, value):
        name = QUALITY[value] if isinstance(value, int) else value
        await _state_alarm(instance, QUALITY_SEVERITY.get(name, AlarmSeverity.NO_ALARM))
        return value


async def _state_alarm(instance: PvpropertyData, severity: AlarmSeverity) -> None:
    """A STATE alarm of ``severity`` on a PV (NO_ALARM clears it)."""
    status = AlarmStatus.STATE if severity else AlarmStatus.NO_ALARM
    await instance.alarm.write(status=status, severity=severity)


def scan_identity(start_doc: dict) -> dict[str, Any]:
    """``ScanUID`` (the uid's first 39 characters) and ``ScanID`` (the run's ``scan_id`` when
    it is a whole number a 32-bit PV holds, else 0) of a run."""
    scan_id = start_doc.get("scan_id")
    whole = isinstance(scan_id, (int, np.integer)) and not isinstance(scan_id, bool)
    fits = whole and abs(int(scan_id)) <= np.iinfo(np.int32).max
    uid = str(start_doc.get("uid", ""))[:STRING_LENGTH]
    return {"ScanUID": uid, "ScanID": int(scan_id) if fits else 0}


def _scan_name(start_doc: dict) -> str:
    """The run's ``scan_id`` for a status message (text from the network: one short line)."""
    return one_line(start_doc.get("scan_id"), 40)


def result_values(result: Any) -> dict[str, Any]:
    """PV name (without prefix) -> value for a reconstruction result."""
    support = result.support
    idx = np.argwhere(support)
    extent = (idx.max(axis=0) - idx.min(axis=0) + 1) if idx.size else np.zeros(3, int)
    phase = np.angle(result.object[support]) if idx.size else np.zeros(1)
    phase = np.angle(np.exp(1j * (phase - np.angle(np.mean(np.exp(1j * phase))))))
    values: dict[str, Any] = {
        "Chi": float(result.chi),
        "ChiCNN": float(result.chi_cnn),
        "Params": np.asarray(result.params, dtype=np.float64)[:MAX_PARAMS],
        "Size:X": int(extent[2]),
        "Size:Y": int(extent[1]),
        "Size:Z": int(extent[0]),
        "Volume": int(support.sum()),
        "Phase:RMS": float(np.sqrt(np.mean(phase**2))),
        "Model:Name": str(result.model_name)[:STRING_LENGTH],
        "Model:Provider": str(result.provider)[:STRING_LENGTH],
        "ES:CostHistory": np.asarray(result.es_costs[-MAX_HISTORY:] or [0.0], dtype=np.float64),
    }
    for stage in TIMED_STAGES:
        values[f"Latency:{stage.capitalize()}"] = float(result.timings.get(stage, 0.0))
    values.update(screen_images(result))
    meta = getattr(result, "metadata", {}) or {}
    voxel = meta.get("voxel_size_nm")
    if voxel is not None:
        values["Voxel:Size"] = np.asarray(voxel, dtype=np.float64)
        values["Volume:NM"] = float(values["Volume"] * np.prod(voxel))
    if getattr(result, "latent_distance", None) is not None:
        values.update(
            {
                "Latent:X": float(result.latent_xy[0]),
                "Latent:Y": float(result.latent_xy[1]),
                "Latent:Distance": float(result.latent_distance),
                "Latent:OOD": int(result.out_of_distribution),
            }
        )
    rec = meta.get("recommendation")  # a beamline Recommendation, read by its attributes
    if rec is not None:
        values.update(
            {
                "Rec:ThetaCenter": float(rec.theta_center),
                "Rec:ThetaRange": float(rec.theta_range),
                "Rec:Exposure": float(rec.exposure) if math.isfinite(rec.exposure) else 0.0,
            }
        )
    values.update(summary_values(result.summary()))
    return values


def summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """PV name -> value for the keys of the result schema (``result.summary()``) that are
    present: the quality grade, and the physical figures a scan with geometry has."""
    values: dict[str, Any] = {}
    if summary.get("quality") in QUALITY:
        values["Quality"] = summary["quality"]
        values["Quality:Reasons"] = "; ".join(map(str, summary.get("quality_reasons") or ()))
    for key, name in (
        ("strain_rms", "Strain:RMS"),
        ("displacement_rms_nm", "Displacement:RMS"),
        ("crystal_volume_nm3", "Volume:NM"),
    ):
        if summary.get(key) is not None:
            values[name] = float(summary[key])
    extents = summary.get("crystal_extents_nm")
    if extents is not None:
        a, b, c = sorted((float(e) for e in extents), reverse=True)
        values.update({"Extent:A": a, "Extent:B": b, "Extent:C": c})
    return values


def screen_images(result: Any, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """The six ``size x size`` float32 slice images (amplitude, phase) of a result, centred on
    the crystal, flattened row-major and keyed by PV name (``Amp:XY`` ...)."""
    return slice_images(result.object, result.support, size)


def slice_images(
    obj: np.ndarray, support: np.ndarray, size: int = IMAGE_SIZE
) -> dict[str, np.ndarray]:
    """:func:`screen_images` of an object and its support (the model fit's preview)."""
    idx = np.argwhere(support)
    centre = idx.mean(axis=0).round().astype(int) if idx.size else np.array(obj.shape) // 2
    padded = np.pad(obj, size // 2)
    window = tuple(slice(c, c + size) for c in centre)  # centre + size//2 - size//2 in padded
    crop = padded[window]
    sup = np.pad(support, size // 2)[window]
    amp = central_slices(np.abs(crop))
    phase = central_slices(np.where(sup, np.angle(crop), 0.0))
    return {
        **{f"Amp:{k}": v.astype(np.float32).ravel() for k, v in amp.items()},
        **{f"Phase:{k}": v.astype(np.float32).ravel() for k, v in phase.items()},
    }


def setting_values(settings: ReconstructionSettings) -> dict[str, Any]:
    """The setting PVs' values (PV name without prefix -> value) for ``settings``."""
    name, fields = ES_MAX_ITER
    values: dict[str, Any] = {name: sum(getattr(settings, f) for f in fields)}
    for field, pv_name in SETTING_PVS.items():
        value = getattr(settings, field)
        values[pv_name] = int(value) if isinstance(value, bool) else value
    return values


def apply_puts(settings: ReconstructionSettings, puts: dict[str, Any]) -> ReconstructionSettings:
    """``settings`` with the setting PVs a client put (PV name -> value).

    ``ES:MaxIter`` is split over the coarse and fine ES runs in the running settings'
    proportion; ``ES:Enable`` 0 turns the whole refinement off (search and ES).
    """
    changes = {field: puts[pv_name] for field, pv_name in SETTING_PVS.items() if pv_name in puts}
    name, (coarse, fine) = ES_MAX_ITER
    if name in puts:
        info = {i.name: i for i in ReconstructionSettings.fields_info()}
        total = int(puts[name])
        running = getattr(settings, coarse) + getattr(settings, fine)
        share = getattr(settings, coarse) / running if running else 0.75
        n_fine = min(info[fine].high, total - min(info[coarse].high, round(total * share)))
        changes[coarse], changes[fine] = total - n_fine, n_fine
    if not puts.get("ES:Enable", 1):
        changes.update(shape_search_evaluations=0, **{coarse: 0, fine: 0})
    return settings.replace(**changes)


class IOCStartError(BCDIError, RuntimeError):
    """The IOC could not serve (no port to bind on its interfaces...), or was not up in time."""


class IOCServer:
    """Run a :class:`ReconstructionIOC` in a background thread with its own event loop.

    Parameters
    ----------
    prefix : str
        PV prefix (default ``BCDI:``).
    interfaces : list of str, optional
        Network interfaces to serve on (caproto's default: all, or ``EPICS_CAS_INTF_ADDR_LIST``).
    access : WriteAccess, optional
        Who may put the settings (default: any client).
    """

    def __init__(
        self,
        prefix: str = "BCDI:",
        interfaces: list[str] | None = None,
        access: WriteAccess | None = None,
    ) -> None:
        self.group = ReconstructionIOC(prefix=prefix, access=access)
        self.interfaces = interfaces
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: Exception | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="bcdi-ioc", daemon=True)

    def _run(self) -> None:
        from caproto.asyncio.server import Context

        asyncio.set_event_loop(self.loop)
        context = None

        async def main() -> None:
            nonlocal context
            self._task = asyncio.current_task()
            # caproto's queues must be made inside the loop that runs them.
            context = Context(self.group.pvdb, self.interfaces)
            await context.run(log_pv_names=False, startup_hook=self._started)

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # it could not serve (no port to bind...): start() says why
            self._failure = exc
        finally:
            # Let caproto's circuit tasks finish cancelling, and close the clients' connections
            # in this loop, not in a garbage-collected closed one.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for circuit in list(context.circuits if context is not None else ()):
                circuit.client.close()
            self.loop.run_until_complete(asyncio.sleep(0.05))
            self.loop.close()

    async def _started(self, async_lib) -> None:
        self._ready.set()

    def start(self, timeout: float = 10.0) -> IOCServer:
        """Start serving; returns once the server is up.

        Raises
        ------
        IOCStartError
            It could not serve (the reason given: no port to bind on its interfaces...), or
            was not up within ``timeout`` seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                failure = self._failure
                why = f"{type(failure).__name__}: {failure}" if failure else "its thread ended"
                raise IOCStartError(f"IOC {self.group.prefix} could not start: {why}")
            if time.monotonic() >= deadline:
                raise IOCStartError(f"IOC {self.group.prefix} did not start within {timeout:g} s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread."""
        if self._task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)

    def write(self, values: dict[str, Any], timeout: float = 10.0, wait: bool = True) -> None:
        """Write PV values (names without the prefix) from any thread; with ``wait``, until
        they are served (without, the caller never blocks: for the RunEngine's thread)."""
        pvs = []
        for name, value in values.items():
            pv = self.group.pvdb[self.group.prefix + name]
            # Text is fitted here to what the PV holds: the long strings (CHAR waveforms) and
            # the STRING PVs take any text.
            if pv.data_type == ChannelType.CHAR:
                value = _long_text(value)
            elif pv.data_type == ChannelType.STRING:
                value = _latin1(value)[:STRING_LENGTH]
            pvs.append((pv, value))

        async def apply() -> None:
            for pv, value in pvs:
                await pv.write(value)

        future = asyncio.run_coroutine_threadsafe(apply(), self.loop)
        if wait:
            future.result(timeout)

    def set_status(self, state: str, message: str = "") -> None:
        """Set ``Status`` (one of :data:`STATUS`) and ``StatusMsg``."""
        self.write({"Status": state, "StatusMsg": message})


class IOCPublisher:
    """Publish the callback's reconstructions through an in-process IOC.

    Give it to :class:`~bcdi_bluesky.beamline.BCDIReconstructionCallback` as a publisher: it
    shows each stage live (Collecting, Reconstructing, Refining with ES:Iteration and ES:Cost,
    Done or Error), writes every result PV, and hands the next reconstruction the settings
    the control room put.

    Parameters
    ----------
    prefix : str
        PV prefix.
    interfaces : list of str, optional
        Network interfaces to serve on.
    server : IOCServer, optional
        A running server to publish through (default: start one).
    access : WriteAccess, optional
        Who may put the settings (default: any client).
    settings : ReconstructionSettings, optional
        The settings the setting PVs show until the first scan (then: that scan's running
        settings, for every PV no client put). Default: ``ReconstructionSettings()``.
    """

    def __init__(
        self,
        prefix: str = "BCDI:",
        interfaces: list[str] | None = None,
        server: IOCServer | None = None,
        access: WriteAccess | None = None,
        settings: ReconstructionSettings | None = None,
    ) -> None:
        self.server = server or IOCServer(prefix, interfaces, access).start()
        self._last_progress = 0.0
        if settings is not None:
            self.server.write(setting_values(settings))

    @property
    def group(self) -> ReconstructionIOC:
        """The PVGroup."""
        return self.server.group

    def __repr__(self) -> str:
        return f"IOCPublisher(prefix={self.group.prefix!r})"

    # Hooks the callback calls (duck-typed: plain callables work as publishers too).
    def collecting(self, start_doc: dict) -> None:
        """A run started: show it (called in the RunEngine's thread, so it does not wait)."""
        self.server.write(
            {
                "Status": "Collecting",
                **scan_identity(start_doc),
                "StatusMsg": f"collecting scan {_scan_name(start_doc)}",
            },
            wait=False,
        )

    def configure(
        self, settings: ReconstructionSettings | None, start_doc: dict
    ) -> ReconstructionSettings | None:
        """The next scan's settings: ``settings`` (the running ones) with every setting a
        client put; None skips the scan (``Enable`` 0). The reconstructor is never changed,
        and the setting PVs nobody put show the running values."""
        settings = settings or ReconstructionSettings()
        puts = dict(self.group.puts)
        self.server.write(
            {name: value for name, value in setting_values(settings).items() if name not in puts}
        )
        if not puts.get("Enable", 1):
            self.server.set_status("Idle", "reconstruction disabled (Enable = 0)")
            return None
        settings = apply_puts(settings, puts)
        self.server.set_status("Reconstructing", f"reconstructing scan {start_doc.get('scan_id')}")
        return settings

    def progress(self, stage: str, info: dict, start_doc: dict) -> None:
        """Live updates from the pipeline (at most ten a second for ES steps)."""
        if stage == "es_step":
            now = time.monotonic()
            if now - self._last_progress < 0.1:
                return
            self._last_progress = now
            values = {"ES:Iteration": int(info["iteration"]), "ES:Cost": float(info["cost"])}
            if self.group.Status.value != "Refining":  # one Status update, not ten a second
                values["Status"] = "Refining"
            self.server.write(values)
        elif stage == "inference":
            self.server.write({"ChiCNN": float(info["chi"])})
            if info.get("message"):  # e.g. out of distribution: say how the pipeline reacts
                self.server.write({"StatusMsg": info["message"]})
        elif stage == "preview":
            # The model fit's picture while the polish runs; the result replaces it.
            message = (
                f"scan {start_doc.get('scan_id')}: model fit shown (chi {float(info['chi']):.4f}); "
                "phase retrieval running"
            )
            self.server.write(
                {**slice_images(info["object"], info["support"]), "StatusMsg": message}
            )

    def skipped(self, message: str, start_doc: dict) -> None:
        """The scan was not reconstructed by design: Skipped state (MINOR alarm) with the
        reason; Idle when the operator disabled reconstruction (``Enable`` 0)."""
        self.server.write(scan_identity(start_doc))
        if not self.group.puts.get("Enable", 1):
            self.server.set_status(
                "Idle", f"scan {_scan_name(start_doc)} not reconstructed: Enable = 0"
            )
            return
        self.server.set_status("Skipped", f"scan {_scan_name(start_doc)}: {message}")

    def failure(self, message: str, start_doc: dict) -> None:
        """The reconstruction failed: Error state (MAJOR alarm) with the reason."""
        self.server.write(scan_identity(start_doc))
        self.server.set_status("Error", f"scan {_scan_name(start_doc)}: {message}")

    def __call__(self, result: Any, start_doc: dict) -> None:
        """Write every result PV with the scan it belongs to (another may be collecting by
        now), then Done."""
        values = {**result_values(result), **scan_identity(start_doc)}
        values["Count"] = int(self.group.Count.value) + 1
        values["ES:Iteration"] = len(result.es_costs)
        self.server.write(values)
        self.server.set_status("Done", f"scan {_scan_name(start_doc)}: chi {result.chi:.4f}")

    def close(self) -> None:
        """Stop the IOC."""
        self.server.stop()


def pv_table(prefix: str = "BCDI:") -> str:
    """Markdown table of every PV (name, type, units, writable, meaning: the PV's ``doc``)."""
    group = ReconstructionIOC(prefix=prefix)
    rows = ["| PV | type | units | writable | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, channel in group.pvdb.items():
        dtype = channel.data_type.name.lower()
        length = getattr(channel, "max_length", 1)
        if length and length > 1 and dtype not in ("char", "string"):
            dtype += f"[{length}]"
        if dtype == "char":  # a long string: a CHAR waveform read as text (caget -S)
            dtype = f"long string (char[{length}])"
        units = getattr(channel, "units", "") or ""
        writable = "no" if channel.pvspec.read_only else "yes"
        meaning = channel.pvspec.doc or ""
        low, high = (
            getattr(channel, "lower_ctrl_limit", 0),
            getattr(channel, "upper_ctrl_limit", 0),
        )
        if not channel.pvspec.read_only and low != high:
            meaning += f"; {low} .. {high}"
        rows.append(f"| `{name}` | {dtype} | {units} | {writable} | {meaning} |")
    return "\n".join(rows) + "\n"


def serving_address(prefix: str, timeout: float = 1.0) -> tuple[str, int] | None:
    """Where a Channel Access server already serves ``{prefix}Status`` (None: nobody answered
    a search within ``timeout`` seconds, on the addresses the EPICS environment names).

    Two IOCs with one prefix both answer every search for its PVs, and clients connect to
    whichever answers first: the standalone ``ioc`` command refuses to be the second.
    """
    import caproto
    from caproto.sync.client import search

    sock = caproto.bcast_socket()
    try:
        return search(f"{prefix}Status", sock, timeout)
    except (caproto.CaprotoTimeoutError, caproto.CaprotoNetworkError, OSError):
        return None  # nobody answered, or no search could be sent: nothing to refuse over
    finally:
        sock.close()


def loopback_environment(server_port: int, repeater_port: int) -> dict[str, str]:
    """EPICS variables for Channel Access on 127.0.0.1 only, with the given ports (tests,
    benchmarks, a demo on one machine): set them before any client or server starts."""
    return {
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(server_port),
        "EPICS_CAS_SERVER_PORT": str(server_port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_REPEATER_PORT": str(repeater_port),
        "EPICS_CAS_BEACON_PORT": str(repeater_port),
        "EPICS_CA_MAX_ARRAY_BYTES": "10000000",
    }
