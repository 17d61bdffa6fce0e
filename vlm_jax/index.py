r"""Build a vector index from `vlm_jax.embed` output, and query it with the same model.

  python -m vlm_jax.index build --embeddings runs/clip/embeddings --kind texts \
      --out runs/clip/caption_index [--approximate --nlist 4096 --target_recall 0.95]
      [--pq_bytes 32 --rerank 50]
  python -m vlm_jax.index query --index runs/clip/caption_index --workdir runs/clip \
      --text "a red circle" -k 10
  python -m vlm_jax.index query --index runs/clip/image_index --workdir runs/clip \
      --image x.png -k 5

  python -m vlm_jax.index neighbours --index runs/clip/caption_index \
      --embeddings runs/clip/train_embeddings --k 4 --out runs/clip/train_neighbours.jsonl

`build` indexes the image (`--kind images`) or caption (`--kind texts`) embeddings: exact search
(every vector, blocked matrix products on the accelerator when there is one) by default, or a
faiss inverted-file index with `--approximate` for corpora past a few million vectors, with
`--pq_bytes N` one whose lists hold N-byte codes instead of the vectors, its candidates
re-ranked by the exact vectors read from disk (see `vlm_jax.search`). `query` embeds the text
or image with the checkpoint in --workdir, refuses
an index built with another model (naming both), and prints one line per hit: rank, score, id,
caption (text index) or the image's captions (image index); `--json` prints JSON lines instead.
`neighbours` writes, for every image of an embeddings folder, the k nearest captions of a
caption index (a datastore), never the image's own captions (those whose image id is the
query's), as JSON lines {"id", "neighbours": [{"id", "caption", "score"}, ...]}: the retrieved
captions a retrieval-augmented captioner is trained and evaluated with.
"""
from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from vlm_jax import cli
from vlm_jax import embed as embed_lib
from vlm_jax import search

_FLAGS = {}


def define_flags():
  _FLAGS["embeddings"] = flags.DEFINE_string("embeddings", None,
                                              "build / neighbours: a vlm_jax.embed folder.")
  _FLAGS["kind"] = flags.DEFINE_enum("kind", "images", list(embed_lib.KINDS),
                                     "build: index the image or the caption embeddings.")
  _FLAGS["out"] = flags.DEFINE_string("out", None, "build: the index folder to write; "
                                      "neighbours: the .jsonl file to write.")
  _FLAGS["approximate"] = flags.DEFINE_bool("approximate", False,
                                            "build: a faiss IVF index instead of exact search.")
  _FLAGS["nlist"] = flags.DEFINE_integer("nlist", None, "build: IVF lists (default 4 sqrt(N)).")
  _FLAGS["nprobe"] = flags.DEFINE_integer("nprobe", None, "build: lists searched per query "
                                          "(default: calibrated to --target_recall).")
  _FLAGS["target_recall"] = flags.DEFINE_float("target_recall", 0.95,
                                               "build: recall@10 the calibrated nprobe reaches.")
  _FLAGS["pq_bytes"] = flags.DEFINE_integer(
      "pq_bytes", None, "build: product-quantised codes of this many bytes per vector in the "
      "IVF lists (implies --approximate; must divide the embedding size).")
  _FLAGS["rerank"] = flags.DEFINE_integer(
      "rerank", None, "build, with --pq_bytes: re-rank this many candidates per result by "
      f"the exact vectors, kept on disk (default {search.DEFAULT_RERANK}; 0: keep none).")
  _FLAGS["index"] = flags.DEFINE_string("index", None, "query / neighbours: the index folder.")
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "query: the model's run directory.")
  _FLAGS["step"] = flags.DEFINE_integer("step", None, "query: checkpoint step (default latest).")
  _FLAGS["text"] = flags.DEFINE_multi_string("text", [], "query: a text (repeatable).")
  _FLAGS["image"] = flags.DEFINE_multi_string("image", [], "query: an image file (repeatable).")
  _FLAGS["k"] = flags.DEFINE_integer("k", 10, "query / neighbours: hits per query.")
  _FLAGS["json"] = flags.DEFINE_bool("json", False, "query: print JSON lines.")


def build(embeddings: str, kind: str, out: str, *, approximate: bool = False, nlist=None,
          nprobe=None, target_recall: float = 0.95, pq_bytes=None,
          rerank_factor=None) -> search.Index:
  vectors, rows, manifest = embed_lib.read(embeddings, kind)
  index = search.Index.build(vectors, rows, model=manifest["model"], kind=kind,
                             approximate=approximate, nlist=nlist, nprobe=nprobe,
                             target_recall=target_recall, pq_bytes=pq_bytes,
                             rerank_factor=rerank_factor)
  index.save(out)
  return index


