"""CoCa-style multimodal decoder (captioner).

(image_tokens [B, N, Wimg], text [B, L]) -> own token + position embedding -> blocks of
(causal self-attention, cross-attention to the image tokens, MLP) -> final LayerNorm -> vocabulary
head -> logits [B, L, vocab] in float32, where position t predicts token t+1.

Causality comes from the self-attention mask alone: padding sits at the end of each sequence, so
no real token ever attends to a pad (pad positions' logits are garbage and are masked in the loss).

Vocabulary head: untied = Dense 'head' (kernel [width, vocab] ~ N(0, 1/width), so the initial
logits have unit scale after the final LayerNorm; bias zero); tied = the transposed token
embedding (`token_embedding.attend`). The head is computed in the compute dtype and cast to
float32.

Decoding with a KV cache (`decode=True`): one call with the image tokens and a [B, 1] dummy text
creates the 'cache' collection (`init_cache`): zeroed self-attention buffers of `cache_length`
positions (default `max_length`), the position counter, and every cross-attention's keys/values of the image tokens,
computed once there. Then feed one token [B, 1] per call with `mutable=['cache']`; a step
projects only its own token (the image tokens are not projected again).

Parameter names: token_embedding/embedding, pos_embedding [max_length, width],
block_<i>/{ln_1, self_attn, ln_2, cross_attn, ln_3, mlp}, decoder_norm, head (untied only).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers
from vlm_jax.models.text import causal_mask

Dtype = Any


class Decoder(nn.Module):
  """Multimodal decoder; see the module docstring. Built from `model.decoder` by `from_config`."""
  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  tie_embeddings: bool = False
  act: str = "gelu"
  ln_eps: float = 1e-6
  use_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False      # False, or True / a name in layers.REMAT_POLICIES
  scan: bool = False
  attention: str = "einsum"       # a name in layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, image_tokens: jax.Array, text: jax.Array, *, train: bool = False,
               decode: bool = False, cache_length: int | None = None) -> jax.Array:
    validate(self)
    if text.ndim != 2 or text.shape[1] > self.max_length:
      raise ValueError(f"text: expected shape [B, L] with L <= model.text.context_length="
                       f"{self.max_length}, got {text.shape}")
    length = text.shape[1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, self.width, name="token_embedding",
                     embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                       ("vocab", "embed")), **kw)
    pos_table = self.param("pos_embedding", layers.partitioned(nn.initializers.normal(0.01),
                                                               ("length", "embed")),
                           (self.max_length, self.width), self.param_dtype)

    stepping = False
    if decode:   # The position counter lives in the cache next to the attention KV buffers.
      stepping = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if stepping:
      if length != 1:
        raise ValueError(f"decode=True expects one token per call, got length {length}")
      pos = jax.lax.dynamic_slice(pos_table, (position.value, 0), (1, self.width))
      position.value = position.value + 1
      self_mask = None   # the attention cache masks the unfilled positions
    else:
      pos = pos_table[:length]
      self_mask = causal_mask(length)

    x = embed(text) + jnp.asarray(pos, self.dtype)[None]
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    context = jnp.asarray(image_tokens, self.dtype)
    x = layers.run_blocks(
        layers.DecoderBlock, self.depth, x, context, self_mask, None,
        remat=self.remat, scan=self.scan, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        act=self.act, ln_eps=self.ln_eps, use_bias=self.use_bias, dropout=self.dropout,
        deterministic=not train, decode=decode, attention=self.attention,
        cache_length=(cache_length or self.max_length) if decode else None, **kw)
    x = layers.layer_norm("decoder_norm", self.ln_eps, True, **kw)(x)

    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.dense(
          self.vocab_size, ("embed", "vocab"), use_bias=self.use_bias, name="head",
          kernel_init=nn.initializers.normal(self.width ** -0.5), **kw)(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


def validate(d: Decoder, prefix: str = "model.decoder") -> None:
  if d.width % d.num_heads:
    raise ValueError(f"{prefix}.num_heads: width {d.width} is not divisible by num_heads "
                     f"{d.num_heads}")
  layers.get_activation(d.act, f"{prefix}.act")


def default_config() -> ml_collections.ConfigDict:
  """`model.decoder`: causal self-attention + cross-attention to image tokens + MLP blocks."""
  c = ml_collections.ConfigDict()
  c.name = "cross_attention"
  c.width = 64
  c.depth = 2
  c.num_heads = 4
  c.mlp_dim = 256
  # Vocabulary and longest caption. None: those of the model's text tower (CoCa shares one
  # tokenizer between the text tower and the decoder); a decoder without a text tower sets them.
  c.vocab_size = ml_collections.config_dict.placeholder(int)
  c.context_length = ml_collections.config_dict.placeholder(int)
  c.tie_embeddings = False       # vocabulary head shares the decoder's token embedding
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def forward_flops(cfg, *, vocab_size: int, length: int, context_tokens: int,
                  context_width: int) -> float:
  """Forward matmul FLOPs on one caption of `length` tokens cross-attending to
  `context_tokens` image tokens of width `context_width`."""
  w, depth = int(cfg.width), int(cfg.depth)
  self_blocks = layers.encoder_flops(length, w, depth, int(cfg.mlp_dim), causal=True)
  cross = depth * 2 * (2 * length * w * w + 2 * context_tokens * context_width * w
                       + 2 * length * context_tokens * w)
  return self_blocks + cross + 2 * length * w * vocab_size


def from_config(cfg, *, vocab_size: int, max_length: int, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, remat: bool | str = False, scan: bool = False,
                attention: str = "einsum",
                name=None) -> Decoder:
  """Builds the decoder from `model.decoder` (see `default_config`) for a vocabulary of
  `vocab_size` ids and captions of up to `max_length` tokens."""
  d = Decoder(
      vocab_size=int(vocab_size), max_length=int(max_length), width=int(cfg.width),
      depth=int(cfg.depth), num_heads=int(cfg.num_heads), mlp_dim=int(cfg.mlp_dim),
      tie_embeddings=bool(cfg.tie_embeddings), act=cfg.act, ln_eps=float(cfg.ln_eps),
      use_bias=bool(cfg.use_bias), dropout=float(cfg.dropout), dtype=dtype,
      param_dtype=param_dtype, remat=remat, scan=scan, attention=attention, name=name)
  validate(d)
  return d
