"""The HTTP service and web page over one collection (DESIGN.md §6).

A thin adapter: every request is parsed, checked and handed to the library (the collection, the
extractor, ``activation.add``). One module per concern:

- :mod:`.app` the FastAPI app factory (:func:`create_app`) and its routes;
- :mod:`.state` what is loaded once at start-up (collection, extractor, batcher, locks);
- :mod:`.locks` the readers-writer lock that keeps searches off an index being changed;
- :mod:`.batcher` gathers concurrent queries into one model call;
- :mod:`.describers` where uploads are decoded and described: model processes, or threads;
- :mod:`.uploads` bounded, checked uploads (bytes, pixels, formats, multipart parts, arrival time)
  and their decoding;
- :mod:`.auth` the bearer token of write endpoints;
- :mod:`.hosts` the ``Host`` names the service answers (a defence against DNS rebinding);
- :mod:`.redact` absolute paths cut from what clients are told;
- :mod:`.metrics` Prometheus counters and per-stage latency histograms;
- :mod:`.thumbnails` small JPEG renderings of indexed images, looked up by id;
- ``static/`` the web page (plain HTML/JS/CSS, works offline).
"""

from activeindex.service.app import create_app, run
from activeindex.service.uploads import ServiceLimits

__all__ = ["ServiceLimits", "create_app", "run"]
