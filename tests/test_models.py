"""Tests for the model zoo: ViT, text tower, decoder, TwoTower (CLIP/SigLIP) and CoCa.

All models are tiny (width 16, one or two blocks) so that the module runs in seconds on CPU.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax import tasks
from vlm_jax.models import layers, text as text_lib, vit as vit_lib

# One worker builds the module fixtures once (xdist would otherwise build them on both).
pytestmark = pytest.mark.xdist_group("models")

# 'rbg' keys: same semantics as the default PRNG, much faster to compile on XLA:CPU (tests only).
KEY = jax.random.key(0, impl="rbg")
B, L, V, IMG = 2, 8, 64, 16


TASKS = {"clip": "contrastive", "siglip": "contrastive", "coca": "coca"}


def tiny_config(kind="coca", **model_overrides):
  """The complete config of a tiny model of `kind` (clip, siglip or coca)."""
  model = dict(embed_dim=24, dtype="float32",
               image=dict(variant="mu/8", image_size=IMG, width=16, depth=1, num_heads=2,
                          mlp_dim=32),
               text=dict(vocab_size=V, context_length=L, width=16, depth=1, num_heads=2,
                         mlp_dim=32))
  if kind == "coca":
    model["decoder"] = dict(width=16, depth=2, num_heads=2, mlp_dim=32)
  if kind == "siglip":
    model.update(logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
  model.update(model_overrides)
  return config_utils.complete({"task": TASKS[kind], "model": model})


def build_model(config):
  return tasks.get(config.task).build_model(config)


def batch():
  images = jax.random.normal(jax.random.key(1), (B, IMG, IMG, 3))
  # bos=1 ... eos=V-1, then padding (pad_id 0) at the end; rows of different lengths.
  text = np.array([[1, 5, 9, 12, V - 1, 0, 0, 0],
                   [1, 7, V - 1, 0, 0, 0, 0, 0]], np.int32)
  return images, jnp.asarray(text)


def init(model, *args, **kw):
  out, variables = jax.jit(lambda *a: model.init_with_output(KEY, *a, **kw))(*args)
  return out, variables


@pytest.fixture(scope="module")
def coca():
  """A tiny CoCa, its variables and, from the same single compile, its outputs on `batch()`
  plus what each public method returns (including the decoder on a changed caption)."""
  model = build_model(tiny_config("coca"))
  images, text = batch()

  def everything(m, x, t):
    tokens = m.image_tokens(x)
    return dict(out=m(x, t), tokens=tokens, image_embed=m.encode_images(x),
                text_embed=m.encode_texts(t), logits=m.decode(tokens, t),
                logits_changed=m.decode(tokens, t.at[:, 4:].set(3)))
  res, variables = init(model, images, text, method=everything)
  return model, variables, res


# --- Variant table and config errors -------------------------------------------------------


def test_variant_parsing_and_overrides():
  # Two anchors from the papers (ViT-B/16, SigLIP So400m/14); the rest of the table is data.
  assert vit_lib.parse_variant("B/16") == dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                                               patch_size=16)
  assert vit_lib.parse_variant("So400m/14")["mlp_dim"] == 4304
  for width, _, heads, _ in vit_lib.VARIANTS.values():
    assert width % heads == 0
  # Config overrides win over the variant; nothing big is instantiated.
  c = vit_lib.default_config()
  c.update(variant="B/16", image_size=224, depth=2)
  vit = vit_lib.from_config(c)
  assert (vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.patch_size) == (768, 2, 12, 3072,
                                                                                 16)


@pytest.mark.parametrize("field,value,match", [
    ("image.image_size", 30, r"model\.image\.image_size: 30 is not divisible by the patch size 8"),
    ("image.variant", "Q/16", r"model\.image\.variant: unknown variant 'Q/16'"),
    ("image.variant", "B", r"model\.image\.variant: variant 'B' needs a positive patch size"),
    ("image.pool", "max", r"model\.image\.pool: unknown pooling 'max'"),
    ("image.posemb", "rope", r"model\.image\.posemb: unknown position embedding 'rope'"),
    ("image.act", "relu6", r"model\.image\.act: unknown activation 'relu6'"),
    ("image.num_heads", 3, r"model\.image\.num_heads: width 16 is not divisible by num_heads 3"),
    ("text.pool", "max", r"model\.text\.pool: unknown pooling 'max'"),
    ("text.act", "swish", r"model\.text\.act: unknown activation 'swish'"),
    ("decoder.act", "swish", r"model\.decoder\.act: unknown activation 'swish'"),
    ("dtype", "int8", r"model\.dtype: unknown dtype 'int8'"),
])
def test_bad_config_raises_naming_field_and_value(field, value, match):
  c = tiny_config("coca")
  section, _, key = field.rpartition(".")
  (c.model[section] if section else c.model)[key] = value
  with pytest.raises(ValueError, match=match):
    build_model(c)


def test_cls_pool_needs_class_token():
  c = tiny_config("clip")
  c.model.image.pool = "cls"
  with pytest.raises(ValueError, match=r"model\.image\.pool: 'cls' pooling needs "
                                       r"model\.image\.class_token=True"):
    build_model(c)


def test_resolve_dtype():
  assert models.resolve_dtype("auto", backend="cpu") == jnp.float32
  assert models.resolve_dtype("auto", backend="gpu") == jnp.bfloat16
  assert models.resolve_dtype("auto", backend="tpu") == jnp.bfloat16
  assert models.resolve_dtype("bfloat16") == jnp.bfloat16


# --- Image tower -----------------------------------------------------------------------------


# 'map' pooling is covered by the CoCa tests, 'cls' + class token + ln_pre by the CLIP test.
@pytest.mark.parametrize("pool,class_token,posemb,ln_pre", [
    ("gap", False, "sincos2d", False),
])
def test_vit_shapes_and_pooling(pool, class_token, posemb, ln_pre):
  c = vit_lib.default_config()
  c.update(variant="mu/8", image_size=IMG, pool=pool)
  c.update(width=16, num_heads=2, mlp_dim=32, class_token=class_token, posemb=posemb,
           ln_pre=ln_pre)
  vit = vit_lib.from_config(c)
  images, _ = batch()
  (pooled, tokens), variables = init(vit, images)
  params = nn.unbox(variables)["params"]
  assert pooled.shape == (B, 16) and pooled.dtype == jnp.float32
  assert tokens.shape == (B, (IMG // 8) ** 2, 16)   # patch tokens only, never the class token
  assert ("cls" in params) == class_token and ("ln_pre" in params) == ln_pre
  assert ("pos_embedding" in params) == (posemb == "learn")
  assert ("map_head" in params) == (pool == "map")
  if pool == "gap":
    np.testing.assert_allclose(pooled, tokens.mean(axis=1), rtol=1e-5, atol=1e-6)
  if class_token:
    assert params["pos_embedding"].shape == (1 + (IMG // 8) ** 2, 16)   # row 0: class token


def test_patch_dropout_keeps_random_patches_in_training_only():
  """FLIP / open_clip patch dropout: in training the encoder sees the class token and a random
  quarter of the 16 patches (per example, in their order); evaluation sees them all."""
  c = vit_lib.default_config()
  c.update(variant="mu/4", image_size=IMG, width=16, num_heads=2, mlp_dim=32, pool="cls",
           class_token=True, ln_pre=True, patch_dropout=0.75)
  vit = vit_lib.from_config(c)
  images = jax.random.normal(jax.random.key(1), (3, IMG, IMG, 3))
  variables = jax.jit(vit.init)(KEY, images)
  _, tokens = jax.jit(vit.apply)(variables, images)
  assert tokens.shape == (3, 16, 16)
  train = jax.jit(lambda v, x, r: vit.apply(v, x, train=True, rngs={"dropout": r}))
  pooled, kept = train(variables, images, jax.random.key(2))
  assert kept.shape == (3, 4, 16) and bool(jnp.isfinite(pooled).all())
  np.testing.assert_array_equal(train(variables, images, jax.random.key(2))[1], kept)
  assert not np.array_equal(train(variables, images, jax.random.key(3))[1], kept)
  # Without patch dropout a training forward (dropout 0) is the evaluation forward.
  plain = vit_lib.from_config(_with(c, patch_dropout=0.0))
  np.testing.assert_allclose(plain.apply(variables, images, train=True,
                                         rngs={"dropout": jax.random.key(2)})[1], tokens,
                             rtol=1e-6, atol=1e-6)
  # The encoder's FLOPs shrink with the kept tokens; a rate of 1 keeps nothing and is refused.
  assert vit_lib.forward_flops(c) < 0.5 * vit_lib.forward_flops(_with(c, patch_dropout=0.0))
  with pytest.raises(ValueError, match=r"model\.image\.patch_dropout: 1.0 is not a fraction"):
    vit_lib.from_config(_with(c, patch_dropout=1.0))


def test_keep_random_patches_keeps_the_prefix_and_distinct_patches_in_order():
  x = jnp.broadcast_to(jnp.arange(1 + 10, dtype=jnp.float32)[None, :, None], (4, 11, 2))
  out = np.asarray(vit_lib.keep_random_patches(x, 1, 3, jax.random.key(0)))[..., 0]
  assert out.shape == (4, 4) and (out[:, 0] == 0).all()
  for row in out[:, 1:]:
    assert list(row) == sorted(set(row)) and set(row) <= set(range(1, 11))
  assert len({tuple(r) for r in out[:, 1:]}) > 1            # drawn per example


def _with(config, **fields):
  out = config.copy_and_resolve_references()
  out.update(fields)
  return out


def test_vit_rejects_wrong_image_size():
  c = vit_lib.default_config()
  c.update(variant="mu/8", image_size=IMG)
  vit = vit_lib.from_config(c)
  with pytest.raises(ValueError, match=r"image_size=16"):
    jax.eval_shape(vit.init, KEY, jnp.zeros((1, 24, 24, 3)))


def test_sincos2d_table():
  pe = vit_lib.posemb_sincos_2d(2, 3, 8)
  assert pe.shape == (6, 8)
  # Patch (row 1, col 2): x-part encodes 2, y-part encodes 1 (first frequency is 1).
  np.testing.assert_allclose(pe[5, [0, 2, 4, 6]], [np.sin(2), np.cos(2), np.sin(1), np.cos(1)],
                             rtol=1e-6)


# --- Text tower ------------------------------------------------------------------------------


def _text_tower(causal, pool="last", dropout=0.0):
  c = text_lib.default_config()
  c.update(vocab_size=V, context_length=12, width=16, depth=1, num_heads=2, mlp_dim=32,
           causal=causal, pool=pool, dropout=dropout)
  return text_lib.from_config(c)


@pytest.fixture(scope="module")
def text_tower():
  """Causal and bidirectional towers (dropout 0.5) share one parameter tree. `run[causal](text)`
  returns the eval-mode pooled output, the tokens and every pooling of those tokens;
  `train(rng)` the causal tower's pooled output in training mode."""
  _, text = batch()
  variables = jax.jit(_text_tower(True, dropout=0.5).init)(KEY, text)

  def make(causal):
    tower = _text_tower(causal, dropout=0.5)

    @jax.jit
    def run(text):
      pooled, tokens = tower.apply(variables, text)
      return pooled, tokens, {p: text_lib.pool_tokens(tokens, text, p, 0) for p in text_lib.POOLS}
    return run
  tower = _text_tower(True, dropout=0.5)
  train = jax.jit(lambda r: tower.apply(variables, text, train=True, rngs={"dropout": r})[0])
  return {True: make(True), False: make(False), "train": train}


