"""Reading checkpoint files, checking their keys and shapes, and writing the converted output.

Reading never runs code from the file: `.safetensors` is read with the `safetensors` library
(its numpy API, no torch needed), `.pt` / `.bin` / `.pth` go through
`torch.load(..., weights_only=True)`, whose unpickler only accepts tensors and plain containers
(a file holding any other pickled object is refused), and TorchScript archives (OpenAI's
original release) through a restricted unpickler of our own (see `read_torchscript`).
"""
from __future__ import annotations

import collections
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from typing import Any, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message says why (and nothing was written)."""


# ------------------------------------------------------------------------------------------------
# Reading.

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_checkpoint(path: str) -> dict[str, Any]:
  """Returns the checkpoint's flat state dict: name -> numpy array (floats as float32).

  Accepts `.safetensors` and torch files (`.pt`, `.pth`, `.bin`, `.ckpt`); a torch file may hold
  the state dict itself or a training checkpoint with a 'state_dict' entry (OpenCLIP), whose
  DataParallel 'module.' prefix is removed. Non-tensor entries (e.g. OpenAI's
  'input_resolution') are returned as Python scalars.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"convert: checkpoint file {path} does not exist")
  if path.endswith(".safetensors"):
    state = _read_safetensors(path)
  elif path.endswith(".npz"):
    state = _read_npz(path)
  elif path.endswith(TORCH_SUFFIXES):
    state = _read_torch(path)
  else:
    raise ConversionError(f"convert: {path}: unknown checkpoint type; expected .safetensors, "
                          f".npz or one of {', '.join(TORCH_SUFFIXES)}")
  if not state:
    raise ConversionError(f"convert: {path} holds no tensors")
  return state


def _read_safetensors(path: str) -> dict[str, Any]:
  """Reads every tensor with the `safetensors` library (its numpy reader; bfloat16 tensors,
  which numpy has no type for, through its JAX reader), floats as float32."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  out, bf16 = {}, []
  try:
    with safe_open(path, framework="np") as f:
      for name in f.keys():
        if f.get_slice(name).get_dtype() == "BF16":
          bf16.append(name)
          out[name] = None        # keeps the file's order
        else:
          out[name] = _as_numpy_float32(f.get_tensor(name))
    if bf16:
      with safe_open(path, framework="flax") as f:
        for name in bf16:
          out[name] = np.asarray(f.get_tensor(name), np.float32)
  except SafetensorError as e:
    raise ConversionError(f"convert: {path} is not a safetensors file, or it is truncated or "
                          f"corrupt ({e})") from e
  return out


def _read_npz(path: str) -> dict[str, Any]:
  """A numpy .npz archive (big_vision's checkpoint format), read with allow_pickle=False: an
  entry holding pickled objects is refused, never unpickled. bfloat16 arrays (stored by numpy as
  2-byte void) are widened to float32."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  if not zipfile.is_zipfile(path):   # np.load would take it for a plain pickle
    raise ConversionError(f"convert: {path} is not a readable .npz archive (not a zip file; "
                          "truncated or corrupt)")
  out = {}
  try:
    with np.load(path, allow_pickle=False) as archive:
      for name in archive.files:
        array = archive[name]
        if array.dtype.kind == "V" and array.dtype.itemsize == 2:
          array = array.view(ml_dtypes.bfloat16).astype(np.float32)
        out[name] = _as_numpy_float32(array)
  except ValueError as e:
    if "pickle" in str(e).lower():
      raise ConversionError(f"convert: refusing to load {path}: an entry holds pickled objects; "
                            f"{_REFUSED}") from e
    raise ConversionError(f"convert: {path} is not a readable .npz archive ({e})") from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f"convert: {path} is not a readable .npz archive (truncated or "
                          f"corrupt: {e})") from e
  return out


def _as_numpy_float32(array: np.ndarray) -> np.ndarray:
  if np.issubdtype(array.dtype, np.floating):
    return np.array(array, dtype=np.float32)
  return np.array(array)


