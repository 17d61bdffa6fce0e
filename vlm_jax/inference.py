"""Load a trained (or imported) checkpoint and use it: embed images and texts, caption, classify.

    from vlm_jax import inference
    model = inference.load("runs/shapes_coca")        # a workdir, its checkpoints/ or checkpoints/<step>
    images = model.load_images(["a.png", "b.jpg"])      # decode + resize/crop + normalise, as in eval
    model.encode_images(images)                         # float32 [N, D], unit norm
    model.encode_texts(model.tokenize(["a red circle"]))  # float32 [N, D], unit norm
    model.generate(images, max_len=12, beam=3)          # captions (CoCa)
    model.classify(images, ["red circle", "blue square"])  # zero-shot probabilities [N, C]

Everything needed is read from the directory: the config (DIR/config.json, else the one stored in
the checkpoint), the tokenizer (DIR/tokenizer.model or the config's tokenizer.model_path) and the
params, restored onto a data-parallel mesh over the local devices (or the mesh you pass).
"""
from __future__ import annotations

import base64
import dataclasses
import os
import tempfile
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import sharding
from vlm_jax import train_state as ts
from vlm_jax.evals import captioning
from vlm_jax.evals import common
from vlm_jax.evals import templates as templates_lib
from vlm_jax.evals import zeroshot
from vlm_jax.models import build_model


# ---- locating checkpoints ---------------------------------------------------------------------


@dataclasses.dataclass
class CheckpointLocation:
  workdir: Optional[str]     # the run directory (config.json, tokenizer.model), if known
  checkpoints: str           # the Orbax CheckpointManager directory
  step: int


def locate(path: str, step: Optional[int] = None) -> CheckpointLocation:
  """Resolves a workdir, a `checkpoints/` directory or a `checkpoints/<step>` directory.

  Raises FileNotFoundError naming the path when there is no checkpoint (or not that step).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint: {path} does not exist or is not a directory")
  base = os.path.basename(path.rstrip("/"))
  workdir = None
  if os.path.isdir(os.path.join(path, "checkpoints")):
    workdir, ckpt_dir = path, os.path.join(path, "checkpoints")
  elif base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    ckpt_dir = os.path.dirname(path)
    if step is not None and int(step) != int(base):
      raise ValueError(f"checkpoint: {path} is step {base}, but step={step} was asked for")
    step = int(base)
  else:
    ckpt_dir = path
  if workdir is None and os.path.basename(ckpt_dir) == "checkpoints":
    workdir = os.path.dirname(ckpt_dir)
  steps = _steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"checkpoint: no checkpoint in {ckpt_dir} (expected step "
                            "directories written by vlm_jax.train or vlm_jax.convert)")
  if step is None:
    step = max(steps)
  elif int(step) not in steps:
    raise FileNotFoundError(f"checkpoint: step {step} not found in {ckpt_dir}; available steps: "
                            f"{sorted(steps)}")
  return CheckpointLocation(workdir=workdir, checkpoints=ckpt_dir, step=int(step))


def _steps(ckpt_dir: str) -> list:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir)
                if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))


def load_config(loc: CheckpointLocation, meta: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The run's config: WORKDIR/config.json, else the copy in the checkpoint's metadata."""
  if loc.workdir and os.path.isfile(os.path.join(loc.workdir, "config.json")):
    with open(os.path.join(loc.workdir, "config.json")) as f:
      return _with_defaults(config_utils.config_from_json(f.read()))
  meta = meta if meta is not None else _read_meta(loc)
  if meta and meta.get("config"):
    return _with_defaults(config_utils.config_from_json(meta["config"]))
  raise FileNotFoundError(f"checkpoint: no config.json in {loc.workdir or loc.checkpoints} and "
                          "no config in the checkpoint metadata")


def _with_defaults(config):
  """Adds the data / evals fields a config saved by an older version may lack, with their
  current defaults (when the repository's `configs` package is importable)."""
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
  except ImportError:
    return config
  sections = {"data": common.data_config, "evals": common.evals_config}
  for name, make in sections.items():
    default = make()
    if name not in config:
      config[name] = default
      continue
    for key, value in default.items():
      if key not in config[name]:
        config[name][key] = value
  return config


