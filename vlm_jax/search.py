"""Vector search over embeddings: exact (blocked matrix product + top-k, on the accelerator when
there is one) and approximate (faiss), behind one on-disk `Index`.

    index = search.Index.build(vectors, rows, model=..., kind="images")   # exact
    index = search.Index.build(vectors, rows, model=..., approximate=True)  # faiss IVF
    index.save("runs/index"); index = search.Index.load("runs/index")
    scores, positions = index.search(queries, k=10)      # [Q, k] each, best first

Scores are inner products (embeddings are unit norm, so cosine similarities). `rows` is one
JSON-able dict per vector (its id, and the caption or image path a query prints).

Why faiss for the approximate index: it is the library most retrieval work in this field uses
(LAION's clip-retrieval builds faiss indexes), it is pip-installable for the CPU with no
framework pinned beside it (ScaNN's wheels follow TensorFlow's releases, which we also pin for
TFDS, so the two would have to move together), it writes indexes that memory-map, and one API
covers IVF, product quantisation and HNSW, CPU and GPU. We use an inverted file over exact
vectors (`IndexIVFFlat`, inner product): its recall is set at query time by `nprobe`, which
the index stores beside itself (`bench/index.py` measures recall@10 against exact search). For
corpora whose vectors do not fit in memory, the lists can hold product-quantised codes instead
(`IndexIVFPQ`, `pq_bytes` per vector), their candidates re-ranked by the exact vectors, which
stay on disk.

An index records the model that embedded its vectors (`model`: its id and embedding size); a
query with another model fails naming both (`check_model`).
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import files

FORMAT = "vlm_jax.index/1"
DEFAULT_BLOCK = 65536          # rows of the database per matrix product in exact search


# ---- exact search ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k",))
def _block_topk(queries, block, offset, best_scores, best_ids, *, k):
  """Merges the top-k of `queries @ block.T` into the running (best_scores, best_ids)."""
  scores = jnp.einsum("qd,nd->qn", queries, block, preferred_element_type=jnp.float32)
  kk = min(k, block.shape[0])
  top, where = jax.lax.top_k(scores, kk)
  scores = jnp.concatenate([best_scores, top], axis=1)
  ids = jnp.concatenate([best_ids, where.astype(jnp.int32) + offset], axis=1)
  best, pick = jax.lax.top_k(scores, k)
  return best, jnp.take_along_axis(ids, pick, axis=1)


def exact_search(queries: np.ndarray, vectors, k: int, block_rows: int = DEFAULT_BLOCK
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The k largest inner products of each query over all `vectors`: (scores float32 [Q, k],
  positions int64 [Q, k]), best first; ties keep the lower position first. `vectors` may be a
  numpy array (it is moved to the default device block by block) or a device array.

  Fewer than k vectors: the missing places hold score -inf and position -1.
  """
  queries = jnp.asarray(queries, jnp.float32)
  n = int(vectors.shape[0])
  q = queries.shape[0]
  best = jnp.full((q, k), -jnp.inf, jnp.float32)
  ids = jnp.full((q, k), -1, jnp.int32)
  # Every block but a ragged last one has the same shape: one compiled function.
  block_rows = max(1, min(int(block_rows), n))
  for start in range(0, n, block_rows):
    block = jnp.asarray(vectors[start:start + block_rows], jnp.float32)
    best, ids = _block_topk(queries, block, jnp.int32(start), best, ids, k=k)
  return np.asarray(best), np.asarray(ids).astype(np.int64)


