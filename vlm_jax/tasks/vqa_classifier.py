"""Visual question answering as classification over the frequent answers (late fusion).

The VQAv2 baseline recipe: an image vector and a question vector (a BERT [CLS] state by
default), concatenated, through an MLP, scored against the K most frequent answers of the
training data with soft targets (each answer: min(#humans who gave it / 3, 1)) and a sigmoid
binary cross-entropy per answer. Evaluated by the `vqa` evaluator with the official VQA accuracy,
like the generative prefix-LM, so the two compare on the same split.

Batch fields: `image`, `text` [B, L] (one question of the image, `bos ... eos`; drawn at random
in training) and `answer_scores` [B, K] (`ops.QuestionAnswerScores`). Model:
`models.fusion.LateFusion` (`model.image`, `model.text`, `model.hidden_dim`).
Loss: 'answer_loss' (BCE summed over the answers, averaged over examples); 'answer_score' (the
soft score of the top answer: a training VQA accuracy) is logged.

The answer vocabulary (`model.answers`, '|'-separated) is filled from the training data before
anything is built (`finalize`: the `model.num_answers` most frequent human answers); a run
records it in its config, so evaluation and inference read the same classes.

Predict functions: answer_class (batch['image'], batch['questions'] [B, Q, L] -> answer indices
[B, Q]), classify (image + one question -> logits [B, K]), image_features.
"""
from __future__ import annotations

import collections

import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.data import ops
from vlm_jax.models import fusion
from vlm_jax.tasks import base

SEPARATOR = "|"


class VqaClassifierTask(base.Task):
  name = "vqa_classifier"
  description = "VQA as classification over frequent answers: image + question features, late fusion"
  default_evals = "vqa"
  towers = {"image": ("image", "vit"), "text": ("text", "bert")}

  def head_config(self):
    c = ml_collections.ConfigDict()
    c.num_answers = 1000           # K: the most frequent answers of the training data
    c.answers = ml_collections.config_dict.placeholder(str)   # filled from the data, '|'-joined
    c.hidden_dim = 512             # the fusion MLP's hidden layer
    c.dropout = 0.0
    return c

  def loss_config(self):
    c = ml_collections.ConfigDict()
    c.answer_weight = 1.0
    return c

  def validate(self, config):
    m = config.model
    problems = []
    if int(m.num_answers) < 2:
      problems.append(f"model.num_answers: {m.num_answers} must be >= 2")
    if m.answers is not None and len(self.answer_vocabulary(config)) < 2:
      problems.append(f"model.answers: {m.answers!r} lists fewer than 2 answers")
    return problems

  def answer_vocabulary(self, config) -> list:
    """The answer classes, in class order."""
    if config.model.answers is None:
      raise ValueError("model.answers: not set; the trainer fills it from the training data's "
                       "answers (a run records it in its config.json)")
    return config.model.answers.split(SEPARATOR)

  def finalize(self, config, source):
    """Fills `model.answers` with the `model.num_answers` most frequent human answers of the
    training questions (ties: first seen first)."""
    if config.model.answers is not None:
      return
    from vlm_jax.evals import vqa  # pylint: disable=g-import-not-at-top  (evals import tasks)
    counts = collections.Counter()
    for q in vqa.annotations(source):
      counts.update(ops.normalize_answer(a) for a in q.get("answers") or [])
    counts.pop("", None)
    answers = [a for a, _ in counts.most_common(int(config.model.num_answers))]
    bad = [a for a in answers if SEPARATOR in a]
    if bad:
      raise ValueError(f"model.answers: training answers contain {SEPARATOR!r}: {bad[:3]}")
    if len(answers) < 2:
      raise ValueError(f"data: {source.describe()} has {len(answers)} distinct answers; a VQA "
                       "classifier needs at least 2 (is data.questions_key set?)")
    config.model.answers = SEPARATOR.join(answers)

  def build_problems(self, config):
    """The model's problems before the data has given the answer vocabulary."""
    if config.model.answers is None:
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.model.answers = "a|b"
    return super().build_problems(config)

  def text_spec(self, config):
    t = config.model.text
    return base.TextSpec(vocab_size=int(t.vocab_size), context_length=int(t.context_length))

  def reads_questions(self, config):
    return True

  def train_ops(self, config, tokenizer):
    answers = self.answer_vocabulary(config) if config.model.answers is not None else ["a", "b"]
    return [ops.QuestionAnswerScores(tokenizer, self.text_spec(config).context_length, answers)]

  def build_model(self, config):
    return fusion.from_config(config.model, num_classes=len(self.answer_vocabulary(config)))

  def model_args(self, batch):
    return batch["image"], batch["text"]

  def objective(self, config, model):
    def local_terms(outputs, batch):
      logits, target = outputs["logits"], batch["answer_scores"]
      mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(logits.shape[:1])
      bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, target), axis=-1)
      top = jnp.take_along_axis(target, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0]
      n = jnp.sum(mask)
      return {"answer_loss": (jnp.sum(bce * mask), n), "answer_score": (jnp.sum(top * mask), n)}
    return base.Objective(forward=self.forward_fn(model),
                          weights={"answer_loss": float(config.loss.answer_weight)},
                          local_terms=local_terms)

  def predict_fns(self, config, model):
    def answer_class(params, batch):
      logits = model.apply({"params": params}, batch["image"], batch["questions"],
                           method="question_logits")
      return jnp.argmax(logits, axis=-1)

    def classify(params, batch):
      return model.apply({"params": params}, batch["image"], batch["text"])["logits"]

    def image_features(params, batch):
      return model.apply({"params": params}, batch["image"],
                         method=lambda m, x: m.image(x)[0])
    return {"answer_class": answer_class, "classify": classify,
            "image_features": image_features}

  def forward_flops(self, config):
    m = config.model
    k = int(m.num_answers) if m.answers is None else len(self.answer_vocabulary(config))
    return fusion.forward_flops(m, num_classes=k)


TASK = VqaClassifierTask()
