"""A new user's first hour, as command lines: each test reproduces a failure a new user met and
checks what happens now (your own captions.jsonl, `evaluate` after the demo on a fresh cache,
overrides without --config, bad input, config discovery, quiet logs)."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, subprocess_env
from vlm_jax import config as config_cli
from vlm_jax import config_utils
from vlm_jax import console
from vlm_jax.data import sources
from vlm_jax.data import write_shapes

# A CLIP small enough to train in seconds (the shapes_clip.py:tiny recipe, narrower).
TINY_CLIP = ["--config.model.image.width=32", "--config.model.image.depth=1",
             "--config.model.image.num_heads=2", "--config.model.image.mlp_dim=64",
             "--config.model.text.width=32", "--config.model.text.depth=1",
             "--config.model.text.num_heads=2", "--config.model.text.mlp_dim=64",
             "--config.model.embed_dim=32", "--config.batch_size=16",
             "--noconfig.progress_bar"]
LIBRARY_LINES = ("checkpoint_manager.py", "read only", "PTBTokenizer", "oneDNN",
                 "xla_bridge.py", "absl::InitializeLog")


def run(args, cwd, env=None, timeout=600):
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env or subprocess_env(1),
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - t0


def error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
  """captions.jsonl files (captions only, as most users' data) for the train and test splits."""
  root = tmp_path_factory.mktemp("byod")
  for split in ("train", "test"):
    write_shapes.write("jsonl", str(root / split), "tiny", split)
  return root


def test_write_shapes_layouts_read_back_as_the_tfds_examples(shapes_data_dir, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.data_source("shapes/tiny", split="test", data_dir=shapes_data_dir)
  captions = {ds[i]["id"].decode(): [c.decode() for c in ds[i]["captions"]]
              for i in range(len(ds))}
  labels = {ds[i]["id"].decode(): int(ds[i]["label"]) for i in range(len(ds))}
  data = config_utils.load_config(f"{REPO}/configs/shapes_clip.py:tiny").data
  data.eval_jsonl = write_shapes.write("jsonl", str(tmp_path / "j"), "tiny", "test", num=20)
  data.eval_shards = str(tmp_path / "w" / "*.tar")
  write_shapes.write("wds", str(tmp_path / "w"), "tiny", "test", num=20, per_shard=8,
                     labels=True)
  data.eval_folder = str(tmp_path / "f")
  classes = write_shapes.write("imagefolder", data.eval_folder, "tiny", "test", num=20)
  for kind in ("jsonl", "wds", "imagefolder"):
    data.source = kind
    source = sources.make_source(data, "eval")
    if kind == "wds":
      raws = [raw for raw, _ in source.iterate({"epoch": 0, "group": 0, "offset": 0},
                                               process_index=0, process_count=1, seed=0,
                                               shuffle=False, num_epochs=1)]
    else:
      raws = [source[i] for i in range(len(source))]
    assert len(raws) == 20, kind
    for raw in raws:
      assert "error" not in raw, raw
      if kind == "imagefolder":   # <class folder>/test_000003.png; labels in folder order
        folder, name = raw["key"].replace(os.sep, "/").split("/")[-2:]
        index = int(name.split("test_")[1][:6])
        assert folder == shapes_names()[labels[f"test/{index:06d}"]]
        assert source.class_names()[raw["label"]].replace(" ", "_") == folder
        assert folder in classes
      elif kind == "jsonl":   # images/test_000003.png holds example test/000003
        index = int(raw["key"].split("test_")[1][:6])
        assert [str(c) for c in raw["captions"]] == captions[f"test/{index:06d}"]
      else:                   # sample <shard:05d><count:04d>, 8 to a shard, the first caption
        key = raw["key"].split("/")[-1]
        index = int(key[:5]) * 8 + int(key[5:9])
        first = raw["captions"][0]
        first = first.decode() if isinstance(first, bytes) else first
        assert first == captions[f"test/{index:06d}"][0]
  # The tar shards carry img2dataset's per-shard statistics.
  stats = json.loads((tmp_path / "w" / "00002_stats.json").read_text())
  assert stats["successes"] == 4
  with pytest.raises(ValueError, match="is not empty"):
    write_shapes.write("jsonl", str(tmp_path / "j"), "tiny", "test")


def shapes_names():
  from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  return [n.replace(" ", "_") for n in shapes.class_names()]


def test_zeroshot_asked_for_by_name_fails_before_step_0(jsonl_data, tmp_path):
  """(README's bring-your-own-data test runs the default evaluations on a captions.jsonl: the
  zero-shot it cannot score is skipped there, with one warning.)"""
  data = ["--config.data.source=jsonl",
          f"--config.data.train_jsonl={jsonl_data}/train/captions.jsonl"]
  # Labels but no class names: the error names the field to set.
  proc, _ = run(["vlm_jax.train", f"--config={REPO}/configs/shapes_clip.py",
                 f"--workdir={tmp_path}/named", "--config.evals.run=zeroshot,retrieval", *data,
                 "--config.data.eval_jsonl=" + write_shapes.write(
                     "jsonl", str(tmp_path / "labelled"), "tiny", "test", num=8, labels=True),
                 *TINY_CLIP], REPO)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "evals.zeroshot.classnames" in proc.stderr
  assert not os.path.exists(f"{tmp_path}/named/checkpoints")


@pytest.mark.slow
def test_evaluate_and_predict_after_training_on_a_fresh_cache(tmp_path):
  """`evaluate --workdir` after the demo used to look for the data in another place than the
  demo wrote it; overrides without --config were a flags error."""
  env = subprocess_env(1, VLM_JAX_CACHE=str(tmp_path / "cache"))
  proc, _ = run(["vlm_jax.train", f"--config={REPO}/configs/shapes_coca.py:tiny",
                 f"--workdir={tmp_path}/run", "--config.total_steps=2", "--config.batch_size=16",
                 "--config.evals.run=", "--noconfig.progress_bar"], REPO, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # --config.total_steps alone used to be refused: the recipe's warm-up (10) is longer.
  assert "schedule.warmup_steps=10 is longer than total_steps=2" in proc.stderr
  assert os.path.isdir(tmp_path / "cache" / "tensorflow_datasets" / "shapes" / "tiny")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data"]["data_dir"] is None         # the cache, wherever it is on this machine
  proc, _ = run(["vlm_jax.evaluate", f"--workdir={tmp_path}/run",
                 "--config.evals.run=zeroshot,caption", "--config.evals.caption.max_len=4"],
                REPO, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.strip().splitlines()[-1])
  assert metrics["zeroshot/shapes/num_examples"] == 64 and "caption/shapes/cider" in metrics
  assert not [l for l in proc.stderr.splitlines() if any(s in l for s in LIBRARY_LINES)], \
      proc.stderr
  image = write_shapes.write("jsonl", str(tmp_path / "img"), "tiny", "test", num=1)
  image = os.path.join(os.path.dirname(image), "images", "test_000000.png")
  proc, _ = run(["vlm_jax.predict", f"--workdir={tmp_path}/run", f"--image={image}",
                 "--labels=red circle,blue square", "--config.data.eval_crop=openai"], REPO, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0] == image and "caption:" in proc.stdout
  assert proc.stderr.strip() == "", proc.stderr   # nothing but the results
  proc, _ = run(["vlm_jax.predict", f"--workdir={tmp_path}/run", f"--image={image}",
                 "--config.data.eval_crp=openai"], REPO, env)
  assert proc.returncode == 1 and "did you mean data.eval_crop" in proc.stderr


@pytest.mark.parametrize("case", ["missing_file", "broken_line", "empty_file", "bpe_no_vocab"])
def test_bad_input_fails_with_one_line_before_compiling(case, jsonl_data, tmp_path):
  path = tmp_path / "captions.jsonl"
  extra, expected = [], {
      "missing_file": f"data.train_jsonl: '{path}' does not exist",
      "broken_line": f"{path}:2: expected a JSON object with an 'image' field",
      "empty_file": f"{path} holds no records",
      "bpe_no_vocab": "tokenizer.model_path: tokenizer.kind='bpe' needs OpenAI CLIP's merges "
                      "file bpe_simple_vocab_16e6.txt.gz",
  }[case]
  if case == "broken_line":
    path.write_text('{"image": "a.png", "caption": "a"}\n{"image": "b.png", "caption": \n')
  elif case == "empty_file":
    path.write_text("\n")
  elif case == "bpe_no_vocab":
    path = jsonl_data / "train" / "captions.jsonl"
    extra = ["--config.tokenizer.kind=bpe"]
  proc, seconds = run(["vlm_jax.train", f"--config={REPO}/configs/shapes_clip.py",
                       f"--workdir={tmp_path}/run", "--config.data.source=jsonl",
                       f"--config.data.train_jsonl={path}",
                       f"--config.data.eval_jsonl={jsonl_data}/test/captions.jsonl", *extra],
                      REPO)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  errors = error_lines(proc)
  assert len(errors) == 1
  problems = [errors[0]] + [l for l in proc.stderr.splitlines()[-3:] if l.startswith("  ")]
  assert any(expected in line for line in problems), (expected, proc.stderr[-2000:])
  print(f"{case}: failed in {seconds:.1f} s")


def test_config_show_prints_every_field_with_help(tmp_path):
  proc, _ = run(["vlm_jax.config", "show", "configs/shapes_coca.py:tiny",
                 "--config.total_steps=77", "--config.optim.lr=0.5"], REPO)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  config = config_utils.load_config(f"{REPO}/configs/shapes_coca.py:tiny",
                                    {"total_steps": 77, "optim.lr": 0.5})
  names = [name for name, _ in config_cli.flat_fields(config)]
  assert [l.split(" = ")[0] for l in lines] == names            # every field, once
  assert "total_steps = 77" in lines
  assert [l for l in lines if l.startswith("optim.lr = 0.5 ")][0].endswith("# peak learning rate")
  templates = [l for l in lines if l.startswith("evals.zeroshot.templates = ")][0]
  assert templates.endswith("'clip7' | 'photo' | 'shapes' | 'a {}.|a photo of a {}.'")  # 2 lines
  assert "# 'plain': the loss on the global batch" in \
      [l for l in lines if l.startswith("loss.contrastive_impl")][0]   # a block above the field
  assert "# " not in [l for l in lines if l.startswith("data.image_size")][0]   # a heading
  proc, _ = run(["vlm_jax.config", "show", "configs/shapes_coca.py", "--config.optim.lrr=1"],
                REPO)
  assert proc.returncode == 1 and error_lines(proc) == [
      "error: --config overrides: no config field 'optim.lrr' (did you mean optim.lr?)"]
  proc, _ = run(["vlm_jax.train", "--help"], REPO)
  assert "python -m vlm_jax.config show" in proc.stdout


def test_library_info_lines_are_quiet_but_warnings_and_ours_are_not():
  library = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/x.py", 1, "lib info",
                              None, None)
  ours = logging.LogRecord("absl", logging.INFO, console.__file__, 1, "our info", None, None)
  warning = logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/x.py", 1,
                              "lib warning", None, None)
  keep = console._LibraryInfoFilter()  # pylint: disable=protected-access
  assert [r.getMessage() for r in (library, ours, warning) if keep.filter(r)] == [
      "our info", "lib warning"]
  console._STATE["verbose"] = True  # pylint: disable=protected-access
  try:
    assert keep.filter(library)
  finally:
    console._STATE["verbose"] = False  # pylint: disable=protected-access