@pytest.mark.parametrize("causal", [True, False])
def test_text_padding_invariance_and_pooling(text_tower, causal):
  run = text_tower[causal]
  _, text = batch()
  padded = jnp.pad(text, ((0, 0), (0, 4)))   # 4 more pad tokens at the end
  pooled, tokens, pools = run(text)
  pooled_p, tokens_p, pools_p = run(padded)
  real = np.asarray(text != 0)
  np.testing.assert_allclose(np.asarray(tokens)[real], np.asarray(tokens_p)[:, :L][real],
                             rtol=1e-5, atol=1e-5)
  for pool in text_lib.POOLS:
    np.testing.assert_allclose(pools[pool], pools_p[pool], rtol=1e-5, atol=1e-5, err_msg=pool)
  # The tower's own pooling is pool_tokens with its configured pool ('last').
  np.testing.assert_array_equal(pooled, pools["last"])
  # The pools pick what they claim to pick (eos id V-1 is the largest id in each row).
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(pools["eos"], tokens[[0, 1], [4, 2]])
  np.testing.assert_array_equal(pools["last"], tokens[[0, 1], [4, 2]])
  np.testing.assert_array_equal(pools["first"], tokens[:, 0])
  np.testing.assert_allclose(pools["mean"][1], tokens[1, :3].mean(0), rtol=1e-5, atol=1e-6)