# ---- the index ---------------------------------------------------------------------------------


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean fraction of each row of `truth` (true top-k positions) that `found` contains."""
  hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
  return float(np.sum(hits) / truth.size) if truth.size else 1.0


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors, k: int,
           chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The k best of each query's `candidates` [Q, C] (positions, -1 for none) by their exact
  inner products with `vectors` (a numpy array or a memory-mapped vectors.npy: only the
  candidates' rows are read): (scores [Q, k], positions [Q, k]), best first."""
  scores_out = np.full((len(queries), k), -np.inf, np.float32)
  positions_out = np.full((len(queries), k), -1, np.int64)
  for start in range(0, len(queries), chunk):
    cand = candidates[start:start + chunk]
    rows, inverse = np.unique(np.where(cand < 0, 0, cand), return_inverse=True)
    gathered = np.asarray(vectors[rows], np.float32)[inverse.reshape(cand.shape)]
    scores = np.einsum("qd,qcd->qc", queries[start:start + chunk], gathered)
    scores[cand < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    kk = order.shape[1]
    scores_out[start:start + chunk, :kk] = np.take_along_axis(scores, order, axis=1)
    positions_out[start:start + chunk, :kk] = np.where(
        np.isneginf(scores_out[start:start + chunk, :kk]), -1,
        np.take_along_axis(cand, order, axis=1))
  return scores_out, positions_out


def ivf_search(ivf, queries: np.ndarray, k: int, nprobe: int, vectors=None,
               rerank_factor: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A faiss IVF index searched `nprobe` lists at a time; with `rerank_factor`, its
  k * rerank_factor best candidates are re-ordered by their exact vectors (`rerank`)."""
  ivf.nprobe = int(nprobe)
  if rerank_factor and vectors is not None:
    _, candidates = ivf.search(queries, k * int(rerank_factor))
    return rerank(queries, candidates, vectors, k)
  scores, positions = ivf.search(queries, k)
  return scores.astype(np.float32), positions.astype(np.int64)


class UnreachableRecall(ValueError):
  """A compressed index whose best recall (every list searched) is below the target."""


def calibrate_nprobe(ivf, vectors: np.ndarray, target_recall: float, k: int = 10,
                     queries: int = 256, seed: int = 0, rerank_factor: int = 0) -> int:
  """The smallest nprobe whose recall@k reaches `target_recall` (doubling, then bisecting),
  measured with `queries` of the indexed vectors as queries (each one's own vector left out of
  both the exact and the approximate answer, so finding itself earns nothing).

  "Reaches" means with 95% confidence: the measured recall less two standard errors of a
  proportion over queries x k hits (0.009 at 256 queries and recall 0.95). The smallest value
  that merely touches the target on a sample lands below it on new queries about half the
  time. An index of exact vectors reaches any target at nprobe = nlist; one of compressed
  vectors (product quantisation) may not, and then UnreachableRecall says what it reaches.
  `rerank_factor`: calibrate the search that re-ranks candidates by the exact `vectors`."""
  rng = np.random.default_rng(seed)
  n = vectors.shape[0]
  pick = rng.choice(n, size=min(queries, n), replace=False)
  q = vectors[pick]
  k = min(k, n - 1)
  if k < 1:
    return 1

  def without_self(positions):
    return np.stack([row[row != own][:k] for row, own in zip(positions, pick)])

  _, exact = exact_search(q, vectors, k + 1)
  truth = without_self(exact)
  measured = {}

  def reaches(nprobe):
    _, found = ivf_search(ivf, q, k + 1, nprobe, vectors, rerank_factor)
    recall = measured[nprobe] = recall_at_k(without_self(found), truth)
    return recall - 2 * math.sqrt(recall * (1 - recall) / truth.size) >= target_recall

  low, high = 0, 1                       # low fails (0: nothing read), high is tried next
  while high < ivf.nlist and not reaches(high):
    low, high = high, min(2 * high, ivf.nlist)
  if high == ivf.nlist and not reaches(high):
    raise UnreachableRecall(
        f"index: recall@{k} {measured[high]:.3f} with every one of the {ivf.nlist} lists "
        f"searched, below the target {target_recall} (less two standard errors over "
        f"{truth.shape[0]} calibration queries): the compressed vectors lose the order of the "
        "nearest neighbours; store more bytes per vector, re-rank more candidates, lower the "
        "target, or keep the exact vectors in the lists")
  while high - low > 1:                  # the smallest passing value in (low, high]
    middle = (low + high) // 2
    low, high = (low, middle) if reaches(middle) else (middle, high)
  return high


PQ_BITS = 8                    # bits per product-quantiser code: 256 centroids per sub-vector
# Candidates per result re-ranked by the exact vectors (pq_bytes). On 1M clustered 256-d vectors
# with 32-byte codes (bench/index.py), 10 reached recall@10 0.61 with every list searched, 50
# reached 0.96 at nprobe 5.
DEFAULT_RERANK = 50


def _check_pq(pq_bytes: int, n: int, d: int) -> None:
  """Product quantisation needs whole sub-vectors and enough vectors to train its codebooks."""
  if pq_bytes < 1 or d % pq_bytes:
    raise ValueError(f"index: pq_bytes={pq_bytes} must divide the embedding size {d} (one byte "
                     f"per sub-vector of {d} / pq_bytes dimensions), e.g. "
                     f"{', '.join(str(m) for m in (8, 16, 32, 64) if d % m == 0) or 1}")
  if n < 2 ** PQ_BITS:
    raise ValueError(f"index: product quantisation trains {2 ** PQ_BITS} centroids per "
                     f"sub-vector and needs at least that many vectors; {n} given: use the "
                     "exact index (no --pq_bytes)")


class ModelMismatch(ValueError):
  """Queries embedded with another model than the index's vectors."""


def check_model(index_model: dict, query_model: dict, index_path: str = "the index") -> None:
  """Raises ModelMismatch naming both models when the embedding size or the model id differ."""
  problems = []
  for field in ("embed_dim", "model_id"):
    a, b = index_model.get(field), query_model.get(field)
    if a != b:
      problems.append(f"{field} {a!r} (index) vs {b!r} (query model)")
  if problems:
    raise ModelMismatch(f"search: {index_path} was built with another model than the query's: "
                        f"{'; '.join(problems)} (index model: {index_model.get('workdir')}, "
                        f"query model: {query_model.get('workdir')}); embed the corpus with the "
                        "query's model, or query with the index's")


class Index:
  """Vectors (or a faiss index over them) + one metadata row per vector + the embedding model."""

  def __init__(self, vectors: Optional[np.ndarray], rows: list, model: dict, kind: str,
               faiss_index=None, nprobe: int = 0, rerank_factor: int = 0):
    # `vectors`: the exact vectors (exact search, or re-ranking an approximate index's
    # candidates; memory-mapped when loaded), or None.
    self.vectors, self.rows, self.model, self.kind = vectors, rows, dict(model), kind
    self.faiss_index, self.nprobe = faiss_index, int(nprobe)
    self.rerank_factor = int(rerank_factor)
    self.path = None                 # the folder it was loaded from / saved to
    self._device_vectors = None

  @property
  def approximate(self) -> bool:
    return self.faiss_index is not None

  @property
  def backend(self) -> str:
    """'exact', 'faiss_ivf_flat' or 'faiss_ivf_pq' (as index.json records it)."""
    if not self.approximate:
      return "exact"
    return "faiss_ivf_pq" if hasattr(self.faiss_index, "pq") else "faiss_ivf_flat"

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def dim(self) -> int:
    return int(self.model["embed_dim"])

  @classmethod
  def build(cls, vectors: np.ndarray, rows: Sequence[dict], *, model: dict, kind: str,
            approximate: bool = False, nlist: Optional[int] = None, nprobe: Optional[int] = None,
            target_recall: float = 0.95, seed: int = 0, pq_bytes: Optional[int] = None,
            rerank_factor: Optional[int] = None) -> "Index":
    """An exact index over `vectors` [N, D] (float32), or with `approximate` a faiss
    IndexIVFFlat with `nlist` lists (default 4 sqrt(N)) searched `nprobe` at a time: given, or
    the smallest whose recall@10 against exact search reaches `target_recall` on calibration
    queries (`calibrate_nprobe`).

    `pq_bytes` (implies `approximate`): the lists hold product-quantised codes of that many
    bytes per vector (faiss IndexIVFPQ, 8 bits per sub-vector of D / pq_bytes dimensions,
    residuals to the list centroid) instead of the D * 4 bytes of the exact vectors: 32 bytes
    against 1024 for 256-d embeddings, for corpora too large for memory otherwise. The codes
    order near neighbours only roughly, so a search takes `rerank_factor` (default
    DEFAULT_RERANK) times k candidates from them and re-ranks those by their exact vectors,
    which the index keeps on disk and memory-maps (only the candidates' rows are read);
    `rerank_factor=0` keeps no vectors, at a recall with a lower ceiling. A target above the
    ceiling fails at build (`UnreachableRecall`)."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(rows):
      raise ValueError(f"index: {vectors.shape} vectors for {len(rows)} rows")
    if vectors.shape[0] == 0:
      raise ValueError("index: no vectors to index (the embeddings are empty)")
    if vectors.shape[1] != int(model["embed_dim"]):
      raise ValueError(f"index: vectors of size {vectors.shape[1]} but the model's embed_dim is "
                       f"{model['embed_dim']}")
    n, d = vectors.shape
    if pq_bytes is not None:
      _check_pq(int(pq_bytes), n, d)
    if rerank_factor is None:
      rerank_factor = DEFAULT_RERANK if pq_bytes else 0
    if rerank_factor and not pq_bytes:
      raise ValueError("index: re-ranking is for an index of compressed vectors (pq_bytes); "
                       "an IVF-Flat index already holds the exact vectors")
    if not approximate and not pq_bytes:
      return cls(vectors, list(rows), model, kind)
    import faiss  # pylint: disable=g-import-not-at-top
    nlist = int(nlist or max(1, min(n // 39, round(4 * math.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(d)
    if pq_bytes:
      ivf = faiss.IndexIVFPQ(quantizer, d, nlist, int(pq_bytes), PQ_BITS,
                             faiss.METRIC_INNER_PRODUCT)
      ivf.pq.cp.seed = int(seed)
    else:
      ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = int(seed)
    # k-means on up to 64 points per list (faiss's default, 256, quadruples the training time
    # for centroids that place the same).
    ivf.cp.max_points_per_centroid = 64
    ivf.train(vectors)
    ivf.add(vectors)
    if not nprobe:
      nprobe = calibrate_nprobe(ivf, vectors, target_recall, seed=seed,
                                rerank_factor=rerank_factor)
    return cls(vectors if rerank_factor else None, list(rows), model, kind, faiss_index=ivf,
               nprobe=int(nprobe), rerank_factor=rerank_factor)

  def search(self, queries: np.ndarray, k: int = 10, block_rows: int = DEFAULT_BLOCK
             ) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], positions [Q, k]) of the k best vectors per query, best first."""
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"search: queries of shape {queries.shape}; this index holds "
                       f"{self.dim}-dim vectors")
    k = int(k)
    if k < 1:
      raise ValueError(f"search: k={k} must be >= 1")
    if self.approximate:
      return ivf_search(self.faiss_index, queries, k, self.nprobe, self.vectors,
                        self.rerank_factor)
    if self._device_vectors is None and len(self) <= DEFAULT_BLOCK:
      self._device_vectors = jnp.asarray(self.vectors)   # a small index stays on the device
    return exact_search(queries, self._device_vectors if self._device_vectors is not None
                        else self.vectors, k, block_rows)

  # ---- files -----------------------------------------------------------------------------------
  def save(self, path: str) -> str:
    """Writes DIR/index.json, rows.jsonl and vectors.npy (exact) or faiss.index; the folder must
    not exist yet (or be empty). Files are written under temporary names and renamed last."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
      raise FileExistsError(f"index: {path} already exists and is not an empty folder")
    os.makedirs(path, exist_ok=True)
    files.write_lines(os.path.join(path, "rows.jsonl"), (json.dumps(r) for r in self.rows))
    if self.approximate:
      import faiss  # pylint: disable=g-import-not-at-top
      faiss.write_index(self.faiss_index, os.path.join(path, "faiss.index.tmp"))
      os.replace(os.path.join(path, "faiss.index.tmp"), os.path.join(path, "faiss.index"))
    if self.vectors is not None:
      files.save_npy(os.path.join(path, "vectors.npy"), np.asarray(self.vectors))
    meta = {"format": FORMAT, "kind": self.kind, "count": len(self), "model": self.model,
            "backend": self.backend, "nprobe": self.nprobe, "rerank_factor": self.rerank_factor}
    files.write_json(os.path.join(path, "index.json"), meta)   # last: marks the index complete
    self.path = path
    return path

  @classmethod
  def load(cls, path: str) -> "Index":
    meta = files.read_described(os.path.join(path, "index.json"), FORMAT, "index",
                                "python -m vlm_jax.index build")
    with open(os.path.join(path, "rows.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    if len(rows) != meta["count"]:
      raise ValueError(f"index: {path}/rows.jsonl has {len(rows)} rows, index.json says "
                       f"{meta['count']}")
    rerank_factor = int(meta.get("rerank_factor", 0))
    vectors = None
    if meta["backend"] == "exact" or rerank_factor:
      vectors = np.load(os.path.join(path, "vectors.npy"), mmap_mode="r", allow_pickle=False)
      if vectors.shape != (meta["count"], int(meta["model"]["embed_dim"])):
        raise ValueError(f"index: {path}/vectors.npy has shape {vectors.shape}, expected "
                         f"({meta['count']}, {meta['model']['embed_dim']})")
    if meta["backend"] == "exact":
      index = cls(vectors, rows, meta["model"], meta["kind"])
    else:
      import faiss  # pylint: disable=g-import-not-at-top
      ivf = faiss.read_index(os.path.join(path, "faiss.index"))
      index = cls(vectors, rows, meta["model"], meta["kind"], faiss_index=ivf,
                  nprobe=meta["nprobe"], rerank_factor=rerank_factor)
    index.path = os.path.abspath(path)
    return index

  def nbytes(self) -> int:
    """Bytes the index holds in memory (vectors or the faiss index; a re-ranking index's
    vectors stay on disk, memory-mapped, and are not counted)."""
    if self.approximate:
      import faiss  # pylint: disable=g-import-not-at-top
      return int(faiss.serialize_index(self.faiss_index).nbytes)
    return int(self.vectors.nbytes)