def _pickle_protocol(path: str):
  """The protocol of the pickle stream `path` holds (its PROTO opcode, else the newest protocol
  its opcodes need), or None if it is not one. Read with pickletools, which lists opcodes and
  never builds an object."""
  import pickletools  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      protocol, declared = 0, None
      for opcode, arg, _ in pickletools.genops(f):
        protocol = max(protocol, opcode.proto)
        if opcode.name == "PROTO":
          declared = arg
        if opcode.name == "STOP":
          return declared if declared is not None else protocol
  except Exception:  # pylint: disable=broad-except  (anything that is not a pickle stream)
    return None
  return None


_REFUSED = ("vlm_jax never unpickles a checkpoint's objects; save the model's state_dict with a "
            "current torch.save, or a .safetensors file")


def _read_torch(path: str) -> dict[str, Any]:
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      if any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist()):
        return read_torchscript(path)
  elif tarfile.is_tarfile(path):
    with tarfile.open(path) as t:
      names = set(t.getnames())
    if {"pickle", "storages", "tensors"} <= names:
      raise ConversionError(f"convert: refusing to load {path}: it is a legacy PyTorch .tar "
                            "checkpoint (torch < 0.4), which can only be read by unpickling its "
                            f"objects; {_REFUSED}")
    raise ConversionError(f"convert: {path} is a tar archive, not a PyTorch checkpoint")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"convert: reading {path} needs PyTorch (pip install torch; CPU is "
                          "enough), or convert the file to .safetensors") from e
  try:
    with warnings.catch_warnings():   # torch warns before refusing TorchScript archives
      warnings.simplefilter("ignore", UserWarning)
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    with open(path, "rb") as f:
      magic = f.read(2)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
      detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
      raise ConversionError(
          f"convert: refusing to load {path}: it contains pickled objects other than tensors "
          f"and plain containers{f' ({detail})' if detail else ''}. Checkpoints are read with "
          "torch.load(weights_only=True), which never runs code from the file; save only the "
          "model's state_dict (or a .safetensors file) instead") from e
    protocol = _pickle_protocol(path)
    if protocol is not None:
      raise ConversionError(f"convert: refusing to load {path}: it is a plain pickle (protocol "
                            f"{protocol}), not a PyTorch checkpoint; unpickling it could run "
                            f"code from the file. {_REFUSED}") from e
    raise ConversionError(f"convert: {path} is not a PyTorch checkpoint (unrecognised or "
                          "corrupt file)") from e
  except RuntimeError as e:
    raise ConversionError(f"convert: {path} is not a readable PyTorch checkpoint "
                          f"(truncated or corrupt: {str(e).splitlines()[0]})") from e
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types on bad input)
    raise ConversionError(f"convert: {path} is not a readable PyTorch checkpoint "
                          f"(truncated or corrupt: {type(e).__name__}: {e})") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"convert: {path} holds a {type(obj).__name__}, not a state dict "
                          "(a mapping from parameter names to tensors)")
  keys = list(obj)
  if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      out[str(k)] = (v.float().numpy() if v.is_floating_point() else v.numpy()).copy()
    else:
      out[str(k)] = v
  return out


# TorchScript archives (OpenAI's original `ViT-B-32.pt` etc.) are zips whose `data.pkl` pickles the
# module tree. torch.load(weights_only=True) refuses them, and torch.jit.load would compile the
# archive's code; instead the pickle is read here with an unpickler that knows only the handful of
# globals that describe modules and tensors (modules become inert attribute holders, tensors numpy
# arrays read from the zip) and refuses anything else, so no code from the file ever runs.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _ScriptModule:
  """An inert stand-in for a pickled TorchScript module: it only holds attributes."""


