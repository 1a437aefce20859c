"""Standard-library file output shared by the library and the experiments (no JAX, Flax or
Orbax import), re-exported publicly as :func:`jaxcompress.checkpoint.write_json_atomic`."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically: the old file stays intact on any failure.

    The text is serialised first (a ``TypeError`` leaves nothing written), written to a
    temporary file in the same directory, flushed and ``fsync``-ed, then renamed over ``path``
    with ``os.replace`` (atomic on POSIX); the directory is ``fsync``-ed after the rename. A
    failed write (disk full, I/O error) removes the temporary file and re-raises.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"write_json_atomic: path must be a str or os.PathLike, got {path!r}")
    try:
        text = json.dumps(obj, indent=indent, allow_nan=True) + "\n"
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"write_json_atomic({os.fspath(path)!r}): not JSON-serialisable: {err}"
        ) from err
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"write_json_atomic: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

_MULTIPLIERS = ((0x9E3779B1, 0x85EBCA77, 0x7F4A7C15), (0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))
