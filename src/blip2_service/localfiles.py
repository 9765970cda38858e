"""Reading images from local paths, with the errors every door reports the same way."""

from __future__ import annotations

import os
from pathlib import Path

from .domain import PermanentError
from .imaging import ImageTooLarge


class PathForbidden(PermanentError):
    status = 403


class FileMissing(PermanentError):
    status = 404


def resolve_within(path: str, roots: list[Path]) -> Path:
    """Resolve symlinks and `..`, then require the result inside one of `roots` (403 otherwise).

    Checked before existence, so a caller cannot probe which files exist outside the roots.
    """
    if not path:
        raise PermanentError("The file parameter is empty; give the image's path")
    resolved = Path(os.path.abspath(os.path.expanduser(path))).resolve()
    if not roots:
        raise PathForbidden(
            f"Reading local files is disabled: set FILE_ROOTS (or WATCH_DIRS) to the folders "
            f"?file= may read from; {path} was refused"
        )
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise PathForbidden(f"{path} is outside the allowed folders ({allowed}); see FILE_ROOTS")


def read_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a whole file, refusing more than `max_bytes` before reading it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileMissing(f"File not found: {path}") from None
    except OSError as exc:
        raise FileMissing(f"Cannot access {path}: {exc.strerror}") from None
    if not path.is_file():
        raise PermanentError(f"{path} is not a regular file")
    if stat.st_size > max_bytes:
        raise ImageTooLarge(f"{path} is {stat.st_size} bytes, over MAX_FILE_SIZE={max_bytes}")
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileMissing(f"File not found: {path}") from None
    except PermissionError:
        raise PathForbidden(f"Permission denied reading {path}") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{path} grew over MAX_FILE_SIZE={max_bytes} bytes while being read")
    return data, stat
