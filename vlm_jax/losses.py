"""Loss functions: pure functions of model outputs (tasks combine them; see vlm_jax.tasks).

Plain losses (any sharding; XLA partitions them under `jax.jit`):

* `softmax_contrastive` -- CLIP: symmetric cross-entropy over the batch (image -> text and
  text -> image), averaged over the two directions.
* `sigmoid_contrastive` -- SigLIP: every image-text pair is an independent binary problem
  (positive on the diagonal, negative elsewhere); the summed loss is divided by the batch size,
  as in the paper.
* `caption_xent` -- next-token cross-entropy with padding masked out and optional label
  smoothing, averaged over the real tokens (`caption_xent_sum`: the sum and the token count).
* `classification_xent_sum` -- softmax cross-entropy of class labels, with label smoothing.

Memory-lean variants for large global batches (`loss.contrastive_impl = 'chunked'` or
`'ring'`), written with `jax.shard_map` over the mesh axes that shard the batch:

* `chunked_sigmoid_contrastive` -- the SigLIP paper's chunked implementation: each device holds
  its own B_local image embeddings; text embeddings travel around a ring (`lax.ppermute`), so a
  device only ever holds B_local x B_local logits. The backward pass (a custom VJP) runs the ring
  again, recomputing each block instead of storing it, and the gradient of every text block
  travels with the block back to its owner. Memory per device: O(B_local^2 + B_local * D),
  independent of the global batch.
* `gathered_softmax_contrastive` -- CLIP's softmax needs a normaliser over the whole row and the
  whole column of the B_global x B_global matrix. Each device computes only *its rows* in both
  directions: local images against all-gathered texts, and local texts against all-gathered
  images. Memory per device: O(B_local * B_global) logits (two of them) plus the gathered
  B_global x D embeddings, instead of B_global^2 on every device. The trade-off: the logits
  still grow linearly with the global batch (e.g. B_global = 32k, B_local = 128: 2 x 16 MB of
  fp32 logits) and the gathered embeddings are held in full, but it needs a single all-gather
  (and a reduce-scatter in the backward pass) instead of n sequential ring steps, so it is the
  faster choice whenever the B_local x B_global rows fit in memory.
* `ring_softmax_contrastive` -- when even that does not fit: image and text blocks both travel
  around the ring, each device accumulates the log-sum-exp of its rows online (B_local^2 logits
  at a time, no gathered embeddings), and a custom VJP runs the ring again for the gradients.
  Cost: 2 x n ring steps of B_local x D blocks instead of one all-gather.

`loss.contrastive_impl`: 'plain'; 'chunked' = sigmoid ring / softmax gathered rows; 'ring' =
sigmoid ring / softmax ring. All give the same loss and gradients as the plain versions (tested
on an 8-device mesh). The models return float32 embeddings; the logits are computed in float32
whatever the input dtype.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# Mesh axes over which the batch is split (see `vlm_jax.sharding`: 'batch' -> ('data', 'fsdp')).
BATCH_AXES = ("data", "fsdp")

CONTRASTIVE_KINDS = ("softmax", "sigmoid", "none")
CONTRASTIVE_IMPLS = ("plain", "chunked", "ring")


def _check_embeddings(image_embed, text_embed):
  chex.assert_rank([image_embed, text_embed], 2)
  chex.assert_equal_shape([image_embed, text_embed])
  chex.assert_type([image_embed, text_embed], float)


def _check_scalar(x, name):
  x = jnp.asarray(x)
  if x.ndim != 0:
    raise ValueError(f"{name} must be a scalar; got shape {x.shape}")
  chex.assert_type(x, float)
  return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Plain losses.


def softmax_contrastive(image_embed, text_embed, logit_scale):
  """CLIP loss: symmetric cross-entropy over the batch.

  Args:
    image_embed: [B, D] L2-normalised image embeddings.
    text_embed: [B, D] L2-normalised text embeddings; row i is the caption of image i.
    logit_scale: scalar temperature, already exponentiated and clipped by the model.

  Returns:
    Scalar float32: 0.5 * (CE(image -> text) + CE(text -> image)), each averaged over the batch.
  """
  _check_embeddings(image_embed, text_embed)
  logit_scale = _check_scalar(logit_scale, "logit_scale")
  logits = logit_scale * jnp.einsum(
      "id,jd->ij", image_embed.astype(jnp.float32), text_embed.astype(jnp.float32))
  diag = jnp.diagonal(logits)
  # Row i: image i against all texts; column j: text j against all images.
  image_to_text = jax.nn.logsumexp(logits, axis=1) - diag
  text_to_image = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def _sigmoid_block_loss(image_embed, text_embed, logit_scale, logit_bias, positive_diagonal):
  """Summed SigLIP loss of one block of pairs; the diagonal is positive iff `positive_diagonal`."""
  logits = logit_scale * (image_embed @ text_embed.T) + logit_bias
  eye = jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
  labels = jnp.where(positive_diagonal, 2.0 * eye - 1.0, -1.0)   # +1 positive, -1 negative
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_contrastive(image_embed, text_embed, logit_scale, logit_bias):
  """SigLIP loss: -1/B * sum_{i,j} log sigmoid(z_ij * (t * x_i . y_j + b)), z_ij = +1 iff i == j.

  Args:
    image_embed: [B, D] L2-normalised image embeddings.
    text_embed: [B, D] L2-normalised text embeddings; row i is the caption of image i.
    logit_scale: scalar t, already exponentiated (and clipped) by the model.
    logit_bias: scalar b.

  Returns:
    Scalar float32: the sum over all B^2 pairs divided by B (the mean over images of the sum
    over texts), as in the SigLIP paper.
  """
  _check_embeddings(image_embed, text_embed)
  logit_scale = _check_scalar(logit_scale, "logit_scale")
  logit_bias = _check_scalar(logit_bias, "logit_bias")
  total = _sigmoid_block_loss(image_embed.astype(jnp.float32), text_embed.astype(jnp.float32),
                              logit_scale, logit_bias, True)
  return total / image_embed.shape[0]


def token_nll(logits, targets, label_smoothing=0.0):
  """Per-position cross-entropy [B, ...] of `targets` under `logits` [B, ..., V].

  With label smoothing epsilon the target distribution is (1 - eps) * one_hot + eps / V.
  """
  chex.assert_type(logits, float)
  chex.assert_type(targets, int)
  chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"loss.label_smoothing: must be in [0, 1); got {label_smoothing}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Gather the target's log-prob instead of building a one-hot over the vocabulary.
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    # CE against the uniform part of the smoothed target: mean over the vocabulary of -log p.
    uniform = -jnp.mean(log_probs, axis=-1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  return nll


def caption_xent_sum(logits, targets, mask, label_smoothing=0.0):
  """(summed next-token cross-entropy over the real tokens, number of real tokens).

  logits [B, L, V] (position t predicts `targets[:, t]`), targets and mask [B, L]; padding
  (mask False) contributes nothing. The pieces of `caption_xent`, for tasks that combine
  token losses over several micro-batches.
  """
  chex.assert_rank(logits, 3)
  chex.assert_rank([targets, mask], 2)
  chex.assert_equal_shape([targets, mask])
  nll = token_nll(logits, targets, label_smoothing)
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def caption_xent(logits, targets, mask, label_smoothing=0.0):
  """Next-token cross-entropy averaged over the real (mask=True) tokens.

  Args:
    logits: [B, L, V] float logits; position t predicts `targets[:, t]`.
    targets: [B, L] int token ids.
    mask: [B, L] bool (or 0/1) -- False for padding, which contributes nothing.
    label_smoothing: epsilon; the target distribution is (1 - eps) * one_hot + eps / V.

  Returns:
    Scalar float32. 0.0 when the mask is empty (rather than NaN).
  """
  total, count = caption_xent_sum(logits, targets, mask, label_smoothing)
  return total / jnp.maximum(count, 1.0)


def classification_xent_sum(logits, labels, label_smoothing=0.0):
  """(summed softmax cross-entropy of `labels` [B] under `logits` [B, C], number of examples)."""
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  nll = token_nll(logits, labels, label_smoothing)
  return jnp.sum(nll), jnp.float32(labels.shape[0])


# ----------------------------------------------------------------------------------------------
# Memory-lean variants (shard_map over the batch axes of a mesh).


def _batch_axes(mesh, batch_axes):
  """The mesh axes in `batch_axes` that exist in `mesh` (e.g. ('data', 'fsdp'))."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  return axes, size


