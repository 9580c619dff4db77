"""A simulated BCDI beamline (ophyd): a rocking motor and an area detector seeing a hidden crystal.

The detector's frame at the rocking motor's readback is a slice, along the rocking axis, of the
hidden crystal's 3D diffraction intensity (axis 0 of ``|fftshift(fftn(o))|^2``), embedded in a
detector larger than the peak, with a flat background, Poisson noise that scales with the
exposure time and the attenuator's transmission, and saturation at the detector's maximum
count. The Bragg peak sits at ``bragg_theta + misalignment``: a misaligned sample puts it
outside a naive scan range.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import uuid
from collections import deque
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import DeviceStatus

from ..physics import CrystalModel, CrystalPrior, Geometry, intensity
from .plans import rocking_scan


class HiddenCrystal:
    """The sample: a crystal drawn from the priors and its diffraction geometry.

    Parameters
    ----------
    seed : int
        Draws the crystal (and nothing else).
    n : int
        Grid of the 3D intensity (``n`` rocking steps span the whole pattern).
    photons : float
        Total photons of the 3D pattern for 1 s exposure at full transmission.
    bragg_theta : float
        Nominal rocking angle of the Bragg peak (degrees).
    misalignment : float
        Offset of the true peak from ``bragg_theta`` (degrees).
    step : float
        Rocking angle per voxel of the reciprocal grid (degrees).
    params : ndarray, optional
        Use these crystal parameters instead of drawing them.
    """

    def __init__(
        self,
        seed: int = 0,
        n: int = 64,
        photons: float = 1e8,
        bragg_theta: float = 20.0,
        misalignment: float = 0.0,
        step: float = 0.005,
        params: np.ndarray | None = None,
    ) -> None:
        self.model = CrystalModel(n=n)
        prior = CrystalPrior(self.model)
        self.params = (
            prior.sample(np.random.default_rng(seed))
            if params is None
            else self.model.clip(np.asarray(params, dtype=np.float64))
        )
        self.photons = float(photons)
        self.bragg_theta = float(bragg_theta)
        self.misalignment = float(misalignment)
        self.step = float(step)
        self._lock = threading.Lock()
        self._update()

    def _update(self) -> None:
        pattern = intensity(self.model.voxelise(self.params)).astype(np.float64)
        self.pattern = pattern * (self.photons / pattern.sum())

    @property
    def peak_theta(self) -> float:
        """Where the Bragg peak really is (degrees)."""
        return self.bragg_theta + self.misalignment

    def truth(self) -> np.ndarray:
        """The hidden object (complex64, ``n^3``)."""
        return self.model.voxelise(self.params)

    def expected_slice(self, theta: float) -> np.ndarray:
        """Expected photons per pixel (1 s, full transmission) at rocking angle ``theta``."""
        n = self.model.n
        x = (theta - self.peak_theta) / self.step + n // 2
        i0 = int(np.floor(x))
        w = x - i0
        out = np.zeros((n, n))
        with self._lock:
            for i, weight in ((i0, 1.0 - w), (i0 + 1, w)):
                if 0 <= i < n and weight > 0:
                    out += weight * self.pattern[i]
        return out


class BCDIDetector(Device):
    """Area detector of the simulated beamline (frames in the events).

    ``image`` is read as ``<name>_image``; ``exposure`` (s), ``transmission`` (attenuator, 0-1)
    and ``max_count`` (saturation) are configuration. The frame is ``frame_shape`` pixels with
    the diffraction pattern centred, plus ``background`` photons per pixel per second.
    """

    image = Cpt(Signal, kind="normal")
    total = Cpt(Signal, value=0.0, kind="hinted")
    exposure = Cpt(Signal, value=1.0, kind="config")
    transmission = Cpt(Signal, value=1.0, kind="config")
    max_count = Cpt(Signal, value=65535.0, kind="config")

    def __init__(
        self,
        *args,
        crystal: HiddenCrystal,
        motor: SynAxis,
        frame_shape: tuple[int, int] = (96, 96),
        background: float = 0.05,
        seed: int = 0,
        illumination=None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.crystal = crystal
        self.motor = motor
        #: Fraction of the beam on the crystal (callable, for alignment); None: always 1.
        self.illumination = illumination
        self.frame_shape = tuple(frame_shape)
        self.background = float(background)
        self._rng = np.random.default_rng(seed)
        n = crystal.model.n
        if any(s < n for s in self.frame_shape):
            raise ValueError(f"frame_shape {frame_shape} must be at least {n} per axis")
        self.image.put(np.zeros(self.frame_shape, dtype=np.float32))

    def make_frame(self) -> np.ndarray:
        """Expose one frame at the motor's readback: Poisson counts, saturated."""
        theta = float(self.motor.readback.get())
        t = float(self.exposure.get()) * float(self.transmission.get())
        if self.illumination is not None:
            t *= float(self.illumination())
        expected = np.full(self.frame_shape, self.background * float(self.exposure.get()))
        n = self.crystal.model.n
        r0, c0 = (self.frame_shape[0] - n) // 2, (self.frame_shape[1] - n) // 2
        expected[r0 : r0 + n, c0 : c0 + n] += t * self.crystal.expected_slice(theta)
        counts = self._rng.poisson(expected).astype(np.float32)
        return np.minimum(counts, np.float32(self.max_count.get()))

    def trigger(self) -> DeviceStatus:
        """Acquire a frame (synchronously: the simulation is fast) and finish the status."""
        status = DeviceStatus(self)
        try:
            frame = self.make_frame()
            self.image.put(frame)
            self.total.put(float(frame.sum()))
        except Exception as exc:  # a failed exposure fails the status, not the process
            status.set_exception(exc)
        else:
            status.set_finished()
        return status


