"""Transformer building blocks shared by the image tower, text tower and decoder.

Everything here is plain Flax Linen. Two conventions hold throughout:

* Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
  names ('embed', 'mlp', 'heads', 'kv', 'vocab', 'patch', 'joint', 'length' and, for scanned
  stacks, 'layers'). The trainer maps those names to mesh axes by config.
* Large activations pass through `nn.with_logical_constraint`; outside a mesh this is a no-op.

Parameter names (what a checkpoint or a weight importer sees), for one block:

    block_<i>/ln_1/{scale,bias}                 pre-attention LayerNorm
    block_<i>/attn/{query,key,value}/{kernel [embed, heads, kv], bias [heads, kv]}
    block_<i>/attn/out/{kernel [heads, kv, embed], bias [embed]}
    block_<i>/ln_2/{scale,bias}                 pre-MLP LayerNorm
    block_<i>/mlp/fc1/{kernel [embed, mlp], bias [mlp]}
    block_<i>/mlp/fc2/{kernel [mlp, embed], bias [embed]}

A decoder block has `self_attn` and `cross_attn` (with `ln_1`, `ln_2`, `ln_3` in front of
self-attention, cross-attention and MLP). With `scan=True` the blocks of a stack live under one
name, `blocks`, with a leading 'layers' axis; `stack_block_params` / `unstack_block_params`
convert between the two layouts.
"""
import functools
import re
from typing import Any, Callable, Optional

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from vlm_jax.models import pallas_attention

Dtype = Any
Array = jax.Array

# Logical names of the activations that get sharding constraints.
BATCH, LENGTH, EMBED, HEADS, KV = "batch", "length", "embed", "heads", "kv"
ACT_AXES = (BATCH, LENGTH, EMBED)

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def quick_gelu(x: Array) -> Array:
  """The sigmoid approximation of GELU used by OpenAI CLIP: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def get_activation(name: str, field: str = "act") -> Callable[[Array], Array]:
  """Returns the activation called `name`; `field` names the config field in the error."""
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "gelu_tanh":
    return functools.partial(jax.nn.gelu, approximate=True)
  if name == "quick_gelu":
    return quick_gelu
  raise ValueError(f"{field}: unknown activation {name!r}; expected one of "
                   f"{', '.join(ACTIVATIONS)}")


# Initialisers. Dense kernels are Xavier-uniform over their real fan-in / fan-out axes (the
# attention kernels are 3-D, so the axes are spelled out), biases start at zero.
def dense_init(in_axis=-2, out_axis=-1):
  return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)


def partitioned(init: Callable, names: tuple) -> Callable:
  """`init` whose result carries the logical axis `names` (one per array dimension)."""
  return nn.with_logical_partitioning(init, names)


def layer_norm(name: str, eps: float, use_bias: bool, dtype: Dtype,
               param_dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm over the width ('embed') axis; statistics are computed in float32 by Flax."""
  return nn.LayerNorm(
      epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones_init(), (EMBED,)),
      bias_init=partitioned(nn.initializers.zeros_init(), (EMBED,)))


