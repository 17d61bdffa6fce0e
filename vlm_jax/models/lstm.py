"""LSTM caption decoder (Show and Tell, Vinyals et al. 2015), with the decoders' contract.

(image_tokens [B, N, Wimg], text [B, L]) -> logits [B, L, vocab] float32, position t predicting
token t + 1, exactly like the cross-attention decoder, so the captioning task, the caption
evaluator and beam search use it unchanged (`model.decoder.name = 'lstm'`).

The image is the LSTM's first input: the mean of the image tokens, projected to the word
embedding size (`image_embedding`), is fed at step -1 (its output is not used); then the caption
is read with teacher forcing, one word embedding per step (`nn.RNN` over
`nn.OptimizedLSTMCell`), and a Dense head maps every hidden state to the vocabulary.

Decoding (`decode=True`): the first call (no 'cache' yet; `coca.init_cache` makes it) runs the
image step and stores the LSTM state (`cell_c`, `cell_h`) in the cache; every later call takes
one token [B, 1], advances the stored state by one step and returns its logits. The state is the
whole cache, so a decoding step costs one LSTM step whatever the caption's length.

Parameter names: token_embedding/embedding [vocab, embed], image_embedding/{kernel, bias},
cell/{ii,if,ig,io}/kernel [embed, width], cell/{hi,hf,hg,ho}/{kernel, bias},
head/{kernel, bias}.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

Dtype = Any


class LSTMDecoder(nn.Module):
  """See the module docstring. Built from `model.decoder` by `from_config`."""
  vocab_size: int
  max_length: int
  width: int                     # LSTM state size
  embed_dim: int                 # word (and image) embedding size
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _cell(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return nn.OptimizedLSTMCell(
        self.width, name="cell",
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
        recurrent_kernel_init=layers.partitioned(nn.initializers.orthogonal(), (None, "mlp")),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), ("mlp",)), **kw)

  @nn.compact
  def __call__(self, image_tokens: jax.Array, text: jax.Array, *, train: bool = False,
               decode: bool = False, cache_length: Optional[int] = None) -> jax.Array:
    del cache_length            # the LSTM state does not grow with the caption
    if text.ndim != 2 or text.shape[1] > self.max_length:
      raise ValueError(f"text: expected shape [B, L] with L <= model.decoder.context_length="
                       f"{self.max_length}, got {text.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, self.embed_dim, name="token_embedding",
                     embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                       ("vocab", "embed")), **kw)
    rnn = nn.RNN(self._cell(), name="lstm", return_carry=True)
    x = nn.Dropout(self.dropout)(embed(text), deterministic=not train)

    stepping = decode and self.has_variable("cache", "cell_c")
    if stepping:
      if text.shape[1] != 1:
        raise ValueError(f"decode=True expects one token per call, got length {text.shape[1]}")
      c = self.variable("cache", "cell_c")
      h = self.variable("cache", "cell_h")
      (c.value, h.value), y = rnn(x, initial_carry=(c.value, h.value))
    else:
      image = jnp.mean(jnp.asarray(image_tokens, jnp.float32), axis=1)
      image = layers.dense(self.embed_dim, ("embed", "mlp"), use_bias=True,
                           name="image_embedding", **kw)(image.astype(self.dtype))
      # Step -1: the image. Its output is discarded; its state starts the caption.
      start, _ = rnn(image[:, None], initial_carry=None)
      if decode:
        self.variable("cache", "cell_c", lambda: start[0])
        self.variable("cache", "cell_h", lambda: start[1])
      _, y = rnn(x, initial_carry=start)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    logits = layers.dense(self.vocab_size, ("mlp", "vocab"), use_bias=True, name="head",
                          kernel_init=nn.initializers.normal(self.width ** -0.5), **kw)(y)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)


def default_config() -> ml_collections.ConfigDict:
  """`model.decoder` of an LSTM captioner."""
  c = ml_collections.ConfigDict()
  c.name = "lstm"
  c.width = 256                  # LSTM state size
  c.embed_dim = 128              # word / image embedding size
  # Vocabulary and longest caption; a captioner without a text tower sets them.
  c.vocab_size = ml_collections.config_dict.placeholder(int)
  c.context_length = ml_collections.config_dict.placeholder(int)
  c.dropout = 0.0
  return c


def forward_flops(cfg, *, vocab_size: int, length: int, context_tokens: int,
                  context_width: int) -> float:
  """Forward matmul FLOPs on one caption of `length` tokens (the image step included)."""
  del context_tokens
  w, e = int(cfg.width), int(cfg.embed_dim)
  step = 2 * 4 * w * (e + w)
  return 2 * context_width * e + (length + 1) * step + 2 * length * w * vocab_size


def from_config(cfg, *, vocab_size: int, max_length: int, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, remat: bool | str = False, scan: bool = False,
                attention: str = "einsum", name=None) -> LSTMDecoder:
  """Builds the LSTM decoder from `model.decoder` (`remat`, `scan`, `attention` are options of
  the Transformer blocks and do not apply)."""
  del remat, scan, attention
  if int(cfg.width) < 1 or int(cfg.embed_dim) < 1:
    raise ValueError(f"model.decoder.width / embed_dim: must be >= 1, got {cfg.width} / "
                     f"{cfg.embed_dim}")
  return LSTMDecoder(vocab_size=int(vocab_size), max_length=int(max_length),
                     width=int(cfg.width), embed_dim=int(cfg.embed_dim),
                     dropout=float(cfg.dropout), dtype=dtype, param_dtype=param_dtype, name=name)