class _FrameWritingDetector(BCDIDetector):
    """The detector writing its frames to ``save_path`` (a fresh temporary folder by default)
    and queuing the asset documents that say where they are, for the RunEngine to collect."""

    def __init__(self, *args, save_path: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if save_path:
            os.makedirs(save_path, exist_ok=True)  # a folder to come, as area detectors make
        self.save_path = save_path or tempfile.mkdtemp(prefix="bcdi_frames_")
        self._asset_docs: deque = deque()
        self._resource_uid: str | None = None

    def collect_asset_docs(self):
        while self._asset_docs:
            yield self._asset_docs.popleft()

    def _describe_image(self, **fields: Any) -> dict:
        """The reading's description with the image's data key marked external."""
        out = super().describe()
        key = f"{self.name}_image"
        out[key] = {**out[key], "dtype": "array", "shape": list(self.frame_shape), **fields}
        return out


class FileBackedBCDIDetector(_FrameWritingDetector):
    """The same detector, delivering frames the way area detectors do: written to files, with
    Resource/Datum documents, and only a datum id in the events.

    Each staging opens a resource (spec ``BCDI_NPY_FRAME``, one ``.npy`` per frame in
    ``save_path``); each trigger writes a frame and queues a datum.
    """

    def __init__(self, *args, save_path: str | None = None, **kwargs) -> None:
        super().__init__(*args, save_path=save_path, **kwargs)
        self._stem: str | None = None
        self._counter = itertools.count()
        self._datum_id: str | None = None

    def stage(self):
        self._stem = uuid.uuid4().hex[:12]
        self._resource_uid = str(uuid.uuid4())
        self._counter = itertools.count()
        self._asset_docs.append(
            (
                "resource",
                {
                    "uid": self._resource_uid,
                    "spec": "BCDI_NPY_FRAME",
                    "root": self.save_path,
                    "resource_path": self._stem,
                    "resource_kwargs": {},
                    "path_semantics": "posix",
                },
            )
        )
        return super().stage()

    def unstage(self):
        self._resource_uid = None
        return super().unstage()

    def trigger(self) -> DeviceStatus:
        status = super().trigger()
        if self._resource_uid is None:
            raise RuntimeError(f"{self.name} must be staged before it is triggered")
        index = next(self._counter)
        np.save(os.path.join(self.save_path, f"{self._stem}_{index}.npy"), self.image.get())
        self._datum_id = f"{self._resource_uid}/{index}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": self._resource_uid,
                    "datum_id": self._datum_id,
                    "datum_kwargs": {"index": index},
                },
            )
        )
        return status

    def read(self):
        out = super().read()
        key = f"{self.name}_image"
        out[key] = {**out[key], "value": self._datum_id}
        return out

    def describe(self):
        return self._describe_image(external="FILESTORE:")


