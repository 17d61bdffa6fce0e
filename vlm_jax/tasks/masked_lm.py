"""Masked-language-model pretraining of a BERT text encoder (Devlin et al., 2019).

Batch fields: `text` [B, L] (the corrupted caption: 15% of its tokens chosen, of those 80%
replaced by the mask id, 10% by a random id, 10% kept; `ops.MaskedTokens`), `mlm_target` [B, L]
(the original ids) and `mlm_mask` [B, L] (the chosen positions). Model: `models.bert.MaskedLM`
(the text tower, `model.text.name = 'bert'`, + BERT's MLM head tied to the token embedding).
Loss: cross-entropy on the chosen positions only ('mlm_loss'); their accuracy is logged
('mlm_accuracy').

The mask id is the tokenizer's [MASK] / <mask> token (Hugging Face BERT vocabularies), else the
first id past the tokenizer's vocabulary, which `model.text.vocab_size` must leave room for
(`ops.mask_token_id`).

Predict functions: mlm_logits (batch['text'] -> logits [B, L, V]), text_features (the [CLS]
features [B, W]). The trained encoder is a text tower: `init_from='text=DIR'` puts it in a
two-tower model (LiT / CLIP with a BERT text tower).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from vlm_jax import losses
from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax.models import bert as bert_lib
from vlm_jax.tasks import base


class MaskedLMTask(base.Task):
  name = "masked_lm"
  description = "BERT masked-language-model pretraining of a text encoder"
  default_evals = "masked_lm"
  reads_images = False
  towers = {"text": ("text", "bert")}

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.mlm_weight = 1.0
    c.mask_rate = 0.15             # share of the (non-special) tokens the loss predicts
    c.mask_frac = 0.8              # of those: replaced by the mask id
    c.random_frac = 0.1            # ... by a random id (the rest are kept unchanged)
    c.document = "caption"         # a row: 'caption' (one, drawn at random) | 'all_captions'
    return c

  def validate(self, config):
    m = config.model
    if config.loss.document not in ops.DOCUMENTS:
      return [f"loss.document: unknown {config.loss.document!r}; expected one of "
              f"{', '.join(ops.DOCUMENTS)}"]
    if m.text.name != "bert":
      return [f"model.text.name: the masked_lm task needs the 'bert' text tower (its MLM head "
              f"is tied to the token embedding), got {m.text.name!r}"]
    return bert_lib.validate(m.text)

  def text_spec(self, config):
    t = config.model.text
    return base.TextSpec(vocab_size=int(t.vocab_size), context_length=int(t.context_length))

  def train_ops(self, config, tokenizer):
    spec = self.text_spec(config)
    loss = config.loss
    # (No tokenizer: only the fields are asked for, before the tokenizer exists.)
    mask_id = ops.mask_token_id(tokenizer, spec.vocab_size) if tokenizer is not None else 0
    return [ops.MaskedTokens(tokenizer, spec.context_length, mask_id,
                             rate=loss.mask_rate, mask_frac=loss.mask_frac,
                             random_frac=loss.random_frac, document=loss.document)]

  def build_model(self, config):
    m = config.model
    common = models.common_kwargs(m)
    return bert_lib.MaskedLM(
        text=models.build_tower("text", m.text, "model.text", **common), act=m.text.act,
        ln_eps=float(m.text.ln_eps), dtype=common["dtype"], param_dtype=common["param_dtype"])

  def model_args(self, batch):
    return (batch["text"],)

  def forward_fn(self, model):
    def forward(params, batch, rng):
      logits = model.apply({"params": params}, batch["text"], train=True,
                           rngs={"dropout": rng})
      return {"mlm_logits": logits}
    return forward

  def objective(self, config, model):
    def local_terms(outputs, batch):
      logits, target, mask = outputs["mlm_logits"], batch["mlm_target"], batch["mlm_mask"]
      total, count = losses.caption_xent_sum(logits, target, mask)
      correct = jnp.sum((jnp.argmax(logits, -1) == target) & mask)
      return {"mlm_loss": (total, count), "mlm_accuracy": (correct.astype(jnp.float32), count)}
    return base.Objective(forward=self.forward_fn(model),
                          weights={"mlm_loss": float(config.loss.mlm_weight)},
                          local_terms=local_terms)

  def predict_fns(self, config, model):
    def mlm_logits(params, batch):
      return model.apply({"params": params}, batch["text"])

    def text_features(params, batch):
      pooled, _ = model.apply({"params": params}, batch["text"], method="encode")
      return pooled
    return {"mlm_logits": mlm_logits, "text_features": text_features}

  def forward_flops(self, config):
    t = config.model.text
    length, width, vocab = int(t.context_length), int(t.width), int(t.vocab_size)
    return bert_lib.forward_flops(t) + 2 * length * (width * width + width * vocab)


TASK = MaskedLMTask()
