"""Embedding export (`vlm_jax.embed`), vector search (`vlm_jax.search`, `vlm_jax.index`) and
`Model.search`: exact search against numpy, the approximate index's recall, shards that resume
without recomputation, and refusals (another model's index, other settings in a folder)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlm_jax import embed as embed_lib
from vlm_jax import search

from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import
from data_fixtures import write_tar_and_jsonl
import train_utils
from train_utils import REPO, subprocess_env

pytestmark = pytest.mark.xdist_group("retrieval")


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_equals_numpy_brute_force():
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(1000, 24)).astype(np.float32)
  queries = rng.normal(size=(9, 24)).astype(np.float32)
  vectors[500] = vectors[20]                     # a tie: the lower position comes first
  queries[0] = vectors[20]
  full = queries @ vectors.T
  want = np.argsort(-full, axis=1, kind="stable")[:, :12]
  # Blocks of 300 (the last ragged), fewer than k in none, the merged top-k across blocks.
  scores, positions = search.exact_search(queries, vectors, 12, block_rows=300)
  np.testing.assert_array_equal(positions, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), rtol=1e-5,
                             atol=1e-5)
  assert positions[0, 0] == 20 and positions[0, 1] == 500
  # More places than vectors: the rest is -inf / -1.
  scores, positions = search.exact_search(queries[:2], vectors[:3], 5)
  assert (positions[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
  assert sorted(positions[0, :3]) == [0, 1, 2]


def test_approximate_index_reaches_its_recall_and_round_trips(tmp_path):
  rng = np.random.default_rng(1)
  vectors = _unit(rng.normal(size=(20000, 32)).astype(np.float32))
  queries = _unit(rng.normal(size=(200, 32)).astype(np.float32))
  model = {"embed_dim": 32, "model_id": "m"}
  rows = [{"id": f"v{i}"} for i in range(len(vectors))]
  index = search.Index.build(vectors, rows, model=model, kind="images", approximate=True,
                             target_recall=0.95)
  assert 1 <= index.nprobe <= index.faiss_index.nlist
  _, exact = search.exact_search(queries, vectors, 10)
  scores, found = index.search(queries, 10)
  # Random vectors are the hardest case; fresh queries land near the calibrated recall.
  assert search.recall_at_k(found, exact) >= 0.9
  assert (np.diff(scores, axis=1) <= 1e-6).all()             # best first
  loaded = search.Index.load(index.save(str(tmp_path / "ivf")))
  assert loaded.approximate and loaded.nprobe == index.nprobe and loaded.rows == rows
  np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)
  with pytest.raises(FileExistsError, match="already exists"):
    index.save(str(tmp_path / "ivf"))
  with pytest.raises(ValueError, match="no vectors to index"):
    search.Index.build(np.zeros((0, 32), np.float32), [], model=model, kind="images")


def _clustered(n, dim, seed, centres=100):
  rng = np.random.default_rng(seed)
  c = np.random.default_rng(123).normal(size=(centres, dim)).astype(np.float32)
  return _unit(c[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32))


def test_rerank_orders_candidates_by_exact_scores():
  rng = np.random.default_rng(2)
  vectors = _unit(rng.normal(size=(50, 8)).astype(np.float32))
  queries = _unit(rng.normal(size=(3, 8)).astype(np.float32))
  candidates = np.array([[5, 9, 1, -1, 7], [2, 49, 3, 4, 0], [-1, -1, 6, -1, -1]])
  scores, positions = search.rerank(queries, candidates, vectors, k=3, chunk=2)
  full = queries @ vectors.T
  for q in range(2):
    want = sorted((c for c in candidates[q] if c >= 0), key=lambda c: -full[q, c])[:3]
    assert positions[q].tolist() == want
    np.testing.assert_allclose(scores[q], full[q, want], rtol=1e-5)
  # Fewer real candidates than k: the rest is -inf / -1.
  assert positions[2].tolist() == [6, -1, -1] and np.isneginf(scores[2, 1:]).all()


def test_product_quantised_index_reranks_from_disk(tmp_path):
  """IVF-PQ: codes of 8 bytes for 32-d vectors (16x smaller than the vectors), candidates
  re-ranked by the exact vectors memory-mapped from the index folder."""
  vectors, queries = _clustered(20000, 32, 3), _clustered(300, 32, 4)
  model = {"embed_dim": 32, "model_id": "m"}
  rows = [{"id": f"v{i}"} for i in range(len(vectors))]
  index = search.Index.build(vectors, rows, model=model, kind="images", pq_bytes=8,
                             target_recall=0.9)
  assert index.backend == "faiss_ivf_pq" and index.rerank_factor == search.DEFAULT_RERANK
  _, exact = search.exact_search(queries, vectors, 10)
  _, found = index.search(queries, 10)
  assert search.recall_at_k(found, exact) >= 0.85
  assert index.nbytes() < vectors.nbytes / 4
  loaded = search.Index.load(index.save(str(tmp_path / "pq")))
  assert isinstance(loaded.vectors, np.memmap) and loaded.rerank_factor == index.rerank_factor
  np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)
  with open(tmp_path / "pq" / "index.json") as f:
    assert json.load(f)["backend"] == "faiss_ivf_pq"
  # Without re-ranking the codes alone cannot reach a high target: the build says what they do.
  with pytest.raises(search.UnreachableRecall, match=r"recall@10 0\.\d+ with every one of the "
                                                     r"\d+ lists searched, below the target 0.99"):
    search.Index.build(vectors, rows, model=model, kind="images", pq_bytes=8, rerank_factor=0,
                       target_recall=0.99)
  with pytest.raises(ValueError, match="pq_bytes=7 must divide the embedding size 32"):
    search.Index.build(vectors, rows, model=model, kind="images", pq_bytes=7)
  with pytest.raises(ValueError, match="needs at least that many vectors; 100 given"):
    search.Index.build(vectors[:100], rows[:100], model=model, kind="images", pq_bytes=8)
  with pytest.raises(ValueError, match="re-ranking is for an index of compressed vectors"):
    search.Index.build(vectors, rows, model=model, kind="images", approximate=True,
                       rerank_factor=4)


@pytest.fixture(scope="module")
def clip_run(shapes_data_dir, shapes_tokenizer, tmp_path_factory):
  """A tiny CLIP trained for 4 steps, loaded for inference."""
  from vlm_jax import inference, train  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("retrieval")
  tok_path = str(base / "tokenizer.model")
  shapes_tokenizer.save(tok_path)
  config = train_utils.tiny_config("clip", shapes_data_dir, tok_path, evals__run="")
  workdir = str(base / "run")
  train.train_and_evaluate(config, workdir)
  return workdir, inference.load(workdir)


def test_embed_resumes_without_recomputing_and_matches_the_model(clip_run, tmp_path):
  workdir, model = clip_run
  data = embed_lib.split_data_config(model.config, "eval")
  out = str(tmp_path / "emb")
  # A run stopped after 2 of the 4 shards (64 test images, 20 a shard).
  first = embed_lib.embed(model, data, out, shard_size=20, max_shards=2, progress=False)
  assert sorted(first["shards"]) == ["0", "1"] and not first["complete"]
  with pytest.raises(ValueError, match="unfinished"):
    embed_lib.read(out, "images")
  stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns
            for name in ("images-00000.npy", "texts-00001.npy", "rows-00001.jsonl")}
  done = embed_lib.embed(model, data, out, shard_size=20, progress=False)
  assert done["complete"] and [done["shards"][str(i)]["images"] for i in range(4)] == \
      [20, 20, 20, 4]
  assert stamps == {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in stamps}
  # The command line, in one go on one device, writes the same vectors.
  straight = str(tmp_path / "straight")
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.embed", f"--workdir={workdir}",
                         f"--out={straight}", "--shard_size=20"], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["complete"] and summary["images"] == 64 and summary["skipped"] == 0
  for kind in ("images", "texts"):
    a, rows_a, _ = embed_lib.read(out, kind)
    b, rows_b, _ = embed_lib.read(straight, kind)
    assert rows_a == rows_b
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Against the inference API on the same images and captions.
  images, image_rows, manifest = embed_lib.read(out, "images")
  texts, text_rows, _ = embed_lib.read(out, "texts")
  assert manifest["model"] == model.identity() and images.shape == (64, 32)
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(data, "eval")
  raw = [source[r["row"]] for r in map(json.loads, open(os.path.join(out, "rows-00002.jsonl")))]
  assert [x["key"] for x in raw] == [r["id"] for r in image_rows[40:60]]
  np.testing.assert_allclose(images[40:60], model.encode_images(
      model.load_images([x["image"] for x in raw])), atol=1e-5)
  captions = [r["caption"] for r in text_rows[:7]]
  np.testing.assert_allclose(texts[:7], model.encode_texts(model.tokenize(captions)), atol=1e-5)
  # Other settings are refused, not mixed in.
  with pytest.raises(ValueError, match="shard_size: 20 there, 16 now"):
    embed_lib.embed(model, data, out, shard_size=16, progress=False)


def test_embed_reads_tar_shards_one_output_shard_per_tar_and_resumes(clip_run, tmp_path):
  """Tar shards embed to what the same images and captions give from a jsonl file, one output
  shard per tar file; a stopped run continues with the first unfinished tar; a truncated tar
  gives its samples up to the damage and one skipped example."""
  _, model = clip_run
  pattern = write_tar_and_jsonl(str(tmp_path / "data"), 3, 7)
  data = embed_lib.split_data_config(model.config, "eval")
  tars = type(data)(dict(data.to_dict(), source="wds", eval_shards=pattern))
  out = str(tmp_path / "tars")
  first = embed_lib.embed(model, tars, out, max_shards=1, progress=False)
  assert sorted(first["shards"]) == ["0"] and not first["complete"] and \
      first["num_shards"] == 3
  stamp = os.stat(os.path.join(out, "images-00000.npy")).st_mtime_ns
  done = embed_lib.embed(model, tars, out, shard_size=5, progress=False)   # (ignored for tars)
  assert done["complete"] and [done["shards"][str(i)]["images"] for i in range(3)] == [7, 7, 7]
  assert os.stat(os.path.join(out, "images-00000.npy")).st_mtime_ns == stamp
  jsonl = type(data)(dict(data.to_dict(), source="jsonl",
                          eval_jsonl=str(tmp_path / "data" / "captions.jsonl")))
  reference = str(tmp_path / "jsonl")
  embed_lib.embed(model, jsonl, reference, shard_size=7, progress=False)
  for kind in ("images", "texts"):
    got, rows, _ = embed_lib.read(out, kind)
    want, want_rows, _ = embed_lib.read(reference, kind)
    assert got.shape == want.shape == (21, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert rows[8]["id"] == "00001.tar/k001#0" and rows[8]["caption"] == "a red circle number 8"
  assert [r["caption"] for r in rows] == [r["caption"] for r in want_rows]

  # A fourth tar: the third one cut in half.
  whole = (tmp_path / "data" / "00002.tar").read_bytes()
  (tmp_path / "data" / "00003.tar").write_bytes(whole[:len(whole) // 2])
  damaged = type(data)(dict(tars.to_dict(), eval_shards=pattern.replace("00002", "00003")))
  result = embed_lib.embed(model, damaged, str(tmp_path / "damaged"), progress=False)
  assert result["complete"] and result["shards"]["3"]["images"] < 7
  assert result["skipped"] == {"3": 1}


@pytest.fixture(scope="module")
def eval_embeddings(clip_run, tmp_path_factory):
  """The run's eval split (64 images) embedded in 2 shards."""
  _, model = clip_run
  emb = str(tmp_path_factory.mktemp("eval_embeddings") / "emb")
  embed_lib.embed(model, embed_lib.split_data_config(model.config, "eval"), emb,
                  shard_size=32, progress=False)
  return emb


