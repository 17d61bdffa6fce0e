"""The task seam: objectives against NumPy references, the generic GradCache accumulation on a toy
objective, config validation, predict functions by name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_losses import (_normalized, np_caption_xent, np_sigmoid_contrastive,
                         np_softmax_contrastive)
from vlm_jax import config_utils
from vlm_jax import runtime
from vlm_jax import tasks
from vlm_jax import train_step
from vlm_jax.evals import common as evals_common


def _config(task, **sections):
  return config_utils.complete({"task": task, **sections})


def _objective(config):
  task = tasks.get(config.task)
  return task.objective(config, model=None)   # the loss terms never call the model


def _outputs(rng, batch=4, length=6, vocab=9, dim=8):
  return {"image_embed": _normalized(rng, (batch, dim)),
          "text_embed": _normalized(rng, (batch, dim)),
          "logit_scale": jnp.float32(5.0), "logit_bias": jnp.float32(-2.0),
          "caption_logits": rng.normal(size=(batch, length, vocab)).astype(np.float32)}


def test_coca_objective_combines_terms():
  rng = np.random.default_rng(6)
  out = _outputs(rng)
  text = np.array([[1, 5, 6, 2, 0, 0]] * 2 + [[1, 7, 8, 3, 4, 2]] * 2, np.int32)
  config = _config("coca", loss={"label_smoothing": 0.1})
  loss, metrics = _objective(config).loss(out, {"text": text})
  con = np_softmax_contrastive(out["image_embed"], out["text_embed"], 5.0)
  # Position t predicts token t + 1; pads (0) in the targets are masked.
  cap = np_caption_xent(out["caption_logits"][:, :-1], text[:, 1:], text[:, 1:] != 0, 0.1)
  np.testing.assert_allclose(metrics["contrastive_loss"], con, rtol=1e-5)
  np.testing.assert_allclose(metrics["caption_loss"], cap, rtol=1e-5)
  np.testing.assert_allclose(loss, 1.0 * con + 2.0 * cap, rtol=1e-5)   # the paper's weights
  assert metrics["loss"] is loss
  assert float(metrics["logit_scale"]) == 5.0 and float(metrics["logit_bias"]) == -2.0


def test_sigmoid_contrastive_and_caption_only_objectives():
  rng = np.random.default_rng(7)
  out = _outputs(rng)
  text = np.ones((4, 6), np.int32)
  loss, metrics = _objective(_config("contrastive", loss={"contrastive": "sigmoid"})).loss(
      out, {"text": text})
  np.testing.assert_allclose(
      loss, np_sigmoid_contrastive(out["image_embed"], out["text_embed"], 5.0, -2.0), rtol=1e-5)
  assert "caption_loss" not in metrics
  loss, metrics = _objective(_config("coca", loss={"contrastive": "none"})).loss(
      out, {"text": text})
  assert "contrastive_loss" not in metrics
  np.testing.assert_allclose(loss, 2.0 * metrics["caption_loss"], rtol=1e-6)
  # An all-pad caption batch counts zero tokens: the term is 0, not NaN.
  _, metrics = _objective(_config("captioning", model={"decoder": {
      "vocab_size": 9, "context_length": 6}})).loss(out, {"text": np.zeros((4, 6), np.int32)})
  assert float(metrics["caption_loss"]) == 0.0


def test_classification_objective():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 0])
  config = _config("classification", model={"num_classes": 5}, loss={"label_smoothing": 0.1})
  loss, metrics = _objective(config).loss({"logits": logits}, {"label": labels})
  want = np_caption_xent(logits[:, None], labels[:, None], np.ones((6, 1), bool), 0.1)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == labels))
  assert set(metrics) == {"classification_loss", "accuracy", "loss"}


def _toy_objective():
  """Per-example outputs of a linear map, a non-linear global term over the whole batch (a
  softmax over all examples, like a contrastive loss), a shared scalar, and a token-weighted
  local term whose count is a function of the batch only."""
  def forward(params, batch, rng):
    del rng
    e = jnp.tanh(batch["x"] @ params["w"])
    return {"e": e, "scale": jnp.exp(params["s"]), "y": batch["x"] @ params["v"]}

  def global_terms(out, batch):
    del batch
    logits = out["scale"] * out["e"] @ out["e"].T
    return {"global": jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))}

  def local_terms(out, batch):
    mask = batch["mask"].astype(jnp.float32)
    err = jnp.sum((out["y"] - batch["t"]) ** 2, axis=-1)
    return {"local": (jnp.sum(err * mask), jnp.sum(mask)),
            "logged_only": (jnp.sum(mask * 2.0), jnp.sum(mask))}

  return tasks.Objective(forward=forward, weights={"global": 0.7, "local": 1.3},
                         global_keys=("e", "scale"), global_terms=global_terms,
                         local_terms=local_terms, logged=("scale",))


def test_gradcache_accumulation_equals_the_whole_batch():
  rng = np.random.default_rng(9)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "s": jnp.float32(0.3)}
  batch = {"x": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
           "t": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32),
           "mask": jnp.asarray(rng.random(12) > 0.3)}
  objective = _toy_objective()
  whole = train_step.loss_and_grads_fn(objective, 1)(params, batch, jax.random.key(0))
  for k in (2, 3, 4):
    acc = jax.jit(train_step.loss_and_grads_fn(objective, k))(params, batch, jax.random.key(0))
    np.testing.assert_allclose(acc[0], whole[0], rtol=1e-5)
    assert set(acc[1]) == set(whole[1]) == {"global", "local", "logged_only", "loss", "scale"}
    for name in whole[1]:
      np.testing.assert_allclose(acc[1][name], whole[1][name], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 acc[2], whole[2])
  # Summing micro-batch losses would be another objective: the global term differs.
  micro = train_step.loss_and_grads_fn(objective, 1)(
      params, jax.tree.map(lambda x: x[:6], batch), jax.random.key(0))
  assert abs(float(micro[1]["global"]) - float(whole[1]["global"])) > 1e-3


@pytest.mark.parametrize("sections,match", [
    ({"loss": {"contrastive": "hinge"}}, r"loss.contrastive: unknown contrastive loss 'hinge'"),
    ({"loss": {"contrastive_impl": "allgather"}}, r"loss.contrastive_impl: .*'allgather'"),
    ({"batch_size": 12, "grad_accum_steps": 5}, r"grad_accum_steps: 5 must .* divide"),
    ({"batch_size": 12}, r"12 must be divisible by the 8 data-parallel devices"),
    ({"total_steps": 0}, r"total_steps: 0 must be >= 1"),
])
def test_config_problems_are_named_before_anything_is_built(sections, match):
  config = _config("contrastive", **sections)
  with pytest.raises(ValueError, match=match):
    runtime.validate(config)


def test_several_problems_are_reported_at_once():
  config = _config("coca", loss={"contrastive": "none", "caption_weight": 0.0}, total_steps=0)
  with pytest.raises(ValueError) as e:
    runtime.validate(config)
  assert "leave nothing to train" in str(e.value) and "total_steps: 0" in str(e.value)
  config = _config("captioning")
  with pytest.raises(ValueError, match="model.decoder.vocab_size: must be set"):
    runtime.validate(config)


def test_missing_predict_function_is_named():
  config = _config("classification", model={"num_classes": 3})
  ctx = evals_common.EvalContext.create(config, tasks.get("classification"), None, None,
                                        jax.make_mesh((1,), ("data",)), None)
  assert ctx.has_predict_fn("classify") and not ctx.has_predict_fn("encode_texts")
  with pytest.raises(ValueError, match=r"evals: zero-shot .*'encode_texts', which task "
                                       r"'classification' does not provide \(it provides: "
                                       r"classify, image_features\)"):
    ctx.predict_fn("encode_texts", "evals: zero-shot on 'x'")


def test_zeroshot_probabilities_follow_the_loss():
  logits = np.array([[2.0, 0.0, -1.0]])
  softmax = tasks.get("contrastive").probabilities(_config("contrastive"), logits)
  np.testing.assert_allclose(softmax.sum(), 1.0, rtol=1e-6)
  sigmoid = tasks.get("contrastive").probabilities(
      _config("contrastive", loss={"contrastive": "sigmoid"}), logits)
  np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-logits)), rtol=1e-6)
