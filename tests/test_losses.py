"""Losses against NumPy references, their gradients, and the memory-lean sharded variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ml_collections

from vlm_jax import losses


def _normalized(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _mesh(data, fsdp, tensor):
  return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)


# NumPy references, written from the papers' formulas (float64).


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_softmax_contrastive(img, txt, scale):
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
  n = len(img)
  i2t = -_np_log_softmax(logits, axis=1)[np.arange(n), np.arange(n)].mean()
  t2i = -_np_log_softmax(logits, axis=0)[np.arange(n), np.arange(n)].mean()
  return (i2t + t2i) / 2


def np_sigmoid_contrastive(img, txt, scale, bias):
  logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T + bias
  labels = 2 * np.eye(len(img)) - 1
  # -log sigmoid(z) = log(1 + exp(-z))
  return np.log1p(np.exp(-labels * logits)).sum() / len(img)


def np_caption_xent(logits, targets, mask, eps):
  logp = _np_log_softmax(logits.astype(np.float64), axis=-1)
  vocab = logits.shape[-1]
  target_dist = (1 - eps) * np.eye(vocab)[targets] + eps / vocab
  per_token = -(target_dist * logp).sum(-1)
  return (per_token * mask).sum() / mask.sum()


# Plain losses.


def test_softmax_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _normalized(rng, (6, 8)), _normalized(rng, (6, 8))
  got = losses.softmax_contrastive(img, txt, jnp.float32(7.5))
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, np_softmax_contrastive(img, txt, 7.5), rtol=1e-5)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5)])
def test_sigmoid_contrastive_matches_numpy(scale, bias):
  rng = np.random.default_rng(1)
  img, txt = _normalized(rng, (5, 8)), _normalized(rng, (5, 8))
  got = losses.sigmoid_contrastive(img, txt, jnp.float32(scale), jnp.float32(bias))
  np.testing.assert_allclose(got, np_sigmoid_contrastive(img, txt, scale, bias), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_xent_matches_numpy(eps):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
  mask = rng.random((3, 7)) < 0.6
  mask[0, 0] = True
  got = losses.caption_xent(logits, targets, mask, label_smoothing=eps)
  np.testing.assert_allclose(got, np_caption_xent(logits, targets, mask, eps), rtol=1e-5)


def test_gradients_are_finite():
  rng = np.random.default_rng(3)
  img, txt = _normalized(rng, (4, 8)), _normalized(rng, (4, 8))
  # A large scale and bias must not overflow (log-sigmoid / logsumexp are stable).
  grads = [
      jax.jit(jax.grad(losses.softmax_contrastive, argnums=(0, 1, 2)))(
          img, txt, jnp.float32(100.0)),
      jax.jit(jax.grad(losses.sigmoid_contrastive, argnums=(0, 1, 2, 3)))(
          img, txt, jnp.float32(100.0), jnp.float32(-50.0)),
      jax.jit(jax.grad(losses.caption_xent), static_argnums=3)(
          rng.normal(size=(2, 5, 9)).astype(np.float32) * 50, rng.integers(0, 9, (2, 5)),
          np.ones((2, 5), bool), 0.1),
  ]
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
    assert np.any(g != 0)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_minimal_when_pairs_match(kind):
  rng = np.random.default_rng(4)
  img = _normalized(rng, (8, 16))
  txt = _normalized(rng, (8, 16)) * 0.3 + img        # each caption close to its own image
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)

  def loss(t):
    if kind == "softmax":
      return float(losses.softmax_contrastive(img, t, jnp.float32(10.0)))
    return float(losses.sigmoid_contrastive(img, t, jnp.float32(10.0), jnp.float32(-5.0)))

  matched = loss(txt)
  for _ in range(5):
    perm = rng.permutation(8)
    if np.all(perm == np.arange(8)):
      continue
    assert matched < loss(txt[perm])
  assert loss(img) < matched        # identical pairs are better still


def test_label_smoothing_behaviour():
  vocab = 10
  targets = np.array([[1, 2, 3]], np.int32)
  mask = np.ones((1, 3), bool)
  # Uniform predictions: CE is log(V) for any smoothing.
  uniform = np.zeros((1, 3, vocab), np.float32)
  for eps in (0.0, 0.2):
    np.testing.assert_allclose(losses.caption_xent(uniform, targets, mask, eps), np.log(vocab),
                               rtol=1e-6)
  # Confident and correct: smoothing penalises over-confidence, so the loss goes up.
  confident = 20.0 * np.eye(vocab, dtype=np.float32)[targets]
  assert losses.caption_xent(confident, targets, mask, 0.1) > \
      losses.caption_xent(confident, targets, mask, 0.0) + 0.5
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.caption_xent(uniform, targets, mask, 1.0)


def test_caption_xent_ignores_masked_positions():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 6)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  base = losses.caption_xent(logits, targets, mask)
  logits2, targets2 = logits.copy(), targets.copy()
  logits2[~mask] = rng.normal(size=logits2[~mask].shape) * 100
  targets2[~mask] = 3
  np.testing.assert_allclose(losses.caption_xent(logits2, targets2, mask), base, rtol=1e-6)
  # The mean is over the 8 real tokens, not over all 12 positions.
  per_token = -np.take_along_axis(_np_log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(base, per_token[mask].mean(), rtol=1e-5)
  # Empty mask: 0, not NaN.
  assert float(losses.caption_xent(logits, targets, np.zeros_like(mask))) == 0.0


def test_shape_and_dtype_checks():
  img = np.zeros((4, 8), np.float32)
  with pytest.raises(AssertionError):
    losses.softmax_contrastive(img, np.zeros((5, 8), np.float32), 1.0)
  with pytest.raises(AssertionError):
    losses.sigmoid_contrastive(img, np.zeros((4, 8), np.int32), 1.0, 0.0)
  with pytest.raises(ValueError, match="logit_scale"):
    losses.softmax_contrastive(img, img, jnp.ones((2,)))
  with pytest.raises(AssertionError):
    losses.caption_xent(np.zeros((2, 3, 5), np.float32), np.zeros((2, 3), np.float32),
                        np.ones((2, 3), bool))


def _outputs(rng, batch=4, dim=8):
  return {"image_embed": _normalized(rng, (batch, dim)), "text_embed": _normalized(rng, (batch, dim)),
          "logit_scale": jnp.float32(5.0), "logit_bias": jnp.float32(-2.0)}


def _loss_config(kind, impl="plain"):
  return ml_collections.ConfigDict({"contrastive": kind, "contrastive_impl": impl})


def test_contrastive_loss_picks_the_configured_loss():
  rng = np.random.default_rng(6)
  out = _outputs(rng)
  np.testing.assert_allclose(
      losses.contrastive_loss(out, _loss_config("sigmoid")),
      np_sigmoid_contrastive(out["image_embed"], out["text_embed"], 5.0, -2.0), rtol=1e-5)
  np.testing.assert_allclose(
      losses.contrastive_loss(out, _loss_config("softmax")),
      np_softmax_contrastive(out["image_embed"], out["text_embed"], 5.0), rtol=1e-5)
  with pytest.raises(ValueError, match="loss.contrastive: unknown .*'hinge'"):
    losses.contrastive_loss(out, _loss_config("hinge"))
  with pytest.raises(ValueError, match="loss.contrastive_impl: .*'allgather'"):
    losses.contrastive_loss(out, _loss_config("softmax", "allgather"))


def test_sums_are_the_pieces_of_the_means():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 5))
  mask = rng.random((3, 5)) > 0.3
  total, count = losses.caption_xent_sum(logits, targets, mask, 0.1)
  assert float(count) == mask.sum()
  np.testing.assert_allclose(total / count, np_caption_xent(logits, targets, mask, 0.1),
                             rtol=1e-5)
  labels = rng.integers(0, 7, (3,))
  total, count = losses.classification_xent_sum(logits[:, 0], labels, 0.1)
  assert float(count) == 3
  np.testing.assert_allclose(
      total / count, np_caption_xent(logits[:, :1], labels[:, None], np.ones((3, 1), bool), 0.1),
      rtol=1e-5)


# Memory-lean variants on the 8-device CPU mesh.


def _plain_and_chunked(kind, mesh):
  if kind == "ring_softmax":
    plain = lambda i, t, s, b: losses.softmax_contrastive(i, t, s)
    chunked = lambda i, t, s, b: losses.ring_softmax_contrastive(i, t, s, mesh=mesh)
    args = (jnp.float32(10.0), jnp.float32(0.0))
  elif kind == "sigmoid":
    plain = losses.sigmoid_contrastive
    chunked = lambda i, t, s, b: losses.chunked_sigmoid_contrastive(i, t, s, b, mesh=mesh)
    args = (jnp.float32(10.0), jnp.float32(-4.0))
  else:
    plain = lambda i, t, s, b: losses.softmax_contrastive(i, t, s)
    chunked = lambda i, t, s, b: losses.gathered_softmax_contrastive(i, t, s, mesh=mesh)
    args = (jnp.float32(10.0), jnp.float32(0.0))
  return plain, chunked, args


@pytest.mark.parametrize("kind", ["sigmoid", "softmax", "ring_softmax"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_chunked_matches_plain(kind, shape):
  assert jax.device_count() == 8
  mesh = _mesh(*shape)
  rng = np.random.default_rng(9)
  batch = 16
  img, txt = _normalized(rng, (batch, 8)), _normalized(rng, (batch, 8))
  txt[:4] = img[:4]      # a few near-perfect pairs so the positives matter
  plain, chunked, (scale, bias) = _plain_and_chunked(kind, mesh)
  argnums = (0, 1, 2, 3) if kind == "sigmoid" else (0, 1, 2)
  want_v, want_g = jax.jit(jax.value_and_grad(plain, argnums=argnums))(img, txt, scale, bias)
  # Chunked: inputs sharded over the batch axes as in training.
  data = NamedSharding(mesh, P(("data", "fsdp")))
  img_s, txt_s = jax.device_put(img, data), jax.device_put(txt, data)
  got_v, got_g = jax.jit(jax.value_and_grad(chunked, argnums=argnums))(img_s, txt_s, scale, bias)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert got_g[0].sharding.spec == P(("data", "fsdp"))   # gradients stay sharded


def test_ring_losses_keep_only_local_blocks():
  """No B_global-sized intermediate: the largest array in the compiled loss is B_local^2."""
  mesh = _mesh(8, 1, 1)
  batch, dim = 64, 4           # B_local = 8: blocks are 8 x 8, the full matrix 64 x 64
  rng = np.random.default_rng(10)
  img, txt = _normalized(rng, (batch, dim)), _normalized(rng, (batch, dim))
  f = lambda i, t: losses.chunked_sigmoid_contrastive(i, t, jnp.float32(10.0),
                                                      jnp.float32(-5.0), mesh=mesh)
  # The compiled (per-device, after SPMD partitioning) program of the loss and its gradient.
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(img, txt).compile().as_text()
  assert "f32[8,8]" in hlo
  for big in ("f32[64,64]", "f32[8,64]", "f32[64,8]"):
    assert big not in hlo, big
  # The softmax variant keeps its rows (B_local x B_global) but never B_global x B_global.
  g = lambda i, t: losses.gathered_softmax_contrastive(i, t, jnp.float32(10.0), mesh=mesh)
  hlo = jax.jit(jax.grad(g, argnums=(0, 1))).lower(img, txt).compile().as_text()
  assert "f32[8,64]" in hlo and "f32[64,64]" not in hlo
  # The softmax ring: only B_local-sized blocks, not even the gathered embeddings.
  r = lambda i, t: losses.ring_softmax_contrastive(i, t, jnp.float32(10.0), mesh=mesh)
  hlo = jax.jit(jax.grad(r, argnums=(0, 1))).lower(img, txt).compile().as_text()
  assert "f32[8,8]" in hlo
  for big in ("f32[64,64]", "f32[8,64]", "f32[64,8]", "f32[64,4]"):
    assert big not in hlo, big


def test_contrastive_loss_chunked_uses_ambient_mesh():
  mesh = _mesh(2, 2, 2)
  rng = np.random.default_rng(11)
  out = _outputs(rng, batch=8)
  for kind, impl in (("softmax", "chunked"), ("softmax", "ring"), ("sigmoid", "chunked"),
                     ("sigmoid", "ring")):
    want = losses.contrastive_loss(out, _loss_config(kind))
    cfg = _loss_config(kind, impl)
    with jax.set_mesh(mesh):
      got = jax.jit(lambda o, c=cfg: losses.contrastive_loss(o, c))(out)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      # The trainer may also pass its (concrete) mesh explicitly.
      got = jax.jit(lambda o, c=cfg: losses.contrastive_loss(o, c, mesh=mesh))(out)
      np.testing.assert_allclose(got, want, rtol=1e-5)
  # Without any mesh 'chunked' is simply the plain loss.
  got = losses.contrastive_loss(out, cfg)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_chunked_rejects_indivisible_batch():
  mesh = _mesh(8, 1, 1)
  img = np.ones((12, 4), np.float32) / 2
  with pytest.raises(ValueError, match="12 is not divisible by the 8 devices"):
    losses.chunked_sigmoid_contrastive(img, img, 1.0, 0.0, mesh=mesh)
