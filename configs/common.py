"""Shared configuration pieces.

Every experiment config (`configs/<experiment>.py`) builds its ConfigDict from these functions
and overrides what differs. Configs are plain Python; the returned ConfigDicts are locked by the
experiment's `get_config`, so a mistyped key (on the command line or in code) fails fast with its
name. Fields that have no sensible default are `placeholder(type)`: they exist (so overrides are
type-checked) but hold None until set.
"""
import math

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def vit_config(variant="mu/8", image_size=32, pool="map"):
  """Image tower. `variant` is `<size>/<patch>`; the widths/depths come from the variant table in
  `vlm_jax.models.vit` unless overridden here (width, depth, num_heads, mlp_dim)."""
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.image_size = image_size
  c.width = placeholder(int)
  c.depth = placeholder(int)
  c.num_heads = placeholder(int)
  c.mlp_dim = placeholder(int)
  c.pool = pool                  # 'map' (attention pooling) | 'gap' | 'cls'
  c.posemb = "learn"             # 'learn' | 'sincos2d'
  c.class_token = False          # OpenAI CLIP: True (with pool='cls', ln_pre=True)
  c.ln_pre = False
  c.act = "gelu"                 # 'gelu' (exact) | 'gelu_tanh' | 'quick_gelu'
  c.ln_eps = 1e-6
  c.use_bias = True              # biases in attention / MLP / patch embedding
  c.dropout = 0.0
  return c


def text_config(vocab_size=1024, context_length=32, width=64, depth=2, num_heads=4, mlp_dim=256):
  """Text tower (token + position embedding, Transformer encoder, pooling)."""
  c = ml_collections.ConfigDict()
  c.vocab_size = vocab_size
  c.context_length = context_length
  c.width = width
  c.depth = depth
  c.num_heads = num_heads
  c.mlp_dim = mlp_dim
  c.causal = True                # causal (CLIP) or bidirectional (SigLIP) self-attention
  c.pool = "last"                # 'eos' (argmax id, OpenAI CLIP) | 'last' (last real token) | 'first' | 'mean'
  c.pad_id = 0                   # tokens equal to pad_id are masked out
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def decoder_config(width=64, depth=2, num_heads=4, mlp_dim=256):
  """CoCa multimodal decoder: causal self-attention + cross-attention to image tokens + MLP."""
  c = ml_collections.ConfigDict()
  c.width = width
  c.depth = depth
  c.num_heads = num_heads
  c.mlp_dim = mlp_dim
  c.tie_embeddings = False       # vocabulary head shares the decoder's token embedding
  c.act = "gelu"
  c.ln_eps = 1e-6
  c.use_bias = True
  c.dropout = 0.0
  return c


def model_config(kind="coca", embed_dim=64):
  """kind: 'clip' (softmax contrastive two-tower), 'siglip' (sigmoid two-tower), 'coca'."""
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.embed_dim = embed_dim
  c.image = vit_config()
  c.text = text_config()
  c.decoder = decoder_config()
  c.proj_bias = False            # projections to the joint space are plain matrices by default
  c.logit_scale_init = math.log(10.0) if kind == "siglip" else math.log(1 / 0.07)
  c.logit_bias_init = -10.0 if kind == "siglip" else placeholder(float)
  c.max_logit_scale = 100.0      # temperature cap (CLIP)
  c.dtype = "auto"               # compute dtype: 'auto' = bfloat16 on TPU/GPU, float32 on CPU
  c.param_dtype = "float32"
  c.remat = False                # nn.remat on every Transformer block
  c.scan = False                 # nn.scan over the Transformer blocks
  return c


def loss_config(kind="coca"):
  c = ml_collections.ConfigDict()
  c.contrastive = "sigmoid" if kind == "siglip" else "softmax"   # 'softmax' | 'sigmoid' | 'none'
  c.contrastive_weight = 1.0
  c.caption_weight = 2.0 if kind == "coca" else 0.0              # CoCa paper: 1.0 / 2.0
  c.label_smoothing = 0.0
  return c
