"""Diffraction geometry: from diffractometer angles to the real-space voxel basis and Q.

The lab frame (the one of xrayutilities and cohere's beamline definitions): the incident beam
travels along +z, y points up, x = y cross z completes a right-handed frame. A circle is named
as in xrayutilities' ``QConversion``: ``"y+"`` is a right-handed rotation about +y, ``"x-"`` a
left-handed one about +x. Circles are listed from the outermost (closest to the floor) to the
innermost. At zero detector angles the detector faces the beam at ``detector_distance_m``
along +z; its rows and columns run along the preset's ``pixel_directions`` and turn with the
detector arm.

A stored volume samples reciprocal space on a grid that is in general not orthogonal: one step
along the rocking axis moves q by ``R(-d_omega) Q - Q`` (about ``|axis x Q| d_omega``), one
detector pixel by ``k p / D`` across the outgoing beam. Its real-space dual, the voxel basis
``B`` (column j = the lab vector, in nm, of one step along input axis j), satisfies
``b_i . (N_j dq_j) = 2 pi delta_ij`` (cohere's ``Tdir / shape``, bcdi's transform).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: h c in keV nm: wavelength (nm) = HC_KEV_NM / energy (keV).
HC_KEV_NM = 1.239841984
#: Names of the three axes of a stored volume, in any order.
AXIS_NAMES = ("rocking", "detector_row", "detector_column")
log = logging.getLogger(__name__)

#: Relative difference between |Q| from the energy and angles and |Q| of ``hkl`` on the cubic
#: ``lattice_constant_nm`` above which a geometry is logged as inconsistent (a warning, not
#: an error: the two are metadata, Q comes from the angles).
LATTICE_TOLERANCE = 0.05
#: Keys every geometry gives (in run metadata the rocking step comes from the readbacks and
#: ``rocking_axis`` defaults to ``theta``).
REQUIRED_KEYS = ("beamline", "energy_kev", "detector_distance_m", "pixel_size_m")
#: Keys a geometry file gives: with them, the voxel basis of the stored volume.
FILE_KEYS = (*REQUIRED_KEYS, "detector_angles_deg", "rocking_axis", "rocking_step_deg")
#: Smallest volume of the parallelepiped of the three unit q steps (1: orthogonal): below it
#: the rocking step and the pixel steps lie nearly in one plane (the rocking axis along Q,
#: the detector arm near the direct beam or its back-reflection) and the voxel basis, their
#: inverse, diverges.
MIN_Q_STEP_VOLUME = 0.05
_UNIT = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


@dataclass(frozen=True)
class Diffractometer:
    """A circle convention: which axis each motor turns about, and how the detector sits.

    Parameters
    ----------
    name : str
        Preset name.
    sample_circles : tuple of (name, axis)
        Sample circles from the outermost to the innermost, axis in xrayutilities' notation.
    detector_circles : tuple of (name, axis)
        Detector-arm circles, outermost first.
    pixel_directions : tuple of str
        Lab direction of increasing detector row and of increasing detector column (the frame
        as read by tifffile or h5py, row first) at zero detector angles.
    description : str
        Where the convention comes from.
    """

    name: str
    sample_circles: tuple[tuple[str, str], ...]
    detector_circles: tuple[tuple[str, str], ...]
    pixel_directions: tuple[str, str]
    description: str = ""


#: Named circle conventions. The axes are those of the beamline definitions that cohere
#: (cohere-beamlines 4.5) uses with xrayutilities; the pixel directions are given for frames
#: in tifffile's orientation (row first), the transpose of cohere's reading.
PRESETS: dict[str, Diffractometer] = {
    "aps_34idc": Diffractometer(
        "aps_34idc",
        (("theta", "y+"), ("chi", "z-"), ("phi", "y+")),
        (("delta", "y+"), ("gamma", "x-")),
        ("y-", "x+"),
        "APS 34-ID-C: theta about the vertical, horizontal delta, vertical gamma (Timepix)",
    ),
    "esrf_id01": Diffractometer(
        "esrf_id01",
        (("mu", "y-"), ("eta", "x-"), ("phi", "y-")),
        (("nu", "y-"), ("delta", "x-")),
        ("y-", "x-"),
        "ESRF ID01: vertical scattering plane, eta rocking about a horizontal axis",
    ),
    "petra_p10": Diffractometer(
        "petra_p10",
        (("mu", "y+"), ("om", "x-"), ("chi", "z+"), ("phi", "y-")),
        (("gamma", "y+"), ("delta", "x-")),
        ("y-", "x+"),
        "PETRA III P10: om rocking about a horizontal axis, gamma/delta detector arm",
    ),
    "generic": Diffractometer(
        "generic",
        (("theta", "y+"),),
        (("delta", "y+"), ("gamma", "x-")),
        ("y-", "x+"),
        "one sample circle about the vertical, a detector arm with an in-plane delta and an "
        "out-of-plane gamma, rows pointing down and columns along +x at zero angles",
    ),
}


def _axis_vector(spec: str) -> np.ndarray:
    if len(spec) != 2 or spec[0] not in _UNIT or spec[1] not in "+-":
        raise ValueError(f"axis {spec!r} is not of the form x+, y-, z+ ...")
    return np.array(_UNIT[spec[0]]) * (1.0 if spec[1] == "+" else -1.0)


def rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Right-handed rotation matrix by ``angle_rad`` about the unit vector ``axis``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def _chain(circles: tuple[tuple[str, str], ...], angles: Mapping[str, float]) -> np.ndarray:
    r = np.eye(3)
    for name, axis in circles:
        r = r @ rotation(_axis_vector(axis), math.radians(float(angles.get(name, 0.0))))
    return r


@dataclass(frozen=True)
class Geometry:
    """The geometry of one rocking scan, as in a ``--geometry`` JSON file.

    Parameters
    ----------
    beamline : str
        Circle convention: a key of :data:`PRESETS` (``aps_34idc``, ``esrf_id01``,
        ``petra_p10``, ``generic``).
    energy_kev : float
        X-ray energy (keV).
    detector_distance_m : float
        Sample to detector distance (m).
    pixel_size_m : tuple of float
        Detector pixel size along rows and columns (m), after any binning.
    sample_angles_deg : dict
        Sample circle positions at the centre of the scan (degrees); missing circles are 0.
    detector_angles_deg : dict
        Detector circle positions (degrees); they put the arm through the Bragg peak's pixel,
        which is the centre of the stored volume.
    rocking_axis : str
        The sample circle that rocks.
    rocking_step_deg : float
        Rocking step per frame (degrees, signed: frames in increasing motor order are positive).
    axes : tuple of str
        What each axis of the stored volume is: a permutation of ``rocking``,
        ``detector_row``, ``detector_column``.
    hkl : tuple of int, optional
        The reflection (metadata; Q comes from the detector angles).
    lattice_constant_nm : float, optional
        Cubic lattice constant (metadata; with ``hkl``, compared with ``|Q|`` in :meth:`check`,
        which logs a warning beyond :data:`LATTICE_TOLERANCE`).
    """

    beamline: str
    energy_kev: float
    detector_distance_m: float
    pixel_size_m: tuple[float, float]
    sample_angles_deg: dict[str, float] = field(default_factory=dict)
    detector_angles_deg: dict[str, float] = field(default_factory=dict)
    rocking_axis: str = "theta"
    rocking_step_deg: float = 0.005
    axes: tuple[str, str, str] = AXIS_NAMES
    hkl: tuple[int, int, int] | None = None
    lattice_constant_nm: float | None = None

    def __post_init__(self) -> None:
        # JSON and run metadata are typed loosely: every key is converted here, with the key
        # named in the error, so true, "55e-6" or [1.7, 1, 1] never pass as numbers.
        for key in ("beamline", "rocking_axis"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("energy_kev", "detector_distance_m", "rocking_step_deg"):
            object.__setattr__(self, key, _number(getattr(self, key), key))
        object.__setattr__(self, "pixel_size_m", _pair(self.pixel_size_m, "pixel_size_m"))
        if isinstance(self.axes, (str, bytes)) or not isinstance(self.axes, Sequence):
            raise ValueError(f"axes must be a list of three axis names, got {self.axes!r}")
        object.__setattr__(self, "axes", tuple(self.axes))
        for key in ("sample_angles_deg", "detector_angles_deg"):
            angles = getattr(self, key)
            if not isinstance(angles, Mapping):
                raise ValueError(f"{key} must map circle names to degrees, got {angles!r}")
            converted = {str(k): _number(v, f"{key}[{k!r}]") for k, v in angles.items()}
            object.__setattr__(self, key, converted)
        if self.hkl is not None:
            object.__setattr__(self, "hkl", _miller_indices(self.hkl))
        if self.lattice_constant_nm is not None:
            a = _number(self.lattice_constant_nm, "lattice_constant_nm")
            object.__setattr__(self, "lattice_constant_nm", a)
        self.check()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], required: tuple[str, ...] = REQUIRED_KEYS
    ) -> Geometry:
        """Build from the JSON keys (unknown keys are an error: a typo must not pass), of
        which ``required`` must be there."""
        if not isinstance(data, Mapping):
            raise ValueError(f"geometry must be a mapping of keys, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown geometry keys {unknown} (known: {sorted(known)})")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"geometry lacks {missing}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad geometry: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Geometry:
        """Read a geometry JSON file (keys: see the class parameters)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        except OSError as exc:
            raise ValueError(f"{p}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{p}: not a JSON text file (binary data)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
        try:
            # A file describes a stored volume: nothing else gives its rocking step.
            return cls.from_dict(data, required=FILE_KEYS)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON keys (lists, not tuples)."""
        out = asdict(self)
        out["pixel_size_m"] = list(self.pixel_size_m)
        out["axes"] = list(self.axes)
        out["hkl"] = None if self.hkl is None else list(self.hkl)
        return out

    def check(self) -> None:
        """Raise ``ValueError`` naming the first key that cannot describe a scan."""
        if self.beamline not in PRESETS:
            raise ValueError(f"beamline {self.beamline!r} is not one of {sorted(PRESETS)}")
        for key in ("energy_kev", "detector_distance_m"):
            value = getattr(self, key)
            if not value > 0:  # a finite float: __post_init__ converted it
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        if min(self.pixel_size_m) <= 0:
            raise ValueError(f"pixel_size_m must be positive, got {self.pixel_size_m}")
        if not (math.isfinite(self.rocking_step_deg) and self.rocking_step_deg != 0):
            raise ValueError(f"rocking_step_deg must be non-zero, got {self.rocking_step_deg}")
        if sorted(self.axes) != sorted(AXIS_NAMES):
            raise ValueError(
                f"axes must be a permutation of {list(AXIS_NAMES)}, got {list(self.axes)}"
            )
        preset = PRESETS[self.beamline]
        sample = [n for n, _ in preset.sample_circles]
        detector = [n for n, _ in preset.detector_circles]
        if self.rocking_axis not in sample:
            raise ValueError(
                f"rocking_axis {self.rocking_axis!r} is not a sample circle of "
                f"{self.beamline} ({sample})"
            )
        for given, names, what in (
            (self.sample_angles_deg, sample, "sample_angles_deg"),
            (self.detector_angles_deg, detector, "detector_angles_deg"),
        ):
            # A motor the convention does not model (34-ID-C's mu) may be recorded at zero.
            extra = sorted(k for k in set(given) - set(names) if given[k] != 0.0)
            if extra:
                raise ValueError(
                    f"{what} has non-zero {extra}, not circles of {self.beamline} {names}"
                )
            if not all(math.isfinite(v) for v in given.values()):
                raise ValueError(f"{what} must be finite")
        if self.lattice_constant_nm is not None and not self.lattice_constant_nm > 0:
            raise ValueError(
                f"lattice_constant_nm must be positive, got {self.lattice_constant_nm}"
            )
        q = float(np.linalg.norm(self.q_bragg_inv_nm))
        if q < 1e-9:
            raise ValueError("the detector angles put the detector in the direct beam (Q = 0)")
        steps = self.q_steps_inv_nm()
        lengths = np.linalg.norm(steps, axis=0)
        volume = abs(float(np.linalg.det(steps))) / float(np.prod(lengths)) if lengths.all() else 0
        if not volume >= MIN_Q_STEP_VOLUME:
            raise ValueError(
                f"the rocking step and the detector's pixel steps lie nearly in one plane of "
                f"reciprocal space (volume {volume:.2g} of the unit steps' box, at least "
                f"{MIN_Q_STEP_VOLUME} needed): no 3D voxel basis; check detector_angles_deg "
                f"and rocking_axis"
            )
        if self.hkl is not None and self.lattice_constant_nm is not None and any(self.hkl):
            cubic = 2 * math.pi * math.sqrt(sum(h * h for h in self.hkl)) / self.lattice_constant_nm
            if abs(q / cubic - 1.0) > LATTICE_TOLERANCE:
                log.warning(
                    "geometry: |Q| from the energy and detector angles is %.4g/nm, but hkl %s "
                    "of a cubic lattice of %g nm gives %.4g/nm: the energy, an angle, hkl or "
                    "lattice_constant_nm is wrong (the results use the angles)",
                    q,
                    list(self.hkl),
                    self.lattice_constant_nm,
                    cubic,
                )

    # ------------------------------------------------------------------ physics
    @property
    def preset(self) -> Diffractometer:
        """The circle convention."""
        return PRESETS[self.beamline]

    @property
    def wavelength_nm(self) -> float:
        """X-ray wavelength (nm)."""
        return HC_KEV_NM / self.energy_kev

    @property
    def k_inv_nm(self) -> float:
        """Wave number ``2 pi / lambda`` (1/nm)."""
        return 2 * math.pi / self.wavelength_nm

    def _detector_rotation(self) -> np.ndarray:
        return _chain(self.preset.detector_circles, self.detector_angles_deg)

    def _q_of_pixel(self, d_row: float, d_col: float) -> np.ndarray:
        """Q (1/nm, lab frame) seen by the pixel ``d_row, d_col`` pixels off the centre."""
        r = self._detector_rotation()
        e_row = r @ _axis_vector(self.preset.pixel_directions[0])
        e_col = r @ _axis_vector(self.preset.pixel_directions[1])
        pos = (
            self.detector_distance_m * (r @ _axis_vector("z+"))
            + d_row * self.pixel_size_m[0] * e_row
            + d_col * self.pixel_size_m[1] * e_col
        )
        return self.k_inv_nm * (pos / np.linalg.norm(pos) - _axis_vector("z+"))

    @property
    def q_bragg_inv_nm(self) -> np.ndarray:
        """Q of the Bragg peak, ``k_f - k_i`` in the lab frame (1/nm)."""
        return self._q_of_pixel(0.0, 0.0)

    def rocking_axis_lab(self) -> np.ndarray:
        """The rocking circle's axis in the lab frame, turned by the circles outside it."""
        outer = np.eye(3)
        for name, axis in self.preset.sample_circles:
            if name == self.rocking_axis:
                return outer @ _axis_vector(axis)
            outer = outer @ rotation(
                _axis_vector(axis), math.radians(self.sample_angles_deg.get(name, 0.0))
            )
        raise AssertionError("unreachable: check() validated the rocking axis")

    def q_steps_inv_nm(self) -> np.ndarray:
        """Reciprocal-space steps (1/nm), column j = the q step of one index along axis j.

        Central differences at the Bragg peak: a detector pixel step, and the rocking step as
        the crystal-frame q expressed in the lab frame at the centre of the scan
        (``R(-d_omega/2) Q - R(d_omega/2) Q`` about the rocking axis).
        """
        q = self.q_bragg_inv_nm
        axis = self.rocking_axis_lab()
        h = math.radians(self.rocking_step_deg) / 2
        steps = {
            "rocking": rotation(axis, -h) @ q - rotation(axis, h) @ q,
            "detector_row": self._q_of_pixel(0.5, 0.0) - self._q_of_pixel(-0.5, 0.0),
            "detector_column": self._q_of_pixel(0.0, 0.5) - self._q_of_pixel(0.0, -0.5),
        }
        return np.stack([steps[name] for name in self.axes], axis=1)

    def voxel_basis_nm(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Real-space voxel basis (nm) of a volume of ``shape``: column j = the lab vector of one
        step along axis j (``b_i . (N_j dq_j) = 2 pi delta_ij``)."""
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {shape}")
        extent = self.q_steps_inv_nm() * np.asarray(shape, dtype=np.float64)[None, :]
        return 2 * math.pi * np.linalg.inv(extent).T

    def d_spacing_nm(self) -> float:
        """Lattice-plane spacing ``2 pi / |Q|`` of the measured reflection (nm)."""
        return 2 * math.pi / float(np.linalg.norm(self.q_bragg_inv_nm))

    def with_binning(self, rocking: int = 1, detector: int = 1) -> Geometry:
        """The geometry of the same scan binned by ``rocking`` frames and ``detector`` pixels."""
        data = self.to_dict()
        data["rocking_step_deg"] = self.rocking_step_deg * rocking
        data["pixel_size_m"] = [p * detector for p in self.pixel_size_m]
        return Geometry.from_dict(data)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} given twice")
        seen[key] = value
    return seen


def _number(value: Any, name: str) -> float:
    """``value`` as a finite float; a bool or a string is not a number here."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _pair(value: Any, name: str) -> tuple[float, float]:
    """One number (both) or two numbers (a list, a tuple or an array, as h5py reads one)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one or two numbers, got {value!r}")
        return _number(value[0], name), _number(value[1], name)
    v = _number(value, name)
    return v, v


def _miller_indices(value: Any) -> tuple[int, int, int]:
    """Three whole numbers (1.0 is 1; 1.7 and true are refused)."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or np.ndim(value) != 1
        or len(value) != 3
    ):
        raise ValueError(f"hkl must be three whole numbers, got {value!r}")
    out = []
    for v in value:
        number = _number(v, "hkl")
        if number != int(number):
            raise ValueError(f"hkl must be three whole numbers, got {value!r}")
        out.append(int(number))
    return out[0], out[1], out[2]


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` when it is a mapping, ``{}`` when it is None or empty; else a ValueError
    naming ``where`` (metadata written by hand or by another tool)."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def geometry_from_start(start: Mapping[str, Any]) -> Geometry | None:
    """The geometry of a Bluesky run from its start document, or None when it has none.

    ``start["bcdi"]["geometry"]`` holds the JSON keys. When hklpy2 recorded a diffractometer
    (``start["diffractometers"][name]``), its energy (``_header.energy`` in keV) and the cubic
    lattice constant of its current sample (``samples[sample_name].lattice.a``, angstrom)
    take precedence: hklpy2 is the beamline's own record of them. hklpy2 does not record the
    detector distance, pixel size or rocking step, so without a ``bcdi.geometry`` block the
    geometry is unknown.

    Raises
    ------
    ValueError
        A geometry block that is present but wrong (an unknown beamline, a missing key...).
    """
    bcdi = _mapping(start.get("bcdi"), 'start["bcdi"]')
    block = bcdi.get("geometry")
    if not block:
        return None
    data = dict(_mapping(block, 'start["bcdi"]["geometry"]'))
    diffractometers = _mapping(start.get("diffractometers"), 'start["diffractometers"]')
    if diffractometers:
        name, info = next(iter(diffractometers.items()))
        where = f'start["diffractometers"][{name!r}]'
        info = _mapping(info, where)
        header = _mapping(info.get("_header"), f'{where}["_header"]')
        if header.get("energy") is not None and header.get("energy_units", "keV") == "keV":
            data["energy_kev"] = _number(header["energy"], f'{where}["_header"]["energy"]')
        samples = _mapping(info.get("samples"), f'{where}["samples"]')
        sample_name = info.get("sample_name", "")
        sample = samples.get(sample_name) if isinstance(sample_name, str) else None
        lattice = _mapping(_mapping(sample, f"{where} sample").get("lattice"), f"{where} lattice")
        a = lattice.get("a")
        if a is not None:
            a = _number(a, f"{where} lattice a")
            if a > 0:
                data["lattice_constant_nm"] = a / 10.0  # hklpy2 works in angstrom
    return Geometry.from_dict(data)
