"""`vlm_jax.soup`: weighted combinations of checkpoints (model soups, WiSE-FT, task arithmetic)
written as a workdir that inference reads, and the refusals (another model, weights that do not
sum to 1)."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from data_fixtures import shapes_tokenizer  # pylint: disable=unused-import
from train_utils import REPO, tiny_overrides
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import inference
from vlm_jax import soup
from vlm_jax import tasks
from vlm_jax.convert import common
from vlm_jax.models import layers


def _config(tokenizer_path, **overrides):
  o = tiny_overrides(None, tokenizer_path, kind="clip")
  o.update({"model.image.depth": 2, **{k.replace("__", "."): v for k, v in overrides.items()}})
  return config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py:tiny"), o)


def _workdir(path, config, seed, tokenizer_path):
  """A workdir of `config`'s model with random params (seed), as `convert` writes one."""
  model = tasks.get(config.task).build_model(config)
  size, length = config.model.image.image_size, config.model.text.context_length
  variables = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32),
                                  np.zeros((1, length), np.int32))
  params = jax.tree.map(np.asarray, jax.device_get(nn.unbox(variables["params"])))
  with open(tokenizer_path, "rb") as f:
    common.write_output(str(path), params, config, tokenizer_bytes=f.read())
  return params


@pytest.fixture(scope="module")
def runs(shapes_tokenizer, tmp_path_factory):
  base = tmp_path_factory.mktemp("soup")
  tok = str(base / "tokenizer.model")
  shapes_tokenizer.save(tok)
  plain = _config(tok)
  a = _workdir(base / "a", plain, 0, tok)
  b = _workdir(base / "b", plain, 1, tok)
  # The same model trained with scanned blocks: its params mix with the plain ones.
  c = _workdir(base / "c", _config(tok, model__scan=True, model__remat=True), 2, tok)
  return base, {"a": a, "b": b, "c": layers.unstack_block_params(c)}


def test_weighted_combination_is_written_as_a_workdir(runs):
  base, params = runs
  out = base / "wise"
  report = soup.combine([str(base / "a"), str(base / "b"), str(base / "c")], str(out),
                        [0.2, 0.5, 0.3])
  assert report["weights"] == [0.2, 0.5, 0.3] and report["steps"] == [0, 0, 0]
  with open(out / "soup.json") as f:
    assert json.load(f)["workdirs"][1] == str(base / "b")
  loaded = inference.load(str(out))          # the first run's config and tokenizer
  got = ckpt_lib.flatten(jax.device_get(loaded.params))
  want = ckpt_lib.flatten(params["a"])
  for path in want:
    mix = (0.2 * ckpt_lib.flatten(params["a"])[path] + 0.5 * ckpt_lib.flatten(params["b"])[path]
           + 0.3 * ckpt_lib.flatten(params["c"])[path])
    np.testing.assert_allclose(got[path], mix, rtol=1e-6, atol=1e-7, err_msg=path)
  assert loaded.encode_texts(loaded.tokenize(["a red circle"])).shape == (1, 32)

  # Task arithmetic (weights -0.5, 1.5) extrapolates: a + 1.5 (b - a).
  out = base / "extrapolated"
  soup.combine([str(base / "a"), str(base / "b")], str(out), [-0.5, 1.5])
  kernel = "text_projection/kernel"
  np.testing.assert_allclose(
      ckpt_lib.flatten(jax.device_get(inference.load(str(out)).params))[kernel],
      ckpt_lib.flatten(params["a"])[kernel] + 1.5 * (ckpt_lib.flatten(params["b"])[kernel]
                                                     - ckpt_lib.flatten(params["a"])[kernel]),
      rtol=1e-5, atol=1e-6)
  # Stored in the first run's layout: the scanned run first gives a scanned soup.
  out = base / "scanned_first"
  soup.combine([str(base / "c"), str(base / "a")], str(out))
  assert "blocks" in inference.load(str(out)).params["image"]["encoder"]


def test_refusals_name_the_problem_and_write_nothing(runs, shapes_tokenizer, tmp_path):
  base, _ = runs
  with pytest.raises(soup.SoupError, match=r"sum to 0.9, not 1"):
    soup.combine([str(base / "a"), str(base / "b")], str(tmp_path / "x"), [0.4, 0.5])
  with pytest.raises(soup.SoupError, match="at least two --workdir"):
    soup.combine([str(base / "a")], str(tmp_path / "x"))
  tok = str(tmp_path / "tokenizer.model")
  shapes_tokenizer.save(tok)
  _workdir(tmp_path / "wide", _config(tok, model__embed_dim=48), 3, tok)
  with pytest.raises(soup.SoupError, match=r"image_projection/kernel is \(32, 32\) in .*a but "
                                           r"\(32, 48\) in .*wide"):
    soup.combine([str(base / "a"), str(tmp_path / "wide")], str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  # The command line: one error line, exit status 1.
  assert soup.main(["--workdir", str(base / "a"), "--workdir", str(base / "b"),
                    "--weights", "1,1", "--out", str(tmp_path / "y")]) == 1
  assert not (tmp_path / "y").exists()
