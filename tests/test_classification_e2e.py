"""The classification task end to end on an ImageFolder (root/<class>/<image>) written from the tiny
shapes splits: train -> evaluate -> predict through the command lines, and the checks that refuse
a data source without the fields the task needs before anything is compiled."""
import json
import os
import subprocess
import sys

import pytest

from train_utils import REPO, flag_args, subprocess_env, tiny_overrides
from vlm_jax import config_utils
from vlm_jax import runtime
from vlm_jax import train
from vlm_jax.data import write_shapes

STEPS = 8


def _run(args, timeout=600):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=subprocess_env(2),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_image_folder_classifier_trains_evaluates_and_predicts(tmp_path):
  train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "val")
  classes = write_shapes.write("imagefolder", train_dir, "tiny", "train")
  write_shapes.write("imagefolder", eval_dir, "tiny", "test")
  workdir = str(tmp_path / "run")
  overrides = tiny_overrides(None, kind="classify", total_steps=STEPS, log_every_steps=4,
                             checkpoint_every_steps=4, schedule__warmup_steps=2,
                             evals__run="classification")
  overrides.update({"data.source": "imagefolder", "data.train_folder": train_dir,
                    "data.eval_folder": eval_dir})
  del overrides["data.data_dir"]
  _run(["vlm_jax.train", f"--config={REPO}/configs/shapes_classify.py:tiny",
        f"--workdir={workdir}", *flag_args(overrides)])

  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["num_classes"] == len(classes)          # from the class folders
  assert saved["data"]["classnames"].split(",") == classes
  assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))   # no text, no tokenizer
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  final = {k: v for r in records if r["step"] == STEPS for k, v in r.items()}
  assert final["eval/classification/imagefolder/num_examples"] == 64
  assert {"classification_loss", "accuracy"} <= set(final)
  assert final["checkpoint/lag_steps"] == 4    # logged before step 8's save: step 4 is newest

  # The evaluation command reproduces the trainer's final evaluation from the saved config.
  printed = json.loads(_run(["vlm_jax.evaluate", f"--workdir={workdir}"]).splitlines()[-1])
  for key in ("top1", "top5", "num_examples"):
    assert printed[f"classification/imagefolder/{key}"] == pytest.approx(
        final[f"eval/classification/imagefolder/{key}"]), key

  image = os.path.join(eval_dir, classes[0], sorted(os.listdir(os.path.join(eval_dir,
                                                                            classes[0])))[0])
  out = json.loads(_run(["vlm_jax.predict", f"--workdir={workdir}", f"--image={image}",
                         "--json"]).splitlines()[-1])
  assert out["image"] == image and "caption" not in out
  assert set(out["probs"]) <= set(classes) and len(out["probs"]) == 5
  assert sum(out["probs"].values()) <= 1.0 + 1e-6


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
