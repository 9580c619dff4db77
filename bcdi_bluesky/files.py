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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DataError

#: Permissions asked for a new file; the process umask takes its share, as for ``open()``.
NEW_FILE_MODE = 0o666


def existing_file(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it names a file.

    Raises
    ------
    DataError
        Nothing there, or a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a file")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    return p


def check_destination(path: str | Path, *, folder: bool = False) -> Path:
    """Refuse, before any work, a path that cannot be written: for a file, a folder there; for
    a ``folder``, a file there; then a nearest existing parent that is a file or a folder this
    process may not write in (missing folders are made at writing time).

    Raises
    ------
    DataError
        One line naming what is in the way.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise DataError(f"{p}: is a file, not a folder")
    if not folder and p.is_dir():
        raise DataError(f"{p}: is a folder")
    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{p}: cannot write ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{p}: cannot write (no permission to write in {parent})")
    return p


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (torch, ONNX): renamed
    over ``path`` when the block ends without error, removed otherwise.

    Raises
    ------
    DataError
        The path cannot be written (:func:`check_destination`), the folder cannot be made or
        the rename fails; nothing is left at the temporary path.
    """
    p = check_destination(path)
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.part"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, p)
    except OSError as exc:
        raise DataError(f"{p}: cannot write ({exc.strerror or exc}); nothing was written") from None
    finally:
        if tmp.exists():
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`), flushed to disk: all of it
    or, on any failure, nothing.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    DataError
        The folder cannot be made or written, or the disk is full; no partial file is left.
    """
    with atomic_path(path) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(tmp, flags, NEW_FILE_MODE), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


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