class _StorageType:
  def __init__(self, name):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused   # requires_grad, backward hooks (and metadata in newer versions)
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if (not isinstance(storage, np.ndarray) or len(size) != len(stride) or offset < 0 or
      any(s < 0 for s in size + stride)):
    raise pickle.UnpicklingError(f"malformed tensor: size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  extent = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
  if extent > storage.size:   # never read outside the storage
    raise pickle.UnpicklingError(f"tensor of size {size} / stride {stride} at offset {offset} "
                                 f"overruns its storage of {storage.size} values")
  if not size:
    return np.array(storage[offset])
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript `data.pkl` without importing or calling anything from the file."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._zip, self._prefix, self._path = zf, prefix, path
    self._classes: dict[str, type] = {}

  def find_class(self, module, name):
    if module.startswith("__torch__"):
      key = f"{module}.{name}"
      if key not in self._classes:
        self._classes[key] = type(name, (_ScriptModule,), {})
      return self._classes[key]
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and
            isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid[:5]
    dtype = _STORAGE_DTYPES[storage_type.name]
    try:
      raw = self._zip.read(f"{self._prefix}/data/{key}")
    except KeyError as e:
      raise ConversionError(f"convert: {self._path}: tensor storage {key} is missing from the "
                            "archive (truncated or corrupt file)") from e
    if dtype == "bfloat16":
      array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
      array = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
    if array.size < int(numel):
      raise ConversionError(f"convert: {self._path}: tensor storage {key} holds {array.size} "
                            f"values, expected {numel} (truncated or corrupt file)")
    return array


def read_torchscript(path: str) -> dict[str, Any]:
  """The tensors of a TorchScript archive by dotted attribute path (= its state_dict names)."""
  try:
    with zipfile.ZipFile(path) as zf:
      pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pkls) != 1:
        raise ConversionError(f"convert: {path}: not a TorchScript archive (no data.pkl)")
      prefix = pkls[0].split("/")[0]
      with zf.open(pkls[0]) as f:
        root = _RestrictedUnpickler(f, zf, prefix, path).load()
  except pickle.UnpicklingError as e:
    raise ConversionError(f"convert: refusing to load {path}: its TorchScript data contains "
                          f"pickled objects other than modules and tensors ({e})") from e
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, IndexError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"convert: {path} is not a readable TorchScript archive "
                          f"({type(e).__name__}: {e})") from e
  if not isinstance(root, _ScriptModule):
    raise ConversionError(f"convert: {path}: a TorchScript archive whose data.pkl holds a "
                          f"{type(root).__name__}, not a module; not a model checkpoint")
  out: dict[str, Any] = {}

  def visit(prefix: str, node: _ScriptModule, depth: int):
    if depth > 64:
      raise ConversionError(f"convert: {path}: module tree too deep")
    for k, v in vars(node).items():
      name = f"{prefix}{k}"
      if isinstance(v, np.ndarray):
        out[name] = _as_numpy_float32(v)
      elif isinstance(v, _ScriptModule):
        visit(name + ".", v, depth + 1)
  visit("", root, 0)
  if not out:
    raise ConversionError(f"convert: {path}: a TorchScript archive whose module holds no tensors "
                          "(its constants.pkl and code are never read or unpickled here); not a "
                          "model checkpoint")
  return out


# ------------------------------------------------------------------------------------------------
# Key and shape checking.


