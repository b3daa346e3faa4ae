"""Shard indexes: the trained, empty index a worker encodes into, and FAISS's own merge back.

A worker needs only the quantiser and the codebooks, not the stored codes: :func:`empty_copy` clones
the collection's index and resets it. Each worker adds its shard's vectors with the ids the driver
reserved, and the driver merges the shard indexes into the collection's with ``merge_from(other,
add_id=0)`` (ids are kept as they are). Indexes FAISS cannot merge (HNSW: the graph would have to
be rebuilt) fall back to adding the shard's vectors with ``add_with_ids`` on the driver, which gives
the same codes.

Two FAISS details handled here:

- IVF ``merge_from`` refuses indexes with a direct map ("merge direct_map not implemented"). The
  templates carry none; the collection's IVF index drops its hashtable for the merge and rebuilds it
  after (one pass over the ids).
- ``merge_from`` checks that both indexes have the same C++ type, and an ``IndexFlat`` built by the
  factory comes back from (de)serialisation as an ``IndexFlatL2``: :func:`can_merge` compares the
  collection's index with the template *as the workers see it* and the caller falls back to vectors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def empty_copy(index: faiss.Index) -> faiss.Index:
    """A trained, empty copy of ``index`` (quantiser, codebooks, transforms) without a direct map."""
    out = faiss.clone_index(index)
    out.reset()
    ivf = faiss.try_extract_index_ivf(out)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return out


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as a uint8 array (what travels between driver and workers)."""
    return faiss.serialize_index(index)


def deserialize(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))


def can_merge(dst: faiss.Index, template: faiss.Index) -> bool:
    """Whether shard indexes made from ``template`` (as deserialised by a worker) can be merged into
    ``dst`` with ``merge_from``. Checked on an empty copy of ``dst`` (no direct map)."""
    probe = empty_copy(dst)
    try:
        probe.check_compatible_for_merge(template)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        logger.info("shard indexes cannot be merged into %s (%s); adding their vectors instead",
                    type(faiss.downcast_index(dst)).__name__, lines[-1] if lines else exc)
        return False
    return True


@contextlib.contextmanager
def _without_direct_map(index: faiss.Index) -> Iterator[None]:
    ivf = faiss.try_extract_index_ivf(index)
    kind = None if ivf is None else int(ivf.direct_map.type)
    if kind in (None, faiss.DirectMap.NoMap):
        yield
        return
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    try:
        yield
    finally:
        ivf.set_direct_map_type(kind)  # rebuilt from the inverted lists


def merge_shards(dst: faiss.Index, shards: Sequence[faiss.Index]) -> int:
    """Merge shard indexes (each holding vectors with their final ids) into ``dst``; returns how
    many vectors were added. The shards are merged into the first one, then that one into ``dst``,
    so that ``dst``'s id maps (direct map, IDMap2 reverse map) are rebuilt once."""
    shards = [s for s in shards if s.ntotal > 0]
    if not shards:
        return 0
    head = shards[0]
    for other in shards[1:]:
        head.merge_from(other, 0)
    n = int(head.ntotal)
    with _without_direct_map(dst):
        dst.merge_from(head, 0)
    return n
