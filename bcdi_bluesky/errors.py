"""One family of exceptions for everything a user, a file or a setting can get wrong.

A :class:`BCDIError` is a problem with what was given (a file, a volume, a model, a setting):
front ends (the CLI, the service) report it in one line. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class BCDIError(Exception):
    """Base class: a problem with the input, the model or the settings, not with the code."""


class DataError(BCDIError, ValueError):
    """A data file is missing or unreadable, or a volume or mask is unusable."""


class NoBraggPeakError(DataError):
    """The volume holds no usable Bragg peak (too few photons to reconstruct anything)."""


class ModelError(BCDIError):
    """The CNN model or its card is missing, unreadable or inconsistent."""


class SettingsError(BCDIError, ValueError):
    """A reconstruction setting is outside its limits or of the wrong type."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` safe for one log line: control characters (a newline that would start a
    forged line, an escape sequence) shown escaped, at most ``limit`` characters. Text from
    the network (a client's host name, a run's metadata) goes through this before a log."""
    text = str(text)
    if limit is not None:  # escapes only lengthen: the rest would be cut anyway
        text = text[: limit + 1]
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    if limit is not None and len(shown) > limit:
        shown = shown[: max(limit - 3, 0)] + "..."
    return shown


__all__ = ["BCDIError", "DataError", "ModelError", "NoBraggPeakError", "SettingsError", "one_line"]
