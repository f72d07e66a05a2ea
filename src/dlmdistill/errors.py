"""Errors that are the user's to fix, and how the command line tells them apart from bugs.

Library code raises :class:`UserError` (or a subclass: ``ConfigError``, ``DataError``) for bad
input: a missing or malformed file, an unknown name, a value out of range. Its message says what
is wrong and names the file, line, key or value, so it can be shown as one line with no
traceback. ``dlmdistill`` (``cli.main``) prints such errors as ``dlmdistill: error: MESSAGE``
and exits with status 2; everything else is a bug and keeps its traceback.

``UserError`` subclasses ``ValueError`` so that code catching ``ValueError`` keeps working. The
project's convention is older than ``UserError``: a ``raise ValueError(...)`` statement in
dlmdistill's own code is a message about the input. :func:`is_user_error` honours it, so a check
written that way is never shown as a crash; a ``ValueError`` raised anywhere else (inside torch,
transformers, a builtin such as ``int()``) is not covered and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class UserError(ValueError):
    """Bad input from the user; the message names the file, line, key or value to fix."""


def is_user_error(exc: BaseException) -> bool:
    """True for exceptions caused by the user's input or environment rather than by a bug:
    :class:`UserError` and its subclasses, a ``ValueError`` raised by a ``raise`` statement in
    dlmdistill's code (see the module docstring), file-system errors (missing file, folder given for
    a file, permission denied, disk full), undecodable text, malformed YAML, a failed checkpoint
    conversion, and a training run stopped by a non-finite loss."""
    if isinstance(exc, (UserError, OSError, UnicodeError)):
        return True
    if isinstance(exc, ValueError) and _raised_here(exc):
        return True
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        return True
    # looked up by module so that a command that never imported them pays nothing
    for module, name in (("dlmdistill.convert.common", "ConversionError"),
                         ("dlmdistill.training.trainer", "NonFiniteLossError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _raised_here(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is a ``raise`` statement in this package."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return False
    last = frames[-1]
    return (os.path.abspath(last.filename).startswith(_PACKAGE_DIR)
            and (last.line or "").lstrip().startswith("raise"))


def describe(exc: BaseException) -> str:
    """A one-line message for a user error."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None and exc.strerror:
        where = str(exc.filename) + (f" -> {exc.filename2}" if getattr(exc, "filename2", None) else "")
        text = f"{where}: {exc.strerror}"
    elif isinstance(exc, UnicodeDecodeError):
        text = (f"input is not valid {exc.encoding} text: {exc.reason} (byte 0x{exc.object[exc.start]:02x} "
                f"at offset {exc.start})")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line: a multi-line message (e.g. from YAML) is joined