def _check_divisible(batch, n, axes):
  if batch % n:
    raise ValueError(f"chunked contrastive loss: global batch {batch} is not divisible by the "
                     f"{n} devices of mesh axes {axes}")


def _make_ring_sigmoid(axes, n):
  """Per-device SigLIP loss with text blocks travelling around a ring of `n` devices.

  Device i holds images I_i and texts T_i. At step k it holds T_{i-k} (the ring sends
  i -> i+1), so the diagonal of the block is positive only at step 0. The function returns the
  loss already summed over all devices (unvarying over `axes`).
  """
  perm = [(i, (i + 1) % n) for i in range(n)]

  def ppermute(x):
    return jax.lax.ppermute(x, axes, perm)

  def varying(x):
    return jax.lax.pcast(x, axes, to="varying")

  def forward_sum(img, txt, scale, bias):
    def step(k, carry):
      txt_k, acc = carry
      acc = acc + _sigmoid_block_loss(img, txt_k, scale, bias, k == 0)
      return ppermute(txt_k), acc
    # n - 1 steps that pass the block on, then the last block (no need to pass it home).
    txt_last, acc = jax.lax.fori_loop(0, n - 1, step, (txt, varying(jnp.float32(0.0))))
    acc = acc + _sigmoid_block_loss(img, txt_last, scale, bias, n == 1)
    return jax.lax.psum(acc, axes)

  @jax.custom_vjp
  def loss_sum(img, txt, scale, bias):
    return forward_sum(img, txt, scale, bias)

  def fwd(img, txt, scale, bias):
    # Residuals are only the local inputs: blocks are recomputed in the backward ring.
    return forward_sum(img, txt, scale, bias), (img, txt, scale, bias)

  def bwd(res, g):
    img, txt, scale, bias = res

    def block_grads(txt_k, positive):
      dots = img @ txt_k.T
      logits = scale * dots + bias
      eye = jnp.eye(logits.shape[0], dtype=logits.dtype)
      labels = jnp.where(positive, 2.0 * eye - 1.0, -1.0)
      # d/dlogit of -log sigmoid(z * logit) = -z * sigmoid(-z * logit).
      dlogits = g * (-labels * jax.nn.sigmoid(-labels * logits))
      return (scale * (dlogits @ txt_k),         # d image (local rows)
              scale * (dlogits.T @ img),         # d text block k (belongs to its owner)
              jnp.sum(dlogits * dots),           # d scale
              jnp.sum(dlogits))                  # d bias

    def step(k, carry):
      txt_k, dtxt_k, dimg, dscale, dbias = carry
      gi, gt, gs, gb = block_grads(txt_k, k == 0)
      # The text block and its accumulated gradient travel together; after n passes the
      # gradient is back on the device that owns the block.
      return (ppermute(txt_k), ppermute(dtxt_k + gt), dimg + gi, dscale + gs, dbias + gb)

    zero = varying(jnp.float32(0.0))
    carry = (txt, jnp.zeros_like(txt), jnp.zeros_like(img), zero, zero)
    _, dtxt, dimg, dscale, dbias = jax.lax.fori_loop(0, n, step, carry)
    # scale and bias are replicated: their gradient is the sum of every device's share.
    return dimg, dtxt, jax.lax.psum(dscale, axes), jax.lax.psum(dbias, axes)

  loss_sum.defvjp(fwd, bwd)
  return loss_sum