def dense(features: int, names: tuple, *, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str, kernel_init: Optional[Callable] = None) -> nn.Dense:
  """A Dense layer whose kernel has logical axes `names` (in, out) and bias axes (out,)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=partitioned(kernel_init or dense_init(), names),
      bias_init=partitioned(nn.initializers.zeros_init(), names[-1:]))


class Projection(nn.Module):
  """Projects the last axis of `x` to `shape` (or back from `shape` when `in_dims` > 1).

  This is a small DenseGeneral with explicit logical axis names: the attention kernels keep the
  head axes separate ([embed, heads, kv] and [heads, kv, embed]) so that the 'heads' axis can be
  sharded for tensor parallelism.
  """
  features: tuple          # output shape (over the trailing axes)
  names: tuple             # logical names of the kernel axes (inputs then outputs)
  in_dims: int = 1         # how many trailing input axes are contracted
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[-self.in_dims:]
    n_in, n_out = len(in_shape), len(self.features)
    init = dense_init(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", partitioned(init, self.names), in_shape + tuple(self.features),
                        self.param_dtype)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.tensordot(x, kernel, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.names[n_in:]),
                        tuple(self.features), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head dot-product attention: self-attention (context=None) or cross-attention.

  mask: boolean, broadcastable to [batch, heads, q_len, kv_len]; True = may attend.
  decode: attention with a cache in the Flax 'cache' collection. Self-attention: the first call
    (cache absent) creates zeroed key/value buffers of `cache_length` positions (default: its
    input length) and computes the ordinary (masked) attention; later calls take one new token
    each, write its key/value at `cache_index` and attend to positions <= cache_index.
    Cross-attention: the first call computes the context's keys/values and keeps them in the
    cache; later calls read them from there (the context argument is then not used), so a
    decoding loop projects the image tokens once, not at every step.
  impl: how the scores are computed (`ATTENTION_IMPLS`): 'einsum' (the reference: two einsums,
    logits and softmax in float32), 'xla' (`jax.nn.dot_product_attention`, XLA's fused
    attention), 'cudnn' (its cuDNN flash kernel: GPU, bf16 / fp16, head size <= 128; a boolean
    mask becomes an additive bias there) or 'pallas' (Pallas's TPU flash kernel,
    `pallas_attention`; one-token decoding steps use einsum). All compute the same function.
  out_features: width of the output projection (default: the input width); OpenAI CLIP's
    attention pooling projects to the embedding size there.
  """
  num_heads: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "einsum"
  cache_length: Optional[int] = None
  out_features: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None, mask: Optional[Array] = None,
               decode: bool = False) -> Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"num_heads: width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    kv_in = x if context is None else context
    proj = functools.partial(Projection, (self.num_heads, head_dim), ("embed", HEADS, KV),
                             use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    q = proj(name="query")(x)
    qkv_axes = (BATCH, LENGTH, HEADS, KV)
    q = nn.with_logical_constraint(q, qkv_axes)
    if decode and context is not None and self.has_variable("cache", "context_key"):
      # Decoding step: the context's keys/values were computed once, by the first call.
      k = self.get_variable("cache", "context_key")
      v = self.get_variable("cache", "context_value")
    else:
      k = nn.with_logical_constraint(proj(name="key")(kv_in), qkv_axes)
      v = nn.with_logical_constraint(proj(name="value")(kv_in), qkv_axes)
      if decode and context is not None:
        self.variable("cache", "context_key", lambda: k)
        self.variable("cache", "context_value", lambda: v)
    if decode and context is None:
      k, v, mask = self._update_cache(k, v, mask)

    impl = resolve_attention(self.impl, self.dtype, head_dim, q.shape[1])
    if impl == "einsum":
      # Logits and softmax in float32 for stability, whatever the compute dtype.
      q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      if mask is not None:
        # A large finite negative (not -inf) keeps fully masked rows NaN-free.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    else:
      out = fused_attention(q, k, v, mask, impl).astype(self.dtype)
    out = nn.with_logical_constraint(out, qkv_axes)
    out = Projection((self.out_features or width,), (HEADS, KV, "embed"), in_dims=2,
                     use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)
    return nn.with_logical_constraint(out, ACT_AXES)

  def _update_cache(self, k, v, mask):
    initialised = self.has_variable("cache", "cached_key")
    shape = (k.shape[0], self.cache_length or k.shape[1]) + k.shape[2:]
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialised:   # Shape-setting call: plain attention over the given sequence.
      return k, v, mask
    if k.shape[1] != 1:
      raise ValueError(f"decode=True expects one token per call, got length {k.shape[1]}")
    idx = cache_index.value
    k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                     (0, idx, 0, 0))
    v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                     (0, idx, 0, 0))
    cached_key.value, cached_value.value = k, v
    cache_index.value = idx + 1
    # The new query may attend to every filled position, i.e. 0..idx.
    mask = (jnp.arange(k.shape[1]) <= idx)[None, None, None, :]
    return k, v, mask