def neighbours(index: search.Index, embeddings: str, k: int, out: str,
               block: int = 4096) -> int:
  """For each image of `embeddings`, `k` retrieved captions that are not its own, written to
  `out` (JSON lines, in the embeddings' order); returns the number of images.

  A caption index (`--kind texts`) gives the k captions nearest to the image (SmallCap's
  image-to-text retrieval); an image index (`--kind images`) the first caption of each of the k
  nearest other images, so a datastore of the same images with other captions (another
  style, another language) changes the words retrieved and not which images they describe."""
  if index.kind not in ("texts", "images"):
    raise ValueError(f"neighbours: {index.path} indexes {index.kind}; it must be a caption or "
                     "an image index (`index build --kind texts|images`)")
  vectors, rows, manifest = embed_lib.read(embeddings, "images")
  search.check_model(index.model, manifest["model"], index.path or "the index")
  if len(index) == 0:
    raise ValueError(f"neighbours: {index.path} holds no {index.kind}: an empty datastore")
  if index.kind == "texts":
    # An image has at most max_captions captions in a datastore made by vlm_jax.embed; fetching
    # that many more than k leaves k after its own are dropped (fewer only if it is small).
    fetch = min(len(index), k + int(manifest.get("max_captions", 5)))
    own = lambda hit_row, image: hit_row.get("image") == image
    hit = lambda r, s: dict(id=r["id"], caption=r["caption"], score=float(s))
  else:
    fetch = min(len(index), k + 1)      # the image itself, when it is in the datastore
    own = lambda hit_row, image: hit_row["id"] == image or not hit_row.get("captions")
    hit = lambda r, s: dict(id=r["id"], caption=r["captions"][0], captions=r["captions"],
                            score=float(s))
  lines = []
  for start in range(0, len(rows), block):
    scores, positions = index.search(vectors[start:start + block], fetch)
    for row, score_row, position_row in zip(rows[start:start + block], scores, positions):
      hits = [hit(index.rows[p], s) for s, p in zip(score_row, position_row)
              if p >= 0 and not own(index.rows[p], row["id"])][:k]
      lines.append(json.dumps({"id": row["id"], "neighbours": hits}))
  from vlm_jax import files  # pylint: disable=g-import-not-at-top
  files.write_lines(out, lines)
  return len(lines)


def _describe(hit: dict) -> str:
  if "caption" in hit:
    return f"{hit['id']}  {hit['caption']}"
  return f"{hit['id']}  {' | '.join(hit.get('captions') or [])}"


def main(argv):
  if len(argv) != 2 or argv[1] not in ("build", "query", "neighbours"):
    raise app.UsageError("usage: python -m vlm_jax.index build|query|neighbours [flags]")
  cli.start()
  try:
    if argv[1] == "neighbours":
      for name in ("index", "embeddings", "out"):
        if not _FLAGS[name].value:
          raise ValueError(f"index neighbours: --{name} is required")
      count = neighbours(search.Index.load(_FLAGS["index"].value), _FLAGS["embeddings"].value,
                         _FLAGS["k"].value, _FLAGS["out"].value)
      print(json.dumps({"out": _FLAGS["out"].value, "images": count, "k": _FLAGS["k"].value}),
            flush=True)
      return
    if argv[1] == "build":
      for name in ("embeddings", "out"):
        if not _FLAGS[name].value:
          raise ValueError(f"index build: --{name} is required")
      index = build(_FLAGS["embeddings"].value, _FLAGS["kind"].value, _FLAGS["out"].value,
                    approximate=_FLAGS["approximate"].value, nlist=_FLAGS["nlist"].value,
                    nprobe=_FLAGS["nprobe"].value, target_recall=_FLAGS["target_recall"].value,
                    pq_bytes=_FLAGS["pq_bytes"].value, rerank_factor=_FLAGS["rerank"].value)
      print(json.dumps({"out": index.path, "kind": index.kind, "count": len(index),
                        "backend": index.backend, "approximate": index.approximate,
                        "nprobe": index.nprobe, "rerank_factor": index.rerank_factor,
                        "bytes": index.nbytes()}), flush=True)
      return
    for name in ("index", "workdir"):
      if not _FLAGS[name].value:
        raise ValueError(f"index query: --{name} is required")
    texts, images = _FLAGS["text"].value, _FLAGS["image"].value
    if bool(texts) == bool(images):
      raise ValueError("index query: pass --text or --image (one kind of query)")
    from vlm_jax import inference  # pylint: disable=g-import-not-at-top
    index = search.Index.load(_FLAGS["index"].value)
    model = inference.load(_FLAGS["workdir"].value, _FLAGS["step"].value)
    results = model.search(index, texts=texts or None, images=images or None,
                           k=_FLAGS["k"].value)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    cli.fail(e)
  sys.stdout.flush()
  for query, hits in zip(texts or images, results):
    if _FLAGS["json"].value:
      print(json.dumps({"query": query, "hits": hits}))
      continue
    print(f"query: {query}")
    for rank, hit in enumerate(hits, 1):
      print(f"  {rank:3d}  {hit['score']:.4f}  {_describe(hit)}")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  cli.run(main)
