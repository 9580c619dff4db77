"""Read diffraction volumes and write reconstructions (npz, CXI-style HDF5).

Readers return ``(intensity, mask)``: a float32 3D array and a boolean mask (True = valid) or
None. Every problem is a :class:`DataError` naming the file and what is wrong with it.

Files are written atomically (:func:`~bcdi_bluesky.files.atomic_write_bytes`, re-exported
here): built in memory, written to a temporary file in the target folder and renamed into place,
so a full disk or a permission problem leaves no partial file and raises one
:class:`DataError`. HDF5 files are built with
h5py's in-memory ``core`` driver: h5py closing a file on a full disk can crash the process, and
in memory it never meets the disk.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError
from .files import atomic_write_bytes, existing_file
from .physics import Geometry, check_mask, check_volume
from .preprocess import saturation_mask

if TYPE_CHECKING:
    from .pipeline import ReconstructionResult

log = logging.getLogger(__name__)

#: Input files read as HDF5 (NeXus and CXI are HDF5).
HDF5_SUFFIXES = (".h5", ".hdf5", ".cxi", ".nxs")
INTENSITY_SUFFIXES = (".npy", ".npz", *HDF5_SUFFIXES, ".tif", ".tiff")
RESULT_SUFFIXES = (".npz", ".h5", ".hdf5", ".cxi", ".vti")
#: Datasets tried, in order, in HDF5/NeXus/CXI files.
_H5_INTENSITY = (
    "entry_1/data_1/data",
    "entry/data/data",
    "entry_1/instrument_1/detector_1/data",
    "intensity",
    "data",
)
#: The first bytes of numpy's files (a zip archive for .npz): anything else is refused before
#: numpy tries it as a pickle.
_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}
_H5_MASK = (
    "entry_1/instrument_1/detector_1/mask",
    "entry_1/data_1/mask",
    "entry/data/mask",
    "mask",
)


def read_geometry(path: str | Path) -> Geometry:
    """Read a scan's geometry from a JSON file (keys: :class:`~bcdi_bluesky.physics.Geometry`).

    Raises
    ------
    DataError
        Missing or unreadable file, not JSON, an unknown or missing key, a value out of range.
    """
    p = existing_file(path)
    try:
        return Geometry.from_json(p)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _volumes(f: Any) -> list[str]:
    """Names of the 3D datasets of an open HDF5 file but masks (what ``--dataset`` may
    name)."""
    import h5py

    names: list[str] = []

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and item.ndim == 3 and not name.endswith("mask"):
            names.append(name)

    f.visititems(visit)
    return names


def _read_h5(path: Path, dataset: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The intensity (``dataset``, else the first of :data:`_H5_INTENSITY` present) and the
    mask: with ``dataset``, only a ``mask`` beside it (a mask of another dataset must not
    apply); else the first of :data:`_H5_MASK`."""
    import h5py

    with h5py.File(path, "r") as f:
        names = (dataset,) if dataset else _H5_INTENSITY
        for name in names:
            if name in f and isinstance(f[name], h5py.Dataset):
                data = f[name][()]
                break
        else:
            volumes = _volumes(f)
            found = f"; 3D datasets in it: {', '.join(volumes[:10])}" if volumes else ""
            raise DataError(
                f"{path}: no intensity dataset (looked for {', '.join(names)}; name one with "
                f"--dataset){found}"
            )
        mask = None
        beside = (f"{name.strip('/').rpartition('/')[0]}/mask".lstrip("/"),) if dataset else None
        for name in beside or _H5_MASK:
            if name in f and isinstance(f[name], h5py.Dataset):
                raw = f[name][()]
                # CXI masks flag bad pixels with non-zero bits; a boolean mask marks valid ones.
                mask = raw if raw.dtype == bool else raw == 0
                break
    return np.asarray(data), mask


