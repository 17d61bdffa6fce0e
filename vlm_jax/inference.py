"""Load a trained (or imported) checkpoint and use it: embed images and texts, caption, classify.

    from vlm_jax import inference
    model = inference.load("runs/shapes_coca")        # a workdir, its checkpoints/ or checkpoints/<step>
    images = model.load_images(["a.png", "b.jpg"])      # decode + resize/crop + normalise, as in eval
    model.encode_images(images)                         # float32 [N, D], unit norm
    model.encode_texts(model.tokenize(["a red circle"]))  # float32 [N, D], unit norm
    model.generate(images, max_len=12, beam=3)          # captions (CoCa, captioner, prefix-LM)
    model.answer(images, ["how many circles are there?", ...])   # VQA (prefix-LM)
    model.classify(images, ["red circle", "blue square"])  # zero-shot probabilities [N, C]

Everything needed is read from the directory: the config (DIR/config.json, else the one stored in
the checkpoint), the tokenizer (DIR/tokenizer.model or the config's tokenizer.model_path) and the
params, restored onto a data-parallel mesh over the local devices (or the mesh you pass).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import runtime
from vlm_jax import sharding
from vlm_jax import tasks as tasks_lib
from vlm_jax.checkpoint import CheckpointLocation, locate
from vlm_jax.data import tokenizers
from vlm_jax.evals import captioning
from vlm_jax.evals import common
from vlm_jax.evals import templates as templates_lib
from vlm_jax.evals import zeroshot


# ---- the run's config and tokenizer -----------------------------------------------------------


def load_config(loc: CheckpointLocation, meta: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The run's config: WORKDIR/config.json, else the copy in the checkpoint's metadata (configs
  saved by earlier versions are upgraded)."""
  if loc.workdir and os.path.isfile(os.path.join(loc.workdir, "config.json")):
    path = os.path.join(loc.workdir, "config.json")
    with open(path) as f:
      return config_utils.config_from_json(f.read(), source=path)
  meta = meta if meta is not None else _read_meta(loc)
  if meta and meta.get("config"):
    return config_utils.config_from_json(meta["config"],
                                         source=f"{loc.checkpoints}/{loc.step} metadata")
  raise FileNotFoundError(f"checkpoint: no config.json in {loc.workdir or loc.checkpoints} and "
                          "no config in the checkpoint metadata")


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
  """The run's tokenizer (see `vlm_jax.data.tokenizers.for_checkpoint`), None for a task that
  reads no text."""
  if tasks_lib.get(config.task).text_spec(config) is None:
    return None
  return tokenizers.for_checkpoint(config, workdir, meta)


# ---- params -----------------------------------------------------------------------------------


def restore_params(config, task, model, mesh, loc: CheckpointLocation, ema: bool = False):
  """The params of checkpoint `loc` (`ema`: its EMA params), restored directly into their
  shardings on `mesh` (any mesh: the checkpoint may have been written on another). Only the
  params are read (not the optimizer state). Every model param must be in the checkpoint with the model's shape; checkpoint params
  the model does not have are ignored (a CoCa checkpoint serves a captioner)."""
  abstract, _ = runtime.abstract_params(config, task, model, mesh)
  ckpt = ckpt_lib.Checkpointer(loc.checkpoints, read_only=True, async_save=False)
  try:
    loaded, _ = ckpt.restore_params(loc.step, abstract, field="checkpoint", ema=ema)
  finally:
    ckpt.close()
  missing = [p for p in ckpt_lib.flatten(abstract) if p not in loaded]
  if missing:
    raise ValueError(f"checkpoint {loc.checkpoints}/{loc.step} does not match the config's model "
                     f"(task={config.task!r}): {len(missing)} params missing, e.g. {missing[:3]}")
  # Same container structure (and key order) as the model's own params.
  return jax.tree.map(lambda _, v: v, abstract, ckpt_lib.unflatten(loaded))


def default_mesh(devices=None):
  """Pure data parallelism over the local devices: fine for evaluation and inference."""
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                            devices)


# ---- the loaded model -------------------------------------------------------------------------


