"""What every evaluator shares: the model on the mesh, eval data, and padded sharded batches.

`EvalContext` bundles the model, its params, the mesh, the logical-axis rules and the tokenizer,
and runs jitted model functions on global batches split over the data-parallel mesh axes (the
same sharding as training), returning host numpy arrays. Two kinds of inputs:

* eval splits: each process reads its own share with `vlm_jax.data.pipeline.make_eval_iterator`
  (one pass, the last batch padded with mask=False examples), and `iterate_batches` turns the
  per-process batches into global arrays;
* arrays every process knows (prompt tokens, images given to the inference API): `run_rows`
  splits them into fixed-size padded chunks, every process contributing its slice.

Results are gathered replicated, padding rows are dropped by mask, so no example is counted
twice or lost, and the order of examples is the split's order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterator, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax import sharding

# Data config fields an eval entry may override (eval field -> data field).
_DATA_OVERRIDES = {
    "source": "source", "dataset": "name", "split": "eval_split", "data_dir": "data_dir",
    "image_key": "image_key", "text_key": "text_key", "label_key": "label_key",
    "id_key": "id_key", "shards": "eval_shards", "jsonl": "eval_jsonl",
    "image_root": "image_root",
}


@dataclasses.dataclass
class EvalContext:
  """The model and where it runs; see the module docstring."""
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any                     # the 'params' collection (unboxed), sharded or not
  mesh: jax.sharding.Mesh
  tokenizer: Any
  rules: tuple = ()
  # Non-metric outputs of the evals (e.g. generated captions), by '<kind>/<tag>'.
  artifacts: Dict[str, Any] = dataclasses.field(default_factory=dict)
  _jitted: Dict[Any, Callable] = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def create(cls, config, model, params, mesh, tokenizer):
    return cls(config=config, model=model, params=params, mesh=mesh, tokenizer=tokenizer,
               rules=sharding.logical_rules(config))

  # ---- basics ----------------------------------------------------------------------------------
  @property
  def context_length(self) -> int:
    return int(self.config.model.text.context_length)

  @property
  def batch_devices(self) -> int:
    """Devices the batch dimension is split over (mesh axes data x fsdp)."""
    spec = sharding.batch_sharding(self.mesh).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

  def global_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the batch devices and of the process count."""
    unit = math.lcm(self.batch_devices, jax.process_count())
    return max(unit, -(-int(requested) // unit) * unit)

  def scope(self):
    """Mesh + logical-axis rules, needed while tracing model code with sharding constraints."""
    return _Scope(self.mesh, self.rules)

  def tokenize(self, texts) -> np.ndarray:
    return self.tokenizer.encode(list(texts), self.context_length)

  def jit(self, key, fn: Callable) -> Callable:
    """`jax.jit(fn)` with replicated outputs, cached under `key`; fn(params, *args)."""
    if key not in self._jitted:
      self._jitted[key] = jax.jit(fn, out_shardings=sharding.replicated_sharding(self.mesh))
    return self._jitted[key]

  def call(self, key, fn: Callable, *args):
    """Runs the cached jitted `fn(params, *args)` inside the mesh scope; host numpy outputs."""
    with self.scope():
      out = self.jit(key, fn)(self.params, *args)
    return jax.tree.map(np.asarray, out)

  # ---- arrays known to every process -------------------------------------------------------------
  def run_rows(self, key, fn: Callable, rows: Dict[str, np.ndarray], batch_size: int):
    """Applies `fn(params, batch)` to `rows` (dict of arrays with N rows, identical on every
    process) in padded chunks; returns fn's outputs (trees of [N, ...] arrays) concatenated."""
    n = len(next(iter(rows.values())))
    # Inputs smaller than a batch are padded only to the next multiple of the device count.
    bs = self.global_batch_size(min(int(batch_size), max(n, 1)))
    local = bs // jax.process_count()
    start_local = jax.process_index() * local
    outs = []
    for start in range(0, n, bs):
      chunk = {k: _pad_rows(v[start:start + bs], bs) for k, v in rows.items()}
      valid = min(bs, n - start)
      host = {k: v[start_local:start_local + local] for k, v in chunk.items()}
      batch = sharding.make_global_batch(host, self.mesh)
      out = self.call(key, fn, batch)
      outs.append(jax.tree.map(lambda x, valid=valid: x[:valid], out))
    if not outs:
      return None
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def embed_texts(self, tokens: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """int32 [N, L] token ids -> float32 [N, D] L2-normalised text embeddings."""
    fn = lambda p, b: self.model.apply({"params": p}, b["text"], method="encode_texts")
    out = self.run_rows("encode_texts", fn, {"text": np.asarray(tokens, np.int32)},
                        batch_size or _default_batch(self.config))
    return out if out is not None else np.zeros((0, int(self.config.model.embed_dim)),
                                                np.float32)

  def embed_images(self, images: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """float32 [N, H, W, 3] preprocessed images -> float32 [N, D] L2-normalised embeddings."""
    fn = lambda p, b: self.model.apply({"params": p}, b["image"], method="encode_images")
    out = self.run_rows("encode_images", fn, {"image": np.asarray(images, np.float32)},
                        batch_size or _default_batch(self.config))
    return out if out is not None else np.zeros((0, int(self.config.model.embed_dim)),
                                                np.float32)


class _Scope:
  def __init__(self, mesh, rules):
    self._cms = [jax.set_mesh(mesh), nn.logical_axis_rules(rules)]

  def __enter__(self):
    for cm in self._cms:
      cm.__enter__()
    return self

  def __exit__(self, *exc):
    for cm in reversed(self._cms):
      cm.__exit__(*exc)
    return False


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def _default_batch(config) -> int:
  evals = config.get("evals")
  return int(evals.batch_size) if evals is not None and "batch_size" in evals else 64


# ---- eval splits ---------------------------------------------------------------------------------


def eval_data_config(config, eval_config, *, all_captions: bool) -> ml_collections.ConfigDict:
  """The experiment's data config with the eval entry's dataset fields applied.

  Image size and normalisation always come from `config.data` (they belong to the model).
  """
  data = ml_collections.ConfigDict(config.data.to_dict())
  for field, target in _DATA_OVERRIDES.items():
    value = eval_config.get(field)
    if value is not None and value != "":
      data[target] = value
  data.eval_all_captions = bool(all_captions)
  if "max_captions" in eval_config and eval_config.max_captions:
    data.eval_max_captions = int(eval_config.max_captions)
  return data


def dataset_tag(config, eval_config) -> str:
  """The <dataset> part of metric names: eval.tag, else the TFDS name without config/version
  ('shapes/tiny' -> 'shapes'), else the source kind ('wds', 'jsonl')."""
  if eval_config.get("tag"):
    return str(eval_config.tag)
  source = eval_config.get("source") or config.data.source
  if source == "tfds":
    name = eval_config.get("dataset") or config.data.name
    return name.split("/")[0].split(":")[0]
  return str(source)


def label_names(data_config):
  """Class names from the TFDS ClassLabel feature at data.label_key, or None."""
  if data_config.source != "tfds" or not data_config.label_key:
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_config.name.split("/")[0].split(":")[0] == "shapes":
    from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top,unused-import
  try:
    features = tfds.builder(data_config.name, data_dir=data_config.data_dir).info.features
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f"evals: TFDS dataset {data_config.name!r} not found "
                            f"(data_dir={data_config.data_dir!r}): {e}") from e
  feature = features
  for part in str(data_config.label_key).split("/"):
    feature = feature[part]
  return list(getattr(feature, "names", None) or []) or None


def iterate_batches(ctx: EvalContext, data_config, batch_size: int) -> Iterator[dict]:
  """Global batches (jax.Arrays split over the batch axes) of one pass over the eval split."""
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TF is heavy)
  bs = ctx.global_batch_size(batch_size)
  it = pipeline.make_eval_iterator(
      data_config, ctx.tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), batch_size=bs // jax.process_count(),
      context_length=ctx.context_length)
  try:
    for batch in it:
      yield sharding.make_global_batch(batch, ctx.mesh)
  finally:
    it.close()


def entry_batch_size(config, eval_config) -> int:
  return int(eval_config.get("batch_size") or config.evals.batch_size)
