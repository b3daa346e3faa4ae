"""Uploads: bounded in bytes and pixels, only image formats we mean to decode, checked before any
decoding, and decoded in memory by the library's :func:`~activeindex.images.decode_image` (EXIF
orientation, mode conversion, reduced-size JPEG decoding, the same as every file the CLI reads).

Where a request's bytes touch the disk (an added image), the file is named by the content's
SHA-256: nothing a client sends is ever used as a path. The client's file name is kept only as a
label, cleaned of folders and odd characters.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from activeindex.errors import ImageLoadError
from activeindex.images import MAX_ACTIVATION_PIXELS, ImageLimits, decode_image

# Pillow formats an upload may be in (the ones the CLI's folder walk picks up). Others are refused
# before Pillow tries them: some plugins (EPS → Ghostscript) are not for untrusted input.
# (Multi-picture JPEGs from cameras open through the JPEG plugin and report format "MPO".)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
# Multipart framing around the file (boundaries, part headers, small form fields).
MULTIPART_SLACK = 64 * 1024
# On an answer sent before the body was read to its end: the rest of it is not read.
CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may cost. ``max_bytes`` and ``max_pixels`` bound an upload (413
    beyond), ``max_k`` the matches per query, ``max_batch`` the images per model call.

    The multipart body around an upload is bounded too, since parsing it runs on the event loop:
    ``max_parts`` parts (the image and a few form fields), ``max_header_bytes`` of part headers in
    all, ``parse_seconds`` of parsing (a 400 beyond each), and ``body_seconds`` for the whole body
    to arrive (a 408 beyond: a client that stops sending mid-body would hold its connection
    forever). ``drain_bytes``: how much of a body refused as too large is still read (and thrown
    away) so that a client that sends all of it before reading can read the 413 (beyond it, the
    connection closes unread and such a client sees a reset)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_batch: int = 32
    max_parts: int = 16
    max_header_bytes: int = 16 * 1024
    parse_seconds: float = 2.0
    body_seconds: float = 60.0
    drain_bytes: int = 64 * 1024 * 1024
    # An upload to activate: activation holds about 180 bytes per pixel at once (413 beyond).
    max_activation_pixels: int = MAX_ACTIVATION_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_k", "max_batch", "max_parts", "max_header_bytes",
                     "max_activation_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("parse_seconds", "body_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drain_bytes < 0:
            raise ValueError(f"drain_bytes must be >= 0, got {self.drain_bytes}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_pixels, max_bytes=self.max_bytes)


class UploadRejected(HTTPException):
    """A 4xx for an upload, with the reason in ``detail``."""


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # the client's file name, cleaned: a label, never a path
    format: str  # Pillow's format name
    width: int
    height: int

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes (computed when first asked: only adds need it)."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def clean_name(filename: str | None, default: str = "upload") -> str:
    """The last component of a client's file name, with characters other than letters, digits,
    ``. _ -`` and space replaced by ``_``, no leading dot, at most 100 characters."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ]", "_", base).lstrip(". ").strip()
    if len(base) > 100:
        stem, ext = os.path.splitext(base)
        base = stem[: 100 - len(ext[:10])] + ext[:10]
    return base or default


class _BodyRefused(Exception):
    """Raised from a parser callback: stops parsing at once (mid-chunk) with the reason."""


class _FilePart:
    """python-multipart callbacks that keep the first part named ``field``: its bytes and file name.
    More than ``max_parts`` parts or ``max_header_bytes`` of part headers stop the parse."""

    def __init__(self, field: str, max_parts: int = 16, max_header_bytes: int = 16 * 1024) -> None:
        self.field = field.encode()
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.parts = 0
        self.header_bytes = 0
        self.data: bytes | None = None
        self.filename: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name: list[bytes] = []
        self._value: list[bytes] = []
        self._chunks: list[bytes] | None = None  # collecting: inside the wanted part

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._name.append(self._header_bytes(data, start, end)),
            "on_header_value": lambda data, start, end: self._value.append(self._header_bytes(data, start, end)),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _BodyRefused(f"more than {self.max_parts} parts in the multipart body")
        self._headers.clear()

    def _header_bytes(self, data: bytes, start: int, end: int) -> bytes:
        self.header_bytes += end - start
        if self.header_bytes > self.max_header_bytes:
            raise _BodyRefused(f"more than {self.max_header_bytes} bytes of part headers in the multipart body")
        return data[start:end]

    def _header_end(self) -> None:
        self._headers[b"".join(self._name).lower()] = b"".join(self._value)
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if self.data is None and options.get(b"name") == self.field:
            self._chunks = []
            filename = options.get(b"filename")
            self.filename = None if filename is None else filename.decode("utf-8", "replace")

    @property
    def inside(self) -> bool:
        """Whether the wanted part began and has not ended (so far)."""
        return self._chunks is not None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is not None:
            self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._chunks is not None:
            self.data = b"".join(self._chunks)
            self._chunks = None


