"""A tiny CoCa trained for a few steps by the real trainer, then: the evaluation CLI reproduces
the metrics the trainer logged at the end; the inference API and the predict CLI work on image
files; bad input (missing checkpoint or step, undecodable image, unknown eval) fails clearly."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import
import train_utils
from vlm_jax import evaluate
from vlm_jax import inference
from vlm_jax import predict
from vlm_jax import train

# Trains a (4-step) model with the real trainer and starts two subprocesses.
# slow; one worker builds the trained run once (xdist would otherwise build it on both).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("inference")]

STEPS = 4
EVAL_OVERRIDES = {
    "total_steps": STEPS,
    "schedule.warmup_steps": 1,
    "checkpoint_every_steps": 2,
    "log_every_steps": 2,
    "evals.run": "zeroshot,retrieval,caption",
    "evals.batch_size": 24,
    "evals.caption.metrics": "bleu,cider,rouge",
    "evals.caption.tokenizer": "python",
    "evals.caption.max_len": 10,
}


@pytest.fixture(scope="module")
def run(shapes_data_dir, shapes_tokenizer, tmp_path_factory):
  """(workdir, command-line overrides, the trainer's final eval metrics) of a 4-step run."""
  base = tmp_path_factory.mktemp("inference")
  tok_path = str(base / "tokenizer.model")
  shapes_tokenizer.save(tok_path)
  overrides = train_utils.tiny_overrides(shapes_data_dir, tok_path, **{})
  overrides.update(EVAL_OVERRIDES)
  config = train_utils.tiny_config("coca", shapes_data_dir, tok_path)
  config.unlock()
  for k, v in EVAL_OVERRIDES.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  workdir = str(base / "run")
  train.train_and_evaluate(config, workdir)
  final = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("step") == STEPS:
        final.update({k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/")})
  assert final, "the trainer logged no eval metrics at the end of training"
  return workdir, overrides, final


def _png_files(data_dir, directory, n=3):
  split = tfds.data_source("shapes/tiny", split="test", data_dir=data_dir)
  paths = []
  for i in range(n):
    path = os.path.join(directory, f"img{i}.png")
    Image.fromarray(np.asarray(split[i]["image"])).save(path)
    paths.append(path)
  return paths


def test_cli_reproduces_the_metrics_logged_at_the_end_of_training(run):
  workdir, overrides, final = run
  cmd = [sys.executable, "-m", "vlm_jax.evaluate", "--config=configs/shapes_coca.py:tiny",
         f"--workdir={workdir}", *train_utils.flag_args(overrides)]
  proc = subprocess.run(cmd, cwd=train_utils.REPO, env=train_utils.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed["step"] == STEPS
  assert {"zeroshot/shapes/top1", "retrieval/shapes/i2t_r1", "retrieval/shapes/t2i_r5",
          "caption/shapes/cider", "caption/shapes/bleu4"} <= set(printed)
  for k, v in final.items():
    assert printed[k] == pytest.approx(v, abs=1e-6), k
  with open(os.path.join(workdir, "eval", f"metrics_{STEPS}.json")) as f:
    written = json.load(f)
  assert written == printed
  assert os.path.isfile(os.path.join(workdir, "eval", f"captions_{STEPS}.json"))


def test_cli_overrides_the_saved_config_with_a_linear_probe(run):
  """Without --config the run's saved config is used, and --config.<field> overrides apply to
  it: a linear probe of the trained image tower."""
  workdir, _, _ = run
  cmd = [sys.executable, "-m", "vlm_jax.evaluate", f"--workdir={workdir}",
         "--config.evals.run=linear_probe", "--config.evals.linear_probe.max_train_examples=128",
         "--tag=probe"]
  proc = subprocess.run(cmd, cwd=train_utils.REPO, env=train_utils.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(printed) == {"step", "linear_probe/shapes/top1", "linear_probe/shapes/l2",
                          "linear_probe/shapes/num_train", "linear_probe/shapes/num_test"}
  # The tagged evaluation has its own file; the untagged one of this step is not overwritten.
  with open(os.path.join(workdir, "eval", f"metrics_{STEPS}_probe.json")) as f:
    assert json.load(f) == printed
  untagged = os.path.join(workdir, "eval", f"metrics_{STEPS}.json")
  assert not os.path.exists(untagged) or "linear_probe/shapes/top1" not in json.load(
      open(untagged))
  with pytest.raises(ValueError, match="--tag 'a/b': use letters, digits"):
    evaluate.check_tag("a/b")
  assert printed["linear_probe/shapes/num_train"] == 128
  assert 0.0 <= printed["linear_probe/shapes/top1"] <= 1.0
  bad = subprocess.run(cmd[:4] + ["--config.evals.linear_probe.max_train=5"],
                       cwd=train_utils.REPO, env=train_utils.subprocess_env(1),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1
  assert ("no config field 'evals.linear_probe.max_train' (did you mean "
          "evals.linear_probe.max_train_examples?)") in bad.stderr


def test_inference_api(run, shapes_data_dir, tmp_path):
  workdir, _, _ = run
  model = inference.load(workdir)
  assert model.step == STEPS and model.task.name == "coca" and model.can_generate
  assert not model.has_classifier
  # An earlier checkpoint by step, or by its directory.
  assert inference.load(os.path.join(workdir, "checkpoints", "2")).step == 2

  paths = _png_files(shapes_data_dir, str(tmp_path))
  images = model.load_images(paths)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
  img = model.encode_images(images)
  assert img.shape == (3, model.config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  # Same as the model applied directly (no sharding, no padding).
  direct = model.module.apply({"params": model.params}, images, method="encode_images")
  np.testing.assert_allclose(img, np.asarray(direct), atol=1e-5)
  features = model.image_features(images)
  assert features.shape == (3, model.config.model.image.width)

  tokens = model.tokenize(["a red circle.", "two blue squares."])
  assert tokens.dtype == np.int32 and tokens.shape == (2, model.config.model.text.context_length)
  assert tokens[0, 0] == model.tokenizer.bos_id
  txt = model.encode_texts(tokens)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)

  greedy = model.generate(images, max_len=8)
  assert len(greedy) == 3 and all(isinstance(c, str) for c in greedy)
  assert model.generate(images, max_len=8, beam=1) == greedy
  assert len(model.generate(images, max_len=8, beam=2, length_penalty=0.6)) == 3
  # Lengths up to a power of two (and 3 or 4 images) share one compiled function, and give what
  # the task's generate compiled for exactly that length gives.
  compiled = lambda: {k: f._cache_size() for k, f in model._ctx._jitted.items()  # pylint: disable=protected-access
                      if k[0] == "generate"}
  before = compiled()
  short = model.generate(images, max_len=5)
  assert len(model.generate(np.concatenate([images, images[:1]]), max_len=11)) == 4
  assert compiled() == before
  tok = model.tokenizer
  exact = jax.jit(lambda p, b: model.task.predict_fns(model.config, model.module)["generate"](
      p, b, max_len=5, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)[0])
  with model._ctx.scope():  # pylint: disable=protected-access
    assert short == tok.decode(np.asarray(exact(model.params, {"image": images})))

  probs = model.classify(images, ["red circle", "blue square", "green triangle"])
  assert probs.shape == (3, 3)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  results = predict.predict(model, paths, ["red circle", "blue square"], templates="shapes")
  assert [r["image"] for r in results] == paths
  assert all("caption" in r and set(r["probs"]) == {"red circle", "blue square"}
             for r in results)


def test_predict_cli(run, shapes_data_dir, tmp_path):
  workdir, _, _ = run
  paths = _png_files(shapes_data_dir, str(tmp_path), n=1)
  cmd = [sys.executable, "-m", "vlm_jax.predict", f"--workdir={workdir}", f"--image={paths[0]}",
         "--labels=red circle,blue square", "--json"]
  proc = subprocess.run(cmd, cwd=train_utils.REPO, env=train_utils.subprocess_env(1),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["image"] == paths[0] and isinstance(out["caption"], str)
  assert sum(out["probs"].values()) == pytest.approx(1.0, rel=1e-5)


def test_bad_input_fails_clearly(run, tmp_path):
  workdir, _, _ = run
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    inference.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.load(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"step 999 not found .* available steps: \[2, 4\]"):
    evaluate.evaluate(None, workdir, 999, write=False)

  config = inference.load_config(inference.locate(workdir))
  config.evals.run = "zeroshot,nonsense"
  with pytest.raises(ValueError, match="evals.run: unknown eval 'nonsense'"):
    evaluate.evaluate(config, workdir, write=False)

  model = inference.load(workdir)
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
  with pytest.raises(ValueError, match="broken.png cannot be decoded"):
    model.load_images([str(bad)])
  with pytest.raises(FileNotFoundError, match="cannot read"):
    model.load_images([str(tmp_path / "missing.png")])
  with pytest.raises(ValueError, match="expected float32"):
    model.encode_images(np.zeros((2, 8, 8, 3), np.float32))
