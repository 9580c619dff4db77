"""Atomic file writes: every file this package writes is complete or absent.

The bytes go to a temporary file in the target folder (the same file system), are flushed to
disk and renamed over the target, so a crash, a full disk or a permission problem never leaves
a partial file, and an existing file is replaced only by a complete one. The file gets the
permissions of any newly created file (``0o666`` less the process umask), as
``open(path, "wb")`` would give it: readable by the beamline's group or everyone where the
umask says so, not owner-only as :func:`tempfile.mkstemp` makes its files.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

from .errors import DataError

#: Permissions asked for a new file; the process umask takes its share, as for ``open()``.
NEW_FILE_MODE = 0o666


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: all of it or, on any failure, nothing.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    DataError
        The folder cannot be made or written, or the disk is full; no partial file is left.
    """
    p = Path(path)
    tmp: Path | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise DataError(f"{p}: cannot write ({exc.strerror or exc}); nothing was written") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Render a matplotlib figure in memory (the format from the suffix; PNG without one) and
    write it with :func:`atomic_write_bytes`.

    Raises
    ------
    DataError
        As :func:`atomic_write_bytes`.
    """
    p = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=p.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return atomic_write_bytes(p, buffer.getvalue())
