"""Beyond one machine: extraction, ``add`` and ``add --activate`` on Ray (optional extra
``activeindex[ray]``).

Images are split into shards; each Ray worker holds the extractor and the collection's trained,
empty index, and returns the shard's codes as a small FAISS index under ids the driver reserved up
front; the driver merges them with FAISS's own ``merge_from``. See :mod:`.driver` for the protocol
(rounds, retries, crash recovery), :mod:`.shards` for the FAISS side and :mod:`.worker` for what a
worker runs.

Ray is imported only when a driver function runs: importing this package, and every default
(in-process) path of the library and the CLI, works without Ray installed.
"""

from activeindex.distributed.driver import (
    RayOptions,
    RunStats,
    add_activated_ray,
    add_images_ray,
    extract_paths_ray,
    ray_session,
)

__all__ = [
    "RayOptions",
    "RunStats",
    "add_activated_ray",
    "add_images_ray",
    "extract_paths_ray",
    "ray_session",
]
