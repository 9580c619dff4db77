"""bcdi-bluesky: real-time Bragg coherent diffraction imaging for Bluesky beamlines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bcdi-bluesky")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = ["__version__"]