class HDF5StreamBCDIDetector(_FrameWritingDetector):
    """The same detector, writing its frames the way modern area detectors (ophyd-async) do:
    appended to one HDF5 dataset per run, announced by one StreamResource and a StreamDatum
    per frame; the events carry no frame.

    Each staging opens ``<save_path>/<uid>.h5`` with the frames in ``/entry/data/data``
    (chunked one frame per chunk, flushed after every frame so readers see it at once); the
    file is closed at unstage.
    """

    dataset = "/entry/data/data"

    def __init__(self, *args, save_path: str | None = None, **kwargs) -> None:
        super().__init__(*args, save_path=save_path, **kwargs)
        self._file = None
        self._path: str | None = None
        self._announced = False

    def stage(self):
        import h5py

        self._resource_uid = str(uuid.uuid4())
        self._path = os.path.join(self.save_path, f"{self._resource_uid}.h5")
        self._file = h5py.File(self._path, "w", libver="latest")
        self._file.create_dataset(
            self.dataset,
            shape=(0, *self.frame_shape),
            maxshape=(None, *self.frame_shape),
            dtype="float32",
            chunks=(1, *self.frame_shape),
        )
        self._announced = False
        return super().stage()

    def unstage(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._resource_uid = None
        return super().unstage()

    def trigger(self) -> DeviceStatus:
        if self._file is None:
            raise RuntimeError(f"{self.name} must be staged before it is triggered")
        status = super().trigger()
        data = self._file[self.dataset]
        index = data.shape[0]
        data.resize(index + 1, axis=0)
        data[index] = self.image.get()
        self._file.flush()
        if not self._announced:
            self._announced = True
            self._asset_docs.append(
                (
                    "stream_resource",
                    {
                        "uid": self._resource_uid,
                        "data_key": f"{self.name}_image",
                        "mimetype": "application/x-hdf5",
                        "uri": f"file://localhost{self._path}",
                        "parameters": {
                            "dataset": self.dataset,
                            "chunk_shape": [1, *self.frame_shape],
                        },
                    },
                )
            )
        self._asset_docs.append(
            (
                "stream_datum",
                {
                    "uid": f"{self._resource_uid}/{index}",
                    "stream_resource": self._resource_uid,
                    "descriptor": "",
                    "indices": {"start": index, "stop": index + 1},
                    "seq_nums": {"start": 0, "stop": 0},
                },
            )
        )
        return status

    def read(self):
        out = super().read()
        out.pop(f"{self.name}_image")  # the frame travels by StreamDatum
        return out

    def describe(self):
        return self._describe_image(external="STREAM:", dtype_numpy=np.dtype("float32").str)


class SimulatedBeamline:
    """The embedded default beamline: a hidden crystal, the ``theta`` motor and ``det``.

    Parameters
    ----------
    seed : int
        Seeds the hidden crystal and the detector noise.
    misalignment : float
        Offset of the Bragg peak from the nominal angle (degrees).
    frame_shape : tuple of int
        Detector pixels (larger than the pattern).
    file_backed : bool or {"npy", "hdf5"}
        Deliver frames as files: ``True`` or ``"npy"``, one file per frame with Resource/Datum
        documents (:class:`FileBackedBCDIDetector`); ``"hdf5"``, one HDF5 file per run with
        StreamResource/StreamDatum documents (:class:`HDF5StreamBCDIDetector`).
    save_path : str, optional
        Folder of the file-backed detector's frames (default: a new temporary folder).
    beam_centre : tuple of float
        Where the sample stage (``sample_x``, ``sample_y``, um) puts the crystal in the beam.
    **crystal_kwargs
        More :class:`HiddenCrystal` settings (photons, step, n, params...).

    Attributes
    ----------
    geometry : Geometry
        The diffraction geometry the simulated scans are recorded with (:meth:`make_geometry`):
        ``rocking_scan(..., geometry=beamline.geometry)`` writes it to the start document.
    """

    def __init__(
        self,
        seed: int = 0,
        misalignment: float = 0.0,
        frame_shape=(96, 96),
        file_backed: bool | str = False,
        save_path: str | None = None,
        beam_centre: tuple[float, float] = (0.0, 0.0),
        **crystal_kwargs,
    ) -> None:
        self.crystal = HiddenCrystal(seed=seed, misalignment=misalignment, **crystal_kwargs)
        self.theta = SynAxis(name="theta", value=self.crystal.bragg_theta)
        # Sample stage: the crystal sits in a Gaussian beam (sigma 1 um) centred at
        # beam_centre; off centre, fewer photons reach it. es_align finds the centre.
        self.sample_x = SynAxis(name="sample_x", value=0.0)
        self.sample_y = SynAxis(name="sample_y", value=0.0)
        self.beam_centre = np.array(beam_centre, dtype=float)
        self.beam_sigma = 1.0
        common = {
            "name": "det",
            "crystal": self.crystal,
            "motor": self.theta,
            "frame_shape": frame_shape,
            "seed": seed + 1,
            "illumination": self.illumination,
        }
        if file_backed == "hdf5":
            self.det = HDF5StreamBCDIDetector(save_path=save_path, **common)
        elif file_backed:
            self.det = FileBackedBCDIDetector(save_path=save_path, **common)
        else:
            self.det = BCDIDetector(**common)
        self.geometry = self.make_geometry()

    def make_geometry(
        self,
        energy_kev: float = 9.0,
        detector_distance_m: float = 1.0,
        pixel_size_m: float = 55e-6,
        gamma_deg: float = 10.0,
    ) -> Geometry:
        """A ``generic`` geometry for this beamline: the rocking ``theta`` at the nominal Bragg
        angle, the detector arm at ``2 theta_B`` split into an in-plane ``delta`` and an
        out-of-plane ``gamma`` (which tilts Q out of the horizontal plane and shears the
        sampling grid, as at a real beamline), the crystal's rocking step.
        """
        two_theta = np.deg2rad(2 * self.crystal.bragg_theta)
        gamma = np.deg2rad(gamma_deg)
        # cos(2 theta) = cos(delta) cos(gamma) puts the arm on the Bragg angle.
        delta = np.rad2deg(np.arccos(np.cos(two_theta) / np.cos(gamma)))
        return Geometry(
            beamline="generic",
            energy_kev=energy_kev,
            detector_distance_m=detector_distance_m,
            pixel_size_m=(pixel_size_m, pixel_size_m),
            sample_angles_deg={"theta": self.crystal.bragg_theta},
            detector_angles_deg={"delta": float(delta), "gamma": gamma_deg},
            rocking_axis="theta",
            rocking_step_deg=self.crystal.step,
        )

    def rocking_scan(self, num: int, **options: Any):
        """A :func:`~bcdi_bluesky.beamline.rocking_scan` of ``det`` over ``theta``: ``num``
        frames one crystal step apart, centred on the nominal Bragg angle (``options``: its
        keywords, such as ``geometry=beamline.geometry`` or ``md``)."""
        centre, step = self.crystal.bragg_theta, self.crystal.step
        return rocking_scan(self.det, self.theta, centre, (num - 1) * step, num, **options)

    def illumination(self) -> float:
        """Fraction of the beam's peak flux on the crystal at the sample stage's readbacks."""
        pos = np.array([self.sample_x.readback.get(), self.sample_y.readback.get()], dtype=float)
        return float(np.exp(-0.5 * np.sum((pos - self.beam_centre) ** 2) / self.beam_sigma**2))
