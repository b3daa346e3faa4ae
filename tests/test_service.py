"""The HTTP service: every endpoint and every refusal, through FastAPI's TestClient."""

from __future__ import annotations

import base64
import io
import shutil
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from activeindex.activation.release import psnr  # noqa: E402
from activeindex.collection import Collection  # noqa: E402
from activeindex.service import ServiceLimits, create_app  # noqa: E402
from activeindex.service.batcher import Batcher  # noqa: E402
from activeindex.service.locks import RWLock  # noqa: E402
from activeindex.service.uploads import clean_name  # noqa: E402
from helpers import served, small_collection

TOKEN = "test-token-☃"  # non-ASCII on purpose: compared as bytes
AUTH = {"Authorization": f"Bearer {TOKEN}".encode()}  # raw UTF-8 bytes on the wire


@pytest.fixture(scope="module")
def template_collection(tmp_path_factory, tiny_extractor, train_vectors, image_dir):
    """A collection (IVF4,PQ16x4: activation can aim at its codes) holding the first 8 images,
    trained once for the module (PQ training is the slow part)."""
    return small_collection(tmp_path_factory.mktemp("template") / "c", tiny_extractor, train_vectors, image_dir)


@pytest.fixture()
def coll_path(tmp_path, template_collection):
    """A fresh copy of the template collection for one test."""
    return Path(shutil.copytree(template_collection, tmp_path / "c"))


@pytest.fixture()
def make_client(coll_path):
    clients = []

    def make(token: str | None = TOKEN, limits: ServiceLimits = ServiceLimits()) -> TestClient:
        client = TestClient(create_app(coll_path, token=token, limits=limits), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture()
def client(make_client):
    return make_client()


def _file(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "image/png")}


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


# -- reads -----------------------------------------------------------------------------------------
def test_query_finds_the_indexed_image(client, image_dir):
    path = sorted(image_dir.glob("*.png"))[3]
    r = client.post("/api/query?k=3", files=_file(path))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == path.name and body["k"] == 3 and len(body["matches"]) == 3
    best = body["matches"][0]
    assert best["name"] == path.name
    assert best["copy"] is None  # no calibrated threshold: passed through as null
    assert "no calibrated copy threshold" in body["copy_decision"]  # and said in words
    assert best["thumbnail"] == f"/api/images/{best['id']}/thumbnail"
    scores = [m["score"] for m in body["matches"]]
    assert scores == sorted(scores, reverse=True)


def test_query_k_is_bounded(make_client, image_dir):
    client = make_client(limits=ServiceLimits(max_k=5))
    path = sorted(image_dir.glob("*.png"))[0]
    assert client.post("/api/query?k=6", files=_file(path)).status_code == 422
    assert client.post("/api/query?k=0", files=_file(path)).status_code == 422
    assert client.post("/api/query", files={}).status_code == 422  # no file at all


def test_upload_bodies_that_are_not_a_multipart_image_are_refused_with_a_reason(client, image_dir):
    path = sorted(image_dir.glob("*.png"))[0]
    # The image in a part with another name: no "file" part.
    r = client.post("/api/query", files={"image": (path.name, path.read_bytes())})
    assert r.status_code == 422 and "no part named 'file'" in r.json()["detail"]
    # The bytes as the body itself, or as a URL-encoded form: not multipart.
    r = client.post("/api/query", content=path.read_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/api/images", data={"file": "x"}, headers=AUTH)
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]
    # Broken framing: garbage, a part whose headers never end, a body cut inside the file part.
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    r = client.post("/api/query", content=b"garbage", headers=multipart)
    assert r.status_code == 400 and "malformed multipart body" in r.json()["detail"]
    r = client.post("/api/query", content=b"--x\r\nContent-Disposition: form-data; name=file" + b"a" * 9000,
                    headers=multipart)
    assert r.status_code == 400 and "malformed multipart body" in r.json()["detail"]
    r = client.post("/api/query", content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
                    + path.read_bytes()[:100], headers=multipart)
    assert r.status_code == 400 and "ends inside the part 'file'" in r.json()["detail"]
    # Other fields beside the file are ignored; the file's name is the label.
    r = client.post("/api/query?k=1", files={"note": ("n.txt", b"hello"), "file": ("mine.png", path.read_bytes())})
    assert r.status_code == 200 and r.json()["query"] == "mine.png"