class Model:
  """A model ready for inference; build it with `load`. Every method goes through the task's
  predict functions (`Task.predict_fns`), so what a model can do depends on its task: encode
  (contrastive, coca), generate (coca, captioning), classify (any: zero-shot with labels for a
  contrastive model, the trained head for a classifier)."""

  def __init__(self, config, task, model, params, tokenizer, mesh, step=None, path=None):
    self.config, self.task, self.module, self.params = config, task, model, params
    self.tokenizer, self.mesh, self.step, self.path = tokenizer, mesh, step, path
    self._ctx = common.EvalContext.create(config, task, model, params, mesh, tokenizer)
    self._preprocess = None

  @property
  def context(self) -> common.EvalContext:
    return self._ctx

  @property
  def can_generate(self) -> bool:
    return self._ctx.has_predict_fn("generate")

  @property
  def can_answer(self) -> bool:
    """True for a model that answers visual questions (a prefix-LM)."""
    return self._ctx.has_predict_fn("answer")

  @property
  def has_classifier(self) -> bool:
    """True for a model with a trained classification head (`classify` without labels)."""
    return self._ctx.has_predict_fn("classify")

  @property
  def class_names(self) -> Optional[list]:
    """The class names a classifier was trained on (config.data.classnames), if recorded."""
    names = self.config.data.get("classnames")
    return [n.strip() for n in names.split(",")] if names else None

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> int32 [N, context_length] with this checkpoint's tokenizer."""
    if isinstance(texts, str):
      texts = [texts]
    return self._ctx.tokenize(texts)

  def _images(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    size = int(self.config.model.image.image_size)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images: expected float32 [N, {size}, {size}, 3] preprocessed images "
                       f"(see load_images), got shape {images.shape}")
    return images

  def encode_images(self, images, batch_size: Optional[int] = None) -> np.ndarray:
    """float32 [N, H, W, 3] preprocessed images -> float32 [N, D] unit-norm embeddings."""
    return self._ctx.embed_images(self._images(images), batch_size)

  def encode_texts(self, token_ids, batch_size: Optional[int] = None) -> np.ndarray:
    """int32 [N, L] token ids (see tokenize) -> float32 [N, D] unit-norm embeddings."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
      raise ValueError(f"encode_texts: expected int token ids [N, L], got {token_ids.dtype} "
                       f"{token_ids.shape}")
    return self._ctx.embed_texts(token_ids.astype(np.int32), batch_size)

  def image_features(self, images, batch_size: Optional[int] = None) -> np.ndarray:
    """The image tower's pooled features [N, W] (before any projection or head)."""
    return self._ctx.predict_rows("image_features", {"image": self._images(images)}, batch_size)

  def generate(self, images, max_len: Optional[int] = None, beam: int = 1,
               length_penalty: float = 0.0, batch_size: Optional[int] = None,
               prompts: Optional[Sequence[str]] = None) -> list:
    """Texts for preprocessed images: greedy (beam=1) or beam search, KV-cached. Without
    `prompts`, captions; with one prompt per image (a prefix-LM), the continuation of each
    prompt (prompts of different lengths share a batch: they are left-padded and prefilled in
    one pass). A prompt longer than the model's context is cut at its end, with a warning."""
    captioning.check_generation(self._ctx, "generate")
    requested = captioning.max_decode_len(self._ctx, max_len)
    generate = self._ctx.predict_fn("generate")
    images = self._images(images)
    rows = {"image": images}
    if prompts is not None:
      rows["prompt"] = self._prompts(prompts, len(images), requested)
    # One compiled function serves every max_len up to its buffer (a power of two).
    static, requested = captioning.generate_kwargs(
        self._ctx, requested, beam, length_penalty,
        prompt_len=rows["prompt"].shape[1] if prompts is not None else 0)
    fn = lambda p, b, stop_at: generate(p, b, stop_at=stop_at, **static)[0]
    tokens = self._ctx.run_rows(("generate", tuple(sorted(static.items()))), fn, rows,
                                batch_size or 16, np.int32(requested))
    return self.tokenizer.decode(tokens[:, :requested]) if tokens is not None else []

  def logits(self, token_ids, batch_size: Optional[int] = None) -> np.ndarray:
    """Next-token logits float32 [N, L, vocab] of int token ids [N, L] (a causal_lm model,
    e.g. an imported GPT-2 / Llama): position t scores token t + 1."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
      raise ValueError(f"logits: expected int token ids [N, L], got {token_ids.dtype} "
                       f"{token_ids.shape}")
    return self._ctx.predict_rows("logits", {"text": token_ids.astype(np.int32)}, batch_size)

  def mlm_logits(self, token_ids, batch_size: Optional[int] = None) -> np.ndarray:
    """Masked-LM logits float32 [N, L, vocab] of int token ids [N, L] (a masked_lm model, e.g.
    an imported BertForMaskedLM): position t scores the token at t (put the mask id there)."""
    return self._ctx.predict_rows("mlm_logits", {"text": self._token_ids(token_ids, "mlm_logits")},
                                  batch_size)

  def text_features(self, token_ids, batch_size: Optional[int] = None) -> np.ndarray:
    """The text encoder's pooled features [N, W] of int token ids [N, L] (BERT: the [CLS]
    state, through the pooler when the model has one)."""
    return self._ctx.predict_rows("text_features",
                                  {"text": self._token_ids(token_ids, "text_features")},
                                  batch_size)

  @staticmethod
  def _token_ids(token_ids, who: str) -> np.ndarray:
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
      raise ValueError(f"{who}: expected int token ids [N, L], got {token_ids.dtype} "
                       f"{token_ids.shape}")
    return token_ids.astype(np.int32)

  def answer(self, images, questions: Sequence[str], max_len: int = 8, beam: int = 1,
             batch_size: Optional[int] = None) -> list:
    """Answers to visual questions, one question per image (repeat an image to ask it several):
    the question is the prompt of the prefix-LM, the generated continuation is the answer."""
    if isinstance(questions, str):
      questions = [questions]
    return self.generate(images, max_len=max_len, beam=beam, batch_size=batch_size,
                         prompts=list(questions))

  def _prompts(self, prompts, count: int, max_len: int) -> np.ndarray:
    """One left-padded row of prompt ids per image; the width is rounded up to a multiple of 8
    so that prompts of similar lengths share one compiled function."""
    from absl import logging  # pylint: disable=g-import-not-at-top
    from vlm_jax.data import ops  # pylint: disable=g-import-not-at-top
    if isinstance(prompts, str) or len(prompts) != count:
      raise ValueError(f"prompts: expected one prompt per image ({count}), got "
                       f"{1 if isinstance(prompts, str) else len(prompts)}")
    pieces = self.tokenizer.tokenize([str(p) for p in prompts])
    room = self._ctx.context_length - 1 - max_len     # prompt + bos + answer must fit
    if room < 1:
      raise ValueError(f"prompts: max_len={max_len} leaves no room for a prompt in the model's "
                       f"context of {self._ctx.context_length}")
    width = min(room, max(8, -(-max(len(p) for p in pieces) // 8) * 8))
    rows, cut = ops.left_padded(pieces, width, self.tokenizer.pad_id)
    if cut.any():
      logging.warning("prompts: %d of %d prompts were longer than %d tokens and were cut at "
                      "the end", int(cut.sum()), len(cut), width)
    return rows

  def classify(self, images, labels: Optional[Sequence[str]] = None, templates="photo"
               ) -> np.ndarray:
    """Class probabilities [N, C].

    With `labels` (a contrastive model): zero-shot, the labels put into the prompt `templates`
    (a set name such as 'photo', 'clip80', 'shapes', or '|'-separated templates); the
    probabilities follow the loss the model was trained with (a softmax over the labels, or
    independent sigmoids for the sigmoid loss). Without labels (a classifier): the trained
    head's softmax over its classes (`class_names`).
    """
    images = self._images(images)
    if labels is None:
      if not self.has_classifier:
        raise ValueError(f"classify: task {self.task.name!r} has no classification head; pass "
                         "the labels to classify zero-shot")
      logits = self._ctx.predict_rows("classify", {"image": images})
      return self.task.probabilities(self.config, logits)
    labels = [str(l) for l in labels]
    if not labels:
      raise ValueError("classify: no labels given")
    classifier = zeroshot.build_classifier(self._ctx, labels,
                                           templates_lib.get_templates(templates))
    sims = self.encode_images(images) @ classifier.T
    scale, bias = self.logit_scale_and_bias()
    return self.task.probabilities(self.config, scale * sims + bias)

  def logit_scale_and_bias(self):
    with self._ctx.scope():
      out = jax.device_get(self._ctx.predict_fn("logit_params")(self.params))
    return float(out["logit_scale"]), float(out["logit_bias"])

  # ---- images from files ----------------------------------------------------------------------
  def identity(self) -> dict:
    """What identifies the embedding model (recorded by `vlm_jax.embed` and indexes, checked by
    `search`): its workdir, step, embedding size and `model_id`, a hash of the model config and
    of the first values of every param array (exact values, so the same on any mesh or process
    count; two checkpoints, runs or fine-tunes of one config differ)."""
    if getattr(self, "_identity", None) is None:
      import hashlib  # pylint: disable=g-import-not-at-top
      h = hashlib.sha256(config_utils.config_to_json(self.config.model).encode())
      leaves = jax.tree_util.tree_leaves_with_path(self.params)
      heads = self._ctx.call("identity", lambda params: [
          x.reshape(-1)[:64] for x in jax.tree.leaves(params)])
      for (path, _), head in zip(leaves, heads):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(head, np.float32).tobytes())
      self._identity = {"workdir": os.path.abspath(self.path) if self.path else None,
                        "step": self.step, "embed_dim": int(self.config.model.get("embed_dim")
                                                            or 0),
                        "model_id": h.hexdigest()[:16]}
    return dict(self._identity)

  def search(self, index, texts: Optional[Sequence[str]] = None, images=None, k: int = 10,
             batch_size: Optional[int] = None) -> list:
    """The k nearest entries of `index` (a `vlm_jax.search.Index` or its folder) to each query:
    `texts` (strings) or `images` (paths, bytes, uint8 arrays or preprocessed float32 [N, H, W,
    3]). Returns one list per query of {score, position, **row} dicts (row: the index's id and
    caption / image path), best first. An index built with another model is refused, naming
    both."""
    from vlm_jax import search as search_lib  # pylint: disable=g-import-not-at-top
    if isinstance(index, (str, os.PathLike)):
      index = search_lib.Index.load(str(index))
    if (texts is None) == (images is None):
      raise ValueError("search: pass texts=... or images=... (one of them)")
    search_lib.check_model(index.model, self.identity(), index.path or "the index")
    if texts is not None:
      queries = self.encode_texts(self.tokenize(texts), batch_size)
    else:
      is_pixels = isinstance(images, np.ndarray) and images.dtype == np.float32
      queries = self.encode_images(images if is_pixels else self.load_images(images),
                                   batch_size)
    scores, positions = index.search(queries, k)
    return [[dict(index.rows[p], score=float(s), position=int(p))
             for s, p in zip(score_row, position_row) if p >= 0]
            for score_row, position_row in zip(scores, positions)]

  def load_images(self, sources: Sequence[Any]) -> np.ndarray:
    """Image files (paths), encoded bytes or uint8 arrays -> float32 [N, H, W, 3], preprocessed
    exactly like the eval pipeline (resize + centre crop + normalisation from config.data).

    Raises ValueError naming the file for an image that cannot be decoded.
    """
    if self._preprocess is None:
      from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      self._preprocess = pipeline.Preprocess(self.config.data, [], train=False)
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
      ex = self._preprocess({"image": data, "key": str(name)})
      if "_skip" in ex:
        raise ValueError(f"image: {name} cannot be decoded as an image ({ex['_skip']})")
      out.append(ex["image"])
    size = int(self.config.data.image_size)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)


def load(path: str, step: Optional[int] = None, *, mesh=None, config=None,
         ema: Optional[bool] = None) -> Model:
  """Loads a workdir / checkpoint directory for inference.

  Args:
    path: a training (or conversion) workdir, its `checkpoints/` directory, or one step's
      directory `checkpoints/<step>`.
    step: which checkpoint (default: the latest, or the one `path` names).
    mesh: where to put the params (default: data parallel over all local devices).
    config: use this config instead of the saved one (it must describe the same model).
    ema: load the EMA weights of a run trained with ema_decay (default: config.evals.use_ema).
  """
  loc = locate(path, step)
  meta = _read_meta(loc)
  if config is None:
    config = load_config(loc, meta)
  task = tasks_lib.get(config.task)
  tokenizer = load_tokenizer(config, loc.workdir, meta)
  mesh = mesh if mesh is not None else default_mesh()
  model = task.build_model(config)
  if ema is None:
    ema = bool(config.get("evals", {}).get("use_ema", False))
  params = restore_params(config, task, model, mesh, loc, ema=ema)
  return Model(config, task, model, params, tokenizer, mesh, step=loc.step, path=path)


__all__ = ["load", "Model", "locate", "load_config", "load_tokenizer", "restore_params",
           "default_mesh", "CheckpointLocation"]