def test_text_causality(text_tower):
  _, text = batch()
  changed = text.at[:, 3:].set(11)   # change every token from position 3 on
  _, base, _ = text_tower[True](text)
  _, after, _ = text_tower[True](changed)
  np.testing.assert_allclose(base[:, :3], after[:, :3], rtol=1e-6, atol=1e-6)
  assert np.abs(base[:, 3:] - after[:, 3:]).max() > 1e-3
  # The bidirectional tower (same weights) does look ahead.
  _, b1, _ = text_tower[False](text)
  _, b2, _ = text_tower[False](changed)
  assert np.abs(b1[:, :2] - b2[:, :2]).max() > 1e-3


def test_text_dropout_only_in_training(text_tower):
  _, text = batch()
  eval_out = text_tower[True](text)[0]
  a, b = text_tower["train"](jax.random.key(1)), text_tower["train"](jax.random.key(2))
  assert np.abs(a - b).max() > 1e-4 and np.abs(a - eval_out).max() > 1e-4
  np.testing.assert_array_equal(text_tower[True](text)[0], eval_out)   # eval is deterministic


def _check_embeds(out):
  for name in ("image_embed", "text_embed"):
    assert out[name].shape == (B, 24) and out[name].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(out[name], axis=-1), 1.0, rtol=1e-5)
  for name in ("logit_scale", "logit_bias"):
    assert out[name].shape == () and out[name].dtype == jnp.float32


