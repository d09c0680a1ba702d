"""Failed writes as plain ``OSError``s that name the file, whatever library did the writing.

A full disk or a read-only directory reaches the user in three shapes: Python's own
``OSError(28, 'No space left on device')`` (often without the file name), torch.save's
``RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos ...')`` or
``'basic_ios::clear: iostream error'`` (the errno is lost unless torch writes through a Python
file object, which then leaves the ``OSError`` as the RuntimeError's ``__context__``), and
safetensors' ``SafetensorError('Error while serializing: I/O error: No space left on device
(os error 28)')``. ``writing(path)`` turns the last two into the first, with ``path`` as the
file name, so that one handler (the CLI's) can say what failed, where, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["describe_os_error", "os_error_of", "write_error", "writing"]

_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, one in its ``__cause__``/``__context__`` chain, or
    one rebuilt from a Rust-style "(os error N)" in its message (safetensors); else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = _OS_ERROR_CODE.search(str(current))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def write_error(error: BaseException, path: str | Path) -> OSError | None:
    """``error`` as ``OSError(errno, strerror, path)`` when it is a failed write, else None.

    Errors that are not about the disk (a pickling error, a bug, Ctrl-C) give None. An OSError
    that already names its file gives None too (its own name is more precise than ``path``).
    """
    if isinstance(error, OSError) and error.filename is not None:
        return None
    if not isinstance(error, Exception):
        return None
    found = os_error_of(error)
    if found is None:
        return None
    return OSError(found.errno, found.strerror, str(path))


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Re-raise a failed write inside the block as ``OSError(errno, strerror, path)``."""
    try:
        yield
    except Exception as error:
        translated = write_error(error, path)
        if translated is None:
            raise
        raise translated from error


def describe_os_error(error: OSError, where: str | None = None) -> str:
    """One line for the user: what failed, on which path, and what to do about it."""
    path = error.filename if error.filename is not None else where
    target = f" {str(path)!r}" if path is not None else ""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk while writing{target} ({reason}); free some space "
                f"or set output_dir to another disk, then rerun with --resume to continue from "
                f"the last checkpoint")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write{target}: {reason}; choose an output_dir you can write to "
                f"(output_dir=...)")
    if error.errno == errno.ENOTDIR or isinstance(error, (NotADirectoryError, FileExistsError)):
        return (f"{target.strip() or 'a path'} is in the way: {reason} (a file where a directory "
                f"should be); choose another output_dir or move the file")
    return f"{reason}{':' + target if target else ''}"