def test_search_finds_a_caption_and_refuses_another_models_index(clip_run, eval_embeddings,
                                                                  tmp_path):
  workdir, model = clip_run
  emb = eval_embeddings
  from vlm_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  index = index_lib.build(emb, "texts", str(tmp_path / "captions"))
  _, rows, _ = embed_lib.read(emb, "texts")
  query = rows[5]["caption"]
  hits = model.search(index, texts=[query], k=4)[0]
  assert len(hits) == 4 and hits[0]["caption"] == query and hits[0]["score"] > 0.99
  assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
  # An image query against the image index finds that image first.
  images = index_lib.build(emb, "images", str(tmp_path / "images"))
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(embed_lib.split_data_config(model.config, "eval"), "eval")
  pixels = model.load_images([source[3]["image"]])
  assert model.search(images, images=pixels, k=1)[0][0]["id"] == source[3]["key"]
  # The command line prints ranked hits.
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.index", "query",
                         f"--index={tmp_path / 'captions'}", f"--workdir={workdir}",
                         f"--text={query}", "--k=3"], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == f"query: {query}" and len(lines) == 4 and query in lines[1]
  # An index of another model (embedding size and id differ) is refused, naming both.
  other = search.Index.build(np.eye(8, dtype=np.float32), [{"id": i} for i in range(8)],
                             model={"embed_dim": 8, "model_id": "0123", "workdir": "elsewhere"},
                             kind="texts")
  with pytest.raises(search.ModelMismatch, match=r"embed_dim 8 \(index\) vs 32 \(query model\)"
                     r".*model_id '0123' \(index\)"):
    model.search(other, texts=["a red circle"])