async def read_form_file(
    request: Request, field: str = "file", limits: ServiceLimits = ServiceLimits()
) -> tuple[bytes, str | None]:
    """The bytes and file name of the ``field`` part of a ``multipart/form-data`` request, parsed
    as the body streams in (the body's size is bounded by :class:`BodyLimitMiddleware`; its parts,
    part headers, parsing time and arrival time by ``limits``).

    python-multipart's parser, which Starlette's form parsing runs too, without the spooled files
    and form objects around it, which cost the event loop more per query than the parsing itself
    (the event loop's CPU per query is a line of ``bench/service.py``)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRejected(422, f"expected a multipart/form-data body with the image in a part named {field!r}")
    part = _FilePart(field, limits.max_parts, limits.max_header_bytes)
    parsing = 0.0
    try:
        parser = MultipartParser(params[b"boundary"], part.callbacks())
        async with asyncio.timeout(limits.body_seconds):
            async for chunk in request.stream():
                start = time.perf_counter()
                parser.write(chunk)
                parsing += time.perf_counter() - start
                if parsing > limits.parse_seconds:
                    raise _BodyRefused(f"the multipart body took over {limits.parse_seconds:g} s to parse")
        parser.finalize()
    except FormParserError as exc:
        raise UploadRejected(400, f"malformed multipart body: {exc}") from None
    except _BodyRefused as exc:
        raise UploadRejected(400, str(exc), headers=CLOSE) from None
    except TimeoutError:
        raise UploadRejected(
            408, f"the request body did not arrive within {limits.body_seconds:g} s", headers=CLOSE
        ) from None
    if part.data is None:
        if part.inside:
            raise UploadRejected(400, f"the multipart body ends inside the part {field!r} (a truncated upload?)")
        raise UploadRejected(422, f"the multipart body has no part named {field!r} (the image)")
    return part.data, part.filename


def inspect_upload(data: bytes, filename: str | None, limits: ServiceLimits) -> Upload:
    """Check an upload's size, format and pixel count from its header, before any decoding."""
    if not data:
        raise UploadRejected(400, "empty upload (0 bytes)")
    if len(data) > limits.max_bytes:
        raise UploadRejected(413, f"upload of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            fmt, (width, height) = img.format, img.size
    except UnidentifiedImageError:
        raise UploadRejected(
            415, f"not an image file (format not recognised); accepted: {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    except Image.DecompressionBombError as exc:
        raise UploadRejected(413, f"too many pixels (possible decompression bomb): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any header Pillow cannot parse is the client's error
        raise UploadRejected(400, f"corrupt image header ({exc})") from None
    if width * height > limits.max_pixels:
        raise UploadRejected(
            413, f"{width}×{height} = {width * height} pixels exceeds the limit of {limits.max_pixels} pixels"
        )
    if width < 1 or height < 1:
        raise UploadRejected(400, f"invalid image size {width}×{height}")
    return Upload(data, clean_name(filename), str(fmt), width, height)


def decode_upload(upload: Upload, limits: ServiceLimits, *, min_side: int | None = None) -> Image.Image:
    """Decode an inspected upload (in memory). A file that fails to decode (truncated, corrupt)
    is a 400 with the reason."""
    try:
        return decode_image(upload.data, upload.name, min_side=min_side, limits=limits.image_limits)
    except ImageLoadError as exc:
        raise UploadRejected(400, exc.reason) from None


class BodyLimitMiddleware:
    """Refuses request bodies larger than ``max_body`` bytes with 413, whether announced by
    ``Content-Length`` (refused before the app sees it) or streamed in chunks (refused once past
    the bound), so that an upload is never held in memory beyond the limit.

    Before the 413 goes out, the rest of the body is read and thrown away, up to ``drain_bytes``
    and within ``body_seconds``: a client that sends the whole body before it reads (``urllib``,
    ``requests``) would otherwise get a connection reset instead of the answer, since a socket
    closed with unread data sends TCP RST. Beyond that bound the connection is closed unread."""

    def __init__(self, app: ASGIApp, max_body: int, drain_bytes: int = 64 * 1024 * 1024,
                 body_seconds: float = 60.0) -> None:
        self.app = app
        self.max_body = max_body
        self.drain_bytes = drain_bytes
        self.body_seconds = body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced > self.max_body:
                    if announced <= self.drain_bytes:
                        await self._drain(receive, 0)
                    await _send_413(send, f"request body of {announced} bytes exceeds the limit of {self.max_body} bytes")
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    if message.get("more_body", False):
                        await self._drain(receive, seen)
                    # FastAPI re-raises HTTPExceptions raised while it parses the body.
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body} bytes",
                                        headers=CLOSE)
            return message

        await self.app(scope, limited_receive, send)

    async def _drain(self, receive: Receive, seen: int) -> None:
        """Read and discard the body until its end, ``drain_bytes`` in all or ``body_seconds``."""
        try:
            async with asyncio.timeout(self.body_seconds):
                while seen <= self.drain_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            return


async def _send_413(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
