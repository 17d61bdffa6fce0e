"""Decoder-only language model (GPT-2 or Llama-style blocks) with a KV cache and an optional
prefix of embeddings (image tokens) in front of the text.

    (tokens [B, T], prefix [B, N, W] or None) -> blocks -> final norm -> logits [B, T, vocab]

Two block styles, chosen by `style`:

  gpt2   learned absolute positions, LayerNorm (with bias), GELU MLP (fc1 -> gelu -> fc2, with
         biases), attention with biases, vocabulary head tied to the token embedding.
  llama  rotary positions (RoPE, the half-split layout of Hugging Face Llama), RMSNorm, gated
         SiLU MLP (down(silu(gate(x)) * up(x)), no biases), grouped-query attention
         (`num_kv_heads` <= `num_heads` key/value heads), untied head.

Attention mask (one rule for training and decoding): a query may attend to key k when k is a
real token (`valid`) and either k < `prefix_len` (the prefix -- image tokens and prompt -- is
seen whole, bidirectionally, by everyone) or k <= the query's own index (causal). So
prefix_len = 0 is a plain causal LM and prefix_len = N + prompt length is a prefix-LM. Position
ids count real tokens only (`cumsum(valid) - 1`), so a left-padded prompt gets the positions a
right-padded one has, and padding never shifts a prediction.

Decoding (`decode=True`): the first call on a cache-less model only creates the zeroed 'cache'
collection sized by its input (`init_cache` does this under `jax.eval_shape`). Later calls take
a chunk of any length: the prompt in one pass (prefill), then one token per call. Each chunk's
keys/values are written at the cache index; the cache also holds which slots are real tokens and
each row's next position id.

Parameter names: token_embedding/embedding [vocab, embed], pos_embedding [max_length, embed]
(gpt2), block_<i>/{norm_1, attn/{query,key,value,out}, norm_2, mlp/{fc1,fc2 | gate,up,down}},
final_norm, head (untied). Attention kernels are [embed, heads, kv] (query) and
[embed, kv_heads, kv] (key, value), so tensor parallelism shards the heads.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

Dtype = Any
Array = jax.Array
STYLES = ("gpt2", "llama")
KV_HEADS = "kv_heads"


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary position embedding of x [B, T, H, D] at integer `positions` [B, T] (the half-split
  layout: dimension i pairs with i + D/2, frequencies theta^(-2i/D))."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, D/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., d // 2:], xf[..., :d // 2]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class LMAttention(nn.Module):
  """Self-attention with grouped key/value heads, optional RoPE and a chunked KV cache."""
  num_heads: int
  num_kv_heads: int
  use_bias: bool
  rotary: bool
  rope_theta: float = 10000.0
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"   # layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache_index: Array) -> Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.Projection((self.num_heads, head_dim), ("embed", layers.HEADS, layers.KV),
                          name="query", **kw)(x)
    kv = functools.partial(layers.Projection, (self.num_kv_heads, head_dim),
                           ("embed", KV_HEADS, layers.KV), **kw)
    k, v = kv(name="key")(x), kv(name="value")(x)
    if self.rotary:
      q = rope(q, positions, self.rope_theta)
      k = rope(k, positions, self.rope_theta)
    axes = (layers.BATCH, layers.LENGTH, layers.HEADS, layers.KV)
    q = nn.with_logical_constraint(q, axes)
    if self.decode:
      k, v = self._cached(k, v, cache_index)
    impl = layers.resolve_attention(self.attention, self.dtype, head_dim, q.shape[1])
    if impl != "einsum":   # the fused kernels take grouped key/value heads as they are
      out = layers.fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl)
      out = out.astype(self.dtype)
    else:
      groups = self.num_heads // self.num_kv_heads
      if groups > 1:   # every key/value head serves `groups` query heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
      q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype))
    out = nn.with_logical_constraint(out, axes)
    out = layers.Projection((width,), (layers.HEADS, layers.KV, "embed"), in_dims=2,
                            name="out", **kw)(out)
    return nn.with_logical_constraint(out, layers.ACT_AXES)

  def _cached(self, k, v, cache_index):
    """Writes this chunk's keys/values at `cache_index`; returns the whole cache buffers."""
    initialised = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if not initialised:
      return k, v
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype),
                                            (0, cache_index, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype),
                                            (0, cache_index, 0, 0))
    return ck.value, cv.value


