"""Scale: a 1M-vector collection, and extraction/activation on 1 vs 2 local Ray workers.

Run it from the repository root::

    .venv/bin/python bench/scale.py                                  # the full run (see README)
    .venv/bin/python bench/scale.py --n 100000 --factory IVF256,PQ8x8 --images 256 --activate 32   # quick

Part (a), the index at scale (synthetic descriptors: the index does not care where vectors come
from). ``--n`` clustered random unit vectors of 256 dimensions (the builtin model's), a collection
(``builtin`` extractor spec, SQLite rows) whose index is trained on ``--ntrain`` of them, then filled
the way the Ray driver fills it: ids reserved as pending rows in one transaction, the vectors encoded
in ``--shards`` shard indexes (each an empty copy of the trained index, as a worker holds), merged
with FAISS's ``merge_from``, written and marked indexed. Queries are noisy copies of stored vectors;
recall is measured against exact search (``faiss.knn``, brute force) of the same queries, and
throughput against that exact search, in the same run. Memory: RSS of a fresh process that opens the
collection and answers queries, with the index loaded and memory-mapped.

Part (b), images through Ray. ``--images`` synthetic 256×256 PNGs are described by the builtin model
in-process (torch's threads over all cores) and by the Ray backend with 1 and 2 local workers (one
torch thread each); ``--activate`` of them are activated (``add --activate``) the same three ways into
fresh copies of one collection. Ray's start-up and the workers' first shard (model load) are timed
apart from the steady-state run, so both the scaling ratio and the overhead show.

It measures; it does not gate, and always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from activeindex.collection import INDEX_FILE, Collection
from activeindex.distributed import shards as sh
from activeindex.extractors import create_extractor
from activeindex.hardware import machine_summary

CACHE = Path("bench/.cache/scale")


def clustered_unit_vectors(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """(n, d) float32 unit vectors around ``n_clusters`` random centres; ``spread`` sets the cluster
    width (the expected cosine of a point to its centre is about 1/sqrt(1 + spread²))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s : s + m] = centres[rng.integers(0, n_clusters, m)]
        x[s : s + m] += rng.standard_normal((m, d), dtype=np.float32) * (spread / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def timed(label: str, out: dict[str, float]):
    t0 = time.perf_counter()
    yield
    out[label] = time.perf_counter() - t0


# -- part (a) ------------------------------------------------------------------------------------
def part_index(args: argparse.Namespace) -> None:
    d = 256
    t: dict[str, float] = {}
    print(f"(a) {args.n:,} vectors, {d}-d, {args.factory}, trained on {args.ntrain:,}, "
          f"{faiss.omp_get_max_threads()} FAISS threads; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    with timed("data", t):
        x = clustered_unit_vectors(args.n + args.ntrain, d, n_clusters=max(1, args.n // 100), spread=1.0, seed=0)
        xb, xt = x[: args.n], x[args.n :]
        rng = np.random.default_rng(1)
        qi = rng.choice(args.n, args.nq, replace=False)
        xq = xb[qi] + rng.standard_normal((args.nq, d), dtype=np.float32) * (0.5 / np.sqrt(d))
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    root = CACHE / "collection"
    shutil.rmtree(root, ignore_errors=True)
    extractor = create_extractor("builtin")
    assert extractor.dim == d
    with timed("train", t):
        coll = Collection.create(root, extractor, args.factory, xt, nprobe=1)
    print(f"  train                {t['train']:8.1f} s")

    # The Ray driver's path, without Ray: reserve → encode shards (what workers do) → merge → commit.
    with coll, coll.writing():
        with timed("reserve", t):
            ids = np.asarray(coll.reserve_ids([f"v{i:07d}" for i in range(args.n)],
                                              [f"{i:064x}" for i in range(args.n)]), dtype=np.int64)
        template = sh.deserialize(sh.serialize(sh.empty_copy(coll.index)))
        parts = []
        with timed("encode", t):
            for s in np.array_split(np.arange(args.n), args.shards):
                part = faiss.clone_index(template)
                part.add_with_ids(xb[s], ids[s])
                parts.append(sh.deserialize(sh.serialize(part)))  # as it travels from a worker
        with timed("merge", t):
            sh.merge_shards(coll.index, parts)
        del parts
        with timed("commit", t):
            coll.complete_add(ids.tolist())
        # The merged codes equal a plain add (checked on a sample).
        check = faiss.clone_index(template)
        if faiss.try_extract_index_ivf(check) is not None:
            faiss.try_extract_index_ivf(check).set_direct_map_type(faiss.DirectMap.Hashtable)
        sample = np.sort(rng.choice(args.n, 2000, replace=False))
        check.add_with_ids(xb[sample], ids[sample])
        same = all(np.array_equal(coll.index.reconstruct(int(ids[i])), check.reconstruct(int(ids[i])))
                   for i in sample[:200])
    per_shard = t["encode"] / args.shards
    print(f"  reserve {args.n:,} ids     {t['reserve']:8.1f} s   (one SQLite transaction)")
    print(f"  encode {args.shards} shards      {t['encode']:8.1f} s   ({per_shard:.1f} s per shard: a worker's job)")
    print(f"  merge (merge_from)   {t['merge']:8.1f} s   (driver, serial)")
    print(f"  write index + mark   {t['commit']:8.1f} s   (driver, serial)")
    print(f"  merged codes == plain add: {same}")
    size = (root / INDEX_FILE).stat().st_size
    print(f"  index file           {size / 1e6:8.1f} MB  ({size / args.n:.1f} B per vector; raw float32 "
          f"{args.n * d * 4 / 1e6:.0f} MB)")

    # Exact search, the baseline of this run.
    with timed("exact", t):
        _, gt = faiss.knn(xq, xb, 10)
    gt_ids = ids[gt]
    exact_qps = args.nq / t["exact"]
    print(f"  exact search (faiss.knn, brute force) {exact_qps:10.1f} queries/s")
    with Collection.open(root) as coll:
        ivf = faiss.try_extract_index_ivf(coll.index)
        for nprobe in args.nprobe:
            if ivf is not None:
                ivf.nprobe = nprobe
            t0 = time.perf_counter()
            _, I, _ = coll.search_arrays(xq, 10)
            dt = time.perf_counter() - t0
            r1 = float(np.mean(I[:, 0] == gt_ids[:, 0]))
            r10 = float(np.mean([gt_ids[i, 0] in I[i] for i in range(args.nq)]))
            found = float(np.mean(I[:, 0] == ids[qi]))
            print(f"  nprobe {nprobe:4d}  {args.nq / dt:10.1f} queries/s  ({args.nq / dt / exact_qps:7.1f}× exact)  "
                  f"1-R@1 {r1:.3f}  1-R@10 {r10:.3f}  (query's source at rank 1: {found:.3f})")
    del x, xb, xt

    # Memory of a serving process: a fresh interpreter opens the collection and answers queries.
    np.save(CACHE / "xq.npy", xq)
    for mode in ("load", "mmap"):
        code = (
            "import numpy as np, sys; sys.path.insert(0, 'bench'); from scale import rss_mb\n"
            "from activeindex.collection import Collection\n"
            "r0 = rss_mb()\n"
            f"c = Collection.open({str(root)!r}, mmap={mode == 'mmap'})\n"
            "r1 = rss_mb()\n"
            f"c.search_arrays(np.load({str(CACHE / 'xq.npy')!r}), 10)\n"
            "st = {l.split(':')[0]: int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile'))}\n"
            "print(f'{r1 - r0:.0f} {rss_mb() - r0:.0f} {st[\"RssAnon\"]} {st[\"RssFile\"]}')\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        opened, after, anon, file_ = out.stdout.split()
        print(f"  serving process, index {mode}: +{opened} MB RSS on open, +{after} MB after {args.nq} queries "
              f"(process total: {anon} MB anonymous, {file_} MB file-backed = shared page cache)")


# -- part (b) ------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def part_ray(args: argparse.Namespace) -> None:
    import ray

    from activeindex.activation.optimize import configure
    from activeindex.activation.add import add_activated
    from activeindex.datasets.synthetic import make_images
    from activeindex.distributed import RayOptions, RunStats, add_activated_ray, extract_paths_ray
    from activeindex.features import extract_paths

    n = args.images
    images = make_images(CACHE / "images", n, seed=7, size=(256, 256))
    paths = images[:n]
    extractor = create_extractor("builtin")
    config = configure({"iterations": args.iterations}, extractor)  # the model's own knobs, as `add --activate`
    print(f"\n(b) {n} images (synthetic 256×256 PNG) → builtin:{extractor.spec['name']} "
          f"({extractor.precision.value}), {os.cpu_count()} cores; activation of {args.activate} of them "
          f"({config.iterations} iterations at lr {config.lr:g}, batch 16, PNG, 42 dB)")
    print(f"  load average at the start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above 0: other work shares them)")
    rows = []

    extract_paths(paths[:64], extractor)  # warm-up, as the Ray runs get one
    t0 = time.perf_counter()
    base = extract_paths(paths, extractor)
    t_in = time.perf_counter() - t0
    rows.append(("extract", "in-process", torch.get_num_threads(), 0.0, 0.0, t_in))
    threads = torch.get_num_threads()
    with single_thread():  # what one core does alone, in-process: the per-worker reference
        t0 = time.perf_counter()
        extract_paths(paths, extractor)
        rows.append(("extract", "in-process", 1, 0.0, 0.0, time.perf_counter() - t0))

    # A collection to activate against, trained on the descriptors just computed.
    coll_root = CACHE / "act-collection"
    shutil.rmtree(coll_root, ignore_errors=True)
    xt = base.features
    if len(xt) < 2048:  # short runs: noisy copies so that the 256-centroid PQ codebooks can train
        rng = np.random.default_rng(0)
        xt = np.concatenate([xt + 0.05 * rng.standard_normal(xt.shape, dtype=np.float32)
                             for _ in range(-(-2048 // len(xt)))])
    Collection.create(coll_root, extractor, "IVF32,PQ32x8", xt, nprobe=1).close()
    act_paths = paths[: args.activate]

    def fresh(tag: str) -> Path:
        dst = CACHE / f"act-{tag}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(coll_root, dst)
        shutil.rmtree(CACHE / f"out-{tag}", ignore_errors=True)
        return dst

    if args.activate:
        with Collection.open(fresh("warm"), extractor=extractor) as c:  # warm-up (precision probe)
            add_activated(c, paths[-2:], CACHE / "out-warm", config)
        with Collection.open(fresh("inproc"), extractor=extractor) as c:
            t0 = time.perf_counter()
            rep_in = add_activated(c, act_paths, CACHE / "out-inproc", config)
            t_act = time.perf_counter() - t0
        rows.append(("activate", "in-process", threads, 0.0, 0.0, t_act))
        with single_thread(), Collection.open(fresh("inproc"), extractor=extractor) as c:
            t0 = time.perf_counter()
            add_activated(c, act_paths, CACHE / "out-inproc", config)
            rows.append(("activate", "in-process", 1, 0.0, 0.0, time.perf_counter() - t0))

    for workers in (1, 2):
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
        t_init = time.perf_counter() - t0
        options = RayOptions(shard_size=args.shard_size)
        # Warm-up: start the worker processes and load the model in each (one shard per worker).
        t0 = time.perf_counter()
        warm = RunStats()
        extract_paths_ray(paths[: 8 * workers], extractor, options=RayOptions(shard_size=8), stats=warm)
        t_warm = time.perf_counter() - t0
        stats = RunStats()
        t0 = time.perf_counter()
        got = extract_paths_ray(paths, extractor, options=options, stats=stats)
        t_run = time.perf_counter() - t0
        assert got.paths == base.paths
        cos = float(np.min(np.sum(got.features * base.features, axis=1)))
        rows.append(("extract", f"Ray, {workers} worker{'s' * (workers > 1)}", max(stats.worker_threads),
                     t_init, t_warm, t_run))
        if args.activate:
            with Collection.open(fresh("warm"), extractor=extractor) as c:  # warm-up, one shard per worker
                add_activated_ray(c, paths[-2 * workers :], CACHE / "out-warm", config,
                                  batch_size=2, options=RayOptions(shard_size=2))
            with Collection.open(fresh(f"ray{workers}"), extractor=extractor) as c:
                st = RunStats()
                t0 = time.perf_counter()
                rep = add_activated_ray(c, act_paths, CACHE / f"out-ray{workers}", config,
                                        options=RayOptions(shard_size=32), stats=st)
                t_act = time.perf_counter() - t0
                assert [i for i, _ in rep.added] == [i for i, _ in rep_in.added]
            rows.append(("activate", f"Ray, {workers} worker{'s' * (workers > 1)}", max(st.worker_threads),
                         0.0, 0.0, t_act))
        ray.shutdown()
        print(f"  Ray {workers}: descriptors within cosine {cos:.6f} of in-process; "
              f"ray.init {t_init:.1f} s, warm-up (workers start, model load) {t_warm:.1f} s")

    print(f"  load average at the end {os.getloadavg()[0]:.1f}")
    print(f"  {'step':9s} {'how':16s} {'torch thr.':>10s} {'images/s':>9s} {'vs in-process':>14s} {'vs 1 worker':>12s}")
    for step in ("extract", "activate"):
        sel = [r for r in rows if r[0] == step]
        if not sel:
            continue
        counts = n if step == "extract" else args.activate
        base_rate = counts / sel[0][5]
        one = next((counts / r[5] for r in sel if r[1] == "Ray, 1 worker"), None)
        for _, how, threads, _, _, secs in sel:
            rate = counts / secs
            vs1 = f"{rate / one:11.2f}×" if one else " " * 12
            print(f"  {step:9s} {how:16s} {threads:10d} {rate:9.1f} {rate / base_rate:13.2f}× {vs1}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    p.add_argument("--ntrain", type=int, default=100_000, help="training vectors")
    p.add_argument("--factory", default="IVF4096,PQ8x8")
    p.add_argument("--nq", type=int, default=1000, help="queries")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--shards", type=int, default=8, help="shard indexes merged into the collection")
    p.add_argument("--images", type=int, default=2048, help="images extracted per configuration (part b)")
    p.add_argument("--activate", type=int, default=256, help="images activated per configuration (part b)")
    p.add_argument("--iterations", type=int, default=None, help="activation iterations (default: the model's own)")
    p.add_argument("--shard-size", type=int, default=256, help="images per Ray task (extraction)")
    p.add_argument("--skip-index", action="store_true", help="skip part (a)")
    p.add_argument("--skip-ray", action="store_true", help="skip part (b)")
    args = p.parse_args(argv)
    print(f"machine: {machine_summary()}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_index:
        part_index(args)
    if not args.skip_ray:
        part_ray(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
