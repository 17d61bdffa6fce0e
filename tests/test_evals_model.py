"""Evals with a real (tiny, randomly initialised) CoCa on the tiny shapes split.

Checks: KV-cache decoding of the real decoder equals full recomputation; `run_evals` produces
every metric, counts each test example exactly once with a padded last batch, gives the same
numbers on an 8-device mesh as on one device, agrees with a direct un-sharded computation of
zero-shot accuracy, and rejects bad eval names / tasks without the predict functions an eval
needs with clear errors.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import
from train_utils import REPO
from vlm_jax import config_utils
from vlm_jax import decoding as decode
from vlm_jax import evals
from vlm_jax import runtime
from vlm_jax import sharding
from vlm_jax import tasks
from vlm_jax.evals import templates
from vlm_jax.evals import zeroshot
from vlm_jax.models import init_cache

# One worker builds the module fixtures once (xdist would otherwise build them on both).
pytestmark = pytest.mark.xdist_group("evals_model")

NUM_TEST = 64   # shapes/tiny test split


def tiny_config(data_dir, tokenizer, kind="coca"):
  return config_utils.load_config(f"{REPO}/configs/shapes_{kind}.py:tiny", {
      "data.data_dir": data_dir, "model.text.vocab_size": tokenizer.vocab_size,
      "evals.run": "zeroshot,retrieval,caption" if kind == "coca" else "zeroshot,retrieval",
      "evals.batch_size": 24,     # 64 = 24 + 24 + 16 (+8 padding)
      "evals.caption.metrics": "bleu,cider,rouge", "evals.caption.tokenizer": "python"})


def init_params(config, seed=0):
  task = tasks.get(config.task)
  model = task.build_model(config)
  params = flax.linen.unbox(task.init_params(model, config, jax.random.key(seed)))
  return model, params


def run_evals(config, model, params, mesh, tokenizer, step=None):
  ctx = evals.EvalContext.create(config, tasks.get(config.task), model, params, mesh, tokenizer)
  with ctx.scope():
    return evals.run_evals(ctx, step)


@pytest.fixture(scope="module")
def coca(shapes_data_dir, shapes_tokenizer):
  config = tiny_config(shapes_data_dir, shapes_tokenizer)
  model, params = init_params(config)
  return config, model, params


def test_kv_cache_decoding_equals_full_recomputation(coca, shapes_tokenizer):
  """The real decoder's KV cache (one token per call) == full teacher-forced recomputation.

  (Beam search == its full-recomputation counterpart is checked on a hand-written model in
  test_decode.py; the search code is the same.)
  """
  config, model, params = coca
  tok = shapes_tokenizer
  b, max_len = 3, 8
  images = jax.random.normal(jax.random.key(1), (b, 32, 32, 3))
  image_tokens = model.apply({"params": params}, images, method="image_tokens")

  # Step logits: feeding a fixed sequence token by token through the cache gives the logits of
  # one full teacher-forced pass.
  text = jnp.asarray(tok.encode(["a small red circle in the top left."] * b, max_len))
  full = jax.jit(lambda t: model.apply({"params": params}, image_tokens, t, method="decode"))
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, image_tokens, t,
                                          decode=True, method="decode", mutable=["cache"]))
  full_logits = full(text)
  cache = init_cache(model, {"params": params}, image_tokens, max_len)
  for t in range(max_len):
    logits, mutated = step(cache, text[:, t:t + 1])
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[:, 0], full_logits[:, t], atol=2e-5, rtol=2e-5)

  # Whole greedy search: cached == the same search recomputing the full prefix every step.
  kw = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  generate = tasks.get(config.task).predict_fns(config, model)["generate"]
  cached, _ = jax.jit(lambda p, b: generate(p, b, max_len=max_len, **kw))(params,
                                                                           {"image": images})
  step_fn, cache0 = decode.full_recompute_logits_fn(lambda seq: full(seq[:, :max_len]), b,
                                                    max_len, tok.pad_id)
  ref = jax.jit(lambda c: decode.greedy(step_fn, c, batch_size=b, max_len=max_len, **kw))(cache0)
  np.testing.assert_array_equal(cached, ref.tokens)
  # A random model does not emit the same token everywhere: the comparison is not vacuous.
  assert len(np.unique(np.asarray(cached))) > 2


@pytest.mark.slow   # three meshes, each compiling the eval functions
def test_run_evals_counts_every_example_once_and_is_mesh_invariant(coca, shapes_data_dir,
                                                                   shapes_tokenizer):
  config, model, params = coca
  mesh8 = sharding.make_mesh(config.mesh)                       # data=8
  assert mesh8.devices.size == 8
  m8 = run_evals(config, model, params, mesh8, shapes_tokenizer, step=0)

  expected = {f"zeroshot/shapes/{k}" for k in ("top1", "top5", "mean_per_class", "num_examples")}
  expected |= {f"retrieval/shapes/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  expected |= {f"caption/shapes/{k}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider",
                                                "rouge_l", "nll", "perplexity", "num_images")}
  assert expected <= set(m8)
  assert all(np.isfinite(v) for v in m8.values())
  # Every test example exactly once (3 batches of 24, the last with 8 padding rows).
  test_split = tfds.data_source("shapes/tiny", split="test", data_dir=shapes_data_dir)
  n_captions = sum(min(len(test_split[i]["captions"]), 5) for i in range(len(test_split)))
  assert m8["zeroshot/shapes/num_examples"] == NUM_TEST
  assert m8["retrieval/shapes/num_images"] == NUM_TEST
  assert m8["retrieval/shapes/num_captions"] == n_captions
  assert m8["caption/shapes/num_images"] == NUM_TEST
  # A random model is near chance but the perplexity is a real number of the right scale.
  assert 1.0 < m8["caption/shapes/perplexity"] < 10 * shapes_tokenizer.vocab_size

  # One device, another batch size (no padding): the same metrics.
  config1 = tiny_config(shapes_data_dir, shapes_tokenizer)
  config1.evals.batch_size = 64
  config1.evals.run = "zeroshot,retrieval"
  mesh1 = sharding.make_mesh(config1.mesh, jax.devices()[:1])
  m1 = run_evals(config1, model, params, mesh1, shapes_tokenizer)
  for k, v in m1.items():
    assert v == pytest.approx(m8[k], abs=1e-6), k

  # Deterministic: a second run gives bit-identical numbers.
  assert run_evals(config1, model, params, mesh1, shapes_tokenizer) == m1

  # FSDP + tensor parallel mesh with the params sharded as the trainer shards them.
  config3 = tiny_config(shapes_data_dir, shapes_tokenizer)
  config3.mesh.data, config3.mesh.fsdp, config3.mesh.tensor = 2, 2, 2
  config3.evals.run = "zeroshot"
  mesh3 = sharding.make_mesh(config3.mesh)
  abstract, _ = runtime.abstract_params(config3, tasks.get(config3.task), model, mesh3)
  sharded = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded))
  m3 = run_evals(config3, model, sharded, mesh3, shapes_tokenizer)
  for k, v in m3.items():
    assert v == pytest.approx(m8[k], abs=1e-6), k


def test_zeroshot_equals_direct_computation(coca, shapes_data_dir, shapes_tokenizer):
  """The sharded, padded, batched eval vs a plain un-jitted pass over the whole split."""
  config, model, params = coca
  from vlm_jax.data import pipeline   # pylint: disable=g-import-not-at-top
  from vlm_jax.data import ops   # pylint: disable=g-import-not-at-top
  it = pipeline.make_eval_iterator(config.data, [ops.Label()], batch_size=NUM_TEST)
  batch = next(it)
  assert batch["mask"].all()
  img = model.apply({"params": params}, batch["image"], method="encode_images")
  names = templates.classnames_for("shapes", [str(n) for n in
                                              tfds.builder("shapes/tiny",
                                                           data_dir=shapes_data_dir)
                                              .info.features["label"].names])
  tmpl = templates.get_templates("shapes")
  prompts = shapes_tokenizer.encode(zeroshot.prompts(names, tmpl),
                                    config.model.text.context_length)
  txt = model.apply({"params": params}, prompts, method="encode_texts")
  classifier = zeroshot.classifier_from_embeddings(np.asarray(txt).reshape(len(names),
                                                                           len(tmpl), -1))
  pred = np.argmax(np.asarray(img) @ classifier.T, axis=1)
  top1 = float(np.mean(pred == batch["label"]))

  config.evals.run = "zeroshot"
  mesh = sharding.make_mesh(config.mesh)
  m = run_evals(config, model, params, mesh, shapes_tokenizer)
  assert m["zeroshot/shapes/top1"] == pytest.approx(top1)


def test_bad_eval_names_and_missing_predict_functions(shapes_data_dir, shapes_tokenizer):
  config = tiny_config(shapes_data_dir, shapes_tokenizer, kind="clip")
  model, params = init_params(config)
  mesh = sharding.make_mesh(config.mesh)
  config.evals.run = "zeroshot,retreival"
  with pytest.raises(ValueError, match="evals.run: unknown eval 'retreival'; expected one of"):
    run_evals(config, model, params, mesh, shapes_tokenizer)
  config.evals.run = "caption"
  with pytest.raises(ValueError, match="'generate', which task 'contrastive' does not provide"):
    run_evals(config, model, params, mesh, shapes_tokenizer)
  config.evals.run = ""
  assert run_evals(config, model, params, mesh, shapes_tokenizer) == {}


def test_jsonl_dataset_zeroshot_and_retrieval(coca, shapes_data_dir, shapes_tokenizer, tmp_path):
  """A captions.jsonl + image folder eval set (several captions per image, labels, class names
  from the config), with one undecodable image that the pipeline skips."""
  import json   # pylint: disable=g-import-not-at-top
  from PIL import Image   # pylint: disable=g-import-not-at-top
  config, model, params = coca
  split = tfds.data_source("shapes/tiny", split="test", data_dir=shapes_data_dir)
  n = 10
  with open(tmp_path / "captions.jsonl", "w") as f:
    for i in range(n):
      ex = split[i]
      Image.fromarray(np.asarray(ex["image"])).save(tmp_path / f"{i}.png")
      caps = [c.decode() if isinstance(c, bytes) else str(c) for c in ex["captions"]]
      f.write(json.dumps({"image": f"{i}.png", "caption": caps, "label": int(ex["label"])}) + "\n")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    f.write(json.dumps({"image": "bad.png", "caption": "a red circle.", "label": 0}) + "\n")
  names = ",".join(str(x) for x in tfds.builder("shapes/tiny", data_dir=shapes_data_dir)
                   .info.features["label"].names)
  cfg = tiny_config(shapes_data_dir, shapes_tokenizer)
  cfg.evals.run = "zeroshot,retrieval"
  cfg.evals.batch_size = 8
  for entry in (cfg.evals.zeroshot, cfg.evals.retrieval):
    entry.source, entry.jsonl, entry.tag = "jsonl", str(tmp_path / "captions.jsonl"), "mini"
  cfg.evals.zeroshot.classnames = names
  cfg.evals.zeroshot.templates = "a {}."
  mesh = sharding.make_mesh(cfg.mesh)
  m = run_evals(cfg, model, params, mesh, shapes_tokenizer)
  assert m["zeroshot/mini/num_examples"] == n
  assert m["retrieval/mini/num_images"] == n
  assert m["retrieval/mini/num_captions"] == sum(min(len(split[i]["captions"]), 5)
                                                  for i in range(n))
  assert 0.0 <= m["zeroshot/mini/top1"] <= m["zeroshot/mini/top5"] <= 1.0
  assert m["retrieval/mini/t2i_r10"] == 1.0   # only 10 images: each is in every top 10


def test_tfds_classification_dataset_by_name(coca, shapes_tokenizer, shapes_data_dir):
  """`zeroshot_cifar10` (a TFDS dataset by name, built-in class names, the 80 CLIP templates),
  on mock cifar10 records."""
  config, model, params = coca
  cfg = tiny_config(shapes_data_dir, shapes_tokenizer)
  cfg.evals.run = "zeroshot_cifar10"
  mesh = sharding.make_mesh(cfg.mesh)
  with tfds.testing.mock_data(num_examples=20):
    m = run_evals(cfg, model, params, mesh, shapes_tokenizer)
  assert set(m) == {f"zeroshot/cifar10/{k}" for k in ("top1", "top5", "mean_per_class",
                                                       "num_examples")}
  assert m["zeroshot/cifar10/num_examples"] == 20
  assert 0.0 <= m["zeroshot/cifar10/top1"] <= m["zeroshot/cifar10/top5"] <= 1.0


def test_linear_probe_equals_direct_computation(coca, shapes_data_dir, shapes_tokenizer):
  """The evaluator's features (the image tower's pooled output, train and test splits through
  the sharded padded pipeline) and classifier equal a plain pass over both splits."""
  from vlm_jax.evals import linear_probe   # pylint: disable=g-import-not-at-top
  config, model, params = coca
  cfg = tiny_config(shapes_data_dir, shapes_tokenizer)
  cfg.evals.run = "linear_probe"
  cfg.evals.linear_probe.max_train_examples = 100
  m = run_evals(cfg, model, params, sharding.make_mesh(cfg.mesh), shapes_tokenizer)
  assert m["linear_probe/shapes/num_train"] == 100 and m["linear_probe/shapes/num_test"] == 64

  def split(name, n):
    data = tfds.data_source("shapes/tiny", split=name, data_dir=shapes_data_dir)
    from vlm_jax.data import pipeline   # pylint: disable=g-import-not-at-top
    pre = pipeline.Preprocess(cfg.data, [], train=False)
    images = np.stack([pre({"image": data[i]["image"]})["image"] for i in range(n)])
    labels = np.array([int(data[i]["label"]) for i in range(n)])
    return np.asarray(model.apply({"params": params}, images, method="image_features")), labels
  train_x, train_y = split("train", 100)
  test_x, test_y = split("test", 64)
  want = linear_probe.linear_probe_top1(train_x, train_y, test_x, test_y, 20,
                                        tuple(cfg.evals.linear_probe.l2_regs), 0.2)
  assert m["linear_probe/shapes/l2"] == want["l2"]
  assert m["linear_probe/shapes/top1"] == pytest.approx(want["top1"], abs=1 / 64)


def test_classification_eval_equals_direct_computation(shapes_data_dir):
  config = config_utils.load_config(f"{REPO}/configs/shapes_classify.py:tiny", {
      "data.data_dir": shapes_data_dir, "model.num_classes": 20, "evals.batch_size": 24,
      "model.image.width": 16, "model.image.num_heads": 2, "model.image.depth": 1,
      "model.head_zero_init": False})     # a random head, so that the predictions vary
  model, params = init_params(config)
  m = run_evals(config, model, params, sharding.make_mesh(config.mesh), None)
  assert set(m) == {f"classification/shapes/{k}" for k in ("top1", "top5", "mean_per_class",
                                                           "num_examples")}
  from vlm_jax.data import ops, pipeline   # pylint: disable=g-import-not-at-top
  batch = next(pipeline.make_eval_iterator(config.data, [ops.Label()], batch_size=NUM_TEST))
  logits = model.apply({"params": params}, batch["image"])["logits"]
  want = zeroshot.classification_metrics(np.asarray(logits), batch["label"])
  assert m["classification/shapes/num_examples"] == NUM_TEST
  assert m["classification/shapes/top1"] == pytest.approx(want["top1"])
  assert m["classification/shapes/top5"] == pytest.approx(want["top5"])
