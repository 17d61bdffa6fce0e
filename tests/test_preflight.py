"""Every config mistake reported at once, before anything is built: the checks of
vlm_jax.preflight through the trainer and through the command line."""
import os
import subprocess
import sys

import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, subprocess_env
from vlm_jax import config_utils
from vlm_jax import runtime
from vlm_jax import tasks
from vlm_jax import train


@pytest.fixture
def nothing_built(monkeypatch):
  """Fails the test if anything gets as far as initialising a model or building the runtime."""
  def refuse(*args, **kwargs):
    raise AssertionError("a model was initialised or the runtime built before the checks")
  monkeypatch.setattr(runtime.Runtime, "create", refuse)
  monkeypatch.setattr(tasks.Task, "init_params", refuse)


def _problems(config, workdir):
  with pytest.raises(config_utils.ConfigError) as e:
    train.train_and_evaluate(config, str(workdir))
  head, *lines = str(e.value).splitlines()
  assert head.startswith("config: ")
  return [line.strip() for line in lines]


def test_every_config_mistake_at_once(tmp_path, nothing_built):
  config = config_utils.load_config(f"{REPO}/configs/shapes_coca.py:tiny", {
      "loss.contrastive": "softmx", "data.train_crop": "zoom", "data.eval_crop": "squash",
      "schedule.kind": "linear", "schedule.warmup_fraction": 1.5, "freeze": "([",
      "data.source": "jsonl", "data.train_jsonl": str(tmp_path / "missing.jsonl"),
      "mesh.fsdp": 3, "tokenizer.kind": "wordpiece", "model.image.num_heads": 5,
      "log_every_steps": 0, "data.image_size": 48,
      "init_from": str(tmp_path / "no_run"), "evals.run": "zeroshot,retreival,caption",
      "evals.caption.beam_size": 0, "evals.caption.metrics": "bleu,spice",
      "model.attention": "cudnn"})
  problems = _problems(config, tmp_path / "run")
  expected = [
      "loss.contrastive: unknown contrastive loss 'softmx'",
      "model.image.num_heads: width 64 is not divisible by num_heads 5",
      "mesh: data=-1, fsdp=3, tensor=1 needs a device count divisible by 3",
      "schedule.kind: unknown schedule 'linear'",
      "schedule.warmup_fraction: 1.5 must be in [0, 1)",
      "model.attention: 'cudnn' runs on GPUs only (this backend: cpu)",
      "log_every_steps: 0 must be >= 1",
      "freeze: '([' is not a valid regex",
      "init_from: ", "data.train_crop: unknown crop 'zoom'", "data.eval_crop: unknown crop 'squash'",
      "data.image_size: 48 != model.image.image_size=32",
      "data.train_jsonl: ", "tokenizer.kind: unknown tokenizer 'wordpiece'",
      "evals.run: unknown eval 'retreival'", "evals.caption.beam_size: 0 must be >= 1",
      "evals.caption.metrics: unknown ['spice']", "evals.zeroshot: data.eval_jsonl: not set",
  ]
  for want in expected:
    assert any(p.startswith(want) for p in problems), (want, problems)
  assert len(problems) == len(set(problems))
  # The TPU kernel is refused off a TPU the same way.
  config = config_utils.load_config(f"{REPO}/configs/shapes_coca.py:tiny",
                                    {"model.attention": "pallas"})
  assert "model.attention: 'pallas' runs on TPUs only (this backend: cpu); use 'xla' or " \
      "'einsum'" in _problems(config, tmp_path / "pallas")


def test_evaluations_the_task_or_the_data_cannot_serve(shapes_data_dir, tmp_path, nothing_built):
  # A contrastive model has no decoder to caption with.
  config = config_utils.load_config(f"{REPO}/configs/shapes_clip.py:tiny", {
      "data.data_dir": shapes_data_dir, "evals.run": "zeroshot,caption,classification"})
  problems = _problems(config, tmp_path / "a")
  assert any(p.startswith("evals.caption: a caption evaluation calls generate, caption_nll, "
                          "which task 'contrastive' does not provide") for p in problems)
  assert any(p.startswith("evals.classification: a classification evaluation calls classify")
             for p in problems)
  # A captions.jsonl without labels: zero-shot cannot score it; found before step 0.
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": "a red circle."}\n')
  config = config_utils.load_config(f"{REPO}/configs/shapes_clip.py:tiny", {
      "data.source": "jsonl", "data.train_jsonl": str(tmp_path / "c.jsonl"),
      "data.eval_jsonl": str(tmp_path / "c.jsonl"), "evals.run": "zeroshot,retrieval"})
  problems = _problems(config, tmp_path / "b")
  assert len(problems) == 1
  assert problems[0].startswith("evals.zeroshot: data: zeroshot on 'jsonl' needs 'label'")


def test_the_command_line_prints_one_error_and_no_traceback(tmp_path):
  cmd = [sys.executable, "-m", "vlm_jax.train", f"--config={REPO}/configs/shapes_clip.py:tiny",
         f"--workdir={tmp_path}", "--config.data.train_crop=zoom", "--config.log_every_steps=0"]
  proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  tail = proc.stderr.strip().splitlines()[-3:]
  assert tail[0] == "error: config: 2 problems:"
  assert {line.strip().split(":")[0] for line in tail[1:]} == {"data.train_crop",
                                                               "log_every_steps"}
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
  verbose = subprocess.run(cmd + ["--verbose"], cwd=REPO, env=subprocess_env(1),
                           capture_output=True, text=True, timeout=300)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr
