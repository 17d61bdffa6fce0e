"""The task seam: what a training objective is made of, and the one place its loss terms combine.

A task (one module in `vlm_jax/tasks/`) says, in one place:

* its config: the model section (towers by name, plus its own fields) and the loss section;
* its batch fields: `train_ops(config, tokenizer)` lists the per-example field ops
  (`vlm_jax.data.ops`) that turn a raw example of any source into the fields its loss reads;
  the trainer checks before compiling that the source provides what they need;
* its model: `build_model(config)` and `model_args(batch)` (which batch fields the model is
  called with);
* its loss, as an `Objective`: named terms that are either computed over the whole global batch
  from per-example outputs ("global" terms: contrastive losses) or are sums over examples
  divided by a count ("local" terms: token or example cross-entropy). `Objective.loss` adds
  them up; the train step differentiates it directly, or, under gradient accumulation, uses the
  same split for exact GradCache accumulation (see `vlm_jax.train_step`);
* its predict functions: `predict_fns(config, model)` maps names ('encode_images',
  'encode_texts', 'image_features', 'generate', 'caption_nll', 'classify', 'logit_params') to
  pure functions `fn(params, batch, **static)`. Evaluators and inference ask for them by name
  and never call a model's methods themselves.

The trainer, the evaluators, inference and the FLOP count use only this interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import models
from vlm_jax.train_step import STATS_KEY

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The token sequences a task's model reads: its tokenizer must fit them."""
  vocab_size: int
  context_length: int


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss as named terms, so that the train step can differentiate it whole or in pieces.

  forward(params, batch, rng) -> outputs: the model on a (micro-)batch, in training mode.
  weights: loss term -> weight; the loss is the weighted sum, in this order.
  global_keys: outputs the global terms read: per-example arrays [B, ...] or scalars shared by
    the whole batch (a temperature).
  global_terms(global outputs, batch) -> {term: scalar}: terms of the whole global batch.
  local_terms(outputs, batch) -> {term: (sum, count)}: terms that are a sum over examples divided
    by a count that does not depend on the params (tokens, examples). Names not in `weights`
    are logged as metrics (sum / count) and add nothing to the loss.
  logged: scalar outputs logged as metrics (e.g. the temperature).
  """
  forward: Callable[[PyTree, dict, jax.Array], dict]
  weights: Mapping[str, float]
  global_keys: tuple = ()
  global_terms: Optional[Callable[[dict, dict], dict]] = None
  local_terms: Optional[Callable[[dict, dict], dict]] = None
  logged: tuple = ()

  def combine(self, global_values: Mapping[str, jax.Array], sums: Mapping[str, jax.Array],
              counts: Mapping[str, jax.Array], scalars: Mapping[str, jax.Array]):
    """(loss, metrics) from the global terms' values and the local terms' sums and counts.

    The one place where loss terms are combined: the plain step and gradient accumulation both
    call it. A local term is sum / max(count, 1) (0 for an empty mask, not NaN).
    """
    metrics = {}
    for name in sums:
      metrics[name] = sums[name] / jnp.maximum(counts[name], 1.0)
    metrics.update(global_values)
    loss = jnp.float32(0.0)
    for name, weight in self.weights.items():
      loss = loss + weight * metrics[name]
    metrics["loss"] = loss
    for key in self.logged:
      metrics[key] = jnp.asarray(scalars[key], jnp.float32)
    return loss, metrics

  def global_values(self, outputs: Mapping[str, jax.Array], batch: dict) -> dict:
    if self.global_terms is None:
      return {}
    return self.global_terms({k: outputs[k] for k in self.global_keys}, batch)

  def local_values(self, outputs: Mapping[str, jax.Array], batch: dict) -> dict:
    return self.local_terms(outputs, batch) if self.local_terms is not None else {}

  def loss(self, outputs: Mapping[str, jax.Array], batch: dict):
    """(loss, metrics) of the model's outputs on a whole batch."""
    local = self.local_values(outputs, batch)
    return self.combine(self.global_values(outputs, batch),
                        {k: s for k, (s, _) in local.items()},
                        {k: c for k, (_, c) in local.items()}, outputs)