class GatedMLP(nn.Module):
  """Llama's MLP: down(silu(gate(x)) * up(x)), no biases."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = layers.dense(self.mlp_dim, ("embed", "mlp"), name="gate", **kw)(x)
    up = layers.dense(self.mlp_dim, ("embed", "mlp"), name="up", **kw)(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, (layers.BATCH, layers.LENGTH, "mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="down", **kw)(h)


def _norm(style, name, eps, dtype, param_dtype):
  if style == "gpt2":
    return layers.layer_norm(name, eps, True, dtype, param_dtype)
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                    scale_init=layers.partitioned(nn.initializers.ones_init(), ("embed",)))


class LMBlock(nn.Module):
  """Pre-norm block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""
  style: str
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  norm_eps: float
  rope_theta: float = 10000.0
  act: str = "gelu_tanh"
  dropout: float = 0.0
  deterministic: bool = True
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, cache_index):
    gpt2 = self.style == "gpt2"
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    y = _norm(self.style, "norm_1", self.norm_eps, **kw)(x)
    y = LMAttention(self.num_heads, self.num_kv_heads, use_bias=gpt2, rotary=not gpt2,
                    rope_theta=self.rope_theta, decode=self.decode, attention=self.attention,
                    name="attn", **kw)(y, mask, positions, cache_index)
    x = x + drop(y)
    y = _norm(self.style, "norm_2", self.norm_eps, **kw)(x)
    if gpt2:
      y = layers.MLP(self.mlp_dim, act=self.act, use_bias=True, name="mlp", **kw)(y)
    else:
      y = GatedMLP(self.mlp_dim, name="mlp", **kw)(y)
    x = nn.with_logical_constraint(x + drop(y), layers.ACT_AXES)
    return (x, None) if self.scan_carry else x


def attention_mask(valid: Array, prefix_len: Array, query_offset, num_queries: int) -> Array:
  """bool [B, 1, Q, K]: query i (absolute index query_offset + i) may attend to key k when
  valid[b, k] and (k < prefix_len[b] or k <= query_offset + i)."""
  keys = jnp.arange(valid.shape[1])[None, None, :]
  queries = (query_offset + jnp.arange(num_queries))[None, :, None]
  allowed = (keys < prefix_len[:, None, None]) | (keys <= queries)
  return (allowed & valid[:, None, :])[:, None]