class StateReader:
  """Hands out a state dict's tensors by name while recording every problem.

  `get(name, shape)` returns the tensor, or zeros of `shape` when the key is missing or its shape
  is wrong (so the mapping runs to the end and one report lists every problem). `check()` then
  raises a ConversionError with missing keys, shape mismatches and unexpected (never read) keys.
  """

  def __init__(self, state: Mapping[str, Any], source: str, ignore: Iterable[str] = ()):
    self.state = state
    self.source = source
    self.ignore = set(ignore)
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []

  def has(self, name: str) -> bool:
    return name in self.state

  def get(self, name: str, shape: tuple) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if name not in self.state:
      self.missing.append(f"{name} {list(shape)}")
      return np.zeros(shape, np.float32)
    self.used.add(name)
    value = self.state[name]
    if not isinstance(value, np.ndarray):
      self.mismatched.append(f"{name}: a {type(value).__name__}, expected a tensor {list(shape)}")
      return np.zeros(shape, np.float32)
    if value.shape != shape:
      if value.size == math.prod(shape) and len(shape) == 0:   # [1] -> scalar
        return value.reshape(shape).astype(np.float32)
      self.mismatched.append(f"{name}: {list(value.shape)} in the checkpoint, expected "
                             f"{list(shape)}")
      return np.zeros(shape, np.float32)
    return value.astype(np.float32)

  def unexpected(self) -> list[str]:
    return sorted(k for k in self.state if k not in self.used and k not in self.ignore)

  def check(self, what: str) -> None:
    unexpected = self.unexpected()
    if not (self.missing or self.mismatched or unexpected):
      return
    lines = [f"convert: {self.source} does not match {what}:"]
    for title, items in (("missing keys", self.missing), ("shape mismatches", self.mismatched),
                         ("unexpected keys", unexpected)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {item}" for item in items[:20]]
        if len(items) > 20:
          lines.append(f"    ... and {len(items) - 20} more")
    raise ConversionError("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Mapping helpers: PyTorch (out, in) conventions -> Flax kernels. All inputs are numpy float32.


def dense(weight: np.ndarray, bias: np.ndarray | None = None) -> dict:
  """torch Linear weight [out, in] (+ bias [out]) -> {'kernel': [in, out], 'bias': [out]}."""
  out = {"kernel": np.ascontiguousarray(weight.T)}
  if bias is not None:
    out["bias"] = bias
  return out


def layer_norm(weight: np.ndarray, bias: np.ndarray) -> dict:
  return {"scale": weight, "bias": bias}


def attention(q: tuple, k: tuple, v: tuple, out: tuple, num_heads: int) -> dict:
  """Separate (weight [W, W], bias [W]) pairs of the q/k/v/out projections (out may be
  [Wout, W]) -> our Attention params, whose kernels keep the heads axis: query/key/value
  [W, heads, head_dim] and out [heads, head_dim, Wout]. PyTorch's multi-head attention splits the projected features into
  heads contiguously, which is exactly this reshape."""
  width = q[0].shape[1]
  head_dim = width // num_heads
  params = {}
  for name, (w, b) in (("query", q), ("key", k), ("value", v)):
    params[name] = {"kernel": np.ascontiguousarray(w.T).reshape(width, num_heads, head_dim),
                    "bias": b.reshape(num_heads, head_dim)}
  out_width = out[0].shape[0]          # the input width, or the embedding of an attention pool
  params["out"] = {"kernel": np.ascontiguousarray(out[0].T).reshape(num_heads, head_dim,
                                                                     out_width),
                   "bias": out[1]}
  return params


def conv_patch_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


# ------------------------------------------------------------------------------------------------
# Writing.


def check_out_dir(out_dir: str) -> str:
  """OUT as an absolute path; it must not exist yet (or be an empty directory)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ConversionError(f"convert: --out {out_dir} already exists and is not an empty "
                          "directory; choose a new one (nothing is overwritten)")
  return out_dir


def write_output(out_dir: str, params: dict, config, *, tokenizer_bytes: bytes | None = None,
                 report: dict | None = None, report_name: str = "conversion.json") -> str:
  """Writes the converted model as a vlm_jax workdir, atomically.

  Layout (that of a training workdir, see vlm_jax.checkpoint):
    OUT/checkpoints/0/state   Orbax: {'params': ..., 'step': 0}
    OUT/checkpoints/0/meta    JSON: the config and where the weights came from
    OUT/config.json           the config (model, tokenizer, data, evals, ...)
    OUT/tokenizer.model       the tokenizer (read as config.tokenizer.kind), when given
    OUT/conversion.json       what was converted from what (`report_name`)

  Everything is written into a temporary directory beside OUT and renamed at the end, so a failed
  conversion leaves nothing behind. OUT must not exist yet (or be an empty directory).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top

  out_dir = check_out_dir(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    if tokenizer_bytes:
      # WORKDIR/tokenizer.model is where inference / evaluate look first (the trainer writes its
      # tokenizer there too); config.tokenizer.kind says how to read it.
      with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_bytes)
      config.tokenizer.model_path = os.path.join(out_dir, "tokenizer.model")
    config_json = config_utils.config_to_json(config)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config_json)
    with open(os.path.join(tmp, report_name), "w") as f:
      json.dump(report or {}, f, indent=2, sort_keys=True)
    state = {"params": jax.tree.map(np.asarray, params), "step": np.zeros((), np.int32)}
    checkpointer = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False,
                                         keep=None)
    try:
      meta = {"config": config_json, "converted_from": report or {}}
      if tokenizer_bytes:
        meta["tokenizer_kind"] = config.tokenizer.kind
      checkpointer.save(0, state, {}, meta)
    finally:
      checkpointer.close()
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)   # the empty directory given as --out
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
