"""litft's own errors, and the translation of a failed write into one of them.

Every error litft raises for something the user can fix (bad input, a full disk, a diverged run) says which file,
field or step and what to do; ``litft.cli.main`` prints it as one line (``LITFT_DEBUG=1``: the traceback). Bad input
is mostly reported as ``ValueError``/``FileNotFoundError``; the classes here are for what those do not describe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Any, Iterator, Union


class LitftError(Exception):
    """Base of litft's own errors: the message is complete (path or field, cause, what to do)."""


class WriteError(LitftError, OSError):
    """An output could not be written (disk full, read-only file system, a file where a folder must be):
    "cannot write <path>: <cause>"."""

    def __init__(self, path: Union[str, Path], cause: str, what: str = "") -> None:
        super().__init__(f"cannot write {what + ' ' if what else ''}{path}: {cause}")
        self.path, self.cause, self.what = Path(path), cause, what

    def __reduce__(self) -> Any:  # pickles (multiprocessing) with its arguments
        return type(self), (self.path, self.cause, self.what)


class NonFiniteError(LitftError, ValueError):
    """Weights holding a NaN or an infinity, refused before they are written."""


class TrainingDivergedError(LitftError, RuntimeError):
    """Training produced a non-finite loss, gradient norm or weights: the run stops, saving nothing of that step."""


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _cause(error: BaseException, path: Path) -> str:
    """The reason a write failed, as the OS words it ("No space left on device"), plus the file when it is not
    ``path`` or one of the temp names beside it."""
    if isinstance(error, OSError):
        cause = error.strerror or str(error)
        name = error.filename
        if name is not None and not str(name).startswith((str(path), str(path.parent / f".{path.name}"))):
            cause += f" ({name})"
        return cause
    found = _OS_ERROR.search(str(error))  # safetensors: "I/O error: No space left on device (os error 28)"
    return os.strerror(int(found.group(1))) if found else f"{type(error).__name__}: {error}"


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _is_write_failure(error: BaseException, path: Path, any_os_error: bool) -> bool:
    if isinstance(error, OSError):
        if any_os_error or error.errno in _WRITE_ERRNOS:
            return True
        # inside a writer's body, reads of other files may fail too: only errors on the output are the output's
        name = error.filename
        return name is not None and str(name).startswith((str(path), str(path.parent / f".{path.name}")))
    if type(error).__name__ == "SafetensorError":  # safetensors' writer: its I/O errors carry "(os error N)"
        return _OS_ERROR.search(str(error)) is not None
    # torch.save to a path: a short write surfaces as "[enforce fail at inline_container.cc:...] unexpected pos"
    return isinstance(error, RuntimeError) and "enforce fail at inline_container" in str(error)


@contextlib.contextmanager
def writing(path: Union[str, Path], any_os_error: bool = True) -> Iterator[None]:
    """Turn a failed write while writing ``path`` into one :class:`WriteError` naming ``path`` and the cause;
    litft's own errors and everything else pass through unchanged. ``any_os_error=False`` (code that also reads
    other files): only OS errors on ``path`` itself (or its temp names) or of a kind only writes have (no space,
    read-only file system) count."""
    path = Path(path)
    try:
        yield
    except LitftError:
        raise
    except Exception as e:
        if not _is_write_failure(e, path, any_os_error):
            raise
        raise WriteError(path, _cause(e, path)) from e


def check_writable(path: Union[str, Path], what: str = "out_dir", beside: bool = False) -> None:
    """Refuse at once (before anything is loaded) an output path that cannot be created: a file where a folder
    must be, or a read-only file system. ``beside``: ``path`` is written as a temp dir beside it, then renamed (so
    its parent must be writable). Disk space is only known when writing (:func:`writing`)."""
    path = Path(path)
    parent = path.parent if beside else path
    while not parent.exists():
        if parent.parent == parent:
            return
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(path, f"{parent} is a file, not a directory (Not a directory)", what)
    if not os.access(parent, os.W_OK):
        readonly = hasattr(os, "statvfs") and bool(os.statvfs(parent).f_flag & getattr(os, "ST_RDONLY", 1))
        cause = "Read-only file system" if readonly else "Permission denied"
        raise WriteError(path, f"{parent} is not writable ({cause})", what)