def test_health_info_and_image_record(client):
    assert client.get("/healthz").json() == {"status": "ok", "images": 8}
    info = client.get("/api/info").json()
    assert info["collection"]["images"] == 8 and info["collection"]["factory"] == "IVF4,PQ16x4"
    assert "path" not in info["collection"]  # the server's file system is not shown
    assert "no calibrated copy threshold" in info["collection"]["copy_decision"]
    assert info["service"]["writes_enabled"] is True
    rec = client.get("/api/images/1").json()
    assert rec["id"] == 1 and rec["mode"] == "passive" and rec["released"] is False and len(rec["sha256"]) == 64


def test_thumbnail_by_id(client):
    r = client.get("/api/images/2/thumbnail?size=32")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) == 32 and img.size == (32, 24)  # 64×48, aspect kept
    assert client.get("/api/images/2/thumbnail?size=8").status_code == 422
    assert client.get("/api/images/2/thumbnail?size=4096").status_code == 422
    # Only integer ids name images: a path is not a route, let alone a file.
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code in (404, 422)
    assert client.get("/api/images/abc/thumbnail").status_code == 422


@pytest.mark.parametrize("url", ["/api/images/999", "/api/images/999/thumbnail", "/api/images/999/released",
                                 "/api/images/1/released"])
def test_unknown_ids_and_missing_files_are_404(client, url):
    r = client.get(url)
    assert r.status_code == 404 and r.json()["detail"]


@pytest.mark.parametrize("image_id", [2**63 - 1, 2**63, 2**64, 10**30])
def test_ids_beyond_int64_are_404_not_500(client, image_id):
    for url in (f"/api/images/{image_id}", f"/api/images/{image_id}/thumbnail", f"/api/images/{image_id}/released"):
        r = client.get(url)
        assert r.status_code == 404 and f"no image with id {image_id}" in r.json()["detail"], (url, r.text)
    r = client.delete(f"/api/images/{image_id}", headers=AUTH)
    assert r.status_code == 404 and f"no image with id {image_id}" in r.json()["detail"]
    assert client.get("/healthz").json()["images"] == 8


def test_cli_remove_of_an_id_beyond_int64_is_a_clear_error(coll_path):
    from activeindex.cli import app

    r = CliRunner().invoke(app, ["remove", str(coll_path), str(2**63), "1"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)  # not OverflowError
    assert f"no image with id {2**63}" in r.output and "removed 1" in r.output
    with Collection.open(coll_path) as c:
        assert c.count() == 7


def test_thumbnail_of_a_file_gone_from_disk_is_404(client, coll_path, tmp_path, image_dir):
    src = tmp_path / "gone.png"
    src.write_bytes(_png(20, 20))
    r = client.post("/api/images", files={"file": ("gone.png", src.read_bytes())}, headers=AUTH)
    image_id = r.json()["id"]
    stored = next((coll_path / "uploads").glob("*.png"))
    stored.unlink()
    r = client.get(f"/api/images/{image_id}/thumbnail")
    assert r.status_code == 404 and "not available" in r.json()["detail"]


class _Net(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3)).repeat(1, 3)  # (B, 9): a model file small enough to make here


def test_info_names_a_file_model_without_its_path(tmp_path):
    from activeindex.extractors import create_extractor

    model = tmp_path / "models" / "sscd-like.pt"
    model.parent.mkdir()
    torch.jit.script(_Net()).save(str(model))
    extractor = create_extractor(f"torchscript:{model}", input_size=32)
    xt = np.random.default_rng(0).standard_normal((64, extractor.dim)).astype(np.float32)
    Collection.create(tmp_path / "c", extractor, "Flat", xt).close()
    with TestClient(create_app(tmp_path / "c"), base_url="http://localhost") as client:
        r = client.get("/api/info")
    assert r.status_code == 200
    assert r.json()["collection"]["extractor"]["path"] == "sscd-like.pt"
    assert str(tmp_path) not in r.text  # neither the model's folder nor the collection's


