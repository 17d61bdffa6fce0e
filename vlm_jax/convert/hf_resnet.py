"""Hugging Face `ResNetModel` / `ResNetForImageClassification` -> a vlm_jax `classification`
workdir with a ResNet image tower (`model.image.name = 'resnet'`).

Key names (prefix `resnet.` in ResNetForImageClassification; S = stage, B = block, I = conv):
    embedder.embedder.convolution / normalization       -> image/stem_conv, stem_bn
    encoder.stages.S.layers.B.layer.I.convolution / normalization
                                                  -> image/stage_<S+1>_block_<B>/conv_<I+1>, bn_<I+1>
    encoder.stages.S.layers.B.shortcut.convolution / normalization
                                                  -> .../shortcut_conv, shortcut_bn
    classifier.1 [C, W] (+ bias)                  -> head
A BatchNorm's weight, bias, running_mean and running_var become scale, bias, running_mean,
running_var (`num_batches_tracked` is not needed). The architecture must be one vlm_jax builds:
v1.5 (`downsample_in_bottleneck=False`), ReLU, the published depths for the layer type
(basic: 10 / 18 / 34 blocks (1,1,1,1) / (2,2,2,2) / (3,4,6,3); bottleneck: 50 / 101 / 152), and
stage widths that double from `embedding_size` (bottlenecks: x4 out). Anything else is refused
by name. A ResNetModel converts to a features-only classifier (`model.num_classes = 0`).
"""
from __future__ import annotations

from vlm_jax.convert import common
from vlm_jax.models import resnet

# (layer type, blocks per stage) -> vlm_jax depth
DEPTHS = {("basic", (1, 1, 1, 1)): 10, ("basic", (2, 2, 2, 2)): 18,
          ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
          ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}


def is_resnet_config(d: dict) -> bool:
  return d.get("model_type") == "resnet"


def fields(d: dict, source: str) -> dict:
  """The vlm_jax ResNet fields of a ResNetConfig, or a ConversionError naming what differs."""
  bad = []
  layer_type = d.get("layer_type", "bottleneck")
  blocks = tuple(int(x) for x in d.get("depths", ()))
  depth = DEPTHS.get((layer_type, blocks))
  if depth is None:
    known = "; ".join(f"{t} {list(b)} (depth {v})" for (t, b), v in DEPTHS.items())
    bad.append(f"layer_type={layer_type!r} with depths={list(blocks)} (known: {known})")
  if d.get("hidden_act", "relu") != "relu":
    bad.append(f"hidden_act={d['hidden_act']!r} (only 'relu')")
  if d.get("downsample_in_bottleneck"):
    bad.append("downsample_in_bottleneck=True (ResNet v1: vlm_jax builds v1.5)")
  if d.get("downsample_in_first_stage"):
    bad.append("downsample_in_first_stage=True")
  if int(d.get("num_channels", 3)) != 3:
    bad.append(f"num_channels={d['num_channels']}")
  width = int(d.get("embedding_size", 64))
  mult = 4 if layer_type == "bottleneck" else 1
  want = [width * 2 ** s * mult for s in range(4)]
  if [int(h) for h in d.get("hidden_sizes", want)] != want:
    bad.append(f"hidden_sizes={d.get('hidden_sizes')} (vlm_jax's stages are {want} for "
               f"embedding_size={width})")
  if bad:
    raise common.ConversionError(f"convert: {source} uses settings vlm_jax's ResNet does not "
                                 f"implement: {'; '.join(bad)}. Nothing was written")
  return dict(depth=depth, width=width, num_labels=len(d.get("id2label") or {}))


def convert(state: dict, f: dict, *, source: str, model: str) -> tuple[dict, int]:
  """(params, number of classes (0: no head)); every key checked."""
  prefix = "resnet." if any(k.startswith("resnet.") for k in state) else ""
  ignore = [k for k in state if k.endswith("num_batches_tracked")]
  r = common.StateReader(state, source, ignore=ignore)
  get = lambda name, shape: r.get(prefix + name, shape)

  def conv_bn(name, c_out, c_in, k):
    kernel = common.conv_patch_kernel(get(f"{name}.convolution.weight", (c_out, c_in, k, k)))
    n = f"{name}.normalization"
    bn = {"scale": get(f"{n}.weight", (c_out,)), "bias": get(f"{n}.bias", (c_out,)),
          "running_mean": get(f"{n}.running_mean", (c_out,)),
          "running_var": get(f"{n}.running_var", (c_out,))}
    return {"kernel": kernel}, bn

  depth, w = f["depth"], f["width"]
  image = {}
  image["stem_conv"], image["stem_bn"] = conv_bn("embedder.embedder", w, 3, 7)
  bottleneck = resnet.bottleneck(depth)
  c_in = w
  for s, blocks in enumerate(resnet.STAGES[depth]):
    c = w * 2 ** s
    out = c * (4 if bottleneck else 1)
    for b in range(blocks):
      layer = f"encoder.stages.{s}.layers.{b}"
      block = {}
      shapes = ([(c, c_in, 1), (c, c, 3), (out, c, 1)] if bottleneck
                else [(c, c_in, 3), (out, c, 3)])
      for i, (o, ci, k) in enumerate(shapes):
        block[f"conv_{i + 1}"], block[f"bn_{i + 1}"] = conv_bn(f"{layer}.layer.{i}", o, ci, k)
      if r.has(prefix + f"{layer}.shortcut.convolution.weight"):
        block["shortcut_conv"], block["shortcut_bn"] = conv_bn(f"{layer}.shortcut", out, c_in, 1)
      image[f"stage_{s + 1}_block_{b}"] = block
      c_in = out
  params = {"image": image}
  classes = 0
  if r.has("classifier.1.weight"):
    classes = int(state["classifier.1.weight"].shape[0])
    params["head"] = common.dense(r.get("classifier.1.weight", (classes, c_in)),
                                  r.get("classifier.1.bias", (classes,)))
  r.check(f"the ResNet described by {model}")
  return params, classes


def to_config(f: dict, classes: int, image_size: int = 224):
  """The `classification` config of a converted ResNet (complete, locked)."""
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  image = {"name": "resnet", "depth": f["depth"], "width": f["width"],
           "image_size": image_size}
  # ImageNet normalisation, as the checkpoints' image processor.
  data = {"image_size": image_size, "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225)}
  user = {"task": "classification",
          "model": {"dtype": "auto", "image": image, "num_classes": classes,
                    "head_zero_init": False},
          "data": data, "evals": {"run": "classification" if classes else ""}}
  return config_utils.complete(user, source="convert")
