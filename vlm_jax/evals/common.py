"""What every evaluator shares: the task's predict functions on the mesh, eval data, padded batches.

`EvalContext` bundles the config, the task, the model, its params, the mesh, the logical-axis
rules and the tokenizer. Evaluators ask it for predict functions by name (`ctx.predict_fn(name)`:
the task's `fn(params, batch, **static)`); they never call a model's methods. Jitted functions
run on global batches split over the data-parallel mesh axes (the same sharding as training)
and return host numpy arrays. Two kinds of inputs:

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
import functools
import math
from typing import Any, Callable, Dict, Iterator, Optional

import jax
import ml_collections
import numpy as np

from vlm_jax import console
from vlm_jax import preemption
from vlm_jax import sharding

placeholder = ml_collections.config_dict.placeholder

# Data config fields an eval entry may override (eval field -> data field).
_DATA_OVERRIDES = {
    "source": "source", "dataset": "name", "split": "eval_split", "data_dir": "data_dir",
    "image_key": "image_key", "text_key": "text_key", "label_key": "label_key",
    "id_key": "id_key", "questions_key": "questions_key", "shards": "eval_shards",
    "jsonl": "eval_jsonl", "image_root": "image_root", "folder": "eval_folder",
    "classnames": "classnames", "vqa_questions": "eval_vqa_questions",
    "vqa_annotations": "eval_vqa_annotations", "vqa_images": "eval_vqa_images",
}


def entry_config(kind: str) -> ml_collections.ConfigDict:
  """The fields every eval entry has: its kind, the name its metrics carry, and where its data
  is. Dataset fields left None fall back to `config.data` (the training dataset's eval split);
  image size and normalisation always come from there (they belong to the model)."""
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.tag = placeholder(str)         # <dataset> in metric names; default: TFDS name or source kind
  c.source = placeholder(str)      # 'tfds' | 'wds' | 'jsonl' | 'imagefolder' | 'vqav2' (None: data.source)
  c.dataset = placeholder(str)     # TFDS name, e.g. 'cifar10'
  c.split = placeholder(str)       # e.g. 'test', 'validation[:1000]'
  c.data_dir = placeholder(str)
  c.image_key = placeholder(str)
  c.text_key = placeholder(str)
  c.label_key = placeholder(str)
  c.id_key = placeholder(str)
  c.questions_key = placeholder(str)
  c.shards = placeholder(str)      # wds: brace/glob pattern of tar shards
  c.jsonl = placeholder(str)       # jsonl: captions.jsonl path
  c.image_root = placeholder(str)
  c.folder = placeholder(str)      # imagefolder: root/<class_name>/<images>
  c.vqa_questions = placeholder(str)    # vqav2: questions JSON
  c.vqa_annotations = placeholder(str)  # vqav2: annotations JSON
  c.vqa_images = placeholder(str)       # vqav2: COCO-named image folder
  c.classnames = placeholder(str)  # comma-separated; None: data.classnames / the source's
  c.batch_size = placeholder(int)  # None: evals.batch_size (global, all processes)
  return c


@dataclasses.dataclass
class EvalContext:
  """The model and where it runs; see the module docstring."""
  config: ml_collections.ConfigDict
  task: Any                       # a vlm_jax.tasks.Task
  model: Any                      # its Linen module
  params: Any                     # the 'params' collection (unboxed), sharded or not
  mesh: jax.sharding.Mesh
  tokenizer: Any                  # None for a task without text
  rules: tuple = ()
  # Non-metric outputs of the evals (e.g. generated captions), by '<kind>/<tag>'.
  artifacts: Dict[str, Any] = dataclasses.field(default_factory=dict)
  _jitted: Dict[Any, Callable] = dataclasses.field(default_factory=dict, repr=False)
  _predict: Optional[dict] = dataclasses.field(default=None, repr=False)

  @classmethod
  def create(cls, config, task, model, params, mesh, tokenizer):
    return cls(config=config, task=task, model=model, params=params, mesh=mesh,
               tokenizer=tokenizer, rules=sharding.logical_rules(config))

  # ---- predict functions -------------------------------------------------------------------------
  def predict_fn(self, name: str, who: str = "evals") -> Callable:
    """The task's predict function `name`; a task without it fails naming what it has."""
    if self._predict is None:
      self._predict = self.task.predict_fns(self.config, self.model)
    if name not in self._predict:
      raise ValueError(f"{who}: needs the predict function {name!r}, which task "
                       f"{self.task.name!r} does not provide (it provides: "
                       f"{', '.join(sorted(self._predict))})")
    return self._predict[name]

  def has_predict_fn(self, name: str) -> bool:
    if self._predict is None:
      self._predict = self.task.predict_fns(self.config, self.model)
    return name in self._predict

  # ---- basics ------------------------------------------------------------------------------------
  @property
  def context_length(self) -> int:
    spec = self.task.text_spec(self.config)
    if spec is None:
      raise ValueError(f"evals: task {self.task.name!r} reads no text")
    return spec.context_length

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
    return sharding.mesh_scope(self.mesh, self.rules)

  def tokenize(self, texts) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"evals: task {self.task.name!r} has no tokenizer")
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
  def run_rows(self, key, fn: Callable, rows: Dict[str, np.ndarray], batch_size: int, *args):
    """Applies `fn(params, batch, *args)` to `rows` (dict of arrays with N rows, identical on
    every process) in padded chunks; returns fn's outputs (trees of [N, ...] arrays)
    concatenated. `args` (e.g. scalars) are passed to every call as they are."""
    n = len(next(iter(rows.values())))
    # Inputs smaller than a batch are padded to a power of two (then to a multiple of the device
    # count), so that calls with 5, 6, 7 or 8 rows share one compiled function.
    bs = self.global_batch_size(min(int(batch_size), 1 << max(n - 1, 0).bit_length()))
    local = bs // jax.process_count()
    start_local = jax.process_index() * local
    outs = []
    for start in range(0, n, bs):
      _stop_if_requested()
      chunk = {k: _pad_rows(v[start:start + bs], bs) for k, v in rows.items()}
      valid = min(bs, n - start)
      host = {k: v[start_local:start_local + local] for k, v in chunk.items()}
      batch = sharding.make_global_batch(host, self.mesh)
      out = self.call(key, fn, batch, *args)
      outs.append(jax.tree.map(lambda x, valid=valid: x[:valid], out))
    if not outs:
      return None
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def predict_rows(self, name: str, rows: Dict[str, np.ndarray], batch_size: Optional[int] = None,
                   **static):
    """The predict function `name` over `rows` (see `run_rows`); None for zero rows."""
    fn = self.predict_fn(name)
    fn = functools.partial(fn, **static) if static else fn
    return self.run_rows(("rows", name, tuple(sorted(static.items()))), fn, rows,
                         batch_size or default_batch(self.config))

  def embed_texts(self, tokens: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """int32 [N, L] token ids -> float32 [N, D] L2-normalised text embeddings."""
    out = self.predict_rows("encode_texts", {"text": np.asarray(tokens, np.int32)}, batch_size)
    return out if out is not None else np.zeros((0, self._embed_dim()), np.float32)

  def embed_images(self, images: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """float32 [N, H, W, 3] preprocessed images -> float32 [N, D] L2-normalised embeddings."""
    out = self.predict_rows("encode_images", {"image": np.asarray(images, np.float32)},
                            batch_size)
    return out if out is not None else np.zeros((0, self._embed_dim()), np.float32)

  def _embed_dim(self) -> int:
    return int(self.config.model.get("embed_dim") or 0)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def default_batch(config) -> int:
  evals = config.get("evals")
  return int(evals.batch_size) if evals is not None and "batch_size" in evals else 64


# ---- eval splits ---------------------------------------------------------------------------------


def eval_data_config(config, eval_config, *, split: Optional[str] = None
                     ) -> ml_collections.ConfigDict:
  """The experiment's data config with the eval entry's dataset fields applied (and `split`, when
  given, as the split to read).

  Image size and normalisation always come from `config.data` (they belong to the model).
  """
  data = ml_collections.ConfigDict(config.data.to_dict())
  for field, target in _DATA_OVERRIDES.items():
    value = eval_config.get(field)
    if value is not None and value != "":
      data[target] = value
  if split:
    data.eval_split = split
  return data


def dataset_tag(config, eval_config) -> str:
  """The <dataset> part of metric names: eval.tag, else the TFDS name without config/version
  ('shapes/tiny' -> 'shapes'), else the source kind ('wds', 'jsonl', 'imagefolder')."""
  if eval_config.get("tag"):
    return str(eval_config.tag)
  source = eval_config.get("source") or config.data.source
  if source == "tfds":
    name = eval_config.get("dataset") or config.data.name
    return name.split("/")[0].split(":")[0]
  return str(source)


def class_names(data_config, source=None):
  """Class names, in label order: `classnames` (comma-separated) if set, else the source's
  (TFDS ClassLabel, ImageFolder folders), else None."""
  if data_config.get("classnames"):
    return [n.strip() for n in str(data_config.classnames).split(",") if n.strip()]
  if source is None:
    from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
    source = sources.make_source(data_config, "eval")
  return source.class_names()


def eval_source(data_config, field_ops, who: str = "evals"):
  """The eval split's source, reading only the raw fields the ops need (a TFDS dataset without
  captions serves zero-shot; one without labels serves retrieval), checked against them."""
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top  (TF is heavy)
  needed = {field for op in field_ops for field in op.requires}
  if data_config.source == "tfds":
    data_config = ml_collections.ConfigDict(data_config.to_dict())
    if sources.CAPTIONS not in needed:
      data_config.text_key = ""
    if sources.LABEL not in needed:
      data_config.label_key = ""
    if sources.QUESTIONS not in needed:
      data_config.questions_key = ""
  source = sources.make_source(data_config, "eval")
  sources.check_fields(source, field_ops, who)
  return source


def iterate_batches(ctx: EvalContext, data_config, field_ops, batch_size: int, *,
                    who: str = "evals", source=None) -> Iterator[dict]:
  """Global batches (jax.Arrays split over the batch axes) of one pass over the eval split,
  with the fields of `field_ops` besides image and mask."""
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TF is heavy)
  source = source if source is not None else eval_source(data_config, field_ops, who)
  bs = ctx.global_batch_size(batch_size)
  it = pipeline.make_eval_iterator(
      data_config, field_ops, batch_size=bs // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), source=source,
      images=ctx.task.reads_images)
  bar = console.bar(total=it.num_batches, desc=who, unit="batch", leave=False,
                    enabled=bool(ctx.config.get("progress_bar", True)))
  try:
    for batch in it:
      _stop_if_requested()
      yield sharding.make_global_batch(batch, ctx.mesh)
      bar.update(1)
  finally:
    bar.close()
    it.close()


def _stop_if_requested():
  """During a training run, a SIGTERM stops an evaluation at its next batch (every process at the
  same batch, see `vlm_jax.preemption.reached`)."""
  if preemption.reached():
    raise preemption.Preempted("SIGTERM during an evaluation")


def text_length(config) -> int:
  """The model's context length (0 for a task that reads no text)."""
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  spec = tasks.get(config.task).text_spec(config)
  return spec.context_length if spec is not None else 0


def entry_batch_size(config, eval_config) -> int:
  return int(eval_config.get("batch_size") or config.evals.batch_size)
