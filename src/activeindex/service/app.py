"""The FastAPI app over one collection: :func:`create_app` builds it, :func:`run` serves it.

Routes (OpenAPI schema at ``/openapi.json``, docs at ``/docs``, served offline):

- ``POST /api/query`` an image upload → its k nearest indexed images (id, name, score, copy);
- ``POST /api/images`` add an upload, passive or ``?activate=true`` (the released file comes back);
- ``DELETE /api/images/{id}``; ``GET /api/images/{id}``, ``…/thumbnail``, ``…/released``;
- ``GET /api/info``, ``GET /healthz``, ``GET /metrics`` (Prometheus);
- ``GET /`` the web page (``static/``).

Write routes need ``Authorization: Bearer <token>`` (see :mod:`.auth`). The upload routes run on
the event loop: they read the multipart body, check the image's header, and await the batch the
job went into (:mod:`.batcher`: decoding and the model run in a describer, the search after it, for
all queries waiting), or the write in the thread pool. The other routes are plain ``def``, run in
FastAPI's thread pool; index changes are kept apart from searches (:mod:`.state`).

Every request first passes the ``Host`` check (:mod:`.hosts`: DNS rebinding) and the body bounds
(:mod:`.uploads`); no answer carries a path of the server's file system (:mod:`.redact`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time, and they
# refer to local names (the limits) that string annotations could not resolve.
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from activeindex import __version__
from activeindex.activation.optimize import configure
from activeindex.errors import ActiveIndexError, ImageLoadError
from activeindex.scoring import threshold_is_stale
from activeindex.service.auth import TokenCheck, bearer
from activeindex.service.describers import DescriberLost
from activeindex.service.knob_params import activation_knobs
from activeindex.service.hosts import LOCAL_NAMES, HostCheckMiddleware, default_allowed_hosts
from activeindex.service.metrics import MetricsMiddleware, ServiceMetrics
from activeindex.service.redact import redact, redact_paths
from activeindex.service.schemas import AddOut, HealthOut, ImageOut, InfoOut, QueryOut, RemoveOut
from activeindex.service.state import ActivationFailed, Service
from activeindex.service.uploads import (
    MULTIPART_SLACK, BodyLimitMiddleware, ServiceLimits, Upload, UploadRejected, inspect_upload, read_form_file,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(str(resources.files("activeindex.service") / "static"))
MAX_SERVICE_ITERATIONS = 100  # one request holds the write lock while it activates
THUMBNAIL_SIZES = (16, 512)  # smallest and largest side a client may ask for
# The body of the upload routes, for the OpenAPI schema (they parse it themselves: read_form_file).
IMAGE_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "an image: JPEG, PNG, WebP, BMP, TIFF or GIF"}},
}}}}}


def create_app(
    collection_path: str | os.PathLike[str],
    *,
    token: str | None = None,
    limits: ServiceLimits = ServiceLimits(),
    mmap: bool = False,
    model_processes: int | None = 0,
    allowed_hosts: Sequence[str] = LOCAL_NAMES,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> FastAPI:
    """Load the collection and its extractor (once, now) and build the app. ``token``: the bearer
    token of write routes; None makes the service read-only. ``mmap``: map the index file instead
    of reading it (read-only: replicas of a service can share one index file this way).
    ``model_processes``: decode and describe uploads in that many child processes (None: one per
    CPU core torch uses, at most 4, on a CPU model; 0: in threads of this process; see
    :mod:`.describers`). ``allowed_hosts``: the host names requests may name in ``Host`` besides
    IP addresses (``*``: any; see :mod:`.hosts`). ``progress``: told each start-up step, in words.
    ``device``: where the model runs (``auto``, ``cpu``, ``cuda[:N]``; on a GPU, uploads are
    described in this process, one batch at a time)."""
    metrics = ServiceMetrics()
    service = Service(collection_path, limits, metrics, mmap=mmap, model_processes=model_processes, progress=progress,
                      device=device)
    tokens = TokenCheck(token, disabled_reason="the index is memory-mapped (--mmap): read-only" if mmap else None)
    logger.info("serving %s (%d images); writes %s", service.collection.root, service.count(),
                "need the bearer token" if tokens.enabled else "disabled (no token configured)")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="activeindex",
        version=__version__,
        summary="Find edited copies of the images of a collection; add images, passive or activated.",
        docs_url=None,  # served below from the packaged Swagger UI (no CDN)
        redoc_url=None,
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry, on by default, looks up the global providers (and the
        # environment) on every request, a large share of the event loop's time per query in
        # py-spy samples. The service reports to Prometheus (/metrics) instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_body=limits.max_bytes + MULTIPART_SLACK,
                       drain_bytes=limits.drain_bytes, body_seconds=limits.body_seconds)
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts)  # outside the body limit: refused unread
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, sees every answer

    def require_writer(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        tokens.verify(credentials)

    writer = [Depends(require_writer)]
    roots = sorted({str(service.collection.root), str(service.collection.root.resolve())}, key=len, reverse=True)

    def public(text: str) -> str:
        """A message for clients: the collection folder named "the collection", other absolute
        paths cut to their file names (:mod:`.redact`)."""
        for root in roots:
            text = text.replace(root + os.sep, "").replace(root, "the collection")
        return redact_paths(text)

    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        metrics.rejected.labels(str(exc.status_code)).inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ActivationFailed)
    async def _activation_failed(request: Request, exc: ActivationFailed) -> JSONResponse:
        return JSONResponse({"detail": f"activation failed: {public(str(exc))}"}, status_code=422)

    @app.exception_handler(DescriberLost)
    async def _describer_lost(request: Request, exc: DescriberLost) -> JSONResponse:
        # A model process died with this request's batch (killed, out of memory): the next batch
        # starts a new one, so the request may be retried.
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ActiveIndexError)
    async def _library_error(request: Request, exc: ActiveIndexError) -> JSONResponse:
        # What the library refuses for this collection (an index that cannot give activation
        # targets, an index file changed under the service): the request cannot succeed as it is.
        logger.warning("409 for %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": public(str(exc))}, status_code=409)

    async def image_upload(request: Request) -> Upload:
        """The request's image (the multipart part ``file``, documented by ``IMAGE_BODY``), checked
        from its header: cheap on the event loop, and a 413/415 before any decoding."""
        with metrics.time("read"):
            data, filename = await read_form_file(request, "file", limits)
        return inspect_upload(data, filename, limits)

    def known(image_id: int) -> dict[str, Any]:
        record = service.record(image_id)
        if record is None:
            raise HTTPException(404, f"no image with id {image_id}")
        return record

    ImageId = Annotated[int, PathParam(ge=0, description="the image's id in the collection")]

    # -- search --------------------------------------------------------------------------------
    @app.post("/api/query", response_model=QueryOut, tags=["search"], openapi_extra=IMAGE_BODY)
    async def query(
        request: Request,
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        dihedral: Annotated[bool, Query(description=(
            "also search the upload's rotations by 90/180/270 degrees and their mirror images (8 views, "
            "8x the model's work), each match's best score kept; copies flagged at the dihedral threshold"))] = False,
    ) -> Any:
        """The k indexed images nearest to an uploaded image, best first."""
        upload = await image_upload(request)
        matches = (await asyncio.wrap_future(service.query(upload, k, dihedral))).matches or []
        mode = "dihedral" if dihedral else "single"
        # A JSONResponse skips FastAPI's response validation on the hot path; the shape is
        # QueryOut's, which documents it.
        return JSONResponse({
            "query": upload.name,
            "k": k,
            "query_mode": mode,
            "copy_decision": redact_paths(service.collection.copy_decision(mode)),
            "matches": [
                {"id": m.id, "name": m.name, "score": m.score, "copy": m.copy,
                 "thumbnail": f"/api/images/{m.id}/thumbnail"}
                for m in matches
            ],
        })

    # -- images --------------------------------------------------------------------------------
    @app.post("/api/images", response_model=AddOut, status_code=201, dependencies=writer, tags=["images"],
              responses={200: {"description": "already in the collection (same bytes)", "model": AddOut}},
              openapi_extra=IMAGE_BODY)
    async def add_image(
        request: Request,
        response: Response,
        knobs: Annotated[dict, Depends(activation_knobs())],
        activate: Annotated[bool, Query(description="release an activated version (it comes back in the answer)")] = False,
    ) -> Any:
        """Add an uploaded image. With ``activate``, the collection keeps the original's code and the
        answer carries the imperceptibly changed file to publish instead (PNG, base64). The
        activation parameters (``psnr``, ``iterations``, ``lr``, ...) need ``activate``; those left
        out take the model's own defaults; the answer's ``released.activation`` says what ran."""
        if knobs and not activate:
            raise HTTPException(422, f"{', '.join(knobs)}: activation parameters need activate=true")
        upload = await image_upload(request)
        if activate:
            if knobs.get("iterations", 0) > MAX_SERVICE_ITERATIONS:
                raise HTTPException(422, f"iterations: at most {MAX_SERVICE_ITERATIONS} through the service, "
                                         f"got {knobs['iterations']}")
            config = configure(knobs, service.collection.extractor)
            out = await run_in_threadpool(service.add_activated, upload, config)
        else:
            out = await run_in_threadpool(service.add_passive, upload)
        if out.duplicate:
            response.status_code = 200
        coll = service.collection
        stale = threshold_is_stale(coll.config.threshold_info, coll.count())
        return {"id": out.id, "name": out.name, "mode": out.mode, "duplicate": out.duplicate, "released": out.released,
                "warning": coll.copy_decision() if stale else None}

    @app.delete("/api/images/{image_id}", response_model=RemoveOut, dependencies=writer, tags=["images"])
    def remove_image(image_id: ImageId) -> Any:
        """Remove an image from the index and the database."""
        if not service.remove(image_id):
            raise HTTPException(404, f"no image with id {image_id}")
        return {"removed": image_id}

    @app.get("/api/images/{image_id}", response_model=ImageOut, tags=["images"])
    def image_info(image_id: ImageId) -> Any:
        """What the collection holds about one image."""
        r = known(image_id)
        return {**{k: r[k] for k in ("id", "name", "sha256", "added", "mode", "psnr", "ssim", "linf")},
                "released": bool(r["released"]), "thumbnail": f"/api/images/{image_id}/thumbnail"}

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(
        image_id: ImageId,
        size: Annotated[int, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1])] = 160,
    ) -> Response:
        """A JPEG of the indexed image that fits in size × size."""
        record = known(image_id)
        # The file the database recorded at add time; a request only ever names the integer id.
        path = Path(record["path"]) if record["path"] else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"the file of image {image_id} is not available to this service")
        try:
            with metrics.time("thumbnail"):
                data = service.thumbnails.get(image_id, path, size)
        except ImageLoadError as exc:
            logger.warning("thumbnail of image %d: %s", image_id, exc)
            reason = public(exc.reason.replace(str(path), path.name))
            raise HTTPException(404, f"the file of image {image_id} cannot be read: {reason}") from None
        # Ids are never reused: a thumbnail never changes.
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/api/images/{image_id}/released", tags=["images"], response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}})
    def released(image_id: ImageId) -> FileResponse:
        """The activated file released for an image added with ``activate``."""
        record = known(image_id)
        path = Path(record["released"]) if record["released"] else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"image {image_id} has no released file here")
        return FileResponse(path, media_type="image/png", filename=path.name)

    # -- service -------------------------------------------------------------------------------
    @app.get("/api/info", response_model=InfoOut, tags=["service"])
    def info() -> Any:
        """The collection's settings and size, and this service's limits."""
        return {
            "collection": redact(service.info()),  # a model file's path: its name only
            "service": {
                "version": __version__,
                "writes_enabled": tokens.enabled,
                "max_upload_bytes": limits.max_bytes,
                "max_upload_pixels": limits.max_pixels,
                "max_k": limits.max_k,
            },
        }

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    def healthz() -> Any:
        return {"status": "ok", "images": service.count()}

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        """Prometheus text format: requests, latency per route and per stage, batch sizes."""
        metrics.images.set(service.count())
        return Response(metrics.render(), media_type=metrics.content_type)

    # -- web page and docs ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _mount_docs(app)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package, so /docs works without internet."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="activeindex API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )


def run(
    collection_path: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServiceLimits = ServiceLimits(),
    mmap: bool = False,
    model_processes: int | None = None,
    allowed_hosts: Sequence[str] | None = None,
    log_level: str = "info",
    say: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Serve a collection with uvicorn until interrupted. ``say`` (default: a line on stderr) is
    told each start-up step, and the URL once the port accepts connections: loading the model
    processes takes seconds, and a URL printed before would be refused. ``allowed_hosts``: None
    answers :func:`~.hosts.default_allowed_hosts` of ``host``."""
    import uvicorn

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    hosts = tuple(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(host)
    app = create_app(collection_path, token=token, limits=limits, mmap=mmap, model_processes=model_processes,
                     allowed_hosts=hosts, progress=say, device=device)
    say(f"uploads are decoded and described by {app.state.service.describers_summary()}")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:  # listening (a port in use ends the run instead)
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                say(f"ready: {_url(host, bound)} (web page; API docs at /docs; answers the host names "
                    f"{', '.join(hosts)} and IP addresses)")

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


def _url(host: str, port: int) -> str:
    """The URL to open for a service listening on ``host``: this machine's name for every interface."""
    import socket

    name = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"
