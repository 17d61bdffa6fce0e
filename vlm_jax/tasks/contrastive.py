"""Contrastive image-text pretraining: CLIP (softmax) and SigLIP (sigmoid).

Batch fields: `image` [B, H, W, 3] and `text` [B, L] (one caption per image, drawn at random in
training). Model: `TwoTower` (image tower + text tower, projections to a joint space, a learned
temperature and, for SigLIP, a bias). Loss: the contrastive term over the whole global batch
(`loss.contrastive`: 'softmax' | 'sigmoid'; `loss.contrastive_impl`: 'plain' | 'chunked' |
'ring', see `vlm_jax.losses`). It is a global term of the image / text embeddings, so gradient
accumulation is exact GradCache.

Predict functions: encode_images, encode_texts (unit-norm embeddings), image_features (pooled,
before the projection), logit_params (temperature and bias). Zero-shot probabilities follow the
loss the model was trained with: a softmax over the classes for 'softmax', independent
sigmoids for 'sigmoid'.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from vlm_jax import losses
from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax.tasks import base

placeholder = ml_collections.config_dict.placeholder


class ContrastiveTask(base.Task):
  name = "contrastive"
  description = "CLIP / SigLIP: image and text towers trained with a contrastive loss"
  default_evals = "zeroshot,retrieval"
  towers = {"image": ("image", "vit"), "text": ("text", "transformer")}
  # Outputs the contrastive term reads; everything it needs from a micro-batch under GradCache.
  contrastive_outputs = ("image_embed", "text_embed", "logit_scale", "logit_bias")
  allows_no_contrastive = False    # CoCa may switch the contrastive term off

  # ---- config ------------------------------------------------------------------------------------
  def head_config(self):
    c = ml_collections.ConfigDict()
    c.embed_dim = 64
    c.proj_bias = False            # projections to the joint space are plain matrices
    c.image_proj = True            # False: the pooled image features are the embedding (SigLIP:
                                   # its MAP head ends the tower); embed_dim = the image width
    c.logit_scale_init = math.log(1 / 0.07)      # SigLIP: log(10)
    c.logit_bias_init = placeholder(float)       # SigLIP: -10; None = no bias parameter
    c.max_logit_scale = 100.0      # temperature cap (CLIP)
    return c

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.contrastive = "softmax"      # 'softmax' (CLIP) | 'sigmoid' (SigLIP)
    c.contrastive_weight = 1.0
    # 'plain': the loss on the global batch as written (XLA partitions it);
    # 'chunked': memory-lean shard_map versions (sigmoid: ring of B_local x B_local blocks;
    # softmax: each device computes only its rows, B_local x B_global);
    # 'ring': softmax also as a ring (B_local x B_local) -- all give the same values and
    # gradients.
    c.contrastive_impl = "plain"
    return c

  def validate(self, config):
    problems = []
    kinds = tuple(k for k in losses.CONTRASTIVE_KINDS if k != "none" or self.allows_no_contrastive)
    if config.loss.contrastive not in kinds:
      problems.append(f"loss.contrastive: unknown contrastive loss {config.loss.contrastive!r}; "
                      f"expected one of {', '.join(kinds)}")
    if not config.model.image_proj:
      image_width = models.tower_module("image", config.model.image.name,
                                        "model.image.name").width(config.model.image)
      if image_width != int(config.model.embed_dim):
        problems.append(f"model.image_proj: False needs model.embed_dim ({config.model.embed_dim}) "
                        f"to equal the image tower's width ({image_width})")
    if config.loss.contrastive_impl not in losses.CONTRASTIVE_IMPLS:
      problems.append(f"loss.contrastive_impl: unknown implementation "
                      f"{config.loss.contrastive_impl!r}; expected one of "
                      f"{', '.join(losses.CONTRASTIVE_IMPLS)}")
    return problems

  def text_spec(self, config):
    t = config.model.text
    return base.TextSpec(vocab_size=int(t.vocab_size), context_length=int(t.context_length))

  # ---- data --------------------------------------------------------------------------------------
  def train_ops(self, config, tokenizer):
    return [ops.Caption(tokenizer, self.text_spec(config).context_length)]

  # ---- model -------------------------------------------------------------------------------------
  def _two_tower_kwargs(self, config) -> dict:
    m = config.model
    common = models.common_kwargs(m)
    return dict(
        image=models.build_tower("image", m.image, "model.image", **common),
        text=models.build_tower("text", m.text, "model.text", **common),
        embed_dim=int(m.embed_dim), proj_bias=bool(m.proj_bias), image_proj=bool(m.image_proj),
        logit_scale_init=float(m.logit_scale_init),
        logit_bias_init=None if m.logit_bias_init is None else float(m.logit_bias_init),
        max_logit_scale=float(m.max_logit_scale), dtype=common["dtype"],
        param_dtype=common["param_dtype"])

  def build_model(self, config):
    return models.TwoTower(**self._two_tower_kwargs(config))

  def model_args(self, batch):
    return batch["image"], batch["text"]

  # ---- loss --------------------------------------------------------------------------------------
  def contrastive_terms(self, config):
    """(weights, global_terms) of the contrastive part; empty when it is switched off."""
    loss_config = config.loss
    if loss_config.contrastive == "none":
      return {}, None

    def global_terms(outputs, batch):
      del batch
      return {"contrastive_loss": losses.contrastive_loss(outputs, loss_config)}
    return {"contrastive_loss": float(loss_config.contrastive_weight)}, global_terms

  def objective(self, config, model):
    weights, global_terms = self.contrastive_terms(config)
    return base.Objective(
        forward=self.forward_fn(model), weights=weights, global_keys=self.contrastive_outputs,
        global_terms=global_terms, logged=("logit_scale", "logit_bias"))

  # ---- prediction --------------------------------------------------------------------------------
  def predict_fns(self, config, model):
    def encode_images(params, batch):
      return model.apply({"params": params}, batch["image"], method="encode_images")

    def encode_texts(params, batch):
      return model.apply({"params": params}, batch["text"], method="encode_texts")

    def logit_params(params, batch=None):
      del batch
      return model.apply({"params": params}, method="logits_params")

    return {"encode_images": encode_images, "encode_texts": encode_texts,
            "image_features": base.image_features_fn(model), "logit_params": logit_params}

  def probabilities(self, config, logits):
    """Zero-shot probabilities: independent sigmoids for a model trained with the sigmoid loss,
    a softmax over the classes otherwise."""
    if config.loss.contrastive == "sigmoid":
      return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)
    return super().probabilities(config, logits)

  # ---- cost --------------------------------------------------------------------------------------
  def forward_flops(self, config):
    m = config.model
    image = models.tower_module("image", m.image.name, "model.image.name")
    text = models.tower_module("text", m.text.name, "model.text.name")
    f = image.forward_flops(m.image) + text.forward_flops(m.text)
    f += 2 * (image.width(m.image) * bool(m.image_proj) + text.width(m.text)) * int(m.embed_dim)
    f += 2 * 2 * int(config.batch_size) * int(m.embed_dim)                   # logits row + col
    return f


TASK = ContrastiveTask()