def test_thumbnail_errors_do_not_show_the_files_path(client, coll_path, monkeypatch):
    import PIL.Image

    stored = Path(client.app.state.service.record(3)["path"])
    real_open = PIL.Image.open

    def unreadable(fp, *args, **kwargs):  # what a file the server's user may not read raises
        if str(fp) == str(stored):
            raise PermissionError(13, "Permission denied", str(stored))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", unreadable)
    r = client.get("/api/images/3/thumbnail")
    assert r.status_code == 404 and "Permission denied" in r.json()["detail"]
    assert str(stored.parent) not in r.text and stored.name in r.json()["detail"]


def test_only_the_allowed_host_names_are_answered(make_client, coll_path):
    client = make_client()  # the default: localhost, and any IP address
    for host in ("evil.example:8000", "evil.example", "localhost.evil.example", "127.0.0.1.nip.io:8000"):
        for url in ("/api/info", "/api/images/1/thumbnail", "/", "/healthz"):
            r = client.get(url, headers={"Host": host})  # what a DNS-rebinding page sends
            assert r.status_code == 400 and "does not answer to the host name" in r.json()["detail"], (host, url)
    for host in ("localhost:8000", "LOCALHOST.", "127.0.0.1:8000", "[::1]:8000", "10.1.2.3"):
        assert client.get("/api/images/1/thumbnail", headers={"Host": host}).status_code == 200, host
    named = TestClient(create_app(coll_path, allowed_hosts=["photos.example.com", "*.internal"]),
                       base_url="http://photos.example.com")
    with named:
        assert named.get("/healthz").status_code == 200
        assert named.get("/healthz", headers={"Host": "api.internal:80"}).status_code == 200
        assert named.get("/healthz", headers={"Host": "localhost"}).status_code == 400  # the list replaces it
        assert named.get("/healthz", headers={"Host": "internal.evil"}).status_code == 400


def test_default_allowed_hosts_follow_the_bound_host():
    import socket

    from activeindex.service.hosts import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ("localhost",)
    assert default_allowed_hosts("::1") == ("localhost",)
    assert default_allowed_hosts("photos.lan") == ("localhost", "photos.lan")
    assert default_allowed_hosts("0.0.0.0") == ("localhost", socket.gethostname().lower())


