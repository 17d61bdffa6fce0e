"""The trainer's runtime: everything built from the config before the loop starts.

`Runtime.create(config)` resolves the task, builds the mesh, the model, the optimizer and the
shardings of the train state (params and optimizer state are created already sharded:
`jax.jit(init, out_shardings=...)`); `make_step()` jits the task's train step with in/out
shardings and a donated state. Tests, benchmarks and inference use the same pieces.

Also here: the checks that run before anything is compiled (`validate`), the training data
(pipeline + device prefetcher) and the run's tokenizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import optim
from vlm_jax import prefetch
from vlm_jax import sharding
from vlm_jax import tasks as tasks_lib
from vlm_jax import train_state as ts
from vlm_jax import train_step as step_lib

TOKENIZER_TRAIN_EXAMPLES = 20_000   # captions of this many training examples train a tokenizer


def abstract_params(config, task, model, mesh) -> tuple[Any, Any]:
  """(abstract params with their target shardings, the shardings) of `model` on `mesh`."""
  rules = sharding.logical_rules(config)
  return sharding.abstract_params(
      lambda: task.init_params(model, config, jax.random.key(0)), mesh, rules)


@dataclasses.dataclass
class Runtime:
  """Everything derived from the config that the loop (and tests) need."""
  config: ml_collections.ConfigDict
  task: Any                       # vlm_jax.tasks.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: ts.TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: ts.TrainState     # ShapeDtypeStructs with the target shardings

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, devices=None) -> "Runtime":
    """Mesh, model, optimizer and the shardings of the train state, from the config."""
    validate(config, None if devices is None else len(devices))
    task = tasks_lib.get(config.task)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config)
    model = task.build_model(config)
    abstract_params_, param_shardings = abstract_params(config, task, model, mesh)
    tx, schedule = optim.make_optimizer(config, abstract_params_)
    replicated = sharding.replicated_sharding(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params_)
    # Moments are sharded like their params; counters etc. replicated.
    # Frozen params (multi_transform) have an empty MaskedNode instead of moments.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shardings = optax.tree_map_params(
        tx, lambda x, s: x if masked(x) else s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)
    ema = config.get("ema_decay") is not None
    state_shardings = ts.TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
        nonfinite_total=replicated, nonfinite_streak=replicated,
        ema_params=param_shardings if ema else None)
    with sharding.mesh_scope(mesh, rules):
      abstract = jax.eval_shape(lambda: ts.init_train_state(
          lambda r: task.init_params(model, config, r), tx, jax.random.key(0), ema=ema))
    abstract = ckpt_lib.abstract_with_shardings(abstract, state_shardings)
    return cls(config=config, task=task, mesh=mesh, rules=rules, model=model, tx=tx,
               schedule=schedule, state_shardings=state_shardings,
               batch_sharding=sharding.batch_sharding(mesh), abstract_state=abstract)

  def context(self):
    """`jax.set_mesh` + Linen logical rules: needed while tracing model code."""
    return sharding.mesh_scope(self.mesh, self.rules)

  def init_state(self) -> ts.TrainState:
    """The initial train state, created directly with its shardings."""
    ema = self.state_shardings.ema_params is not None
    init = jax.jit(lambda rng: ts.init_train_state(
        lambda r: self.task.init_params(self.model, self.config, r), self.tx, rng, ema=ema),
                   out_shardings=self.state_shardings)
    with self.context():
      return init(jax.random.key(self.config.seed))

  def make_step(self) -> Callable:
    """The jitted train step of the task's objective: in/out shardings, state donated."""
    step = step_lib.make_train_step(
        self.task.objective(self.config, self.model), self.tx, self.schedule,
        grad_accum_steps=self.config.grad_accum_steps, batch_sharding=self.batch_sharding,
        ema_decay=self.config.get("ema_decay"), ema_warmup=bool(self.config.get("ema_warmup")),
        guard=self.config.get("nonfinite_guard") or "cond")
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def init_params_from(self, state: ts.TrainState) -> ts.TrainState:
    """Replaces params by those of `config.init_from` (fine-tuning), logging what was not taken.

    `init_from` is one checkpoint (every param the model and it share), or comma-separated
    `subtree=checkpoint` entries that compose a model from several: each takes only the params
    under `subtree/` (e.g. 'image=runs/clip,lm=runs/gpt2': a prefix-LM from a CLIP's image
    tower and a GPT-2)."""
    config = self.config
    flat = ckpt_lib.flatten(state.params)
    total = 0
    for subtree, where in ckpt_lib.init_from_entries(config.init_from):
      loc = ckpt_lib.locate(where, field="init_from")
      check_tower_sizes(config, loc, subtree, where)
      for message in function_differences(config, loc, subtree, where):
        logging.warning("%s", message)
      source = ckpt_lib.Checkpointer(loc.checkpoints, read_only=True, async_save=False)
      try:
        loaded, messages = source.restore_params(loc.step, self.abstract_state.params,
                                                 skip=config.init_from_skip, prefix=subtree)
      finally:
        source.close()
      for m in messages:
        logging.warning("%s", m)
      if not loaded:
        raise ValueError(f"init_from={config.init_from}: no parameter of the model"
                         f"{f' under {subtree}/' if subtree else ''} was found in {where}")
      flat.update(loaded)
      total += len(loaded)
      logging.info("init_from: loaded %d params%s from %s/%d", len(loaded),
                   f" under {subtree}/" if subtree else "", loc.checkpoints, loc.step)
    params = jax.tree.map(lambda _, v: v, state.params, ckpt_lib.unflatten(flat))
    logging.info("init_from: %d of %d params loaded", total, len(flat))
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)   # the average starts at the loaded params


