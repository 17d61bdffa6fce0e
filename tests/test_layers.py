"""Tests for vlm_jax.models.layers: activations, attention masks, the block stack layouts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.models import layers

# Random init with the 'rbg' PRNG: same semantics as the default, but XLA:CPU compiles it far
# faster than threefry (tests only; the key type travels with the key, no global setting).
KEY = jax.random.key(0, impl="rbg")
ENC = dict(depth=2, num_heads=2, mlp_dim=32)


def test_activations():
  x = jnp.linspace(-4.0, 4.0, 101)
  np.testing.assert_allclose(layers.get_activation("quick_gelu")(x), x / (1 + np.exp(-1.702 * x)),
                             rtol=1e-6, atol=1e-6)
  exact, tanh = layers.get_activation("gelu")(x), layers.get_activation("gelu_tanh")(x)
  np.testing.assert_allclose(exact, jax.nn.gelu(x, approximate=False))
  np.testing.assert_allclose(tanh, jax.nn.gelu(x, approximate=True))
  assert np.abs(exact - tanh).max() > 1e-5   # the two GELUs really are different functions
  with pytest.raises(ValueError, match=r"model\.text\.act: unknown activation 'swish'"):
    layers.get_activation("swish", "model.text.act")


def test_attention_masks_and_cross_attention():
  attn = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  x2 = x.at[0, 3:].set(7.0).at[1, 4:].set(-3.0)   # changes only the masked-out positions
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)[:, None, None, :]
  ctx = jax.random.normal(jax.random.key(2), (2, 7, 24))   # another width and length

  @jax.jit
  def run():
    params = attn.init(KEY, x, mask=mask)
    f = lambda *a, **k: attn.apply(params, *a, **k)
    cross, cross_vars = attn.init_with_output(KEY, x, ctx)
    return dict(masked=f(x, mask=mask), masked2=f(x2, mask=mask), plain=f(x), plain2=f(x2),
                none=f(x, mask=jnp.zeros_like(mask)), cross=cross,
                cross_params=nn.unbox(cross_vars)["params"])
  r = run()
  # Changing padding (masked keys) does not change the outputs at real positions ...
  np.testing.assert_allclose(r["masked"][0, :3], r["masked2"][0, :3], atol=1e-6)
  np.testing.assert_allclose(r["masked"][1, :4], r["masked2"][1, :4], atol=1e-6)
  # ... while without the mask it does, so the check above is meaningful.
  assert np.abs(r["plain"][0, :3] - r["plain2"][0, :3]).max() > 1e-3
  # A fully masked row gives finite numbers (large finite negative, not -inf).
  assert np.isfinite(r["none"]).all()
  p = r["cross_params"]
  assert r["cross"].shape == (2, 5, 16)
  assert p["key"]["kernel"].shape == (24, 2, 8) and p["query"]["kernel"].shape == (16, 2, 8)
  assert p["out"]["kernel"].shape == (2, 8, 16)


def _encoder_outputs(**kw):
  x = jax.random.normal(jax.random.key(3), (2, 6, 16))
  mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
  enc = layers.Encoder(**ENC, **kw)
  variables = jax.jit(enc.init)(KEY, x, mask)
  return enc, variables, x, mask


def test_remat_and_scan_match_plain_stack():
  enc, variables, x, mask = _encoder_outputs()
  params = nn.unbox(variables)
  y = jax.jit(enc.apply)(params, x, mask)

  # remat: the very same parameter tree (so checkpoints are interchangeable) and the same output.
  remat = layers.Encoder(**ENC, remat=True)
  remat_shapes = jax.eval_shape(remat.init, KEY, x, mask)
  assert (jax.tree.structure(nn.unbox(remat_shapes)) == jax.tree.structure(params))
  np.testing.assert_array_equal(jax.jit(remat.apply)(params, x, mask), y)

  # scan: one 'blocks' entry with a leading layers axis; plain params stacked give the same output.
  scan = layers.Encoder(**ENC, scan=True, remat=True)
  scan_shapes = nn.unbox(jax.eval_shape(scan.init, KEY, x, mask))
  stacked = layers.stack_block_params(params)
  assert jax.tree.map(lambda s: s.shape, scan_shapes) == jax.tree.map(jnp.shape, stacked)
  assert "blocks" in stacked["params"] and "block_0" not in stacked["params"]
  np.testing.assert_array_equal(jax.jit(scan.apply)(stacked, x, mask), y)
  # ... and the conversion round-trips exactly.
  back = layers.unstack_block_params(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)

  # Scanned params keep their logical names, with 'layers' in front.
  boxed = jax.eval_shape(scan.init, KEY, x, mask)["params"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert boxed.names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("grid", [12, 7, 4])
def test_resampled_position_embedding_equals_open_clips_resize(grid):
  """open_clip's `resize_pos_embed` (and timm's) resize the grid part with torch's antialiased
  bicubic interpolation and keep the class token's row: the same numbers, up and down."""
  torch = pytest.importorskip("torch")
  pos = np.random.default_rng(0).normal(size=(1 + 7 * 7, 16)).astype(np.float32)
  ours = np.asarray(layers.resample_grid_posemb(jnp.asarray(pos), 1, grid))
  image = torch.from_numpy(pos[1:]).reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(image, size=(grid, grid), mode="bicubic",
                                        antialias=True, align_corners=False)
  np.testing.assert_allclose(ours[1:], ref.permute(0, 2, 3, 1).reshape(grid * grid, 16).numpy(),
                             atol=2e-6)
  np.testing.assert_array_equal(ours[0], pos[0])
  with pytest.raises(ValueError, match="48 positions after 1 prefix token.* not a square grid"):
    layers.resample_grid_posemb(jnp.asarray(pos[:49]), 1, grid)


