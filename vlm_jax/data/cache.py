"""The one place vlm_jax keeps the data it makes, for every entry point.

    $VLM_JAX_CACHE (default ~/.cache/vlm_jax)/tensorflow_datasets   the embedded `shapes` data

`config.data.data_dir` unset means: the embedded `shapes` dataset in this cache (the demo, the
trainer, `evaluate`, the launch scripts and the notebooks all build and find it there), and any
other TFDS dataset where TFDS itself looks (`$TFDS_DATA_DIR`, default ~/tensorflow_datasets),
which is where `tfds build` puts it. A `data_dir` that is set is used as given.
"""
import os

ENV_VAR = "VLM_JAX_CACHE"
DEFAULT = "~/.cache/vlm_jax"


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get(ENV_VAR) or DEFAULT)


def is_embedded(tfds_name: str) -> bool:
  """Whether `tfds_name` ('shapes/demo', 'shapes/tiny:1.1.0') is the embedded dataset."""
  return tfds_name.split("/")[0].split(":")[0] == "shapes"


def tfds_data_dir(tfds_name: str, data_dir=None):
  """The data_dir to read / build `tfds_name` in (None: TFDS's own default)."""
  if data_dir:
    return os.path.expanduser(str(data_dir))
  if is_embedded(tfds_name):
    return os.path.join(cache_dir(), "tensorflow_datasets")
  return None
