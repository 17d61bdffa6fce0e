"""Supervised image classification: an image tower with a linear head, softmax cross-entropy.

The fine-tuning half of the ViT recipe (and plain supervised training from scratch). Batch
fields: `image` and `label` [B] (examples without a label are skipped and counted as
`missing_label`). Model: `Classifier` (tower -> pooled features -> zero-initialised linear head).
Loss: softmax cross-entropy with optional label smoothing, a local term (mean over the global
batch's examples), so accumulation is a plain sum of micro-batch gradients; the training batch's
top-1 accuracy is logged as `accuracy`.

`model.num_classes` None takes the number of classes of the training data (a TFDS ClassLabel,
the class folders of an ImageFolder); the run records it, and the class names, in its config.

Predict functions: classify (logits [B, C]) and image_features (pooled [B, W]).

`model.num_classes = 0` is an image tower without a head (an imported Hugging Face ViTModel):
it offers image_features only (linear probes, `init_from='image=DIR'`) and cannot be trained.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from vlm_jax import config_utils
from vlm_jax import losses
from vlm_jax import models
from vlm_jax.data import ops
from vlm_jax.tasks import base


class ClassificationTask(base.Task):
  name = "classification"
  description = "supervised image classification: image tower + linear head"
  default_evals = "classification"
  towers = {"image": ("image", "vit")}

  def head_config(self):
    c = ml_collections.ConfigDict()
    c.num_classes = ml_collections.config_dict.placeholder(int)   # None: from the data
    c.head_zero_init = True
    return c

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.label_smoothing = 0.0
    return c

  def validate(self, config):
    n = config.model.num_classes
    if n is not None and n != 0 and n < 2:
      return [f"model.num_classes: {n}; a classifier needs at least 2 classes (0: an image "
              "tower without a head, for features only)"]
    return []

  def finalize(self, config, source):
    """Fills `model.num_classes` (and `data.classnames`) from the training data's classes."""
    m = config.model
    class_names = source.class_names()
    if class_names:
      if m.num_classes is None:
        m.num_classes = len(class_names)
      elif m.num_classes != len(class_names):
        raise ValueError(f"model.num_classes={m.num_classes}, but the training data has "
                         f"{len(class_names)} classes")
      if config.data.classnames is None:
        config.data.classnames = ",".join(class_names)
    if m.num_classes is None:
      raise ValueError("model.num_classes: not set, and the training data does not say how many "
                       "classes it has (no TFDS ClassLabel, not an ImageFolder); set it")

  def build_problems(self, config):
    """The model's problems before the data has given the number of classes."""
    if config.model.num_classes is None:
      config = config_utils.complete(
          dict(config.to_dict(), model=dict(config.model.to_dict(), num_classes=2)))
    return super().build_problems(config)

  def train_ops(self, config, tokenizer):
    del config, tokenizer
    return [ops.Label(skip_missing=True)]

  def build_model(self, config):
    m = config.model
    common = models.common_kwargs(m)
    image = models.build_tower("image", m.image, "model.image", **common)
    return models.Classifier(image=image, num_classes=int(m.num_classes),
                             head_zero_init=bool(m.head_zero_init), dtype=common["dtype"],
                             param_dtype=common["param_dtype"])

  def model_args(self, batch):
    return (batch["image"],)

  def objective(self, config, model):
    if not config.model.num_classes:
      raise ValueError("model.num_classes: 0 is an image tower without a head (features only), "
                       "which has nothing to train; set the number of classes")
    smoothing = float(config.loss.label_smoothing)

    def local_terms(outputs, batch):
      logits, labels = outputs["logits"], batch["label"]
      correct = jnp.argmax(logits, axis=-1) == labels
      return {"classification_loss": losses.classification_xent_sum(logits, labels, smoothing),
              "accuracy": (jnp.sum(correct.astype(jnp.float32)), jnp.float32(labels.shape[0]))}

    return base.Objective(forward=self.forward_fn(model),
                          weights={"classification_loss": 1.0}, local_terms=local_terms)

  def predict_fns(self, config, model):
    def classify(params, batch):
      return model.apply({"params": params}, batch["image"])["logits"]
    fns = {"image_features": base.image_features_fn(model)}
    if config.model.num_classes != 0:
      fns["classify"] = classify
    return fns

  def forward_flops(self, config):
    m = config.model
    image = models.tower_module("image", m.image.name, "model.image.name")
    return image.forward_flops(m.image) + 2 * image.width(m.image) * int(m.num_classes or 0)


TASK = ClassificationTask()