@pytest.mark.parametrize("policy", sorted(layers.REMAT_POLICIES))
def test_remat_policies_change_memory_not_gradients(policy):
  enc, variables, x, mask = _encoder_outputs()
  params = nn.unbox(variables)

  def grads(module):
    loss = lambda p: jnp.sum(module.apply(p, x, mask) ** 2)
    return jax.jit(jax.grad(loss))(params)
  want = grads(enc)
  got = grads(layers.Encoder(**ENC, remat=policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
  with pytest.raises(ValueError, match="model.remat_policy: unknown policy 'some'"):
    models.common_kwargs(ml_collections.ConfigDict(dict(
        dtype="float32", param_dtype="float32", remat=True, remat_policy="some", scan=False)))


def test_dot_product_attention_matches_the_einsum_reference():
  """model.attention='xla' (jax.nn.dot_product_attention) against the einsum path: outputs and
  gradients, with a causal + padding mask, without a mask, and in a decoder block (cross-
  attention, and step-by-step decoding with the KV cache)."""
  x = jax.random.normal(jax.random.key(3), (2, 6, 16))
  causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
  padding = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)[:, None, None, :]
  for mask in (causal & padding, None):
    ref = layers.Encoder(**ENC)
    params = nn.unbox(jax.jit(ref.init)(KEY, x, mask))
    outs, grads = [], []
    for impl in ("einsum", "xla"):
      enc = layers.Encoder(**ENC, attention=impl)
      loss = lambda p, enc=enc: jnp.sum(enc.apply(p, x, mask) ** 2)
      outs.append(jax.jit(enc.apply)(params, x, mask))
      grads.append(jax.jit(jax.grad(loss))(params))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)

  context = jax.random.normal(jax.random.key(4), (2, 5, 16))
  tokens = jax.random.normal(jax.random.key(5), (2, 4, 16))
  blocks = {impl: layers.DecoderBlock(num_heads=2, mlp_dim=32, attention=impl)
            for impl in ("einsum", "xla")}
  params = nn.unbox(blocks["einsum"].init(KEY, tokens, context, causal[..., :4, :4]))
  full = {impl: b.apply(params, tokens, context, causal[..., :4, :4]) for impl, b in blocks.items()}
  np.testing.assert_allclose(full["xla"], full["einsum"], rtol=1e-5, atol=1e-5)
  step = layers.DecoderBlock(num_heads=2, mlp_dim=32, attention="xla", decode=True)
  cache = step.init(KEY, tokens, context)["cache"]
  outs = []
  for t in range(4):
    y, mutated = step.apply({**params, "cache": cache}, tokens[:, t:t + 1], context,
                            mutable=["cache"])
    cache = mutated["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full["einsum"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="model.attention: unknown implementation 'flash'"):
    models.common_kwargs(ml_collections.ConfigDict(dict(
        dtype="float32", param_dtype="float32", remat=False, remat_policy="full", scan=False,
        attention="flash")))


def test_fused_attention_padding_to_even_lengths_changes_nothing():
  """The 'cudnn' path pads odd lengths (a ViT's 197 tokens) to a multiple of 2 and masks the
  padding by sequence lengths; here through XLA's implementation, which takes the same
  arguments: outputs and gradients equal the unpadded call, with a mask and without."""
  q = jax.random.normal(jax.random.key(6), (2, 7, 2, 8))
  kv = jax.random.normal(jax.random.key(7), (2, 2, 5, 2, 8))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
  for m in (mask, None):
    def loss(q, k, v, pad_to, m=m):
      out = layers.fused_attention(q, k, v, m, "xla", pad_to=pad_to)
      return jnp.sum(jnp.sin(out)), out
    (_, plain), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, *kv, 1)
    for pad_to in (2, 8):
      (_, padded), padded_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
          q, *kv, pad_to)
      assert padded.shape == plain.shape == (2, 7, 2, 8)
      np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
      for g, pg in zip(grads, padded_grads):
        np.testing.assert_allclose(pg, g, rtol=1e-5, atol=1e-6)


