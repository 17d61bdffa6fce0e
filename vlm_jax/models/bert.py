"""BERT: a bidirectional post-LN text encoder, and its masked-language-model head.

text [B, L] int ids (`[CLS] ... [SEP] pad pad`) (+ token types [B, L], 0 by default)
-> token + position + token-type embeddings -> LayerNorm -> `depth` post-LN blocks
   (x = LN(x + Attn(x)); x = LN(x + MLP(x)), as in Devlin et al. and Hugging Face's BertModel)
-> (pooled [B, width], tokens [B, L, width]).

Pooling is the [CLS] (first) token's state, through BERT's pooler (dense + tanh) when `pooler`
is set (Hugging Face's `pooler_output`), else the state itself (what LiT's BERT tower uses).
Padding (`pad_id`) is masked out of the attention keys. Registered as the text tower 'bert', so
any task with a text tower (contrastive: LiT / CLIP with a BERT text tower) can use it.

`MaskedLM` adds BERT's MLM head: dense -> activation -> LayerNorm -> logits against the token
embedding (tied) + a bias per token.

Parameter names: token_embedding/embedding [vocab, width], pos_embedding [max_length, width],
type_embedding [type_vocab_size, width], embed_norm,
encoder/block_<i>/{attn, attn_norm, mlp, mlp_norm}
(attn/mlp as in `layers`), pooler/{kernel, bias}; the MLM head: mlm_dense, mlm_norm, mlm_bias.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers
from vlm_jax.models import text as text_lib

Dtype = Any
Array = jax.Array


class BertBlock(nn.Module):
  """Post-LN Transformer block: x = LN(x + Attn(x)), then x = LN(x + MLP(x))."""
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-12
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  scan_carry: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    y = layers.Attention(self.num_heads, impl=self.attention, name="attn", **kw)(x, mask=mask)
    x = layers.layer_norm("attn_norm", self.ln_eps, True, **kw)(x + drop(y))
    y = layers.MLP(self.mlp_dim, act=self.act, name="mlp", **kw)(x)
    x = layers.layer_norm("mlp_norm", self.ln_eps, True, **kw)(x + drop(y))
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    return (x, None) if self.scan_carry else x


class BertEncoder(nn.Module):
  """`depth` BertBlocks (plain, remat or scanned: `layers.run_blocks`)."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-12
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False
  attention: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, train: bool = False) -> Array:
    return layers.run_blocks(
        BertBlock, self.depth, x, mask, remat=self.remat, scan=self.scan,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
        dropout=self.dropout, deterministic=not train, dtype=self.dtype,
        param_dtype=self.param_dtype, attention=self.attention)


class Bert(nn.Module):
  """BERT text tower; see the module docstring. Built from `model.text` by `from_config`."""
  vocab_size: int
  context_length: int            # longest text it reads (position embeddings)
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  type_vocab_size: int = 2
  pooler: bool = False
  pad_id: int = 0
  act: str = "gelu"
  ln_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan: bool = False
  attention: str = "einsum"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width,
        embedding_init=layers.partitioned(init, ("vocab", "embed")), **kw)
    self.pos_embedding = self.param("pos_embedding", layers.partitioned(init, ("length", "embed")),
                                    (self.context_length, self.width), self.param_dtype)
    self.type_embedding = self.param("type_embedding", layers.partitioned(init, (None, "embed")),
                                     (self.type_vocab_size, self.width), self.param_dtype)
    self.embed_norm = layers.layer_norm("embed_norm", self.ln_eps, True, **kw)
    self.embed_dropout = nn.Dropout(self.dropout)
    self.encoder = BertEncoder(
        self.depth, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
        dropout=self.dropout, remat=self.remat, scan=self.scan, attention=self.attention, **kw)
    if self.pooler:
      self.pooler_dense = layers.dense(self.width, ("embed", "mlp"), use_bias=True,
                                       name="pooler", **kw)

  def __call__(self, text: Array, token_types: Optional[Array] = None, *,
               train: bool = False):
    if text.ndim != 2 or text.shape[1] > self.context_length:
      raise ValueError(f"text: expected shape [B, L] with L <= model.text.context_length="
                       f"{self.context_length}, got {text.shape}")
    length = text.shape[1]
    types = jnp.zeros_like(text) if token_types is None else token_types
    x = (self.token_embedding(text)
         + jnp.asarray(self.pos_embedding[:length], self.dtype)[None]
         + jnp.asarray(self.type_embedding, self.dtype)[types])
    x = self.embed_dropout(self.embed_norm(x), deterministic=not train)
    x = nn.with_logical_constraint(x, layers.ACT_AXES)
    x = self.encoder(x, text_lib.padding_mask(text, self.pad_id), train=train)
    pooled = x[:, 0]
    if self.pooler:
      pooled = jnp.tanh(self.pooler_dense(pooled))
    return pooled, x

  def attend(self, x: Array) -> Array:
    """x [..., width] -> logits [..., vocab] against the token embedding (a tied output layer)."""
    return self.token_embedding.attend(x)


