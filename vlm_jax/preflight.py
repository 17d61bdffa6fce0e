"""Checks before anything is built: every problem of a config at once, one line each.

The trainer checks in two rounds, both before any model is initialised or compiled:

1. the config alone, no data read: every enum field (task, towers, loss kinds, crop modes,
   schedule kinds, tokenizer kinds, eval names and kinds, ...), numbers and regexes, the mesh
   against the devices, the model built from its config (not initialised), the files the
   config names (shards, captions.jsonl, image folders, tokenizer, init_from), and whether the
   task offers the predict functions its evaluations call;
2. the data (once the embedded dataset is prepared): the training source and every evaluation's
   source are opened and checked for the fields they must provide (labels for zero-shot and
   classification, captions for retrieval and captioning) and for class names.

Each round's problems are raised together (`raise_problems`): one `ConfigError` listing them,
each naming the field and the value. `check_evals` is the evaluation command's part.
"""
from __future__ import annotations

import glob
import re
from typing import Optional

from absl import logging
import jax
from etils import epath

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import optim
from vlm_jax import sharding
from vlm_jax import tasks as tasks_lib
from vlm_jax import train_step as step_lib


def check_evals(config, task_name: Optional[str] = None) -> None:
  """Only what the evaluations need (for `vlm_jax.evaluate`), both rounds."""
  raise_problems(eval_problems(config, task_name or config.task))
  raise_problems(eval_data_problems(config))


def raise_problems(problems: list) -> None:
  if problems:
    head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    raise config_utils.ConfigError(f"config: {head}:\n  " + "\n  ".join(problems))


# ---- round 1: the config alone ------------------------------------------------------------------


def config_problems(config, num_devices: Optional[int] = None) -> list:
  try:
    task = tasks_lib.get(config.task)
  except ValueError as e:
    return [str(e)]
  problems = list(task.validate(config))
  problems += task.build_problems(config)     # the Linen module, not initialised
  problems += trainer_problems(config, num_devices)
  problems += _data_problems_static(config)
  problems += _tokenizer_problems(config, task)
  problems += eval_problems(config, task.name)
  return problems


def warn(config) -> None:
  """Logs what the trainer adjusts rather than refuses (a warm-up longer than the run); for a
  config that passed `config_problems`."""
  warning = optim.warmup_steps(config)[1]
  if warning:
    logging.warning("%s", warning)


def _regex_problem(field, value) -> list:
  if value:
    try:
      re.compile(value)
    except re.error as e:
      return [f"{field}: {value!r} is not a valid regex ({e})"]
  return []