class MLP(nn.Module):
  """Two-layer feed-forward network: fc1 (width -> mlp_dim), activation, fc2 (-> width)."""
  mlp_dim: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, "mlp"))
    h = get_activation(self.act)(h)
    return dense(width, ("mlp", "embed"), name="fc2", **kw)(h)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `deterministic` is a module attribute (not a call argument) so that nn.remat / nn.scan only
  see array arguments. With `scan_carry=True` the block returns (x, None), the shape nn.scan
  needs.
  """
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  ln_bias: bool = True
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(x, ACT_AXES)
    y = layer_norm("ln_1", self.ln_eps, self.ln_bias, **kw)(x)
    y = Attention(self.num_heads, use_bias=self.use_bias, impl=self.attention, name="attn",
                  **kw)(y, mask=mask)
    x = x + nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    y = layer_norm("ln_2", self.ln_eps, self.ln_bias, **kw)(x)
    y = MLP(self.mlp_dim, act=self.act, use_bias=self.use_bias, name="mlp", **kw)(y)
    x = x + nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, ACT_AXES)
    return (x, None) if self.scan_carry else x


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: causal self-attention, cross-attention to `context`, MLP."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  ln_bias: bool = True
  dropout: float = 0.0
  deterministic: bool = True
  decode: bool = False
  cache_length: Optional[int] = None    # decode: positions of the self-attention cache
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x: Array, context: Array, self_mask: Optional[Array] = None,
               context_mask: Optional[Array] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, ACT_AXES)
    y = layer_norm("ln_1", self.ln_eps, self.ln_bias, **kw)(x)
    y = Attention(self.num_heads, use_bias=self.use_bias, impl=self.attention, name="self_attn",
                  cache_length=self.cache_length, **kw)(y, mask=self_mask, decode=self.decode)
    x = x + drop(y)
    y = layer_norm("ln_2", self.ln_eps, self.ln_bias, **kw)(x)
    y = Attention(self.num_heads, use_bias=self.use_bias, impl=self.attention, name="cross_attn",
                  **kw)(y, context=context, mask=context_mask, decode=self.decode)
    x = x + drop(y)
    y = layer_norm("ln_3", self.ln_eps, self.ln_bias, **kw)(x)
    y = MLP(self.mlp_dim, act=self.act, use_bias=self.use_bias, name="mlp", **kw)(y)
    x = x + drop(y)
    x = nn.with_logical_constraint(x, ACT_AXES)
    return (x, None) if self.scan_carry else x


def encoder_flops(tokens: int, width: int, depth: int, mlp: int, causal: bool) -> float:
  """Forward matmul FLOPs of `depth` pre-LN self-attention blocks on one sequence (2 FLOPs per
  multiply-add): the four attention projections, the MLP, and QK^T / AV (causal: half)."""
  proj = 2 * tokens * (4 * width * width + 2 * width * mlp)
  attn = 2 * 2 * tokens * tokens * width
  if causal:
    attn /= 2
  return depth * (proj + attn)


# What nn.remat keeps from the forward pass of a block (`model.remat_policy`); everything else is
# recomputed in the backward pass. 'full' keeps only the block's input (least memory, one more
# forward); 'dots' keeps every matmul output; 'dots_no_batch' keeps the matmuls without a batch
# dimension (MaxText's 'minimal').
# model.attention -> the `implementation` of jax.nn.dot_product_attention ('einsum': our own).
# 'auto' resolves per call site (`resolve_attention`): cuDNN where it runs, else the reference.
# 'pallas': Pallas's TPU flash-attention kernel (`pallas_attention`), not jax.nn's.
ATTENTION_IMPLS = {"einsum": None, "xla": "xla", "cudnn": "cudnn", "pallas": None, "auto": None}


def resolve_attention(impl: str, dtype, head_dim: int, query_length: int,
                      backend: Optional[str] = None) -> str:
  """The implementation an attention layer runs: `impl`, except that 'auto' becomes 'cudnn' on
  a GPU when cuDNN's flash kernel takes the call (bf16 / fp16, head size a multiple of 8 and
  <= 128) and the query is more than one token, and 'einsum' otherwise (CPU, TPU, float32, and
  decoding steps: on an H200, CoCa's KV-cached decoding ran 1.3x slower with cuDNN)."""
  if impl == "pallas" and query_length == 1:
    return "einsum"   # a decoding step: one query row would be padded to a whole kernel block
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  fits = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 128 and query_length > 1)
  return "cudnn" if backend == "gpu" and fits else "einsum"

# cuDNN's fused attention refuses to differentiate odd sequence lengths ("Unsupported sequence
# length Q 197, KV 197", seen with jax 0.11.2: its training rule treats every call as having a
# bias, and with a bias cuDNN needs even lengths), which is every ViT with a class token. So the
# 'cudnn' path pads queries and keys to an even length and masks the padding by sequence lengths.
CUDNN_LENGTH_MULTIPLE = 2