def openai_style(c):
  """The options an OpenAI / HF CLIP checkpoint needs."""
  c.model.image.update(class_token=True, ln_pre=True, pool="cls", act="quick_gelu", ln_eps=1e-5,
                 patch_bias=False)
  c.model.text.update(pool="eos", act="quick_gelu", ln_eps=1e-5)
  return c


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_tower_outputs(kind):
  c = tiny_config(kind)
  if kind == "clip":
    openai_style(c)
  else:   # SigLIP-style: bidirectional text tower, bf16 compute
    c.model.text.causal, c.model.dtype = False, "bfloat16"
  model = build_model(c)
  (out, tokens), variables = init(model, *batch(), method=lambda m, x, t: (m(x, t), m.image(x)[1]))
  assert set(out) == {"image_embed", "text_embed", "logit_scale", "logit_bias"}
  _check_embeds(out)   # float32 embeddings whatever the compute dtype
  assert tokens.shape == (B, (IMG // 8) ** 2, 16)   # patch tokens only, never the class token
  assert tokens.dtype == (jnp.bfloat16 if kind == "siglip" else jnp.float32)
  # Parameters stay float32 under bf16 compute.
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  params = nn.unbox(variables)["params"]
  assert set(params["image_projection"]) == {"kernel"}   # plain matrices by default
  assert set(params["text_projection"]) == {"kernel"}
  if kind == "clip":
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert out["logit_bias"] == 0.0 and "logit_bias" not in params
    assert model.image.ln_eps == 1e-5 and model.text.pool == "eos"
    assert set(params["image"]["embedding"]) == {"kernel"}
    assert {"cls", "ln_pre", "pos_embedding"} <= set(params["image"])
    assert params["image"]["pos_embedding"].shape == (1 + (IMG // 8) ** 2, 16)   # row 0: cls
    assert set(params["image"]["encoder"]["block_0"]["attn"]["query"]) == {"kernel", "bias"}
  else:
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)


def test_logit_scale_is_clipped():
  c = tiny_config("clip", logit_scale_init=math.log(500.0), proj_bias=True)
  model = build_model(c)
  shapes = jax.eval_shape(model.init, KEY, *batch())
  assert "bias" in shapes["params"]["text_projection"]   # proj_bias=True adds a bias
  params = {"params": {"logit_scale": jnp.log(500.0)}}
  scale = model.apply(params, method=lambda m: m.logits_params()["logit_scale"])
  np.testing.assert_allclose(scale, 100.0)


def test_coca_outputs_and_methods(coca):
  _, _, res = coca
  out = res["out"]
  assert set(out) == {"image_embed", "text_embed", "logit_scale", "logit_bias",
                      "caption_logits"}
  _check_embeds(out)
  assert out["caption_logits"].shape == (B, L, V)
  assert out["caption_logits"].dtype == jnp.float32
  # Untied head is a real, initialised matrix: initial logits have roughly unit scale.
  assert 0.3 < float(jnp.std(out["caption_logits"])) < 3.0
  assert res["tokens"].shape == (B, (IMG // 8) ** 2, 16)   # the ViT's patch tokens ('map' pool)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  # The methods compute the same things as the joint forward.
  np.testing.assert_allclose(res["image_embed"], out["image_embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res["text_embed"], out["text_embed"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res["logits"], out["caption_logits"], rtol=1e-5, atol=1e-5)


def test_decoder_causality(coca):
  _, _, res = coca   # logits_changed: the same captions with every token from position 4 on changed
  base, after = res["logits"], res["logits_changed"]
  np.testing.assert_allclose(base[:, :4], after[:, :4], rtol=1e-5, atol=1e-5)
  assert np.abs(base[:, 4:] - after[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(coca, scan):
  model, variables, res = coca
  out, tokens = res["out"], res["tokens"]
  params = nn.unbox(variables)
  if scan:   # the same weights in the scanned (and rematerialised) layout
    model = build_model(tiny_config("coca", scan=True, remat=True))
    params = layers.stack_block_params(params)
  _, text = batch()
  cache = models.init_cache(model, params, tokens, L)

  @jax.jit
  def step(cache, token):
    return model.apply({**params, "cache": cache}, tokens, token, decode=True, method="decode",
                       mutable=["cache"])

  steps = []
  for t in range(L):
    logits, mutated = step(cache, text[:, t:t + 1])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), out["caption_logits"], rtol=1e-5,
                             atol=1e-5)


def test_every_param_has_logical_axis_names(coca):
  _, variables, _ = coca
  scanned = jax.eval_shape(build_model(tiny_config("siglip", scan=True)).init, KEY,
                           *batch())
  for tree in (variables, scanned):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    assert len(leaves) > 20
    for path, leaf in leaves:
      name = jax.tree_util.keystr(path)
      assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
      assert len(leaf.names) == leaf.value.ndim, name
      assert all(n is None or isinstance(n, str) for n in leaf.names), name
      assert any(n is not None for n in leaf.names) or leaf.value.ndim == 0, name


def test_param_names_are_readable(coca):
  _, variables, _ = coca
  paths = {"/".join(p.key for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(variables)["params"])[0]}
  for expected in ["image/embedding/kernel", "image/encoder/block_0/attn/query/kernel",
                   "image/encoder/block_0/mlp/fc1/kernel", "image/map_head/probe",
                   "text/token_embedding/embedding", "text/encoder/encoder_norm/scale",
                   "decoder/block_1/cross_attn/key/kernel", "decoder/head/kernel",
                   "image_projection/kernel", "text_projection/kernel", "logit_scale"]:
    assert expected in paths, expected


def test_remat_and_scan_models_match_plain(coca):
  """Same params => same outputs. Within one block stack the layouts agree bit for bit (see
  test_layers); across a whole jitted model XLA may fuse differently, hence ulp tolerances."""
  model, variables, res = coca
  params = nn.unbox(variables)
  images, text = batch()
  remat = build_model(tiny_config("coca", remat=True))
  shapes = nn.unbox(jax.eval_shape(remat.init, KEY, images, text))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, params)
  scan = build_model(tiny_config("coca", scan=True, remat=True))
  stacked = layers.stack_block_params(params)
  scan_shapes = nn.unbox(jax.eval_shape(scan.init, KEY, images, text))
  assert jax.tree.map(lambda s: s.shape, scan_shapes) == jax.tree.map(jnp.shape, stacked)
  got = jax.jit(scan.apply)(stacked, images, text)
  for k, v in res["out"].items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_attention_implementations_give_the_same_model(coca, monkeypatch):
  """model.attention='xla' reaches every tower (image, text with its padding mask, decoder)."""
  model, variables, res = coca
  images, text = batch()
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, *a, **k: calls.append(q.shape) or fused(q, *a, **k))
  xla = build_model(tiny_config("coca", attention="xla"))
  got = jax.jit(xla.apply)(nn.unbox(variables), images, text)
  # 1 image block, 1 text block, 2 decoder blocks x (self, cross): 6 attentions, all fused.
  assert len(calls) == 6, calls
  for k, v in res["out"].items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_tied_decoder_head_reuses_token_embedding():
  c = tiny_config("coca")
  c.model.decoder.tie_embeddings = True
  model = build_model(c)
  images, text = batch()
  out, variables = jax.eval_shape(lambda: model.init_with_output(KEY, images, text))
  decoder = variables["params"]["decoder"]
  assert "head" not in decoder and "token_embedding" in decoder
  assert out["caption_logits"].shape == (B, L, V)
