"""README's "Bring your own data" section, run command by command as written, and the two
commands' Makefile choosing its Python."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from train_utils import REPO, subprocess_env


def section_commands(title: str) -> list:
  """The `python -m ...` commands of the ```bash blocks of a README section, continuation lines
  joined."""
  text = open(os.path.join(REPO, "README.md")).read()
  start = text.index(f"## {title}\n")
  end = text.find("\n## ", start + 1)
  blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
  commands = []
  for block in blocks:
    for command in block.replace("\\\n", " ").splitlines():
      command = command.split("  #")[0].strip()
      if command:
        commands.append(command)
  return commands


def test_the_section_covers_every_layout_from_files_to_a_model():
  commands = section_commands("Bring your own data")
  assert all(c.startswith("python -m vlm_jax.") for c in commands)
  layouts = {re.search(r"--layout (\w+)", c).group(1) for c in commands if "write_shapes" in c}
  sources = {re.search(r"--config.data.source=(\w+)", c).group(1) for c in commands
             if "vlm_jax.train" in c}
  assert layouts == sources == {"jsonl", "wds", "imagefolder"}


@pytest.mark.slow
def test_bring_your_own_data_commands_run_as_written(tmp_path):
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  outputs = {}
  for command in section_commands("Bring your own data"):
    argv = shlex.split(command)
    assert argv[0] == "python"
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, command
    outputs[command] = proc.stdout
    if "--workdir runs/my_clip " in command and "vlm_jax.train" in command:
      # Used to train every step, then die at the final evaluation: the default zero-shot needs
      # class names a captions.jsonl does not have. Now it is skipped, with one warning.
      skipped = [l for l in proc.stderr.splitlines() if "evals.run='auto' skips" in l]
      assert len(skipped) == 1 and "evals.zeroshot" in skipped[0], proc.stderr[-3000:]
      assert "running: retrieval" in skipped[0]
      # The libraries' INFO lines stay off the console.
      assert not [l for l in proc.stderr.splitlines() if any(
          s in l for s in ("checkpoint_manager.py", "PTBTokenizer", "oneDNN", "xla_bridge.py"))]
  by_start = lambda prefix: [out for c, out in outputs.items() if c.startswith(prefix)]
  metrics = json.loads(by_start("python -m vlm_jax.evaluate --workdir runs/my_clip")[0]
                       .strip().splitlines()[-1])
  # The classifier: classes from the folders, no tokenizer (no text), and `evaluate` reproduces
  # the trainer's final evaluation from the saved config.
  classifier = json.loads(open(tmp_path / "runs" / "my_classifier" / "config.json").read())
  folders = sorted(os.listdir(tmp_path / "mydata" / "classes_train"))
  assert classifier["data"]["classnames"].split(",") == folders
  assert classifier["model"]["num_classes"] == len(folders) == 20
  assert not os.path.exists(tmp_path / "runs" / "my_classifier" / "tokenizer.model")
  printed = json.loads(by_start("python -m vlm_jax.evaluate --workdir runs/my_classifier")[0]
                       .strip().splitlines()[-1])
  logged_final = {k: v for r in map(json.loads, open(tmp_path / "runs" / "my_classifier" /
                                                     "metrics.jsonl"))
                  if r["step"] == 30 for k, v in r.items()}
  test_images = sum(len(files) for _, _, files in os.walk(tmp_path / "mydata" / "classes_test"))
  assert logged_final["eval/classification/imagefolder/num_examples"] == test_images > 0
  for key in ("top1", "top5", "num_examples"):
    assert printed[f"classification/imagefolder/{key}"] == pytest.approx(
        logged_final[f"eval/classification/imagefolder/{key}"]), key
  assert 0 <= metrics["retrieval/jsonl/i2t_r1"] <= 1 and metrics["step"] == 30
  clip_predict, classifier_predict = by_start("python -m vlm_jax.predict")
  assert "red circle" in clip_predict and "blue square" in clip_predict
  assert "tok.model: vocab_size" in by_start("python -m vlm_jax.data.tokenizer")[0]
  # The classifier recorded its class names (the folders) and prints them.
  assert re.search(r"\d\.\d{4}  (red|green|blue|yellow|white)_(circle|square|triangle|cross)",
                   classifier_predict), classifier_predict
  for run in ("my_clip", "my_clip_wds", "my_classifier"):
    final = [json.loads(l) for l in open(tmp_path / "runs" / run / "metrics.jsonl")][-1]
    assert final["step"] == 30, run
  saved = json.loads(open(tmp_path / "runs" / "my_clip" / "config.json").read())
  assert saved["evals"]["run"] == "retrieval"      # what ran is what `evaluate` runs again
  wds = json.loads(open(tmp_path / "runs" / "my_clip_wds" / "config.json").read())
  assert wds["tokenizer"]["model_path"] == "mydata/tok.model"


def test_make_refuses_another_python_before_creating_the_venv(tmp_path):
  """The two commands need the Python the pins are for; any other stops `make` at once, naming
  the interpreter, before a venv is made."""
  stub = tmp_path / "python3.11"
  stub.write_text("#!/bin/sh\nexit 1\n")   # not Python 3.12: the version check fails
  stub.chmod(0o755)
  venv = tmp_path / "venv"
  proc = subprocess.run(["make", "-C", REPO, "install", f"PYTHON={stub}", f"VENV={venv}"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert "need Python 3.12" in proc.stderr and str(stub) in proc.stderr
  assert not venv.exists()
  pinned_for = re.search(r"on Python (3\.\d+)", open(os.path.join(REPO, "requirements.txt")).read())
  assert pinned_for.group(1) == "3.12"


def test_make_finds_the_newest_python_3_12_that_pyenv_installed(tmp_path):
  """With no python3.12 on the PATH, the Makefile takes pyenv's newest 3.12 (3.12.10 after
  3.12.9, not before), from pyenv's versions folder: pyenv itself need not be on the PATH."""
  root = tmp_path / "pyenv"
  for version in ("3.11.7", "3.12.9", "3.12.10", "3.13.0"):
    binary = root / "versions" / version / "bin" / f"python{version[:4]}"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
  env = {"HOME": str(tmp_path), "PYENV_ROOT": str(root), "PATH": "/usr/bin:/bin"}
  if shutil.which("python3.12", path=env["PATH"]):
    pytest.skip("this machine has a python3.12 in /usr/bin, which the Makefile takes first")
  proc = subprocess.run(["make", "-s", "-C", REPO, "--eval", "print-python: ; @echo $(PYTHON)",
                         "print-python"], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(root / "versions" / "3.12.10" / "bin" / "python3.12")