def chunked_sigmoid_contrastive(image_embed, text_embed, logit_scale, logit_bias, *, mesh,
                                batch_axes=BATCH_AXES):
  """`sigmoid_contrastive` computed block by block around a ring of devices (shard_map).

  Same value and gradients as `sigmoid_contrastive` on the global batch. The global batch must
  divide evenly over the mesh axes in `batch_axes` (those present in `mesh`). Works inside
  `jax.jit` (embeddings sharded over the batch axes; any other sharding is resharded to that).
  """
  _check_embeddings(image_embed, text_embed)
  logit_scale = _check_scalar(logit_scale, "logit_scale")
  logit_bias = _check_scalar(logit_bias, "logit_bias")
  axes, n = _batch_axes(mesh, batch_axes)
  if n == 1:
    return sigmoid_contrastive(image_embed, text_embed, logit_scale, logit_bias)
  batch = image_embed.shape[0]
  _check_divisible(batch, n, axes)
  loss_sum = _make_ring_sigmoid(axes, n)
  sharded = jax.shard_map(
      loss_sum, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  total = sharded(image_embed.astype(jnp.float32), text_embed.astype(jnp.float32),
                  logit_scale, logit_bias)
  return total / batch


def gathered_softmax_contrastive(image_embed, text_embed, logit_scale, *, mesh,
                                 batch_axes=BATCH_AXES):
  """`softmax_contrastive` where each device computes only its own rows (shard_map).

  Device i: logits of its B_local images against all B_global texts, and of its B_local texts
  against all B_global images; its labels are the global indices of its rows. Per-device memory
  is 2 x B_local x B_global logits instead of B_global^2 (see the module docstring for the
  trade-off). Gradients flow back through the all-gathers (a reduce-scatter), so they equal the
  plain version's.
  """
  _check_embeddings(image_embed, text_embed)
  logit_scale = _check_scalar(logit_scale, "logit_scale")
  axes, n = _batch_axes(mesh, batch_axes)
  if n == 1:
    return softmax_contrastive(image_embed, text_embed, logit_scale)
  batch = image_embed.shape[0]
  _check_divisible(batch, n, axes)

  def local_sum(img, txt, scale):
    b = img.shape[0]
    all_img = jax.lax.all_gather(img, axes, tiled=True)    # [B_global, D]
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    rows = jax.lax.axis_index(axes) * b + jnp.arange(b)      # global index of the local rows
    def rows_loss(queries, keys):
      logits = scale * (queries @ keys.T)                    # [B_local, B_global]
      positive = jnp.take_along_axis(logits, rows[:, None], axis=1)[:, 0]
      return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive)
    return jax.lax.psum(rows_loss(img, all_txt) + rows_loss(txt, all_img), axes)

  sharded = jax.shard_map(local_sum, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                          out_specs=P())
  total = sharded(image_embed.astype(jnp.float32), text_embed.astype(jnp.float32), logit_scale)
  return total / (2 * batch)


