"""Atomic file writes: every artefact the package writes goes through here.

A file is written under a temporary name beside its destination, fsynced, then ``os.replace``d
onto it, so a reader or a crash sees the old file or the new one, never a torn one. Temporary names
are unique per writer (pid and a random part), so two processes writing the same destination never
share a temporary file, and they start with the destination's name so that :func:`remove_stale_temps`
can clean up after a writer that was killed between the write and the rename.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A unique temporary path beside ``path``: ``.NAME.PID-RANDOM.tmp`` (hidden, so folder walks
    skip it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (by any writer: FAISS, NumPy,
    torch); on success it is fsynced and renamed onto ``path``, on any error (or interrupt) it is
    deleted and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The rename itself is durable once the folder is synced (a power loss could otherwise undo it).
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temps(folder: Path, names: list[str]) -> list[Path]:
    """Delete the temporary files of ``names`` in ``folder`` left by writers that were killed
    mid-write → the paths deleted. Call it only while no other writer can be writing them (under
    the collection's writer lock)."""
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
        legacy = folder / f"{name}{TEMP_SUFFIX}"  # the fixed names of earlier versions
        for old in (legacy, folder / f".{name}{TEMP_SUFFIX}"):
            if old.exists():
                with contextlib.suppress(OSError):
                    old.unlink()
                    removed.append(old)
    return removed