def test_neighbours_are_the_best_captions_of_other_images(eval_embeddings, tmp_path):
  emb = eval_embeddings
  from vlm_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  captions = index_lib.build(emb, "texts", str(tmp_path / "captions"))
  out = str(tmp_path / "neighbours.jsonl")
  assert index_lib.neighbours(captions, emb, 3, out) == 64
  found = [json.loads(line) for line in open(out)]
  images, image_rows, _ = embed_lib.read(emb, "images")
  texts, text_rows, _ = embed_lib.read(emb, "texts")
  # Brute force: every caption of another image, by score.
  scores = images @ texts.T
  for i, (row, got) in enumerate(zip(image_rows, found)):
    assert got["id"] == row["id"] and len(got["neighbours"]) == 3
    others = [j for j, t in enumerate(text_rows) if t["image"] != row["id"]]
    best = sorted(others, key=lambda j: -scores[i, j])[:3]
    # The same scores (captions with equal scores, e.g. one text under two images, may swap).
    np.testing.assert_allclose([n["score"] for n in got["neighbours"]], scores[i, best],
                               atol=1e-5)
    by_id = {t["id"]: t for t in text_rows}
    assert all(by_id[n["id"]]["image"] != row["id"] and by_id[n["id"]]["caption"] == n["caption"]
               for n in got["neighbours"]), i
  # A compressed (IVF-PQ, re-ranked) caption index built on the command line gives the same
  # neighbours' scores.
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.index", "build", f"--embeddings={emb}",
                         "--kind=texts", f"--out={tmp_path / 'pq'}", "--pq_bytes=8",
                         "--target_recall=0.9"], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["backend"] == "faiss_ivf_pq"
  pq_out = str(tmp_path / "pq_neighbours.jsonl")
  index_lib.neighbours(search.Index.load(str(tmp_path / "pq")), emb, 3, pq_out)
  for exact_row, pq_row in zip(found, (json.loads(line) for line in open(pq_out))):
    np.testing.assert_allclose([n["score"] for n in pq_row["neighbours"]],
                               [n["score"] for n in exact_row["neighbours"]], atol=1e-5)
  # Another model's embeddings are refused, naming both.
  manifest = json.load(open(os.path.join(emb, "manifest.json")))
  other = str(tmp_path / "other")
  os.makedirs(other)
  for name in os.listdir(emb):
    if name != "manifest.json":
      os.link(os.path.join(emb, name), os.path.join(other, name))
  manifest["model"]["model_id"] = "0123"
  json.dump(manifest, open(os.path.join(other, "manifest.json"), "w"))
  with pytest.raises(search.ModelMismatch, match="model_id"):
    index_lib.neighbours(captions, other, 3, str(tmp_path / "bad.jsonl"))