def read_intensity(
    path: str | Path, dataset: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a 3D intensity and optional mask from ``.npy``, ``.npz``, HDF5/NeXus/CXI or TIFF.

    Parameters
    ----------
    path : path-like
        The file. ``.npz`` holds ``intensity`` (optional ``mask``, True = valid); a TIFF stack
        has one frame per rocking step.
    dataset : str, optional
        HDF5 dataset to read instead of the usual CXI/NeXus locations.

    Raises
    ------
    DataError
        Missing or unreadable file, a ``dataset`` for a file that is not HDF5, no intensity
        in it, or an intensity or mask that fails the checks of
        :func:`bcdi_bluesky.physics.check_volume` (rank, NaN, negative, empty).
    """
    p = existing_file(path)
    suffix = p.suffix.lower()
    if suffix not in INTENSITY_SUFFIXES:
        raise DataError(
            f"{p}: unsupported file type {suffix!r} (use one of {', '.join(INTENSITY_SUFFIXES)})"
        )
    if dataset and suffix not in HDF5_SUFFIXES:
        raise DataError(f"{p}: a dataset name ({dataset!r}) applies to HDF5 files only")
    try:
        mask = None
        if suffix in _MAGIC:
            with open(p, "rb") as f:
                if f.read(len(_MAGIC[suffix])) != _MAGIC[suffix]:
                    raise DataError(f"{p}: not a {suffix} file (it lacks numpy's header)")
        if suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "intensity" not in z:
                    raise DataError(f"{p}: no 'intensity' array (found {', '.join(z.files)})")
                data = z["intensity"]
                mask = z["mask"] if "mask" in z else None
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                # Frames appended one by one are one series each: every page is a frame.
                data = tif.asarray() if len(tif.series) == 1 else tif.asarray(key=slice(None))
        else:
            data, mask = _read_h5(p, dataset)
    except DataError:
        raise
    except Exception as exc:  # numpy, h5py and tifffile raise many kinds
        raise DataError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from None
    unsaturated = saturation_mask(data) if isinstance(data, np.ndarray) else None
    try:
        data = check_volume(data)
        mask = check_mask(mask, data.shape)
    except ValueError as exc:
        raise DataError(f"{p}: {exc}") from None
    if unsaturated is not None:
        log.warning(
            "%s: %d voxels at the integer type's maximum (saturated) masked",
            p,
            int(np.count_nonzero(~unsaturated)),
        )
        mask = unsaturated if mask is None else mask & unsaturated
    return data, mask


VTK_NEEDED = "writing .vti needs vtk: pip install 'bcdi-bluesky[vtk]'"


def check_vtk() -> None:
    """Refuse, before any work, a ``.vti`` output where vtk is not installed (an extra)."""
    if importlib.util.find_spec("vtkmodules") is None:
        raise DataError(VTK_NEEDED)


def _physical_arrays(result: ReconstructionResult) -> dict[str, np.ndarray]:
    """The physical keys (empty without a geometry) and the geometry as JSON."""
    physical = getattr(result, "physical", None)
    if physical is None:
        return {}
    return {**physical.arrays(), "geometry": np.array(json.dumps(physical.geometry.to_dict()))}


def _result_npz(result: ReconstructionResult, meta: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        object=result.object,
        support=result.support,
        params=result.params,
        param_names=np.array(result.crystal_model.names),
        summary=json.dumps(meta),
        **_physical_arrays(result),
    )
    return buffer.getvalue()


def _result_cxi(result: ReconstructionResult, meta: dict[str, Any]) -> bytes:
    import h5py

    names = np.array(result.crystal_model.names)
    # In memory, never backed by a file: the image is written out by atomic_write_bytes.
    with h5py.File(f"bcdi-{uuid.uuid4().hex}.cxi", "w", driver="core", backing_store=False) as f:
        # NeXus's root and its "default" chain: a reader (silx, h5web, nexpy) opens the
        # result's image without knowing the layout.
        f.attrs.update(creator="bcdi-bluesky", NX_class="NXroot", default="entry_1")
        f.create_dataset("cxi_version", data=150)
        entry = f.create_group("entry_1")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "image_1"
        image = entry.create_group("image_1")
        image.attrs.update(NX_class="NXdata", signal="data")
        image.create_dataset("data", data=result.object, compression="gzip")
        image.create_dataset("mask", data=result.support, compression="gzip")
        image.create_dataset("data_type", data="electron density")
        image.create_dataset("data_space", data="real")
        process = image.create_group("process_1")
        process.attrs["NX_class"] = "NXprocess"
        process.create_dataset("program", data="bcdi-bluesky")
        process.create_dataset("summary", data=json.dumps(meta))
        # The file keys at the root are hard links to the CXI places: one copy of each array.
        f["object"], f["support"] = image["data"], image["mask"]
        f.create_dataset("params", data=result.params)
        f.create_dataset("param_names", data=names.astype("S"))
        uid = (getattr(result, "metadata", None) or {}).get("uid")
        if uid:
            # The raw Bluesky run this reconstruction came from.
            entry.create_dataset("experiment_identifier", data=str(uid))
        if getattr(result, "physical", None) is not None:
            _cxi_physical(f, entry, image, result.physical)
        f.flush()
        return f.id.get_file_image()


def _cxi_physical(f, entry, image, physical) -> None:
    """The geometry and the lab-frame results in CXI/NeXus places, and under the file keys at
    the root (hard links to those places, as ``object`` and ``support``)."""
    g = physical.geometry
    arrays = physical.arrays()
    # The input-grid image: its voxel basis (CXI's image basis vectors are in metres).
    image.create_dataset("voxel_basis_nm", data=arrays["voxel_basis_nm"]).attrs["units"] = "nm"
    basis = image.create_dataset("basis_vectors", data=physical.voxel_basis_nm.T * 1e-9)
    basis.attrs["units"] = "m"
    # The lab-frame image: NXdata with its axes in nm.
    lab = entry.create_group("image_2")
    entry.attrs["default"] = "image_2"  # the crystal in the lab frame, in nm
    lab.attrs.update(NX_class="NXdata", signal="data", axes=["x_nm", "y_nm", "z_nm"])
    lab.create_dataset("data", data=arrays["object_lab"], compression="gzip")
    lab.create_dataset("mask", data=arrays["support_lab"], compression="gzip")
    displacement = lab.create_dataset(
        "displacement_nm", data=arrays["displacement_nm"], compression="gzip"
    )
    displacement.attrs["units"] = "nm"
    strain = lab.create_dataset("strain", data=arrays["strain"], compression="gzip")
    strain.attrs["units"] = "1"  # dimensionless (UDUNITS)
    lab.create_dataset("voxel_size_nm", data=arrays["voxel_size_nm"]).attrs["units"] = "nm"
    lab.create_dataset("lab_origin_nm", data=arrays["lab_origin_nm"]).attrs["units"] = "nm"
    lab.create_dataset("data_type", data="electron density, lab frame (x, y up, z along beam)")
    lab.create_dataset("data_space", data="real")
    for k, axis in enumerate(("x_nm", "y_nm", "z_nm")):
        coords = physical.origin_nm[k] + physical.voxel_size_nm[k] * np.arange(
            physical.object_lab.shape[k]
        )
        lab.create_dataset(axis, data=coords).attrs["units"] = "nm"
    sample = entry.create_group("sample_1")
    sample.attrs["NX_class"] = "NXsample"
    q = sample.create_dataset("q_bragg", data=arrays["q_bragg_inv_nm"])
    q.attrs["units"] = "1/nm"
    places = {
        "voxel_basis_nm": image["voxel_basis_nm"],
        "object_lab": lab["data"],
        "support_lab": lab["mask"],
        "voxel_size_nm": lab["voxel_size_nm"],
        "lab_origin_nm": lab["lab_origin_nm"],
        "displacement_nm": lab["displacement_nm"],
        "strain": lab["strain"],
        "q_bragg_inv_nm": q,
    }
    for key in arrays:  # every file key, linked to its place
        f[key] = places[key]
    if g.hkl is not None:
        sample.create_dataset("hkl", data=np.array(g.hkl))
    if g.lattice_constant_nm is not None:
        sample.create_dataset("lattice_constant", data=g.lattice_constant_nm).attrs["units"] = "nm"
    for name, value in g.sample_angles_deg.items():
        sample.create_dataset(name, data=value).attrs["units"] = "deg"
    instrument = entry.create_group("instrument_1")
    instrument.attrs["NX_class"] = "NXinstrument"
    instrument.create_dataset("name", data=g.beamline)
    source = instrument.create_group("source_1")
    source.attrs["NX_class"] = "NXsource"
    # CXI gives the energy in joules.
    source.create_dataset("energy", data=g.energy_kev * 1.602176634e-16).attrs["units"] = "J"
    source.create_dataset("wavelength", data=g.wavelength_nm * 1e-9).attrs["units"] = "m"
    detector = instrument.create_group("detector_1")
    detector.attrs["NX_class"] = "NXdetector"
    detector.create_dataset("distance", data=g.detector_distance_m).attrs["units"] = "m"
    detector.create_dataset("y_pixel_size", data=g.pixel_size_m[0]).attrs["units"] = "m"
    detector.create_dataset("x_pixel_size", data=g.pixel_size_m[1]).attrs["units"] = "m"
    for name, value in g.detector_angles_deg.items():
        detector.create_dataset(name, data=value).attrs["units"] = "deg"
    process = entry.create_group("process_1")
    process.attrs["NX_class"] = "NXprocess"
    process.create_dataset("geometry", data=json.dumps(g.to_dict()))
    process.create_dataset("rocking_axis", data=g.rocking_axis)
    process.create_dataset("rocking_step", data=g.rocking_step_deg).attrs["units"] = "deg"


def vti_bytes(physical) -> bytes:
    """A VTK XML image (``.vti``) of the crystal on its lab grid: spacing and origin in nm,
    point arrays ``amplitude``, ``phase``, ``support``, ``displacement_nm``, ``strain``.

    Raises
    ------
    DataError
        vtk is not installed (it is the ``vtk`` extra).
    """
    try:
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData
        from vtkmodules.vtkIOXML import vtkXMLImageDataWriter
    except ImportError:
        raise DataError(VTK_NEEDED) from None
    image = vtkImageData()
    image.SetDimensions(*physical.object_lab.shape)
    image.SetSpacing(*(float(v) for v in physical.voxel_size_nm))
    image.SetOrigin(*(float(v) for v in physical.origin_nm))
    fields = {
        "amplitude": np.abs(physical.object_lab).astype(np.float32),
        "phase": np.angle(physical.object_lab).astype(np.float32),
        "support": physical.support_lab.astype(np.uint8),
        "displacement_nm": physical.displacement_nm.astype(np.float32),
        "strain": physical.strain.astype(np.float32),
    }
    points = image.GetPointData()
    for name, values in fields.items():
        # VTK runs x fastest: Fortran order of an [ix, iy, iz] array.
        array = numpy_to_vtk(np.ravel(values, order="F").copy(), deep=True)
        array.SetName(name)
        points.AddArray(array)
    points.SetActiveScalars("amplitude")
    writer = vtkXMLImageDataWriter()
    writer.SetInputData(image)
    # Base64-encoded binary: the whole file is text, so the string vtk hands back is exact.
    writer.SetDataModeToBinary()
    writer.SetCompressorTypeToZLib()
    writer.WriteToOutputStringOn()
    if not writer.Write():
        raise DataError("vtk could not render the image")
    text = writer.GetOutputString()
    return text if isinstance(text, bytes) else text.encode("ascii")


def write_result(
    result: ReconstructionResult, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write a reconstruction as ``.npz``, CXI-style HDF5 (``.cxi``/``.h5``) or VTK ``.vti``,
    atomically.

    ``.npz`` and CXI hold ``object`` (complex64, input grid and convention), ``support``,
    ``params`` (with their names) and the run's figures (``summary``, JSON); the CXI layout puts
    the object at ``entry_1/image_1/data`` as PyNX and cohere users expect. With the geometry
    (``result.physical``) they also hold ``voxel_basis_nm``, ``object_lab``, ``support_lab``,
    ``voxel_size_nm``, ``lab_origin_nm``, ``displacement_nm``, ``strain``, ``q_bragg_inv_nm``
    and ``geometry`` (JSON); the CXI file adds the lab-frame image at ``entry_1/image_2``, the
    source, detector and sample in NeXus places and the raw run's uid as
    ``entry_1/experiment_identifier``. ``.vti`` (needs the geometry and vtk) holds the lab grid
    for ParaView (:func:`vti_bytes`).

    Raises
    ------
    DataError
        An unsupported suffix, or the file cannot be written (no partial file is left).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise DataError(
            f"{p}: unsupported output type {suffix!r} (use one of {', '.join(RESULT_SUFFIXES)})"
        )
    if suffix == ".vti":
        if getattr(result, "physical", None) is None:
            raise DataError(f"{p}: a .vti file needs the scan's geometry (--geometry)")
        return atomic_write_bytes(p, vti_bytes(result.physical))
    meta = {**result.summary(), **(extra or {})}
    data = _result_npz(result, meta) if suffix == ".npz" else _result_cxi(result, meta)
    return atomic_write_bytes(p, data)