def fused_attention(q: Array, k: Array, v: Array, mask: Optional[Array], impl: str,
                    pad_to: Optional[int] = None) -> Array:
  """`jax.nn.dot_product_attention` (impl 'xla' or 'cudnn') on [batch, length, heads, head_dim]
  inputs, scaled by head_dim^-0.5; k / v may have fewer heads than q (grouped-query attention).
  mask: boolean, broadcastable to [batch, 1, q_len, kv_len].

  pad_to (default: CUDNN_LENGTH_MULTIPLE for 'cudnn', else 1) > 1 pads both lengths up to a
  multiple of it: padded keys are masked out through `key_value_seq_lengths` (and padded query
  rows dropped), so the result is the unpadded one. impl 'pallas' is the TPU flash kernel
  (`pallas_attention`, which pads to its own block size)."""
  if impl == "pallas":
    return pallas_attention.attention(q, k, v, mask, (BATCH, LENGTH, HEADS, KV))
  if pad_to is None:
    pad_to = CUDNN_LENGTH_MULTIPLE if impl == "cudnn" else 1
  batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
  q_pad, kv_pad = -q_len % pad_to, -kv_len % pad_to
  lengths = {}
  if q_pad or kv_pad:
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    q, k, v = pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad)
    if mask is not None:   # the padding itself is masked by the lengths below
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, kv_pad)), constant_values=True)
    lengths = dict(query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
                   key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5,
                                     implementation=ATTENTION_IMPLS[impl], **lengths)
  return out[:, :q_len]

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_blocks(block_cls, depth: int, x: Array, *args, remat: bool | str = False,
               scan: bool = False, **block_kwargs) -> Array:
  """Applies `depth` blocks of `block_cls` to x; must be called inside a compact method.

  `args` are extra array (or None) arguments shared by every block (masks, cross-attention
  context). The three layouts compute the same function with the same parameter values:
    plain: submodules block_0 .. block_{depth-1};
    remat: the same names and tree, each block wrapped in nn.remat (activations recomputed in the
      backward pass instead of stored; `remat` True or a name in REMAT_POLICIES);
    scan:  one submodule `blocks` whose params have a leading 'layers' axis of size depth.
  """
  if depth < 1:
    raise ValueError(f"depth: must be >= 1, got {depth}")
  policy = REMAT_POLICIES[remat if isinstance(remat, str) else "full"] if remat else None
  cls = nn.remat(block_cls, policy=policy) if remat else block_cls
  if not scan:
    for i in range(depth):
      x = cls(name=f"block_{i}", **block_kwargs)(x, *args)
    return x
  scanned = nn.scan(
      cls,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=depth,
      metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(name="blocks", scan_carry=True, **block_kwargs)(x, *args)
  return x


# --- Position embeddings of an image grid at another resolution. ---


def resample_grid_posemb(pos: Array, prefix_tokens: int, grid: int) -> Array:
  """A learned position embedding [prefix_tokens + g * g, W] of a g x g patch grid (row-major
  after its class / pooling token) for a grid x grid one: the grid part resized with
  antialiased bicubic interpolation (the method open_clip's `resize_pos_embed` and timm use),
  the prefix kept. Fine-tuning at another image size or patch count starts from it."""
  old = int(round((pos.shape[0] - prefix_tokens) ** 0.5))
  if old * old != pos.shape[0] - prefix_tokens:
    raise ValueError(f"pos_embedding: {pos.shape[0] - prefix_tokens} positions after "
                     f"{prefix_tokens} prefix token(s) are not a square grid")
  width = pos.shape[1]
  image = pos[prefix_tokens:].reshape(old, old, width).astype(jnp.float32)
  image = jax.image.resize(image, (grid, grid, width), method="bicubic", antialias=True)
  return jnp.concatenate([pos[:prefix_tokens].astype(jnp.float32),
                          image.reshape(grid * grid, width)]).astype(pos.dtype)


# --- Converting parameters between the plain and the scanned layout. ---

_BLOCK_RE = re.compile(r"^block_(\d+)$")


def stack_block_params(tree):
  """Plain layout -> scan layout: every dict holding block_0..block_{n-1} gets them stacked
  along a new leading axis under the key 'blocks'. Works on unboxed arrays (`nn.unbox`)."""
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return tree
  tree = dict(tree)
  blocks = {int(m.group(1)): k for k in tree if (m := _BLOCK_RE.match(k))}
  out = {k: stack_block_params(v) for k, v in tree.items() if k not in blocks.values()}
  if blocks:
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"non-contiguous block indices: {sorted(blocks)}")
    parts = [stack_block_params(tree[blocks[i]]) for i in range(len(blocks))]
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
  return out


def unstack_block_params(tree):
  """Scan layout -> plain layout (inverse of `stack_block_params`)."""
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return tree
  out = {}
  for k, v in dict(tree).items():
    if k == "blocks":
      depth = jax.tree.leaves(v)[0].shape[0]
      for i in range(depth):
        out[f"block_{i}"] = unstack_block_params(jax.tree.map(lambda a, i=i: a[i], v))
    else:
      out[k] = unstack_block_params(v)
  return out



class Encoder(nn.Module):
  """A stack of `EncoderBlock`s followed by a final LayerNorm ('encoder_norm')."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  ln_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan: bool = False
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, *, train: bool = False) -> Array:
    x = run_blocks(
        EncoderBlock, self.depth, x, mask, remat=self.remat, scan=self.scan,
        attention=self.attention,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
        use_bias=self.use_bias, ln_bias=self.ln_bias, dropout=self.dropout,
        deterministic=not train, dtype=self.dtype, param_dtype=self.param_dtype)
    return layer_norm("encoder_norm", self.ln_eps, self.ln_bias, self.dtype, self.param_dtype)(x)
