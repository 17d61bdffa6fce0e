"""Shared data fixtures: the tiny `shapes` dataset prepared once, a tokenizer trained on its
captions, and a writer of small tar shards (with the same samples as jsonl). Test modules import
what they use from here.

Both live at fixed paths under pytest's base temp directory (shared by pytest-xdist workers), and
both builders are idempotent and file-locked, so however many tests, modules or workers ask for
them, the work is done once per test session.
"""
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tokenizer_lib

SHAPES_CONFIG = "tiny"
TOKENIZER_VOCAB_SIZE = 1024  # an upper bound: the shapes captions need about 250 pieces


def _shared_tmp(tmp_path_factory, name):
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # one directory for all workers of the session
  path = base / name
  path.mkdir(parents=True, exist_ok=True)
  return path


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data_dir holding `shapes/tiny` (array_record): 256/64/64 images, 32x32."""
  data_dir = _shared_tmp(tmp_path_factory, "shapes_tfds")
  shapes.prepare(SHAPES_CONFIG, str(data_dir))
  return str(data_dir)


@pytest.fixture(scope="session")
def shapes_tokenizer(tmp_path_factory):
  """A SentencePiece Tokenizer trained on the tiny shapes train captions (pad 0, bos 2, eos 3)."""
  path = _shared_tmp(tmp_path_factory, "shapes_tokenizer") / "shapes.model"
  return tokenizer_lib.get_or_train(
      path, lambda: shapes.caption_corpus(SHAPES_CONFIG), TOKENIZER_VOCAB_SIZE)


def write_tar_and_jsonl(folder, num_tars, per_tar, caption="a red circle number"):
  """The same images and captions (`<caption> <i>`) as tar shards (`{folder}/{s:05d}.tar`, a
  .jpg and a .txt per sample) and as a jsonl file with the images beside it. Returns the tar
  pattern."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "images"))
  with open(os.path.join(folder, "captions.jsonl"), "w") as jsonl:
    for s in range(num_tars):
      with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
        for i in range(per_tar):
          buf = io.BytesIO()
          Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
          text = f"{caption} {s * per_tar + i}"
          for name, data in ((f"k{i:03d}.jpg", buf.getvalue()), (f"k{i:03d}.txt",
                                                                  text.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
          image = f"images/{s}_{i}.jpg"
          with open(os.path.join(folder, image), "wb") as f:
            f.write(buf.getvalue())
          jsonl.write(json.dumps({"image": image, "caption": text}) + "\n")
  return os.path.join(folder, "{00000..%05d}.tar" % (num_tars - 1))
