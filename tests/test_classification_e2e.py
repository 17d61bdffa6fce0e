"""The classification task's data checks: a data source without the fields the task needs is
refused before anything is compiled. (Training, evaluating and predicting from an ImageFolder
through the command lines runs in tests/test_readme.py, as README's walkthrough writes it.)"""
import os

import pytest

from train_utils import REPO
from vlm_jax import config_utils
from vlm_jax import runtime
from vlm_jax import train

def _no_runtime(monkeypatch):
  """Fails the test if anything gets as far as building the model and compiling."""
  def refuse(*args, **kwargs):
    raise AssertionError("the runtime was built before the data was checked")
  monkeypatch.setattr(runtime.Runtime, "create", refuse)


def test_missing_field_fails_before_compiling(tmp_path, monkeypatch):
  _no_runtime(monkeypatch)
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
  config = config_utils.load_config(f"{REPO}/configs/shapes_classify.py:tiny", {
      "data.source": "jsonl", "data.train_jsonl": str(tmp_path / "captions.jsonl"),
      "data.eval_jsonl": str(tmp_path / "captions.jsonl"), "model.num_classes": 3})
  with pytest.raises(ValueError, match=r"task 'classification' needs 'label' \(for batch field "
                                       r"label\), which captions file .*captions.jsonl does not "
                                       r"provide \(it provides: image, captions\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  os.makedirs(tmp_path / "folder" / "cat")
  (tmp_path / "folder" / "cat" / "0.png").write_bytes(b"")
  config = config_utils.load_config(f"{REPO}/configs/shapes_clip.py:tiny", {
      "data.source": "imagefolder", "data.train_folder": str(tmp_path / "folder"),
      "data.eval_folder": str(tmp_path / "folder")})
  with pytest.raises(ValueError, match=r"task 'contrastive' needs 'captions'"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))
  config = config_utils.load_config(f"{REPO}/configs/shapes_classify.py:tiny", {
      "data.source": "imagefolder", "data.train_folder": str(tmp_path / "empty"),
      "data.eval_folder": str(tmp_path / "folder")})
  with pytest.raises(ValueError, match=r"data.train_folder: .*empty' does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "run3"))
