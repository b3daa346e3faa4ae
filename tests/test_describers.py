"""Model processes: the service's uploads decoded and described in child processes.

Each test here starts model processes (spawn: a fresh interpreter importing torch, a few seconds
each), so there are few of them and each checks several things.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from activeindex.errors import ModelError  # noqa: E402
from activeindex.extractors import create_extractor  # noqa: E402
from activeindex.images import ImageLimits  # noqa: E402
from activeindex.service import create_app  # noqa: E402
from activeindex.service.describers import DescriberLost, LocalDescriber, ProcessDescriber  # noqa: E402
from helpers import small_collection  # noqa: E402


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory, tiny_extractor, train_vectors, image_dir):
    return small_collection(tmp_path_factory.mktemp("describers") / "c", tiny_extractor, train_vectors, image_dir)


def _items(paths):
    return [(p.read_bytes(), p.name) for p in paths]


def _slow_png(side: int = 3000) -> bytes:
    """A small file that takes a while to decode (about 0.1 s here): many pixels, compressible."""
    ramp = np.arange(side, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, :] // 2), -1)).save(buf, format="PNG")
    return buf.getvalue()


def test_model_processes_answer_as_the_server_threads_do(coll_path, image_dir, tmp_path):
    paths = sorted(image_dir.glob("*.png"))[:8]
    answers = {}
    for processes in (0, 2):
        root = Path(shutil.copytree(coll_path, tmp_path / f"c{processes}"))
        with TestClient(create_app(root, model_processes=processes), base_url="http://localhost") as client:
            service = client.app.state.service
            kinds = {type(d) for d in service._describers}
            assert kinds == ({ProcessDescriber} if processes else {LocalDescriber})
            answers[processes] = [
                client.post("/api/query?k=3", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
                for p in paths
            ]
            # A file that passes the header check but does not decode fails in the model process,
            # for its own request, with the reason.
            data = paths[0].read_bytes()
            r = client.post("/api/query", files={"file": ("cut.png", data[: len(data) // 2])})
            assert r.status_code == 400 and "truncated" in r.json()["detail"]
            # Several at once: batched together, and a broken upload among them fails alone.
            results = {}

            def post(i, body):
                results[i] = client.post("/api/query?k=1", files={"file": (f"{i}.png", body)})

            bodies = [p.read_bytes() for p in paths[:5]] + [data[: len(data) // 2]]
            threads = [threading.Thread(target=post, args=(i, b)) for i, b in enumerate(bodies)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [results[i].status_code for i in range(6)] == [200] * 5 + [400]
    for a, b in zip(answers[0], answers[2]):
        assert [m["id"] for m in a["matches"]] == [m["id"] for m in b["matches"]]
        np.testing.assert_allclose([m["score"] for m in a["matches"]], [m["score"] for m in b["matches"]], atol=1e-5)
    # Each image finds itself first (ids are given from 1 in file order).
    assert [a["matches"][0]["id"] for a in answers[2]] == list(range(1, 9))


def test_a_model_process_that_dies_fails_only_its_batch_and_is_replaced(tiny_extractor, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:4]
    describer = ProcessDescriber(tiny_extractor, ImageLimits(), threads=1)
    try:
        describer.wait_ready()
        expected = describer.describe(_items(paths)).descriptors
        np.testing.assert_allclose(expected, tiny_extractor.features(
            np.stack([tiny_extractor.preprocessing.prepare(Image.open(p).convert("RGB")) for p in paths])), atol=1e-5)

        # Killed while describing: that batch fails with DescriberLost, the next gets a new process.
        slow = _slow_png()
        big = [(slow, f"big{i}.png") for i in range(40)]  # seconds of decoding: killed well before the end
        pid = describer._proc.pid
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.perf_counter()
        with pytest.raises(DescriberLost, match="exited"):
            describer.describe(big)
        assert time.perf_counter() - t0 < 60
        np.testing.assert_array_equal(describer.describe(_items(paths)).descriptors, expected)
        assert describer.starts == 2 and describer._proc.pid != pid

        # Killed while idle: noticed before the next batch is sent, which a new process describes.
        os.kill(describer._proc.pid, signal.SIGKILL)
        describer._proc.join(10)
        np.testing.assert_array_equal(describer.describe(_items(paths)).descriptors, expected)
        assert describer.starts == 3
    finally:
        describer.close()
    assert describer._proc is None


def test_a_lost_model_process_is_a_503_for_the_requests_of_its_batch(coll_path, image_dir, monkeypatch):
    path = sorted(image_dir.glob("*.png"))[0]
    with TestClient(create_app(coll_path, model_processes=1), base_url="http://localhost") as client:
        (describer,) = client.app.state.service._describers

        def lost(items, dihedral=()):
            raise DescriberLost(f"the model process describing this batch of {len(items)} exited (exit code -9)")

        monkeypatch.setattr(describer, "describe", lost)
        r = client.post("/api/query", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "exited" in r.json()["detail"]
        monkeypatch.undo()
        assert client.post("/api/query", files={"file": (path.name, path.read_bytes())}).status_code == 200


class _Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, 2)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_a_model_process_refuses_a_model_file_changed_since_the_server_loaded_it(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(_Net(0)).save(str(path))
    extractor = create_extractor(f"torchscript:{path}", input_size=32)
    torch.jit.script(_Net(1)).save(str(path))  # replaced: other weights under the same name
    describer = ProcessDescriber(extractor, ImageLimits())
    with pytest.raises(ModelError, match="could not load the model: .*digest"):
        describer.wait_ready()
    assert describer._proc is None  # stopped, not left behind


def test_keep_freed_memory_takes_effect_on_glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    # In a child: the setting stays for the life of the process that makes it.
    code = "from activeindex.service.describers import keep_freed_memory as k; raise SystemExit(0 if k() else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
