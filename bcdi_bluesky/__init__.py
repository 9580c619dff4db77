"""bcdi-bluesky: real-time Bragg coherent diffraction imaging for Bluesky beamlines.

The public API lives here::

    from bcdi_bluesky import Reconstructor
    result = Reconstructor().reconstruct(intensity, mask=None, refine="full")
    result.object, result.support, result.quality, result.quality_reasons, result.summary()

- :class:`Reconstructor` and its :class:`ReconstructionResult`; :class:`ReconstructionSettings`
  (every default and limit); :func:`read_intensity` and :func:`write_result` (files).
- :class:`BCDIReconstructionCallback`: reconstruct every rocking scan of a RunEngine
  (publishers, plans and the simulated beamline in :mod:`bcdi_bluesky.beamline`; the IOC in
  :mod:`bcdi_bluesky.epics`).
- :class:`BCDIError` and its subclasses: what a user, a file or a setting can get wrong.
- Geometry, lab frame, displacement and strain: :mod:`bcdi_bluesky.physics`.
- The command line: ``bcdi-bluesky --help``; the documentation: the ``docs/`` folder of the
  source (user guide, method, benchmarks).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("bcdi-bluesky")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

# Imported on first use, so that `import bcdi_bluesky` stays cheap (no ONNX Runtime, no
# plotting) for scripts that only need the physics core.
_LAZY = {
    "Reconstructor": "bcdi_bluesky.pipeline",
    "ReconstructionResult": "bcdi_bluesky.pipeline",
    "read_intensity": "bcdi_bluesky.io",
    "write_result": "bcdi_bluesky.io",
    "BCDIReconstructionCallback": "bcdi_bluesky.beamline",
    "ReconstructionSettings": "bcdi_bluesky.settings",
    "BCDIError": "bcdi_bluesky.errors",
    "DataError": "bcdi_bluesky.errors",
    "ModelError": "bcdi_bluesky.errors",
    "NoBraggPeakError": "bcdi_bluesky.errors",
    "SettingsError": "bcdi_bluesky.errors",
}

__all__ = [
    "BCDIError",
    "BCDIReconstructionCallback",
    "DataError",
    "ModelError",
    "NoBraggPeakError",
    "ReconstructionResult",
    "ReconstructionSettings",
    "Reconstructor",
    "SettingsError",
    "__version__",
    "read_intensity",
    "write_result",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bcdi_bluesky' has no attribute {name!r}")


def __dir__() -> list[str]:
    # help() and dir() list the public names before their first use imports them.
    return sorted(set(globals()) | set(__all__))