# ---- checks before anything is built ------------------------------------------------------------


# Tower fields whose difference makes a checkpoint's params the wrong set (not only the wrong
# shapes): named in the error before any param is read.
_STRUCTURAL = ("name", "depth", "blocks")
# Model fields that change neither the params nor the function they compute (precision, memory,
# kernels, regularisation), or that the params' shapes already check, or that only initialise.
_NOT_THE_FUNCTION = ("dtype", "param_dtype", "remat", "remat_policy", "scan", "attention",
                     "dropout", "variant", "width", "mlp_dim", "vocab_size", "context_length",
                     "image_size", "embed_dim", "use_bias", "patch_bias", "proj_bias",
                     "image_proj") + _STRUCTURAL


def _saved_model_config(loc):
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    return inference.load_config(loc).model
  except (FileNotFoundError, ValueError):
    return None                       # no saved config: the params' shapes are checked anyway


def _sections(ours, subtree: str) -> list:
  return [subtree] if subtree else [k for k in ours if hasattr(ours[k], "get")]


def check_tower_sizes(config, loc, subtree: str, where: str) -> None:
  """init_from: a tower of the checkpoint (its saved config) with another architecture name or
  depth than this model's fails naming both (e.g. a ResNet-50 into a ResNet-18)."""
  saved = _saved_model_config(loc)
  if saved is None:
    return
  ours = config.model
  for section in _sections(ours, subtree):
    mine, theirs = ours.get(section), saved.get(section)
    if not (hasattr(mine, "get") and hasattr(theirs, "get")):
      continue
    for field in _STRUCTURAL:
      a, b = mine.get(field), theirs.get(field)
      if a is not None and b is not None and a != b:
        raise ValueError(f"init_from={where}: its model.{section}.{field} is {b!r} but this "
                         f"model's model.{section}.{field} is {a!r}; the params do not carry over")


def function_differences(config, loc, subtree: str, where: str) -> list[str]:
  """init_from: the model fields, set in both configs, that make this model compute another
  function than the checkpoint's on the same params (an activation, a LayerNorm epsilon, the
  pooling, the head count, the padding id, ...): one warning each. The params still load (a
  fine-tune may change them on purpose), but OpenAI's QuickGELU weights run with exact GELU,
  say, start from a worse model than the one converted."""
  saved = _saved_model_config(loc)
  if saved is None:
    return []
  ours, pairs = config.model, []
  for section in _sections(ours, subtree):
    mine, theirs = ours.get(section), saved.get(section)
    if hasattr(mine, "get") and hasattr(theirs, "get"):
      pairs += [(f"model.{section}.{k}", mine.get(k), theirs.get(k)) for k in mine]
  if not subtree:
    pairs += [(f"model.{k}", ours.get(k), saved.get(k)) for k in ours
              if not hasattr(ours.get(k), "get")]
  out = []
  for name, a, b in pairs:
    field = name.rsplit(".", 1)[1]
    if (field in _NOT_THE_FUNCTION or field.endswith("_init") or a is None or b is None
        or hasattr(a, "get") or a == b):
      continue
    out.append(f"init_from={where}: {name} is {a!r} here but {b!r} in the checkpoint's config: "
               f"the params load, but compute another function than they did there (set "
               f"--config.{name}={b} to keep it)")
  return out


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """What building the runtime needs of the config (the task's checks, batch, mesh, schedule);
  every problem at once. The trainer checks the whole config before (`vlm_jax.preflight`)."""
  from vlm_jax import preflight  # pylint: disable=g-import-not-at-top
  task = tasks_lib.get(config.task)
  preflight.raise_problems(list(task.validate(config))
                           + preflight.trainer_problems(config, num_devices))


