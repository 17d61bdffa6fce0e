"""open_clip's own model code (`open_clip/model.py` and the modules it imports), loaded from the
installed wheel for parity tests.

`import open_clip` cannot work here: the package's `__init__` imports its image transforms,
which need torchvision, and torchvision is not installed (its only build for this platform is a
CUDA one). The model code itself needs torchvision for one name only: `open_clip/utils.py`
imports `FrozenBatchNorm2d`, used by `freeze_batch_norm_2d` when a tower is locked, which no
forward pass calls. So the model files are imported as the submodules of a package of another
name whose `__init__` is empty, with a placeholder for that one torchvision name in place while
`utils.py` is imported (a placeholder that raises if anything ever builds it) and removed
afterwards. Everything that runs in the parity tests is open_clip's code as released.
"""
import importlib
import importlib.util
import sys
import types

PACKAGE = "open_clip_reference"


class _NoFrozenBatchNorm:
  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision's FrozenBatchNorm2d is not available in the tests")


def load():
  """open_clip's `model` module (CLIP, CustomTextCLIP, ...), or None when open_clip is absent."""
  if PACKAGE + ".model" in sys.modules:
    return sys.modules[PACKAGE + ".model"]
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  # Imported first: transformers probes for torchvision when it loads and must not see the
  # placeholder below.
  import transformers  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  package = types.ModuleType(PACKAGE)
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules[PACKAGE] = package
  names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
  saved = {name: sys.modules.get(name) for name in names}
  placeholder = {name: types.ModuleType(name) for name in names}
  placeholder["torchvision.ops.misc"].FrozenBatchNorm2d = _NoFrozenBatchNorm
  sys.modules.update(placeholder)
  try:
    importlib.import_module(PACKAGE + ".utils")
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  return importlib.import_module(PACKAGE + ".model")


BEAM_SEARCH_UNAVAILABLE = ("open_clip's CoCa beam search needs transformers' BeamSearchScorer, "
                           "which transformers 5 removed")


class _NoBeamSearchScorer:
  def __init__(self, *args, **kwargs):
    raise RuntimeError(BEAM_SEARCH_UNAVAILABLE)


def load_coca():
  """open_clip's `coca_model` module (CoCa and its `generate`), or None when open_clip is absent.

  Its generation code imports transformers' logits processors and `BeamSearchScorer` in one
  block and, if any is missing, disables `generate` altogether. transformers 5 removed
  `BeamSearchScorer` (used by beam search only), so a placeholder that raises when built stands
  in for it while the module is imported: greedy / top-k generation runs as released, beam
  search fails naming the missing class.
  """
  if load() is None:
    return None
  import transformers  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import transformers.generation  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  added = [m for m in (transformers, transformers.generation)
           if not hasattr(m, "BeamSearchScorer")]
  for module in added:
    module.BeamSearchScorer = _NoBeamSearchScorer
  try:
    return importlib.import_module(PACKAGE + ".coca_model")
  finally:
    for module in added:
      delattr(module, "BeamSearchScorer")


def model_config(name: str) -> dict:
  """open_clip's model config `name` (model_configs/<name>.json inside the wheel)."""
  import json  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import os  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
  with open(os.path.join(folder, "model_configs", f"{name}.json")) as f:
    return json.load(f)
