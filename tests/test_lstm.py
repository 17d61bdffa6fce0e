"""The LSTM caption decoder (Show and Tell) behind the decoders' contract: cached decoding equals
the teacher-forced forward, causality, logical axes, and a captioner that learns on shapes."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax import tasks

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, logged

pytestmark = pytest.mark.xdist_group("lstm")

SMALL = {"model.decoder.width": 32, "model.decoder.embed_dim": 16,
         "model.image.width": 32, "model.image.depth": 1, "model.image.num_heads": 2,
         "model.image.mlp_dim": 64}


@pytest.fixture(scope="module")
def captioner():
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_lstm_caption.py:tiny"),
                                 SMALL)
  model = tasks.get(cfg.task).build_model(cfg)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  text = jnp.asarray([[2, 5, 9, 12, 3, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0]], jnp.int32)
  variables = model.init({"params": jax.random.key(0)}, images, text)
  return model, variables, images, text


def test_cached_decoding_equals_teacher_forcing(captioner):
  model, variables, images, text = captioner
  params = nn.unbox(variables)
  full = model.apply(params, images, text)["caption_logits"]
  tokens = model.apply(params, images, method="image_tokens")
  cache = models.init_cache(model, params, tokens, text.shape[1])
  assert set(cache["decoder"]) == {"cell_c", "cell_h"}      # the state is the whole cache

  @jax.jit
  def step(cache, token):
    return model.apply({**params, "cache": cache}, tokens, token, decode=True, method="decode",
                       mutable=["cache"])
  steps = []
  for t in range(text.shape[1]):
    logits, mutated = step(cache, text[:, t:t + 1])
    cache = mutated["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)


def test_causal_and_conditioned_on_the_image(captioner):
  model, variables, images, text = captioner
  params = nn.unbox(variables)
  base = model.apply(params, images, text)["caption_logits"]
  changed = model.apply(params, images, text.at[:, 3:].set(9))["caption_logits"]
  np.testing.assert_allclose(base[:, :3], changed[:, :3], rtol=1e-6)
  assert np.abs(base[:, 3:] - changed[:, 3:]).max() > 1e-6
  other = model.apply(params, images[::-1], text)["caption_logits"]
  assert np.abs(other - base).max() > 1e-6          # the image step changes every position


def test_every_decoder_param_has_logical_axes(captioner):
  _, variables, _, _ = captioner
  leaves = jax.tree_util.tree_flatten_with_path(
      variables["params"]["decoder"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  assert len(leaves) == 17        # 12 in the cell, head 2, image_embedding 2, token_embedding
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim


def test_lstm_captioner_learns(shapes_data_dir, tmp_path):
  o = dict(SMALL)
  o.update({"data.data_dir": shapes_data_dir, "batch_size": 32, "total_steps": 200,
            "optim.lr": 1e-2, "log_every_steps": 20, "checkpoint_every_steps": 200,
            "evals.run": "caption", "progress_bar": False, "async_checkpointing": False})
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_lstm_caption.py:tiny"), o)
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  losses = logged(str(tmp_path / "run"), keys=("caption_loss",))
  first, last = losses[min(losses)]["caption_loss"], losses[max(losses)]["caption_loss"]
  assert last < first - 2.0, (first, last)
  assert final["eval/caption/shapes/cider"] > 0.3, final
