r"""Vector search: exact (vlm_jax's blocked matmul + top-k) against the approximate faiss index,
one JSON line.

  python bench/index.py [--n 1000000] [--dim 256] [--queries 1000] [--k 10] \
      [--target_recall 0.95] [--nlist 1024] [--clusters 0] [--pq_bytes 32 [--rerank 10]]

Random unit vectors (the hardest case for an approximate index: no clusters to exploit) and
random unit queries, or with `--clusters N` both drawn around N centres (closer to real
embeddings). `exact` is the reference: its top-10 defines recall. For each method:
`build_s` (exact: moving the vectors to the device; approximate: k-means training, adding, and
calibrating nprobe to --target_recall), `queries_per_s` (all queries in one call, after a
warm-up call), `bytes` (what the index holds in memory) and `recall_at_10`. With
`--pq_bytes N`, `compressed` is the same for an IVF-PQ index of N-byte codes whose candidates are
re-ranked by the exact vectors, memory-mapped from the saved index (not counted in its bytes). Prints `uptime`'s
load average beside the figures (timings on a loaded machine are upper bounds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import search  # pylint: disable=g-import-not-at-top,wrong-import-position


def unit_vectors(n: int, dim: int, seed: int, clusters: int = 0, spread: float = 0.5
                 ) -> np.ndarray:
  """Random unit vectors; with `clusters`, each drawn around one of that many random centres
  (noise of `spread` times the centre's norm per vector), as embeddings of real data cluster."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim), dtype=np.float32) if clusters else None
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, 100_000):             # in chunks: float64 draws of 1M x 256 = 2 GB
    x = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
    if clusters:
      x = centres[rng.integers(0, clusters, size=len(x))] + spread * x
    out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--target_recall", type=float, default=0.95)
  p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(n))")
  p.add_argument("--clusters", type=int, default=0,
                 help="0: uniform random vectors; N: vectors (and queries) around N centres")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--pq_bytes", type=int, default=None,
                 help="also an IVF-PQ index with codes of this many bytes per vector")
  p.add_argument("--rerank", type=int, default=None,
                 help="its candidates re-ranked per result (default: the library's)")
  args = p.parse_args(argv)
  # Queries come from the same distribution (the same centres: the generator's first draws).
  both = unit_vectors(args.n + args.queries, args.dim, args.seed, args.clusters)
  vectors, queries = both[:args.n], both[args.n:]
  model = {"embed_dim": args.dim, "model_id": "random"}
  rows = [{}] * args.n

  # Exact: the whole database on the device (as Index.search keeps a small one), blocked.
  device_vectors, exact_build = timed(lambda: jnp.asarray(vectors))
  search.exact_search(queries, device_vectors, args.k)                # compile (same shapes)
  (_, truth), exact_s = timed(lambda: search.exact_search(queries, device_vectors, args.k))
  exact = {"build_s": round(exact_build, 3), "queries_per_s": round(args.queries / exact_s, 1),
           "bytes": int(vectors.nbytes), "recall_at_10": 1.0}

  index, approx_build = timed(lambda: search.Index.build(
      vectors, rows, model=model, kind="images", approximate=True, nlist=args.nlist,
      target_recall=args.target_recall, seed=args.seed))
  index.search(queries, args.k)
  (_, found), approx_s = timed(lambda: index.search(queries, args.k))
  approximate = {"build_s": round(approx_build, 3),
                 "queries_per_s": round(args.queries / approx_s, 1),
                 "bytes": index.nbytes(),
                 "recall_at_10": round(search.recall_at_k(found, truth), 4),
                 "nlist": int(index.faiss_index.nlist), "nprobe": index.nprobe}
  record = {"bench": "index", "n": args.n, "dim": args.dim, "queries": args.queries,
            "k": args.k, "clusters": args.clusters, "backend": jax.default_backend(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "exact": exact, "approximate": approximate}
  if args.pq_bytes:
    del index
    with tempfile.TemporaryDirectory() as folder:
      # Built, saved and loaded again, so the re-ranking reads memory-mapped vectors as a
      # loaded index does (the page cache still holds them: a warm disk).
      built, pq_build = timed(lambda: search.Index.build(
          vectors, rows, model=model, kind="images", pq_bytes=args.pq_bytes,
          rerank_factor=args.rerank, nlist=args.nlist, target_recall=args.target_recall,
          seed=args.seed))
      pq = search.Index.load(built.save(os.path.join(folder, "pq")))
      pq.search(queries, args.k)
      (_, found), pq_s = timed(lambda: pq.search(queries, args.k))
      record["compressed"] = {
          "build_s": round(pq_build, 3), "queries_per_s": round(args.queries / pq_s, 1),
          "bytes": pq.nbytes(), "recall_at_10": round(search.recall_at_k(found, truth), 4),
          "nlist": int(pq.faiss_index.nlist), "nprobe": pq.nprobe, "pq_bytes": args.pq_bytes,
          "rerank_factor": pq.rerank_factor}
  print(json.dumps(record), flush=True)
  return record


if __name__ == "__main__":
  main()