def _pallas_interpreter():
  """Pallas kernels run by Pallas's generic interpreter (plain XLA ops) on the CPU. Unlike TPU
  interpret mode (which simulates a TPU's memories and its devices), it also runs inside
  shard_map over the simulated CPU devices."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.force_tpu_interpret_mode(True)


def _einsum_attention(q, k, v, mask):
  k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min) if mask is not None else logits
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def test_pallas_flash_kernel_matches_the_einsum_reference():
  """model.attention='pallas' (the TPU flash kernel): outputs and gradients equal the einsum
  attention's without a mask at a length the kernel pads (70 -> 128), with a causal + padding
  mask, with a prefix-LM mask whose prefix differs per example, and with grouped-query heads (4
  query heads on 2 key/value heads)."""
  from vlm_jax.models import pallas_attention  # pylint: disable=g-import-not-at-top
  axes = (layers.BATCH, layers.LENGTH, layers.HEADS, layers.KV)   # no mesh: one device
  keys = jax.random.split(jax.random.key(8), 3)
  q = jax.random.normal(keys[0], (2, 70, 4, 16))
  k, v = (jax.random.normal(key, (2, 70, 2, 16)) for key in keys[1:])
  causal = jnp.tril(jnp.ones((70, 70), bool))[None, None]
  padding = (jnp.arange(70) < jnp.array([50, 70])[:, None])[:, None, None, :]
  prefix = causal | (jnp.arange(70) < jnp.array([10, 40])[:, None])[:, None, None, :]
  for mask in (None, causal & padding, prefix):
    def loss(fn, q, k, v, mask=mask):
      out = fn(q, k, v, mask)
      return jnp.sum(jnp.sin(out)), out
    with _pallas_interpreter():
      (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
          functools.partial(pallas_attention.attention, axes=axes), q, k, v)
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        _einsum_attention, q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    if mask is not None:   # the mask matters: without it the result differs
      np.testing.assert_array_less(1e-3, np.abs(got - _einsum_attention(q, k, v, None)).max())


def test_pallas_attention_in_blocks_on_a_sharded_mesh():
  """Encoder and decoder blocks with attention='pallas' on a data=2, fsdp=2, tensor=2 mesh (the
  kernel under shard_map, a shard of examples and heads per device) equal the einsum blocks:
  self-attention with and without a mask, cross-attention, and KV-cached decoding (whose
  one-token steps use einsum)."""
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  x = jax.random.normal(jax.random.key(3), (4, 9, 32))
  causal = jnp.tril(jnp.ones((9, 9), bool))[None, None]
  padding = (jnp.arange(9) < jnp.array([7, 9, 5, 9])[:, None])[:, None, None, :]
  context = jax.random.normal(jax.random.key(4), (4, 5, 32))
  enc = {impl: layers.Encoder(depth=1, num_heads=4, mlp_dim=32, attention=impl)
         for impl in ("einsum", "pallas")}
  dec = {impl: layers.DecoderBlock(num_heads=4, mlp_dim=32, attention=impl)
         for impl in ("einsum", "pallas")}
  with _pallas_interpreter(), jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    for mask in (causal & padding, None):
      params = nn.unbox(jax.jit(enc["einsum"].init)(KEY, x, mask))
      outs, grads = {}, {}
      for impl, module in enc.items():
        loss = lambda p, module=module: jnp.sum(module.apply(p, x, mask) ** 2)
        outs[impl] = jax.jit(module.apply)(params, x, mask)
        grads[impl] = jax.jit(jax.grad(loss))(params)
      np.testing.assert_allclose(outs["pallas"], outs["einsum"], rtol=1e-5, atol=1e-5)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                   grads["pallas"], grads["einsum"])
    params = nn.unbox(jax.jit(dec["einsum"].init)(KEY, x, context, causal))
    full = {impl: jax.jit(b.apply)(params, x, context, causal) for impl, b in dec.items()}
    np.testing.assert_allclose(full["pallas"], full["einsum"], rtol=1e-5, atol=1e-5)
    step = layers.DecoderBlock(num_heads=4, mlp_dim=32, attention="pallas", decode=True)
    cache = jax.jit(step.init)(KEY, x, context)["cache"]
    apply = jax.jit(functools.partial(step.apply, mutable=["cache"]))
    outs = []
    for t in range(3):
      y, mutated = apply({**params, "cache": cache}, x[:, t:t + 1], context)
      cache = mutated["cache"]
      outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full["einsum"][:, :3], rtol=1e-5,
                             atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
  enc = layers.Encoder(**ENC, dtype=jnp.bfloat16)
  x = jnp.ones((1, 4, 16), jnp.bfloat16)
  y, variables = jax.jit(enc.init_with_output)(KEY, x)
  assert y.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}


def test_depth_must_be_positive():
  with pytest.raises(ValueError, match="depth"):
    layers.Encoder(depth=0, num_heads=2, mlp_dim=8).init(KEY, jnp.ones((1, 2, 8)))


def test_cross_attention_decoding_projects_the_context_once():
  """With decode=True the first call keeps the context's keys/values in the cache and later
  calls read them there: a step given another context gives the same output."""
  attn = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 1, 8))
  context = jax.random.normal(jax.random.key(1), (3, 5, 8))
  params = attn.init(jax.random.key(2), x, context=context)["params"]
  want = attn.apply({"params": params}, x, context=context)
  first, mut = attn.apply({"params": params}, x, context=context, decode=True, mutable=["cache"])
  assert mut["cache"]["context_key"].shape == (3, 5, 2, 4)
  np.testing.assert_allclose(first, want, atol=1e-6)
  step, _ = attn.apply({"params": params, "cache": mut["cache"]}, x,
                       context=jnp.zeros_like(context), decode=True, mutable=["cache"])
  np.testing.assert_allclose(step, want, atol=1e-6)