def _read_meta(loc: CheckpointLocation) -> Optional[dict]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ckpt_lib.Checkpointer(loc.checkpoints, read_only=True, async_save=False)
  try:
    restored = ckpt.manager.restore(loc.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    ckpt.close()


def load_tokenizer(config, workdir: Optional[str], meta: Optional[dict] = None):
  """The run's tokenizer, from (first found): WORKDIR/tokenizer.model (the trainer writes the
  serialized tokenizer there), the copy stored in the checkpoint metadata, or the config's
  `tokenizer.model_path`. `tokenizer.kind` says how to read it: 'sentencepiece' or 'bpe'
  (OpenAI CLIP's vocabulary, for imported weights)."""
  tok_cfg = config.get("tokenizer") or {}
  kind = (meta or {}).get("tokenizer_kind") or tok_cfg.get("kind", "sentencepiece")
  if kind not in ("sentencepiece", "bpe"):
    raise ValueError(f"tokenizer.kind: unknown tokenizer {kind!r}; expected sentencepiece or bpe")
  candidates = []
  if workdir:
    candidates.append(os.path.join(workdir, "tokenizer.model"))
  model_path = tok_cfg.get("model_path")
  for path in candidates:
    if os.path.isfile(path):
      return _read_tokenizer(kind, path)
  if meta and meta.get("tokenizer_model_b64"):
    data = base64.b64decode(meta["tokenizer_model_b64"])
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "tokenizer.model")
      with open(path, "wb") as f:
        f.write(data)
      return _read_tokenizer(kind, path)
  if model_path:
    candidates.append(model_path)
    if os.path.isfile(model_path):
      return _read_tokenizer(kind, model_path)
  raise FileNotFoundError(f"tokenizer: none found; looked for {candidates or ['(no path)']} and "
                          f"in the checkpoint metadata (tokenizer.kind={kind!r})")


def _read_tokenizer(kind, path):
  if kind == "bpe":
    from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
    return bpe.load(path)
  from vlm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer.load(path)


# ---- params -----------------------------------------------------------------------------------


def abstract_params(config, model, mesh):
  """ShapeDtypeStructs of the params with their target shardings on `mesh`."""
  rules = sharding.logical_rules(config)
  images, text = ts.dummy_inputs(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)}, images, text))["params"]
  shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
  unboxed = nn.unbox(boxed)
  shardings = jax.tree.map(lambda _, s: s, unboxed, shardings)
  return ckpt_lib.abstract_with_shardings(unboxed, shardings)


