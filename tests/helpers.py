"""Helpers shared by test modules (plain functions, not fixtures): the CLI run in-process, a real
uvicorn server in a thread, and the small collection several modules serve or activate against."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def small_collection(root: Path, extractor, train_vectors, image_dir: Path,
                     factory: str = "IVF4,PQ16x4", nprobe: int = 4) -> Path:
    """A collection at ``root`` trained on ``train_vectors`` and holding the first 8 images of
    ``image_dir`` (an IVF-PQ factory: activation can aim at its codes)."""
    from activeindex.collection import Collection

    with Collection.create(root, extractor, factory, train_vectors, nprobe=nprobe) as c:
        c.add_images(sorted(image_dir.glob("*.png"))[:8])
    return root


def assert_released_files_found_first(coll, report, paths: list[Path]) -> None:
    """Every released file of ``report`` (an ``add --activate`` of ``paths``), described as a query
    of it would be, ranks its original's code first in ``coll`` wherever the original itself does."""
    import numpy as np
    from PIL import Image

    from activeindex.activation.add import describe_arrays

    source = {p.name: p for p in paths}
    ids = np.array([r.id for r in report.released])
    x, y = (describe_arrays(coll.extractor, [np.asarray(Image.open(f).convert("RGB")) for f in files])
            for files in ([source[r.name] for r in report.released], [r.released for r in report.released]))
    # The collection's own search, not the check under test (activation/verify.py).
    passive = coll.search_arrays(x, 1)[1][:, 0] == ids
    assert (coll.search_arrays(y, 1)[1][:, 0] == ids)[passive].all()


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``activeindex.cli.main`` in-process (it maps ActiveIndexError to exit 2 + ``error:``)
    → (exit code, stdout, stderr)."""
    from activeindex import cli

    monkeypatch.setattr(sys, "argv", ["activeindex", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.out, out.err


@contextlib.contextmanager
def served(app) -> Iterator[int]:
    """A real uvicorn server (h11 or httptools, as `activeindex serve` picks) for ``app`` on a free
    loopback port, in a thread; yields the port and stops the server on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            break
        thread.join(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)
