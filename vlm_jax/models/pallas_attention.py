"""Attention through Pallas's TPU flash-attention kernel (`model.attention='pallas'`).

The kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) computes softmax attention block by
block without writing the [query, key] scores to memory, forward and backward. It takes its mask
in two forms, and this module maps our boolean masks onto them:

- no mask (a ViT's tokens, cross-attention to image tokens): nothing but the padding below, done
  with segment ids, so the scores never exist outside the kernel;
- a boolean mask (causal, padding, a prefix-LM's per-example prefix, any mix): an additive bias
  `ab` of [batch, heads, query, key], 0 where attending is allowed and a large negative elsewhere.
  The bias is in memory (as XLA's attention holds its scores), but the softmax stays fused.

We use this kernel rather than the newer splash kernel because splash takes its mask as static
structure (causal, local, a NumPy array) plus segment ids, and a prefix-LM's prefix differs per
example; the flash kernel's bias covers every mask our models build.

Lengths are padded to a multiple of `BLOCK` (the kernel's default block sizes); padded keys are
never attended and padded query rows are dropped. Grouped-query key/value heads are repeated to
the query heads. A Pallas kernel is opaque to XLA's sharding propagation (it would gather its
inputs onto every device), so under a mesh `attention` runs it with `jax.shard_map`, each device
on its own examples and heads, split as the model's logical axis rules split them. TPU only; the
tests run it on the CPU through Pallas's interpreter (`pltpu.force_tpu_interpret_mode(True)`)
against the einsum path.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

BLOCK = 128
# Added to the scores of masked pairs. Finite, so a row with every key masked (a padded query)
# stays NaN-free; exp(-1e9) is 0 in float32.
MASKED_BIAS = -1e9


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
              axes: tuple) -> jax.Array:
  """Softmax attention of [batch, length, heads, head_dim] inputs (k / v may have fewer heads:
  grouped-query attention) through `flash_attention`; under the ambient mesh (`jax.set_mesh`)
  one shard of the batch and heads per device: q / k / v split as the logical `axes` (batch,
  length, heads, head_dim) map to the mesh, the mask as the batch."""
  heads, kv_heads = q.shape[2], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"attention: {heads} query heads are not a multiple of {kv_heads} "
                     "key/value heads")
  if kv_heads != heads:   # the kernel takes one key/value head per query head
    k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return flash_attention(q, k, v, mask)
  spec = nn.logical_to_mesh_axes(axes)
  # check_vma=False: the kernel's outputs do not declare how they vary over the mesh axes; each
  # device's output is its own shard of examples and heads, as out_specs says.
  if mask is None:
    return jax.shard_map(lambda q, k, v: flash_attention(q, k, v, None), mesh=mesh,
                         in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
  mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
  mask_spec = jax.sharding.PartitionSpec(spec[0], None, None, None)
  return jax.shard_map(flash_attention, mesh=mesh, in_specs=(spec,) * 3 + (mask_spec,),
                       out_specs=spec, check_vma=False)(q, k, v, mask)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: Optional[jax.Array]) -> jax.Array:
  """Softmax attention of [batch, length, heads, head_dim] inputs (as many key/value heads as
  query heads), scaled by head_dim^-0.5, through the TPU flash kernel on one device.
  mask: boolean, broadcastable to [batch, 1, q_len, kv_len]; True = may attend."""
  # pylint: disable-next=g-import-not-at-top  (imported on first use: only this path needs it)
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  q_pad, kv_pad = _round_up(q_len, BLOCK) - q_len, _round_up(kv_len, BLOCK) - kv_len
  # The kernel's layout: [batch, heads, length, head_dim].
  to_kernel = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q, k, v = to_kernel(q, q_pad), to_kernel(k, kv_pad), to_kernel(v, kv_pad)
  bias = segment_ids = None
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, kv_pad)))   # padding: masked
    bias = jnp.where(mask, 0.0, MASKED_BIAS).astype(jnp.float32)
    bias = jax.lax.stop_gradient(jnp.broadcast_to(bias, (batch, heads) + bias.shape[2:]))
  elif q_pad or kv_pad:
    # Real tokens are segment 1 and padding segment 0: a real query never sees a padded key.
    real = lambda n, pad: jnp.broadcast_to((jnp.arange(n + pad) < n).astype(jnp.int32),
                                           (batch, n + pad))
    segment_ids = tpu_flash.SegmentIds(q=real(q_len, q_pad), kv=real(kv_len, kv_pad))
  out = tpu_flash.flash_attention(q, k, v, bias, segment_ids, sm_scale=head_dim ** -0.5)
  return out.transpose(0, 2, 1, 3)[:, :q_len]
