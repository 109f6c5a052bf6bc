"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

One recipe for every file the project writes (checkpoints, configs, pointers, PNGs, JSON):

    1. write to a temp file in the *same* folder (``.NAME.<random>.tmp``, created exclusively with
       the usual umask permissions, like a plain ``open``; same file system, so the rename below
       is atomic), flush and ``fsync`` it;
    2. ``os.replace`` it onto the target;
    3. ``fsync`` the folder, so the rename itself survives a power cut.

Any failure before 2 (disk full, an exception of the code writing the data, Ctrl-C) removes the
temp file and leaves the target as it was. Never imports torch, gradio or ``studio``.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(path) as fh: fh.write(...)`` — the file appears at ``path`` only when the
    block ends without an exception (then it is fsynced, renamed into place, the folder fsynced).
    ``mode``: ``"wb"`` or ``"w"`` (text, UTF-8). The folder must exist."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a whole file: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fh = open(tmp, mode.replace("w", "x"), **({} if mode == "wb" else {"encoding": "utf-8"}))
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> Path:
    """``json.dumps(obj, **dumps_kw)`` as UTF-8, atomically (e.g. ``indent=1``, ``default=list``)."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kw))
