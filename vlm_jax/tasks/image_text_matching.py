"""Image-text matching: does this caption describe this image? (binary, late fusion)

The ITM head of the fusion baselines (and of ALBEF / BLIP, without their cross-attention): the
image tower's pooled features and the caption's text features ([CLS] of a BERT by default),
concatenated, through an MLP to one logit. Negatives are made in the train step from the batch
itself: for a random half of the examples (drawn from the step's rng) the caption is replaced by
the caption of another example (the batch rolled by a random shift); a caption that happens to
be the very same text as the image's own stays a positive.

Batch fields: `image`, `text` [B, L] (one caption, `ops.Caption`). Model:
`models.fusion.LateFusion` with one output. Loss: sigmoid binary cross-entropy ('match_loss');
'match_accuracy' (logit > 0 is the label) is logged.

Predict functions: match_logits (batch['image'], batch['text'] -> [B]), image_features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.data import ops
from vlm_jax.models import fusion
from vlm_jax.tasks import base


def mismatched_pairs(text: jax.Array, rng: jax.Array):
  """(text with a random half of the rows replaced by another row's, labels: 1 where the text
  is still the row's own). The other row is the batch rolled by a random shift in [1, B)."""
  b = text.shape[0]
  shift_rng, pick_rng = jax.random.split(rng)
  shift = jax.random.randint(shift_rng, (), 1, max(b, 2))
  other = jnp.roll(text, shift, axis=0)
  negative = jax.random.bernoulli(pick_rng, 0.5, (b,))
  paired = jnp.where(negative[:, None], other, text)
  same = jnp.all(paired == text, axis=-1)
  return paired, same.astype(jnp.float32)


class ImageTextMatchingTask(base.Task):
  name = "image_text_matching"
  description = "image-text matching: image + caption features, late fusion, binary"
  default_evals = "matching"
  towers = {"image": ("image", "vit"), "text": ("text", "bert")}

  def head_config(self):
    c = ml_collections.ConfigDict()
    c.hidden_dim = 512             # the fusion MLP's hidden layer
    c.dropout = 0.0
    return c

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.match_weight = 1.0
    return c

  def text_spec(self, config):
    t = config.model.text
    return base.TextSpec(vocab_size=int(t.vocab_size), context_length=int(t.context_length))

  def train_ops(self, config, tokenizer):
    return [ops.Caption(tokenizer, self.text_spec(config).context_length)]

  def build_model(self, config):
    return fusion.from_config(config.model, num_classes=1)

  def model_args(self, batch):
    return batch["image"], batch["text"]

  def forward_fn(self, model):
    def forward(params, batch, rng):
      pair_rng, dropout_rng = jax.random.split(rng)
      text, labels = mismatched_pairs(batch["text"], pair_rng)
      out = base.apply_train(model, params, batch["image"], text, rng=dropout_rng)
      out.update(match_logits=out.pop("logits")[:, 0], match_labels=labels)
      return out
    return forward

  def objective(self, config, model):
    def local_terms(outputs, batch):
      del batch
      logits, labels = outputs["match_logits"], outputs["match_labels"]
      n = jnp.float32(logits.shape[0])
      correct = ((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
      return {"match_loss": (jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels)), n),
              "match_accuracy": (jnp.sum(correct), n)}
    return base.Objective(forward=self.forward_fn(model),
                          weights={"match_loss": float(config.loss.match_weight)},
                          local_terms=local_terms)

  def predict_fns(self, config, model):
    def match_logits(params, batch):
      return model.apply({"params": params}, batch["image"], batch["text"])["logits"][:, 0]

    def image_features(params, batch):
      return model.apply({"params": params}, batch["image"],
                         method=lambda m, x: m.image(x)[0])
    return {"match_logits": match_logits, "image_features": image_features}

  def forward_flops(self, config):
    return fusion.forward_flops(config.model, num_classes=1)


TASK = ImageTextMatchingTask()