# ---- data and tokenizer -------------------------------------------------------------------------


def prepare_data(config) -> None:
  """Builds the embedded `shapes` dataset for the training data and every evaluation that reads
  it (no download; a no-op when prepared; in the vlm_jax cache unless `data_dir` is set). Other
  TFDS datasets must be prepared beforehand (`tfds build`)."""
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import cache  # pylint: disable=g-import-not-at-top
  from vlm_jax.evals import common  # pylint: disable=g-import-not-at-top
  datas = [config.data] + [common.eval_data_config(config, entry)
                           for _, entry in evals.entries(config, [])]
  done = set()
  for d in datas:
    if d.source == "tfds" and cache.is_embedded(d.name) and "/" in d.name:
      key = (d.name.split("/")[1].split(":")[0], cache.tfds_data_dir(d.name, d.data_dir))
      if key not in done:
        from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
        shapes.prepare(*key)
        done.add(key)


def training_captions(config, source=None) -> list:
  """Captions to train a tokenizer on: the shapes generator's (fast, no images) or those of the
  first TOKENIZER_TRAIN_EXAMPLES records of the training source (any kind); with
  `data.neighbours`, also the retrieval prompts of up to as many training images."""
  texts = _source_captions(config, source)
  d = config.data
  if d.get("neighbours"):   # retrieval prompts are text the model reads too
    from vlm_jax.data import retrieval  # pylint: disable=g-import-not-at-top
    neighbours = retrieval.load_neighbours(d.neighbours, int(d.neighbours_k))
    texts += [retrieval.prompt_text(retrieval.phrasing(hits, i))
              for i, hits in enumerate(list(neighbours.values())[:TOKENIZER_TRAIN_EXAMPLES])]
  return texts


def _source_captions(config, source=None) -> list:
  d = config.data
  questions = tasks_lib.get(config.task).reads_questions(config)
  if d.source == "tfds" and d.name.startswith("shapes/") and not d.get("mixture"):
    from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.caption_corpus(d.name.split("/")[1].split(":")[0], d.train_split,
                                 questions=questions)
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = source if source is not None else sources.make_source(d, "train")
  texts = sources.captions(source, TOKENIZER_TRAIN_EXAMPLES, questions=questions)
  if not any(texts):
    raise ValueError(f"tokenizer: the first {TOKENIZER_TRAIN_EXAMPLES} records of "
                     f"{source.describe()} hold no captions to train a tokenizer on; give one in "
                     "tokenizer.model_path")
  return texts


def load_tokenizer(config, workdir: str, source=None):
  """The run's tokenizer (None for a task without text), checked against the model's text."""
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  spec = tasks_lib.get(config.task).text_spec(config)
  if spec is None:
    return None
  tok = tokenizers.for_training(config, workdir, lambda: training_captions(config, source))
  tokenizers.check_fits(tok, spec, config)
  return tok


def make_train_data(runtime: Runtime, tokenizer, source, data_state=None):
  """This process's training batches from `source` (checked against the task's fields before,
  see `train.prepare`), as global arrays prefetched onto the devices. The batch holds the image
  and the task's fields."""
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = runtime.config
  field_ops = runtime.task.train_ops(config, tokenizer)
  if config.data.worker_count:
    from vlm_jax import cli  # pylint: disable=g-import-not-at-top
    cli.ensure_flags_parsed()     # grain's worker processes read absl flags
  it = pipeline.make_train_iterator(
      config.data, field_ops, batch_size=config.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), source=source,
      images=runtime.task.reads_images)
  if data_state is not None:
    it.set_state(data_state)
  fields = ["image"] * runtime.task.reads_images + [f for op in field_ops for f in op.provides]
  put = lambda b: sharding.make_global_batch({f: b[f] for f in fields}, runtime.mesh)
  return prefetch.DevicePrefetcher(it, put, size=config.data.prefetch)
