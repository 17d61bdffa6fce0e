"""Text Transformer tower.

text [B, L] int token ids (`bos ... eos pad pad`, pad = pad_id) -> token + position embedding
-> causal or bidirectional pre-LN encoder with final LayerNorm -> pooling.

Returns `(pooled [B, width], tokens [B, L, width])`.

Padding is masked out of the attention keys, so the outputs at real-token positions (and every
pooling) do not change when more padding is appended. Pooling:
    eos   the position of the highest token id (OpenAI CLIP, whose eos id is the largest id)
    last  the last non-pad token (padding is at the end)
    first the first token
    mean  the mean over non-pad tokens

Parameter names: token_embedding/embedding [vocab, width], pos_embedding [context_length, width],
encoder/block_<i>/..., encoder/encoder_norm (OpenAI CLIP's `ln_final`).
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

Dtype = Any
POOLS = ("eos", "last", "first", "mean")


def padding_mask(text: jax.Array, pad_id: int) -> jax.Array:
  """Attention mask [B, 1, 1, L]: True where the key is a real (non-pad) token."""
  return (text != pad_id)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
  """Attention mask [1, 1, L, L]: query t may attend to keys 0..t."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def pool_tokens(x: jax.Array, text: jax.Array, pool: str, pad_id: int) -> jax.Array:
  """Pools tokens x [B, L, W] into [B, W] according to `pool` (see the module docstring)."""
  real = text != pad_id
  if pool == "eos":
    idx = jnp.argmax(text, axis=-1)
  elif pool == "last":
    idx = jnp.maximum(jnp.sum(real, axis=-1) - 1, 0)
  elif pool == "first":
    return x[:, 0]
  elif pool == "mean":
    w = real.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * w, axis=1)
    return (total / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(x.dtype)
  else:
    raise ValueError(f"model.text.pool: unknown pooling {pool!r}; expected one of "
                     f"{', '.join(POOLS)}")
  return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class TextTransformer(nn.Module):
  """Text tower; see the module docstring. Built from `model.text` by `from_config`."""
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = True
  pool: str = "last"
  pad_id: int = 0
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
  def __call__(self, text: jax.Array, *, train: bool = False):
    validate(self)
    if text.ndim != 2 or text.shape[1] > self.context_length:
      raise ValueError(f"text: expected shape [B, L] with L <= model.text.context_length="
                       f"{self.context_length}, got {text.shape}")
    length = text.shape[1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding",
                 embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                   ("vocab", "embed")), **kw)(text)
    pos = self.param("pos_embedding", layers.partitioned(nn.initializers.normal(0.01),
                                                         ("length", "embed")),
                     (self.context_length, self.width), self.param_dtype)
    x = x + jnp.asarray(pos[:length], self.dtype)[None]
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    mask = padding_mask(text, self.pad_id)
    if self.causal:
      mask = jnp.logical_and(mask, causal_mask(length))
    x = layers.Encoder(
        self.depth, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
        use_bias=self.use_bias, dropout=self.dropout, remat=self.remat, scan=self.scan,
        attention=self.attention, name="encoder", **kw)(x, mask, train=train)
    return pool_tokens(x, text, self.pool, self.pad_id), x


def validate(t: TextTransformer, prefix: str = "model.text") -> None:
  if t.pool not in POOLS:
    raise ValueError(f"{prefix}.pool: unknown pooling {t.pool!r}; expected one of "
                     f"{', '.join(POOLS)}")
  if t.width % t.num_heads:
    raise ValueError(f"{prefix}.num_heads: width {t.width} is not divisible by num_heads "
                     f"{t.num_heads}")
  layers.get_activation(t.act, f"{prefix}.act")


def default_config() -> ml_collections.ConfigDict:
  """`model.text` of a Transformer text tower (token + position embedding, encoder, pooling)."""
  c = ml_collections.ConfigDict()
  c.name = "transformer"
  c.vocab_size = 1024
  c.context_length = 32
  c.width = 64
  c.depth = 2
  c.num_heads = 4
  c.mlp_dim = 256
  c.causal = True                # causal (CLIP) or bidirectional (SigLIP) self-attention
  c.pool = "last"                # 'eos' (argmax id, OpenAI CLIP) | 'last' | 'first' | 'mean'
  c.pad_id = 0                   # tokens equal to pad_id are masked out
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def width(cfg) -> int:
  """Width of the pooled output and of the tokens."""
  return int(cfg.width)


def forward_flops(cfg) -> float:
  """Forward matmul FLOPs of the tower on one text of `context_length` tokens."""
  return layers.encoder_flops(int(cfg.context_length), int(cfg.width), int(cfg.depth),
                              int(cfg.mlp_dim), causal=bool(cfg.causal))


def from_config(cfg, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                remat: bool | str = False, scan: bool = False,
                attention: str = "einsum",
                name: Optional[str] = None) -> TextTransformer:
  """Builds the text tower from `model.text` (see `default_config`)."""
  t = TextTransformer(
      vocab_size=int(cfg.vocab_size), context_length=int(cfg.context_length),
      width=int(cfg.width), depth=int(cfg.depth), num_heads=int(cfg.num_heads),
      mlp_dim=int(cfg.mlp_dim), causal=bool(cfg.causal), pool=cfg.pool, pad_id=int(cfg.pad_id),
      act=cfg.act, ln_eps=float(cfg.ln_eps), use_bias=bool(cfg.use_bias),
      dropout=float(cfg.dropout), dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan, attention=attention,
      name=name)
  validate(t)
  return t