class MaskedLM(nn.Module):
  """A text encoder with BERT's masked-language-model head: text [B, L] -> logits [B, L, V]."""
  text: nn.Module
  act: str = "gelu"
  ln_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: Array, token_types: Optional[Array] = None, *, train: bool = False):
    _, tokens = self.text(text, token_types, train=train)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = tokens.shape[-1]
    h = layers.dense(width, ("embed", "mlp"), use_bias=True, name="mlm_dense", **kw)(tokens)
    h = layers.get_activation(self.act, "model.text.act")(h)
    h = layers.layer_norm("mlm_norm", self.ln_eps, True, **kw)(h)
    bias = self.param("mlm_bias", layers.partitioned(nn.initializers.zeros_init(), ("vocab",)),
                      (self.text.vocab_size,), self.param_dtype)
    logits = self.text.attend(h) + jnp.asarray(bias, self.dtype)
    return nn.with_logical_constraint(logits, (layers.BATCH, layers.LENGTH, "vocab"))

  def encode(self, text: Array, token_types: Optional[Array] = None) -> tuple:
    """(pooled [B, width], tokens [B, L, width]) of the encoder alone."""
    return self.text(text, token_types)


def default_config() -> ml_collections.ConfigDict:
  """`model.text` of a BERT tower (BERT-tiny-sized by default)."""
  c = ml_collections.ConfigDict()
  c.name = "bert"
  c.vocab_size = 1024
  c.context_length = 32          # longest text (BERT's max_position_embeddings)
  c.type_vocab_size = 2
  c.width = 64
  c.depth = 2
  c.num_heads = 4
  c.mlp_dim = 256
  c.pooler = False               # [CLS] through dense + tanh (BertModel's pooler_output)
  c.pad_id = 0
  c.act = "gelu"                 # exact GELU, as BERT's 'gelu'
  c.ln_eps = 1e-12
  c.dropout = 0.0
  return c


def validate(cfg, prefix: str = "model.text") -> list:
  problems = []
  if int(cfg.width) % int(cfg.num_heads):
    problems.append(f"{prefix}.num_heads: width {cfg.width} is not divisible by num_heads "
                    f"{cfg.num_heads}")
  if cfg.act not in layers.ACTIVATIONS:
    problems.append(f"{prefix}.act: unknown activation {cfg.act!r}; expected one of "
                    f"{', '.join(layers.ACTIVATIONS)}")
  return problems


def width(cfg) -> int:
  return int(cfg.width)


def forward_flops(cfg) -> float:
  """Forward matmul FLOPs of the encoder on one text of `context_length` tokens."""
  return layers.encoder_flops(int(cfg.context_length), int(cfg.width), int(cfg.depth),
                              int(cfg.mlp_dim), causal=False)


def from_config(cfg, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                remat: bool | str = False, scan: bool = False, attention: str = "einsum",
                name: Optional[str] = None) -> Bert:
  problems = validate(cfg)
  if problems:
    raise ValueError("; ".join(problems))
  return Bert(vocab_size=int(cfg.vocab_size), context_length=int(cfg.context_length),
              width=int(cfg.width), depth=int(cfg.depth), num_heads=int(cfg.num_heads),
              mlp_dim=int(cfg.mlp_dim), type_vocab_size=int(cfg.type_vocab_size),
              pooler=bool(cfg.pooler), pad_id=int(cfg.pad_id), act=cfg.act,
              ln_eps=float(cfg.ln_eps), dropout=float(cfg.dropout), dtype=dtype,
              param_dtype=param_dtype, remat=remat, scan=scan, attention=attention, name=name)