def _make_ring_softmax(axes, n):
  """Per-device CLIP loss with (image, text) blocks travelling around a ring of `n` devices.

  Device i keeps its rows in both directions (local images vs every text block, local texts vs
  every image block) and accumulates their log-sum-exp online, so it only ever holds
  B_local x B_local logits. Returns the summed loss over all devices (unvarying over `axes`).
  The backward pass runs the ring again with the stored row log-sum-exps; the gradient of each
  travelling block travels with it back to its owner.
  """
  perm = [(i, (i + 1) % n) for i in range(n)]

  def ppermute(x):
    return jax.lax.ppermute(x, axes, perm)

  def varying(x):
    return jax.lax.pcast(x, axes, to="varying")

  def row_lse(img, txt, scale):
    def step(carry, _):
      img_k, txt_k, lse_i, lse_t = carry
      lse_i = jnp.logaddexp(lse_i, jax.nn.logsumexp(scale * (img @ txt_k.T), axis=1))
      lse_t = jnp.logaddexp(lse_t, jax.nn.logsumexp(scale * (txt @ img_k.T), axis=1))
      return (ppermute(img_k), ppermute(txt_k), lse_i, lse_t), None
    neg_inf = jnp.full((img.shape[0],), -jnp.inf, jnp.float32)
    init = (img, txt, varying(neg_inf), varying(neg_inf))
    (img_k, txt_k, lse_i, lse_t), _ = jax.lax.scan(step, init, None, length=n - 1)
    # The last blocks need not be passed on.
    lse_i = jnp.logaddexp(lse_i, jax.nn.logsumexp(scale * (img @ txt_k.T), axis=1))
    lse_t = jnp.logaddexp(lse_t, jax.nn.logsumexp(scale * (txt @ img_k.T), axis=1))
    return lse_i, lse_t

  def forward(img, txt, scale):
    lse_i, lse_t = row_lse(img, txt, scale)
    positive = scale * jnp.sum(img * txt, axis=1)      # the diagonal, in both directions
    return jax.lax.psum(jnp.sum(lse_i + lse_t - 2.0 * positive), axes), (lse_i, lse_t)

  @jax.custom_vjp
  def loss_sum(img, txt, scale):
    return forward(img, txt, scale)[0]

  def fwd(img, txt, scale):
    total, (lse_i, lse_t) = forward(img, txt, scale)
    return total, (img, txt, scale, lse_i, lse_t)

  def bwd(res, g):
    img, txt, scale, lse_i, lse_t = res

    def step(k, carry):
      img_k, txt_k, dimg_k, dtxt_k, dimg, dtxt, dscale = carry
      dots_i = img @ txt_k.T                                   # local images vs text block k
      p_i = g * jnp.exp(scale * dots_i - lse_i[:, None])       # softmax rows, times g
      dots_t = txt @ img_k.T                                   # local texts vs image block k
      p_t = g * jnp.exp(scale * dots_t - lse_t[:, None])
      dimg = dimg + scale * (p_i @ txt_k)
      dtxt = dtxt + scale * (p_t @ img_k)
      dtxt_k = dtxt_k + scale * (p_i.T @ img)
      dimg_k = dimg_k + scale * (p_t.T @ txt)
      dscale = dscale + jnp.sum(p_i * dots_i) + jnp.sum(p_t * dots_t)
      return (ppermute(img_k), ppermute(txt_k), ppermute(dimg_k), ppermute(dtxt_k), dimg, dtxt,
              dscale)

    zeros = jnp.zeros_like(img)
    carry = (img, txt, zeros, zeros, zeros, zeros, varying(jnp.float32(0.0)))
    _, _, dimg_k, dtxt_k, dimg, dtxt, dscale = jax.lax.fori_loop(0, n, step, carry)
    # After n passes each block's gradient is home; add the positive (diagonal) terms.
    dimg = dimg + dimg_k - 2.0 * g * scale * txt
    dtxt = dtxt + dtxt_k - 2.0 * g * scale * img
    dscale = dscale - 2.0 * g * jnp.sum(img * txt)
    return dimg, dtxt, jax.lax.psum(dscale, axes)

  loss_sum.defvjp(fwd, bwd)
  return loss_sum