class Task:
  """Base class of the tasks; see the module docstring. Subclasses set the class attributes and
  override the hooks marked 'override'."""
  name: str = ""
  description: str = ""
  default_evals: str = ""                      # evals.run of a config that does not set it
  towers: Mapping[str, tuple] = {}             # model section -> (tower kind, default name)
  reads_images: bool = True                    # False: batches carry no image (text alone)

  # ---- config ------------------------------------------------------------------------------------
  def model_config(self, tower_names: Optional[Mapping[str, str]] = None
                   ) -> ml_collections.ConfigDict:
    """`config.model` defaults: the shared fields, one section per tower (the registry's default
    config of the tower named in `tower_names`, else the task's default), and `head_config()`."""
    tower_names = dict(tower_names or {})
    c = models.shared_config()
    for section, (kind, default) in self.towers.items():
      c[section] = models.tower_config(kind, tower_names.get(section) or default,
                                       f"model.{section}.name")
    c.update(self.head_config())
    return c

  def head_config(self) -> ml_collections.ConfigDict:
    """override: the task's own model fields (projection sizes, heads, temperatures)."""
    return ml_collections.ConfigDict()

  def loss_config(self) -> ml_collections.ConfigDict:
    """override: `config.loss` defaults."""
    return ml_collections.ConfigDict()

  def validate(self, config) -> list:
    """override: problems with the config as one-line messages naming field and value."""
    del config
    return []

  def text_spec(self, config) -> Optional[TextSpec]:
    """override: the token sequences the model reads, or None for a task without text."""
    del config
    return None

  def reads_questions(self, config) -> bool:
    """override: whether the task trains on visual questions (their text then also trains the
    tokenizer)."""
    del config
    return False

  def build_problems(self, config) -> list:
    """Problems building the model from the config shows (no parameter is initialised)."""
    try:
      self.build_model(config)
    except (ValueError, TypeError, KeyError) as e:
      return [str(e)]
    return []

  def finalize(self, config, source) -> None:
    """override: completes the config from the training data (`source`, opened and checked)
    before anything is built."""
    del config, source

  # ---- data --------------------------------------------------------------------------------------
  def train_ops(self, config, tokenizer) -> list:
    """override: the per-example field ops (`vlm_jax.data.ops`) of a training batch."""
    raise NotImplementedError

  # ---- model -------------------------------------------------------------------------------------
  def build_model(self, config):
    """override: the Linen module of this task."""
    raise NotImplementedError

  def model_args(self, batch: Mapping[str, Any]) -> tuple:
    """override: the positional arguments of the model's `__call__`, from a batch."""
    raise NotImplementedError

  def init_batch(self, config, batch_size: int = 1) -> dict:
    """A batch of zeros with the shapes the model is initialised on."""
    if not self.reads_images:
      spec = self.text_spec(config)
      return {"text": jnp.zeros((batch_size, spec.context_length), jnp.int32)}
    size = int(config.model.image.image_size)
    batch = {"image": jnp.zeros((batch_size, size, size, 3), jnp.float32)}
    spec = self.text_spec(config)
    if spec is not None:
      batch["text"] = jnp.zeros((batch_size, spec.context_length), jnp.int32)
    return batch

  def init_params(self, model, config, rng: jax.Array) -> PyTree:
    """The model's (boxed) 'params' collection, initialised on `init_batch`."""
    variables = model.init({"params": rng, "dropout": rng},
                           *self.model_args(self.init_batch(config)))
    return variables["params"]

  def forward_fn(self, model) -> Callable[[PyTree, dict, jax.Array], dict]:
    """(params, batch, rng) -> the model's outputs in training mode (dropout from `rng`)."""
    def forward(params, batch, rng):
      return apply_train(model, params, *self.model_args(batch), rng=rng)
    return forward

  def objective(self, config, model) -> Objective:
    """override: the training loss of `model` (see `Objective`)."""
    raise NotImplementedError

  # ---- prediction --------------------------------------------------------------------------------
  def predict_fns(self, config, model) -> dict:
    """override: name -> fn(params, batch, **static), pure and jit-compatible."""
    raise NotImplementedError

  def probabilities(self, config, logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits [N, C]: a softmax over the classes."""
    del config
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

  # ---- cost --------------------------------------------------------------------------------------
  def forward_flops(self, config) -> float:
    """override: forward matmul FLOPs per example (2 per multiply-add), for the global batch of
    `config.batch_size` (batch-wide terms such as contrastive logits count their share)."""
    raise NotImplementedError

  def train_flops_per_example(self, config) -> float:
    """Training FLOPs per example: 3 x forward (the backward pass costs about 2 x forward)."""
    return 3.0 * self.forward_flops(config)


STAT_UPDATES = "stat_updates"      # the collection BatchNorm reports new statistics in


def apply_train(model, params, *args, rng: jax.Array) -> dict:
  """The model's outputs (a dict) in training mode, plus, for a model with BatchNorm, its new
  running statistics under STATS_KEY (the train step writes them into the params)."""
  out, updates = model.apply({"params": params}, *args, train=True, rngs={"dropout": rng},
                             mutable=[STAT_UPDATES])
  stats = updates.get(STAT_UPDATES)
  return dict(out, **{STATS_KEY: stats}) if stats else out


def image_features_fn(model, method: str = "image_features") -> Callable:
  """Predict function: batch['image'] -> the image tower's pooled features [B, W]."""
  def image_features(params, batch):
    return model.apply({"params": params}, batch["image"], method=method)
  return image_features
