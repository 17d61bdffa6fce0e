"""Shared data fixtures: the tiny `shapes` dataset prepared once, and a tokenizer trained on its
captions. Test modules import the fixtures they use from here.

Both live at fixed paths under pytest's base temp directory (shared by pytest-xdist workers), and
both builders are idempotent and file-locked, so however many tests, modules or workers ask for
them, the work is done once per test session.
"""
import os

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