def test_docs_openapi_and_page_work_offline(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/query", "/api/images", "/api/images/{image_id}", "/api/info", "/healthz", "/metrics"} <= set(spec["paths"])
    docs = client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere


def test_metrics_count_requests_and_time_stages(client, image_dir):
    path = sorted(image_dir.glob("*.png"))[0]
    client.post("/api/query", files=_file(path))
    client.post("/api/query", files={"file": ("x.txt", b"not an image")})
    text = client.get("/metrics").text
    assert 'activeindex_http_requests_total{method="POST",route="/api/query",status="200"} 1.0' in text
    assert 'activeindex_http_requests_total{method="POST",route="/api/query",status="415"} 1.0' in text
    assert 'activeindex_uploads_rejected_total{status="415"} 1.0' in text
    assert 'activeindex_stage_seconds_count{stage="read"} 2.0' in text  # the refused upload was read too
    for stage in ("queue", "decode", "model", "search"):
        assert f'activeindex_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert 'activeindex_http_request_seconds_bucket{le="0.5",method="POST",route="/api/query"}' in text
    assert "activeindex_extract_batch_size_count 1.0" in text
    assert "activeindex_images 8.0" in text


# -- bad uploads -----------------------------------------------------------------------------------
def test_non_images_are_415_with_a_reason(client):
    for name, data in [("notes.txt", b"hello, world"), ("fake.png", b"%PDF-1.4 not a png at all")]:
        r = client.post("/api/query", files={"file": (name, data)})
        assert r.status_code == 415 and "not an image file" in r.json()["detail"]
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # Pillow knows EPS; we do not accept it
    assert client.post("/api/query", files={"file": ("x.eps", eps)}).status_code == 415


def test_broken_images_are_400_with_a_reason(client, image_dir):
    data = sorted(image_dir.glob("*.png"))[0].read_bytes()
    r = client.post("/api/query", files={"file": ("cut.png", data[: len(data) // 2])})
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    r = client.post("/api/query", files={"file": ("empty.png", b"")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]


def test_uploads_over_the_byte_limit_are_413(make_client, image_dir):
    client = make_client(limits=ServiceLimits(max_bytes=1000))
    data = sorted(image_dir.glob("*.png"))[0].read_bytes()
    assert len(data) > 1000
    r = client.post("/api/query", files={"file": ("big.png", data)})  # within the multipart slack
    assert r.status_code == 413 and "exceeds the limit of 1000 bytes" in r.json()["detail"]
    # Far over: refused from the Content-Length header, before the body is read.
    r = client.post("/api/query", files={"file": ("huge.png", b"\0" * 200_000)})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]

    def chunks():  # no Content-Length: refused once the streamed body passes the bound
        for _ in range(20):
            yield b"\0" * 10_000

    r = client.post("/api/query", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    r = client.post("/api/images", content=chunks(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def _multipart(*parts: tuple[str, bytes], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n\r\n'
                    .encode() + data + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_multipart_parts_part_headers_and_parsing_time_are_bounded(make_client, image_dir):
    png = sorted(image_dir.glob("*.png"))[3].read_bytes()
    client = make_client()
    # Thousands of tiny parts (each costs the event loop parser work): refused at the 17th.
    body, headers = _multipart(("file", png), *[("f", b"x")] * 5000)
    r = client.post("/api/query", content=body, headers=headers)
    assert r.status_code == 400 and "more than 16 parts" in r.json()["detail"]
    assert r.headers["connection"] == "close"
    body, headers = _multipart(("file", png), *[("f", b"x")] * 15)  # 16 parts: fine
    assert client.post("/api/query?k=1", content=body, headers=headers).status_code == 200
    # Part headers are parsed a byte at a time: bounded in bytes in all (python-multipart bounds
    # each one alone).
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            + (b"X-Pad: " + b"p" * 4000 + b"\r\n") * 5 + b"\r\n" + png + b"\r\n--b--\r\n")
    r = client.post("/api/query", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "bytes of part headers" in r.json()["detail"]
    # And the parsing time itself (a bound no real upload comes near, made tiny here).
    strict = make_client(limits=ServiceLimits(parse_seconds=1e-9))
    r = strict.post("/api/query", files=_file(sorted(image_dir.glob("*.png"))[3]))
    assert r.status_code == 400 and "to parse" in r.json()["detail"]


def test_a_body_that_stops_arriving_is_408_and_closed(coll_path):
    import socket

    with served(create_app(coll_path, limits=ServiceLimits(body_seconds=1.0))) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            head = _multipart(("file", b"\x89PNG" + b"\0" * 100))[0][:80]
            sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: multipart/form-data; boundary=b0undary\r\n"
                         b"Content-Length: 100000\r\n\r\n" + head)  # and then nothing
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 1 s" in answer


@pytest.mark.parametrize("announced", [True, False])
def test_clients_that_send_the_whole_oversized_body_first_still_read_the_413(coll_path, announced):
    import json
    import urllib.error
    import urllib.request

    body, headers = _multipart(("file", b"\0" * (32 * 1024 * 1024)))  # larger than the socket buffers
    data = body if announced else (body[i:i + 65536] for i in range(0, len(body), 65536))  # chunked
    with served(create_app(coll_path, limits=ServiceLimits(max_bytes=100_000))) as port:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/query", data=data, headers=headers)
        if not announced:
            req.add_header("Transfer-Encoding", "chunked")
        with pytest.raises(urllib.error.HTTPError) as err:  # not ConnectionResetError / BrokenPipeError
            urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413 and "exceeds the limit" in json.loads(err.value.read())["detail"]


def test_uploads_over_the_pixel_limit_are_413(make_client):
    client = make_client(limits=ServiceLimits(max_pixels=1000))
    r = client.post("/api/query", files={"file": ("wide.png", _png(50, 30))})
    assert r.status_code == 413 and "1500 pixels exceeds the limit of 1000" in r.json()["detail"]
    # A decompression bomb: a PNG header announcing 30000×30000 pixels in a few bytes.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (30000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    r = client.post("/api/query", files={"file": ("bomb.png", bomb)})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert client.post("/api/images", files={"file": ("wide.png", _png(50, 30))}, headers=AUTH).status_code == 413


def test_client_file_names_never_become_paths(client, coll_path, tmp_path):
    r = client.post("/api/images", files={"file": ("../../../evil/..\\x.png", _png(20, 21))}, headers=AUTH)
    assert r.status_code == 201 and r.json()["name"] == "x.png"
    assert not (tmp_path / "evil").exists()
    stored = list((coll_path / "uploads").iterdir())
    assert len(stored) == 1 and len(stored[0].stem) == 64  # named by the content's SHA-256
    assert clean_name("..") == "upload" and clean_name("/etc/") == "etc" and clean_name("a b/c:d?.png") == "c_d_.png"


# -- writes ----------------------------------------------------------------------------------------
def test_add_passive_is_durable_when_acknowledged_and_deduplicated(client, coll_path, image_dir):
    path = sorted(image_dir.glob("*.png"))[20]
    r = client.post("/api/images", files=_file(path), headers=AUTH)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["mode"] == "passive" and out["duplicate"] is False and out["released"] is None
    # Acknowledged = on disk: a fresh process (the service never closed) sees it in index and DB.
    with Collection.open(coll_path) as again:
        assert again.count() == 9 and again.index.ntotal == 9
        assert again.names([out["id"]]) == {out["id"]: path.name}
    best = client.post("/api/query?k=1", files=_file(path)).json()["matches"][0]
    assert best["id"] == out["id"]
    r = client.post("/api/images", files=_file(path, "renamed.png"), headers=AUTH)
    assert r.status_code == 200 and r.json()["duplicate"] is True and r.json()["id"] == out["id"]
    assert client.get("/healthz").json()["images"] == 9
    assert client.get(f"/api/images/{out['id']}/thumbnail").status_code == 200  # kept under uploads/


def test_add_activated_returns_the_released_file(client, coll_path, image_dir):
    path = sorted(image_dir.glob("*.png"))[30]
    r = client.post("/api/images?activate=true&psnr=40&iterations=3", files=_file(path), headers=AUTH)
    assert r.status_code == 201, r.text
    out = r.json()
    rel = out["released"]
    assert out["mode"] == "activated" and rel["media_type"] == "image/png"
    data = base64.b64decode(rel["data_base64"])
    original = np.asarray(Image.open(path).convert("RGB"))
    released = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert released.shape == original.shape
    assert rel["psnr"] >= 40.0 and abs(psnr(original, released) - rel["psnr"]) < 1e-6
    assert client.get(rel["url"]).content == data  # the same file, downloadable again by id
    assert client.get(f"/api/images/{out['id']}").json()["mode"] == "activated"
    # The released file is a copy the collection finds, and the original's code is what it stores.
    best = client.post("/api/query?k=1", files={"file": ("rel.png", data)}).json()["matches"][0]
    assert best["id"] == out["id"]
    again = client.post("/api/images?activate=true", files=_file(path), headers=AUTH)
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["released"]["data_base64"] == rel["data_base64"]
    assert client.post("/api/images?activate=true&psnr=5", files=_file(path), headers=AUTH).status_code == 422


def test_remove_by_id(client, coll_path, image_dir):
    path = sorted(image_dir.glob("*.png"))[2]
    image_id = client.post("/api/query?k=1", files=_file(path)).json()["matches"][0]["id"]
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 200
    r = client.delete(f"/api/images/{image_id}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": image_id}
    assert client.delete(f"/api/images/{image_id}", headers=AUTH).status_code == 404
    assert client.delete("/api/images/12345", headers=AUTH).status_code == 404
    assert client.get(f"/api/images/{image_id}").status_code == 404
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 404
    matches = client.post("/api/query?k=8", files=_file(path)).json()["matches"]
    assert image_id not in [m["id"] for m in matches] and len(matches) == 7
    with Collection.open(coll_path) as again:
        assert again.count() == 7 and again.index.ntotal == 7


def _writes(image_dir):
    path = sorted(image_dir.glob("*.png"))[40]
    return [
        ("post", "/api/images", {"files": _file(path)}),
        ("post", "/api/images?activate=true&iterations=1", {"files": _file(path)}),
        ("delete", "/api/images/1", {}),
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_writes_need_the_right_token(client, image_dir, which):
    method, url, kwargs = _writes(image_dir)[which]
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == 401 and r.json()["detail"] == "missing bearer token"
    assert r.headers["www-authenticate"].startswith("Bearer")
    for header in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
                   {"Authorization": f"Basic {TOKEN}"}):
        r = getattr(client, method)(url, headers={k: v.encode() for k, v in header.items()}, **kwargs)
        assert r.status_code == 401, header
        assert TOKEN not in r.text
    assert client.get("/healthz").json()["images"] == 8  # nothing was written
    r = getattr(client, method)(url, headers={"Authorization": f"Bearer {TOKEN}".encode()}, **kwargs)
    assert r.status_code in (200, 201)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_writes_are_refused_without_a_configured_token(make_client, image_dir, which):
    client = make_client(token=None)
    method, url, kwargs = _writes(image_dir)[which]
    for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Bearer "}):
        r = getattr(client, method)(url, headers=headers, **kwargs)
        assert r.status_code == 403 and "writes are disabled" in r.json()["detail"]
    assert client.get("/api/info").json()["service"]["writes_enabled"] is False
    assert make_client(token="   ").get("/api/info").json()["service"]["writes_enabled"] is False


def test_the_token_is_never_logged(coll_path, image_dir, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(coll_path, token=TOKEN), base_url="http://localhost") as client:
        client.post("/api/images", files=_file(sorted(image_dir.glob("*.png"))[41]), headers=AUTH)
        client.post("/api/images", files={"file": ("x.png", b"junk")}, headers={"Authorization": "Bearer nope"})
    assert TOKEN not in caplog.text and "nope" not in caplog.text
    assert TOKEN not in repr(client.app.state)


def test_an_index_changed_by_another_process_is_extended_not_overwritten(client, coll_path, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    with Collection.open(coll_path) as other:  # e.g. `activeindex add` while the service runs
        other.add_images(paths[50:52])
    # The service's copy of the index predates those two: a query reloads the latest one ...
    r = client.post("/api/query?k=1", files=_file(paths[50]))
    assert r.status_code == 200 and r.json()["matches"][0]["name"] == paths[50].name
    # ... and an add extends it instead of writing its own copy back over the other's adds.
    r = client.post("/api/images", files=_file(paths[53]), headers=AUTH)
    assert r.status_code == 201
    with Collection.open(coll_path) as other:  # and again, with no query in between
        other.add_images(paths[54:55])
    r = client.post("/api/images", files=_file(paths[55]), headers=AUTH)
    assert r.status_code == 201
    with Collection.open(coll_path) as again:
        assert again.count() == 13 and again.index.ntotal == 13
        for p in [*paths[50:52], *paths[53:56]]:
            assert again.query_images([p], k=1)[0][0].matches[0].name == p.name


def test_concurrent_queries_and_writes_stay_consistent(client, coll_path, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    errors: list[str] = []
    stop = threading.Event()

    def reader(i: int) -> None:
        while not stop.is_set():
            r = client.post("/api/query?k=5", files=_file(paths[i % 8]))
            if r.status_code != 200 or r.json()["matches"][0]["name"] != paths[i % 8].name:
                errors.append(r.text)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in readers:
        t.start()
    try:
        added = []
        for p in paths[10:18]:
            r = client.post("/api/images", files=_file(p), headers=AUTH)
            assert r.status_code == 201, r.text
            added.append(r.json()["id"])
        for image_id in added[::2]:
            assert client.delete(f"/api/images/{image_id}", headers=AUTH).status_code == 200
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors
    with Collection.open(coll_path) as again:
        assert again.count() == again.index.ntotal == 12
        db = sqlite3.connect(coll_path / "meta.sqlite")
        assert db.execute("SELECT COUNT(*) FROM images WHERE status != 'indexed'").fetchone()[0] == 0


# -- pieces ----------------------------------------------------------------------------------------
def test_batcher_batches_and_equals_one_at_a_time(tiny_extractor, image_dir):
    pre = tiny_extractor.preprocessing
    imgs = [pre.prepare(Image.open(p).convert("RGB")) for p in sorted(image_dir.glob("*.png"))[:12]]
    sizes = []
    gate = threading.Event()

    def fn(batch):
        gate.wait()
        sizes.append(len(batch))
        return tiny_extractor.features(np.stack(batch))

    batcher = Batcher(fn, max_batch=8)
    futures = [batcher.submit(a) for a in imgs]
    gate.set()  # what queued while the first call waited goes in batches of ≤ 8
    got = np.stack([f.result(timeout=10) for f in futures])
    batcher.close()
    assert max(sizes) == 8 and sum(sizes) == 12 and len(sizes) <= 3
    np.testing.assert_allclose(got, tiny_extractor.features(np.stack(imgs)), atol=1e-5)

    failing = Batcher(lambda b: 1 / 0)  # the whole batch fails
    with pytest.raises(ZeroDivisionError):
        failing.submit(imgs[0]).result(timeout=10)
    failing.close()


def test_batcher_fails_one_job_alone_and_pins_each_slot_to_its_threads():
    threads_seen = []

    def fn(jobs):
        threads_seen.append(torch.get_num_threads())
        return [ValueError(f"bad {j}") if j < 0 else 2 * j for j in jobs]

    before = torch.get_num_threads()
    batcher = Batcher(fn, slots=2, threads_per_slot=1)
    assert torch.get_num_threads() == before  # the caller's count is left as it was
    torch.set_num_threads(2)  # what another thread sets later must not reach the workers either
    try:
        futures = [batcher.submit(j) for j in (1, -1, 3)]
        assert futures[0].result(timeout=10) == 2 and futures[2].result(timeout=10) == 6
        with pytest.raises(ValueError, match="bad -1"):
            futures[1].result(timeout=10)
    finally:
        batcher.close()
        torch.set_num_threads(before)
    assert threads_seen and set(threads_seen) == {1}


def test_a_job_cancelled_while_queued_is_skipped_and_the_workers_go_on():
    gate = threading.Event()
    seen = []

    def fn(jobs):
        gate.wait()
        seen.extend(jobs)
        return [2 * j for j in jobs]

    batcher = Batcher(fn, max_batch=1)
    first = batcher.submit(1)
    time.sleep(0.2)  # the worker is inside fn with the first job
    cancelled = batcher.submit(2)
    assert cancelled.cancel()  # what asyncio.wrap_future does when a client goes away
    gate.set()
    try:
        assert first.result(timeout=10) == 2
        assert batcher.submit(3).result(timeout=10) == 6  # a worker hit by the cancelled job would be gone
        assert seen == [1, 3]
    finally:
        batcher.close()


def test_rwlock_keeps_writers_apart_from_readers():
    lock, log = RWLock(), []
    inside = threading.Event()

    def read(i):
        with lock.read():
            log.append(("r+", i))
            inside.set()
            time.sleep(0.05)
            log.append(("r-", i))

    def write():
        inside.wait()
        with lock.write():
            log.append(("w+", 0))
            time.sleep(0.02)
            log.append(("w-", 0))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = log.index(("w+", 0))
    assert log[w + 1] == ("w-", 0)  # nothing ran while the writer held the lock
    depth = 0
    for kind, _ in log:
        depth += {"r+": 1, "r-": -1, "w+": 0, "w-": 0}[kind]
        if kind == "w+":
            assert depth == 0


def test_cli_serve_passes_settings_and_the_token_from_the_environment(coll_path, monkeypatch):
    import activeindex.service as service
    from activeindex.cli import app

    seen = {}
    monkeypatch.setattr(service, "run", lambda path, **kw: seen.update(path=path, **kw))
    r = CliRunner().invoke(app, ["serve", str(coll_path), "--port", "9123", "--max-upload-mb", "1"],
                           env={"ACTIVEINDEX_TOKEN": TOKEN})
    assert r.exit_code == 0, r.output
    assert seen["path"] == coll_path and seen["port"] == 9123 and seen["host"] == "127.0.0.1"
    assert seen["token"] == TOKEN and seen["limits"].max_bytes == 1024 * 1024
    assert TOKEN not in r.output
    r = CliRunner().invoke(app, ["serve", str(coll_path)], env={"ACTIVEINDEX_TOKEN": ""})
    assert seen["token"] in (None, "") and "writes disabled" in r.output and seen["mmap"] is False
    r = CliRunner().invoke(app, ["serve", str(coll_path), "--mmap"], env={"ACTIVEINDEX_TOKEN": TOKEN})
    assert seen["mmap"] is True and "disabled: --mmap" in r.output and seen["allowed_hosts"] is None
    r = CliRunner().invoke(app, ["serve", str(coll_path), "--allowed-hosts", "photos.lan, *.internal",
                                 "--body-timeout", "5"])
    assert r.exit_code == 0 and seen["allowed_hosts"] == ["photos.lan", "*.internal"]
    assert seen["limits"].body_seconds == 5.0 and seen["limits"].max_parts == 16


def test_a_memory_mapped_service_answers_queries_and_refuses_writes(coll_path, image_dir):
    path = sorted(image_dir.glob("*.png"))[4]
    with TestClient(create_app(coll_path, token=TOKEN, mmap=True), base_url="http://localhost") as client:
        best = client.post("/api/query?k=1", files=_file(path)).json()["matches"][0]
        assert best["name"] == path.name
        for method, url, kwargs in _writes(image_dir):
            r = getattr(client, method)(url, headers=AUTH, **kwargs)
            assert r.status_code == 403 and "memory-mapped" in r.json()["detail"]


def test_serve_prints_its_url_once_the_port_accepts_connections(coll_path):
    import re
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "activeindex", "serve", str(coll_path), "--port", "0",
                             "--model-processes", "1"], stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)  # a server that never says "ready" fails, not hangs
    watchdog.start()
    try:
        lines = []
        for line in proc.stderr:  # start-up progress, then the URL
            lines.append(line)
            if line.startswith("ready: "):
                break
        assert lines and lines[-1].startswith("ready: "), "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[-1]).group(0)
        # At once: the port must already accept connections when the URL is shown.
        with urllib.request.urlopen(url + "healthz", timeout=10) as r:
            assert r.status == 200
        text = "".join(lines)
        assert "loaded c: 8 images, IVF4,PQ16x4" in text and "starting 1 model process" in text
        assert "model process 1/1 ready" in text
        assert text.index("model process 1/1 ready") < text.index("ready: http")
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()


def test_an_upload_too_large_to_activate_is_a_413(make_client, image_dir):
    client = make_client(limits=ServiceLimits(max_activation_pixels=1000))
    path = sorted(image_dir.glob("*.png"))[40]  # 64×48 = 3072 pixels
    r = client.post("/api/images?activate=true&iterations=1", files=_file(path), headers=AUTH)
    assert r.status_code == 413 and "too large to activate" in r.json()["detail"]
    assert client.post("/api/images", files=_file(path), headers=AUTH).status_code == 201  # passive: fine


def test_calibrated_decision_is_said_in_words(make_client, coll_path, image_dir):
    import numpy as np

    from activeindex.collection import Collection
    from activeindex.scoring import CalibrationScores

    matching = np.arange(800) < 200
    scores = np.where(matching, 0.9, np.linspace(0.0, 0.5, 800)).astype(np.float32)
    with Collection.open(coll_path) as c:
        thr = c.calibrate(CalibrationScores(scores, matching.copy(), matching))
    client = make_client()
    assert client.get("/api/info").json()["collection"]["copy_decision"] == thr.meaning
    assert "unrelated images" in thr.meaning and "1 in" in thr.meaning
    body = client.post("/api/query?k=2", files=_file(sorted(image_dir.glob("*.png"))[0])).json()
    assert body["copy_decision"] == thr.meaning
    assert all(m["copy"] == (m["score"] >= thr.threshold) for m in body["matches"])


def test_an_add_that_makes_the_threshold_stale_says_so(client, coll_path, image_dir, monkeypatch):
    import activeindex.scoring as scoring

    with Collection.open(coll_path) as c:
        rng = np.random.default_rng(0)
        matching = np.arange(200) < 100
        scores = np.where(matching, rng.normal(0.8, 0.05, 200), rng.normal(0.2, 0.05, 200)).astype(np.float32)
        c.calibrate(scoring.CalibrationScores(scores, matching.copy(), matching), scoring.CopyTarget(fpr=0.05))
    paths = sorted(image_dir.glob("*.png"))
    first = client.post("/api/images", files=_file(paths[20]), headers=AUTH).json()
    assert first["warning"] is None  # 9 indexed, calibrated with 8: far from stale
    assert "STALE" not in client.post("/api/query?k=1", files=_file(paths[20])).json()["copy_decision"]
    monkeypatch.setattr(scoring, "STALE_MIN_INDEXED", 1)
    monkeypatch.setattr(scoring, "STALE_FACTOR", 1)
    second = client.post("/api/images", files=_file(paths[21]), headers=AUTH).json()
    assert second["warning"].startswith("STALE: calibrated with 8 images indexed, now 10")
    assert client.post("/api/query?k=1", files=_file(paths[21])).json()["copy_decision"].startswith("STALE")