class LM(nn.Module):
  """See the module docstring. Built from `model.lm` by `from_config`."""
  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  style: str = "gpt2"
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  act: str = "gelu_tanh"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan: bool = False
  attention: str = "einsum"

  @nn.compact
  def __call__(self, tokens: Array, *, prefix: Optional[Array] = None,
               prefix_len: Optional[Array] = None, valid: Optional[Array] = None,
               decode: bool = False, train: bool = False) -> Array:
    """Logits [B, T, vocab] (float32) of the T tokens; position t predicts token t + 1.

    prefix: [B, N, width] embeddings placed before the tokens (image tokens), or None.
    prefix_len: int [B], keys below it are seen bidirectionally (see the module docstring);
      None = 0 (causal). Counted over this call's chunk, prefix included.
    valid: bool [B, N + T], False for padding inside the chunk; None = all real.
    """
    b, t = tokens.shape
    n = 0 if prefix is None else prefix.shape[1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, self.width, name="token_embedding",
                     embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                       ("vocab", "embed")), **kw)
    x = embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([jnp.asarray(prefix, self.dtype), x], axis=1)
    length = n + t
    valid = jnp.ones((b, length), bool) if valid is None else valid.astype(bool)
    prefix_len = (jnp.zeros((b,), jnp.int32) if prefix_len is None
                  else jnp.asarray(prefix_len, jnp.int32))

    stepping = False
    if decode:
      stepping = self.has_variable("cache", "index")
      index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      next_pos = self.variable("cache", "next_position", lambda: jnp.zeros((b,), jnp.int32))
      valid_cache = self.variable("cache", "valid", lambda: jnp.zeros((b, length), bool))
    if stepping:
      offset = index.value
      positions = next_pos.value[:, None] + jnp.cumsum(valid, axis=1) - 1
      all_valid = jax.lax.dynamic_update_slice(valid_cache.value, valid, (0, offset))
      mask = attention_mask(all_valid, offset + prefix_len, offset, length)
      valid_cache.value = all_valid
      next_pos.value = next_pos.value + jnp.sum(valid, axis=1).astype(jnp.int32)
      index.value = offset + length
    else:
      offset = jnp.array(0, jnp.int32)
      positions = jnp.cumsum(valid, axis=1) - 1
      mask = attention_mask(valid, prefix_len, 0, length)
    positions = jnp.maximum(positions, 0)

    if self.style == "gpt2":
      pos_table = self.param("pos_embedding", layers.partitioned(nn.initializers.normal(0.01),
                                                                 ("length", "embed")),
                             (self.max_length, self.width), self.param_dtype)
      x = x + jnp.take(jnp.asarray(pos_table, self.dtype), positions, axis=0)
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = layers.run_blocks(
        LMBlock, self.depth, x, mask, positions, offset, remat=self.remat, scan=self.scan,
        style=self.style, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        mlp_dim=self.mlp_dim, norm_eps=self.norm_eps, rope_theta=self.rope_theta, act=self.act,
        dropout=self.dropout, deterministic=not train, decode=decode, attention=self.attention,
        **kw)
    x = _norm(self.style, "final_norm", self.norm_eps, **kw)(x[:, n:])
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(self.vocab_size, ("embed", "vocab"), use_bias=False, name="head",
                            kernel_init=nn.initializers.normal(self.width ** -0.5), **kw)(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class TextLM(nn.Module):
  """An LM on text alone (the causal_lm task), its params under `lm/` like a prefix-LM's, so
  that one initialises the other (`init_from`)."""
  lm: Optional[nn.Module] = None

  def __call__(self, tokens: Array, *, train: bool = False) -> Array:
    return self.lm(tokens, train=train)


def init_cache(model: nn.Module, params, apply_kwargs: dict, method=None) -> dict:
  """The zeroed 'cache' collection of a `decode=True` call of `model` with `apply_kwargs`
  (arrays of the full decoding length); only shapes are traced."""
  _, shapes = jax.eval_shape(
      lambda p, kw: model.apply({"params": p}, **kw, decode=True, method=method,
                                mutable=["cache"]), params, apply_kwargs)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def default_config() -> ml_collections.ConfigDict:
  """`model.lm`: a decoder-only LM (see the module docstring for the two styles)."""
  c = ml_collections.ConfigDict()
  c.name = "decoder_only"
  c.style = "gpt2"               # 'gpt2' | 'llama'
  c.width = 64
  c.depth = 2
  c.num_heads = 4
  c.num_kv_heads = ml_collections.config_dict.placeholder(int)   # llama GQA; None = num_heads
  c.mlp_dim = 256
  c.vocab_size = ml_collections.config_dict.placeholder(int)     # ids (>= the tokenizer's vocabulary)
  c.max_length = ml_collections.config_dict.placeholder(int)     # positions; None: what the task needs
  c.norm_eps = 1e-5
  c.rope_theta = 10000.0         # llama
  c.tie_embeddings = ml_collections.config_dict.placeholder(bool)  # None: gpt2 tied, llama not
  c.act = "gelu_tanh"            # gpt2's MLP activation (GPT-2: gelu_tanh, 'gelu_new')
  c.dropout = 0.0
  return c


def validate(cfg, prefix: str = "model.lm") -> list:
  problems = []
  if cfg.style not in STYLES:
    problems.append(f"{prefix}.style: unknown style {cfg.style!r}; expected one of "
                    f"{', '.join(STYLES)}")
  heads = int(cfg.num_heads)
  kv = int(cfg.get("num_kv_heads") or heads)
  if int(cfg.width) % heads:
    problems.append(f"{prefix}.num_heads: width {cfg.width} is not divisible by num_heads {heads}")
  elif (int(cfg.width) // heads) % 2 and cfg.style == "llama":
    problems.append(f"{prefix}.num_heads: rotary positions need an even head size, got "
                    f"{int(cfg.width) // heads}")
  if heads % kv:
    problems.append(f"{prefix}.num_kv_heads: num_heads {heads} is not a multiple of "
                    f"num_kv_heads {kv}")
  if cfg.style == "gpt2" and kv != heads:
    problems.append(f"{prefix}.num_kv_heads: gpt2 blocks have one key/value head per query head "
                    f"({heads}), got {kv}")
  return problems


def tied(cfg) -> bool:
  t = cfg.get("tie_embeddings")
  return (cfg.style == "gpt2") if t is None else bool(t)


def from_config(cfg, *, vocab_size: int, max_length: int, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, remat: bool | str = False, scan: bool = False,
                attention: str = "einsum", name=None) -> LM:
  """The LM of `model.lm` for `vocab_size` ids and sequences of up to `max_length` positions
  (prefix included)."""
  problems = validate(cfg)
  if problems:
    raise ValueError("; ".join(problems))
  if cfg.style == "gpt2":
    layers.get_activation(cfg.act, "model.lm.act")
  return LM(vocab_size=int(vocab_size), max_length=int(max_length), width=int(cfg.width),
            depth=int(cfg.depth), num_heads=int(cfg.num_heads),
            num_kv_heads=int(cfg.get("num_kv_heads") or cfg.num_heads), mlp_dim=int(cfg.mlp_dim),
            style=cfg.style, norm_eps=float(cfg.norm_eps), rope_theta=float(cfg.rope_theta),
            tie_embeddings=tied(cfg), act=cfg.act, dropout=float(cfg.dropout), dtype=dtype,
            param_dtype=param_dtype, remat=remat, scan=scan, attention=attention, name=name)


def forward_flops(cfg, *, vocab_size: int, length: int) -> float:
  """Forward matmul FLOPs of one sequence of `length` positions (prefix included)."""
  w, depth, mlp = int(cfg.width), int(cfg.depth), int(cfg.mlp_dim)
  heads = int(cfg.num_heads)
  kv = int(cfg.get("num_kv_heads") or heads)
  head_dim = w // heads
  proj = 2 * length * (2 * w * w + 2 * w * kv * head_dim)
  mlp_flops = 2 * length * w * mlp * (3 if cfg.style == "llama" else 2)
  attn = 2 * 2 * length * length * w / 2
  return depth * (proj + mlp_flops + attn) + 2 * length * w * vocab_size


def width(cfg) -> int:
  return int(cfg.width)