def ring_softmax_contrastive(image_embed, text_embed, logit_scale, *, mesh,
                             batch_axes=BATCH_AXES):
  """`softmax_contrastive` with both embeddings travelling around a ring (shard_map).

  The most memory-lean softmax: B_local x B_local logits per device, no gathered B_global x D
  embeddings; the price is n = (devices on the batch axes) ring steps in the forward and again in
  the backward pass, each moving a B_local x D block of images and of texts (plus their
  gradients on the way back), where `gathered_softmax_contrastive` does one all-gather. Choose it
  (`loss.contrastive_impl = 'ring'`) when the B_local x B_global rows do not fit in memory.
  """
  _check_embeddings(image_embed, text_embed)
  logit_scale = _check_scalar(logit_scale, "logit_scale")
  axes, n = _batch_axes(mesh, batch_axes)
  if n == 1:
    return softmax_contrastive(image_embed, text_embed, logit_scale)
  batch = image_embed.shape[0]
  _check_divisible(batch, n, axes)
  sharded = jax.shard_map(_make_ring_softmax(axes, n), mesh=mesh,
                          in_specs=(P(axes), P(axes), P()), out_specs=P())
  total = sharded(image_embed.astype(jnp.float32), text_embed.astype(jnp.float32), logit_scale)
  return total / (2 * batch)


# ----------------------------------------------------------------------------------------------
# The configured contrastive loss.


def _resolve_mesh(mesh):
  """The explicit mesh, else the ambient one (`jax.set_mesh`), else None."""
  if mesh is not None:
    return mesh
  ambient = jax.sharding.get_abstract_mesh()
  return None if ambient.empty else ambient


def contrastive_loss(outputs, loss_config, *, mesh=None):
  """The configured contrastive term (`loss.contrastive`, `loss.contrastive_impl`).

  'chunked' and 'ring' use the shard_map variants over `mesh` (default: the mesh set with
  `jax.set_mesh`); without a mesh, or with a single device on the batch axes, they are the plain
  loss.
  """
  kind = loss_config.contrastive
  impl = loss_config.get("contrastive_impl", "plain")
  if kind not in CONTRASTIVE_KINDS:
    raise ValueError(f"loss.contrastive: unknown contrastive loss {kind!r}; expected one of "
                     f"{', '.join(CONTRASTIVE_KINDS)}")
  if impl not in CONTRASTIVE_IMPLS:
    raise ValueError(f"loss.contrastive_impl: unknown implementation {impl!r}; expected one of "
                     f"{', '.join(CONTRASTIVE_IMPLS)}")
  img, txt, scale = outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"]
  mesh = None if impl == "plain" else _resolve_mesh(mesh)
  if kind == "softmax":
    if mesh is None:
      return softmax_contrastive(img, txt, scale)
    if impl == "ring":
      return ring_softmax_contrastive(img, txt, scale, mesh=mesh)
    return gathered_softmax_contrastive(img, txt, scale, mesh=mesh)
  bias = outputs["logit_bias"]
  if mesh is None:
    return sigmoid_contrastive(img, txt, scale, bias)
  return chunked_sigmoid_contrastive(img, txt, scale, bias, mesh=mesh)