def trainer_problems(config, num_devices=None) -> list:
  """Batch, accumulation, mesh, schedule, logging and checkpoint fields, regexes, init_from."""
  problems = []
  n = jax.device_count() if num_devices is None else num_devices
  processes = jax.process_count()
  if config.batch_size < 1 or config.batch_size % processes:
    problems.append(f"batch_size: {config.batch_size} must be >= 1 and divide evenly over "
                    f"{processes} processes")
  k = config.grad_accum_steps
  if k < 1 or config.batch_size % k:
    problems.append(f"grad_accum_steps: {k} must be >= 1 and divide batch_size="
                    f"{config.batch_size}")
  try:
    data, fsdp, _ = sharding.mesh_shape(config.mesh, n)
    if k >= 1 and not config.batch_size % k and (config.batch_size // k) % (data * fsdp):
      problems.append(f"batch_size: batch_size/grad_accum_steps = {config.batch_size // k} must "
                      f"be divisible by the {data * fsdp} data-parallel devices (mesh.data * "
                      "mesh.fsdp)")
  except ValueError as e:
    problems.append(str(e))
  try:
    sharding.logical_rules(config)
  except ValueError as e:
    problems.append(str(e))
  attention = config.model.get("attention")
  needs = {"cudnn": "gpu", "pallas": "tpu"}.get(attention)     # kernels of one backend
  if needs and jax.default_backend() != needs:
    problems.append(f"model.attention: {attention!r} runs on {needs.upper()}s only (this "
                    f"backend: {jax.default_backend()}); use 'xla' or 'einsum'")
  if config.total_steps < 1:
    problems.append(f"total_steps: {config.total_steps} must be >= 1")
  guard = config.get("nonfinite_guard") or "cond"
  if guard not in step_lib.GUARDS:
    problems.append(f"nonfinite_guard: unknown guard {guard!r}; expected one of "
                    f"{', '.join(step_lib.GUARDS)}")
  ema = config.get("ema_decay")
  if ema is not None and not 0.0 < float(ema) < 1.0:
    problems.append(f"ema_decay: {ema} must be in (0, 1) (e.g. 0.9999), or None for no EMA")
  if config.evals.get("use_ema") and ema is None:
    problems.append("evals.use_ema: True needs EMA weights, and ema_decay is None (set "
                    "--config.ema_decay, e.g. 0.9999)")
  if config.schedule.kind not in optim.SCHEDULES:
    problems.append(f"schedule.kind: unknown schedule {config.schedule.kind!r}; expected one of "
                    f"{', '.join(optim.SCHEDULES)}")
  if config.schedule.warmup_steps < 0:
    problems.append(f"schedule.warmup_steps: {config.schedule.warmup_steps} must be >= 0")
  fraction = config.schedule.get("warmup_fraction")
  if fraction is not None and not 0 <= fraction < 1:
    problems.append(f"schedule.warmup_fraction: {fraction} must be in [0, 1)")
  for field in ("log_every_steps", "max_consecutive_nonfinite"):
    if config[field] < 1:
      problems.append(f"{field}: {config[field]} must be >= 1")
  for field in ("checkpoint_every_steps", "eval_every_steps"):
    if config[field] < 0:
      problems.append(f"{field}: {config[field]} must be >= 0 (0 = off)")
  problems += _regex_problem("freeze", config.freeze)
  problems += _regex_problem("init_from_skip", config.init_from_skip)
  problems += _regex_problem("optim.no_decay", config.optim.no_decay)
  if config.init_from:
    try:
      for _, where in ckpt_lib.init_from_entries(config.init_from):
        ckpt_lib.locate(where, field="init_from")
    except (FileNotFoundError, ValueError) as e:
      problems.append(str(e))
  return problems


def _data_problems_static(config) -> list:
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  d, problems = config.data, []
  if d.source not in sources.KINDS:
    problems.append(f"data.source: unknown source {d.source!r}; expected one of "
                    f"{', '.join(sources.KINDS)}")
  if d.train_crop not in pipeline.TRAIN_CROPS:
    problems.append(f"data.train_crop: unknown crop {d.train_crop!r}; expected one of "
                    f"{', '.join(pipeline.TRAIN_CROPS)}")
  if d.eval_crop not in pipeline.EVAL_CROPS:
    problems.append(f"data.eval_crop: unknown crop {d.eval_crop!r}; expected one of "
                    f"{', '.join(pipeline.EVAL_CROPS)}")
  if d.tfds_reader not in ("auto", "data_source", "as_dataset"):
    problems.append(f"data.tfds_reader: unknown reader {d.tfds_reader!r}; expected auto, "
                    "data_source or as_dataset")
  if not 0 < d.min_scale <= d.max_scale <= 1:
    problems.append(f"data.min_scale / max_scale: need 0 < {d.min_scale} <= {d.max_scale} <= 1")
  reads_images = tasks_lib.get(config.task).reads_images   # (a text-only task decodes none)
  if reads_images and d.source == "text":
    problems.append(f"data.source: 'text' is a corpus without images; task {config.task!r} "
                    "reads images")
  elif reads_images and d.image_size != config.model.image.image_size:
    problems.append(f"data.image_size: {d.image_size} != model.image.image_size="
                    f"{config.model.image.image_size} (the pipeline makes the images the model "
                    "reads)")
  for field in ("read_threads", "prefetch"):
    if d[field] < 1:
      problems.append(f"data.{field}: {d[field]} must be >= 1")
  if d.get("mixture"):
    from vlm_jax.data.sources import mixture  # pylint: disable=g-import-not-at-top
    try:
      for i, (entry, _) in enumerate(mixture.entries(d)):
        component = mixture.component_config(d, entry)
        if component.source not in sources.KINDS:
          problems.append(f"data.mixture[{i}].source: unknown source {component.source!r}")
        else:
          problems += [p.replace("data.", f"data.mixture[{i}].", 1)
                       for p in _path_problems(component, "train")]
    except ValueError as e:
      problems.append(str(e))
  else:
    problems += _path_problems(d, "train")
  return problems


def _path_problems(d, split) -> list:
  """The files a file-based source of `split` names must exist (TFDS: see round 2)."""
  if d.source == "vqav2":
    problems = []
    for f, required in (("questions", True), ("annotations", False), ("images", True)):
      value = d.get(f"{split}_vqa_{f}")
      if not value:
        if required:
          problems.append(f"data.{split}_vqa_{f}: not set (data.source='vqav2' reads it)")
      elif not epath.Path(value).exists():
        problems.append(f"data.{split}_vqa_{f}: {value!r} does not exist")
    return problems
  field = {"wds": "shards", "jsonl": "jsonl", "imagefolder": "folder",
           "text": "text"}.get(d.source)
  if field is None:
    return []
  name = f"data.{split}_{field}"
  value = d.get(f"{split}_{field}")
  if not value:
    return [f"{name}: not set (data.source={d.source!r} reads it)"]
  if field == "shards":
    from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
    try:
      sources.list_shards(value, name)
    except (FileNotFoundError, ValueError) as e:
      return [str(e)]
    return []
  exists = epath.Path(value).is_dir() if field == "folder" else bool(glob.glob(value))
  return [] if exists else [f"{name}: {value!r} does not exist"]


def _tokenizer_problems(config, task) -> list:
  from vlm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  spec = task.text_spec(config)
  if spec is None:
    return []
  t, problems = config.tokenizer, []
  if t.kind not in tokenizers.KINDS:
    problems.append(f"tokenizer.kind: unknown tokenizer {t.kind!r}; expected one of "
                    f"{', '.join(tokenizers.KINDS)}")
  if t.model_path and not epath.Path(t.model_path).exists():
    problems.append(f"tokenizer.model_path: {t.model_path!r} does not exist")
  if not t.model_path and t.kind in tokenizers.NEEDS_FILE:
    problems.append(f"tokenizer.model_path: tokenizer.kind={t.kind!r} needs "
                    f"{tokenizers.NEEDS_FILE[t.kind]}")
  if t.context_length != spec.context_length:
    problems.append(f"tokenizer.context_length: {t.context_length} != the model's context length "
                    f"{spec.context_length}")
  if not t.model_path and t.vocab_size > spec.vocab_size:
    problems.append(f"tokenizer.vocab_size: {t.vocab_size} ids would not fit the model's "
                    f"vocabulary of {spec.vocab_size}")
  return problems


def eval_problems(config, task_name: str) -> list:
  """Eval names and kinds, each entry's own fields, and the predict functions it calls."""
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  task = tasks_lib.get(task_name)
  offered = set(task.predict_fns(config, None))     # names only; the model is never called
  problems = []
  if config.evals.batch_size < 1:
    problems.append(f"evals.batch_size: {config.evals.batch_size} must be >= 1")
  for name, entry in evals.entries(config, problems):
    module = evals.EVALUATORS[entry.kind]
    needed = (module.predict_fns(entry) if callable(getattr(module, "predict_fns", None))
              else module.PREDICT_FNS)
    # 'a|b': either predict function serves.
    missing = [f for f in needed if not set(f.split("|")) & offered]
    if missing:
      problems.append(f"evals.{name}: a {entry.kind} evaluation calls {', '.join(missing)}, "
                      f"which task {task.name!r} does not provide (it provides: "
                      f"{', '.join(sorted(offered))}); remove it from evals.run")
    if hasattr(module, "check"):
      problems += [f"evals.{name}.{p}" for p in module.check(config, entry)]
    for data, _ in module.splits(config, entry):
      problems += [f"evals.{name}: {p}" for p in _path_problems(data, "eval")]
  return problems


# ---- round 2: the data --------------------------------------------------------------------------


def open_train_source(config):
  """(the training source, or None, and its problems): opened, with the fields the task needs.
  The trainer keeps the source it checked."""
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  task = tasks_lib.get(config.task)
  try:
    source = sources.make_source(config.data, "train")
    # The field ops' requirements do not depend on the tokenizer, which may not exist yet.
    sources.check_fields(source, task.train_ops(config, None), f"task {task.name!r}")
  except (FileNotFoundError, ValueError) as e:
    return None, [str(e)]
  return source, []


def eval_data_problems(config) -> list:
  """Every evaluation's data opened and checked. With `evals.run='auto'`, an evaluation whose
  data lacks what it reads (`DataLacks`: a field, class names) is dropped with one warning and
  `config.evals.run` is set to the evaluations that remain; a named one is a problem."""
  from vlm_jax import evals  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  from vlm_jax.evals import common  # pylint: disable=g-import-not-at-top
  problems, kept, skipped = [], [], []
  for name, entry in evals.entries(config, []):
    module = evals.EVALUATORS[entry.kind]
    tag = common.dataset_tag(config, entry)
    try:
      for data, field_ops in module.splits(config, entry):
        common.eval_source(data, field_ops, f"{entry.kind} on {tag!r}")
      if hasattr(module, "check_data"):
        module.check_data(config, entry, tag)
      kept.append(name)
    except sources.DataLacks as e:
      message = str(e).replace("evals.<name>.", f"evals.{name}.")
      (skipped if evals.is_auto(config) else problems).append(f"evals.{name}: {message}")
    except (FileNotFoundError, ValueError) as e:
      problems.append(f"evals.{name}: {e}")
  if skipped:
    config.evals.run = ",".join(kept)
    logging.warning(
        "evals.run='auto' skips what the data cannot score (name an evaluation in evals.run to "
        "make this an error): %s; running: %s", "; ".join(skipped), config.evals.run or "none")
  return problems