def restore_params(config, model, mesh, loc: CheckpointLocation):
  """The params of checkpoint `loc`, restored directly into their shardings on `mesh` (any mesh:
  the checkpoint may have been written on another). Only the params are read (not the optimizer
  state). Every model param must be in the checkpoint with the model's shape."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = abstract_params(config, model, mesh)
  manager = ocp.CheckpointManager(
      loc.checkpoints, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    tree = manager.item_metadata(loc.step)["state"]
    saved = ckpt_lib._flatten(tree["params"] if tree is not None and "params" in tree else {})  # pylint: disable=protected-access
    wanted = ckpt_lib._flatten(abstract)  # pylint: disable=protected-access
    missing = [p for p in wanted if p not in saved]
    wrong = [f"{p}: checkpoint {tuple(saved[p].shape)} vs model {tuple(w.shape)}"
             for p, w in wanted.items() if p in saved and tuple(saved[p].shape) != tuple(w.shape)]
    if missing or wrong:
      raise ValueError(
          f"checkpoint {loc.checkpoints}/{loc.step} does not match the config's model "
          f"(model.kind={config.model.kind!r}): {len(missing)} params missing (e.g. "
          f"{missing[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})")
    item = {"params": abstract}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        item)
    restored = manager.restore(loc.step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                     partial_restore=True)))
  finally:
    manager.close()
  # Same container structure (and key order) as the model's own params.
  return jax.tree.map(lambda _, v: v, abstract, restored.state["params"])


def default_mesh(devices=None):
  """Pure data parallelism over the local devices: fine for evaluation and inference."""
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                            devices)


# ---- the loaded model -------------------------------------------------------------------------


class Model:
  """A model ready for inference; build it with `load`."""

  def __init__(self, config, model, params, tokenizer, mesh, step=None, path=None):
    self.config, self.module, self.params = config, model, params
    self.tokenizer, self.mesh, self.step, self.path = tokenizer, mesh, step, path
    self._ctx = common.EvalContext.create(config, model, params, mesh, tokenizer)
    self._preprocess = None

  @property
  def context(self) -> common.EvalContext:
    return self._ctx

  @property
  def kind(self) -> str:
    return self.config.model.kind

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> int32 [N, context_length] with this checkpoint's tokenizer."""
    if isinstance(texts, str):
      texts = [texts]
    return self._ctx.tokenize(texts)

  def encode_images(self, images, batch_size: Optional[int] = None) -> np.ndarray:
    """float32 [N, H, W, 3] preprocessed images -> float32 [N, D] unit-norm embeddings."""
    images = np.asarray(images, np.float32)
    size = int(self.config.model.image.image_size)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"encode_images: expected float32 [N, {size}, {size}, 3] preprocessed "
                       f"images (see load_images), got shape {images.shape}")
    return self._ctx.embed_images(images, batch_size)

  def encode_texts(self, token_ids, batch_size: Optional[int] = None) -> np.ndarray:
    """int32 [N, L] token ids (see tokenize) -> float32 [N, D] unit-norm embeddings."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
      raise ValueError(f"encode_texts: expected int token ids [N, L], got {token_ids.dtype} "
                       f"{token_ids.shape}")
    return self._ctx.embed_texts(token_ids.astype(np.int32), batch_size)

  def generate(self, images, max_len: Optional[int] = None, beam: int = 1,
               length_penalty: float = 0.0, batch_size: Optional[int] = None) -> list:
    """Captions for preprocessed images (CoCa): greedy (beam=1) or beam search, KV-cached."""
    captioning.check_decoder(self._ctx, "generate")
    images = np.asarray(images, np.float32)
    max_len = captioning.max_decode_len(self.config, max_len)
    tok = self.tokenizer
    gen = captioning.make_generate_fn(self.module, max_len=max_len, beam_size=int(beam),
                                      alpha=float(length_penalty), bos_id=tok.bos_id,
                                      eos_id=tok.eos_id, pad_id=tok.pad_id)
    fn = lambda p, b: gen(p, b["image"])[0]
    tokens = self._ctx.run_rows(("generate", max_len, int(beam), float(length_penalty)), fn,
                                {"image": images}, batch_size or 16)
    return tok.decode(tokens) if tokens is not None else []

  def classify(self, images, labels: Sequence[str], templates="photo") -> np.ndarray:
    """Zero-shot label probabilities [N, C] (softmax over labels; SigLIP: independent sigmoids).

    templates: a template set name ('photo', 'clip80', 'shapes', ...) or '|'-separated templates.
    """
    labels = [str(l) for l in labels]
    if not labels:
      raise ValueError("classify: no labels given")
    classifier = zeroshot.build_classifier(self._ctx, labels,
                                           templates_lib.get_templates(templates))
    sims = self.encode_images(images) @ classifier.T
    scale, bias = self.logit_scale_and_bias()
    logits = scale * sims + bias
    if self.kind == "siglip":
      return 1.0 / (1.0 + np.exp(-logits))
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)

  def logit_scale_and_bias(self):
    out = jax.device_get(self.module.apply({"params": self.params}, method="logits_params"))
    return float(out["logit_scale"]), float(out["logit_bias"])

  # ---- images from files ----------------------------------------------------------------------
  def load_images(self, sources: Sequence[Any]) -> np.ndarray:
    """Image files (paths), encoded bytes or uint8 arrays -> float32 [N, H, W, 3], preprocessed
    exactly like the eval pipeline (resize + centre crop + normalisation from config.data).

    Raises ValueError naming the file for an image that cannot be decoded.
    """
    if self._preprocess is None:
      from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      self._preprocess = pipeline.Preprocess(self.config.data, self.tokenizer,
                                             self._ctx.context_length, train=False)
    out = []
    for i, src in enumerate(sources):
      name = src if isinstance(src, (str, os.PathLike)) else f"image {i}"
      if isinstance(src, (str, os.PathLike)):
        try:
          with open(src, "rb") as f:
            data = f.read()
        except OSError as e:
          raise FileNotFoundError(f"image: cannot read {src}: {e}") from e
      else:
        data = src
      ex = self._preprocess({"image": data, "captions": ["-"], "key": str(name)})
      if "_skip" in ex:
        raise ValueError(f"image: {name} cannot be decoded as an image ({ex['_skip']})")
      out.append(ex["image"])
    size = int(self.config.data.image_size)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)


def load(path: str, step: Optional[int] = None, *, mesh=None, config=None) -> Model:
  """Loads a workdir / checkpoint directory for inference.

  Args:
    path: a training (or conversion) workdir, its `checkpoints/` directory, or one step's
      directory `checkpoints/<step>`.
    step: which checkpoint (default: the latest, or the one `path` names).
    mesh: where to put the params (default: data parallel over all local devices).
    config: use this config instead of the saved one (it must describe the same model).
  """
  loc = locate(path, step)
  meta = _read_meta(loc)
  if config is None:
    config = load_config(loc, meta)
  tokenizer = load_tokenizer(config, loc.workdir, meta)
  mesh = mesh if mesh is not None else default_mesh()
  model = build_model(config.model)
  params = restore_params(config, model, mesh, loc)
  return Model(config, model, params, tokenizer, mesh, step=loc.step, path=path)


__all__ = ["load", "Model", "locate", "load_config", "load_tokenizer", "restore_params",
           "abstract_params", "default_mesh", "CheckpointLocation"]
