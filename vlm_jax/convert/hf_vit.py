"""Hugging Face `ViTModel` / `ViTForImageClassification` -> a vlm_jax `classification` workdir
(params `image/...`, plus the classifier `head` when the checkpoint has one).

Key names (N = layer; Linear weights [out, in]; prefix `vit.` in ViTForImageClassification):
    embeddings.cls_token [1, 1, W]                       -> image/cls
    embeddings.position_embeddings [1, 1 + n, W]         -> image/pos_embedding
    embeddings.patch_embeddings.projection (conv + bias) -> image/embedding
    encoder.layer.N.layernorm_before / layernorm_after   -> image/encoder/block_N/ln_1 / ln_2
    encoder.layer.N.attention.attention.{query,key,value}, attention.output.dense
                                                         -> .../attn/{query,key,value,out}
    encoder.layer.N.intermediate.dense, output.dense     -> .../mlp/fc1, fc2
    layernorm                                            -> image/encoder/encoder_norm
    classifier [C, W] (+ bias)                           -> head
The image tower is HF's exactly: class token, no pre-LayerNorm, exact GELU, pooled output = the
final LayerNorm's class token (`last_hidden_state[:, 0]`), tokens = the patch positions of
`last_hidden_state`. ViTModel's optional pooler (Dense + tanh over the class token, trained only
by some checkpoints' pretraining objective) has no place in vlm_jax's towers: it is left out
and the conversion report says so. A ViTModel converts to a features-only classifier
(`model.num_classes = 0`): `image_features` for linear probes, and `init_from='image=DIR'` for
the image tower of another model (a prefix-LM, a CLIP).
"""
from __future__ import annotations

from vlm_jax.convert import common


def is_vit_config(d: dict) -> bool:
  return d.get("model_type") == "vit"


def fields(d: dict, source: str) -> dict:
  bad = []
  if d.get("hidden_act", "gelu") != "gelu":
    bad.append(f"hidden_act={d['hidden_act']!r} (only 'gelu')")
  if d.get("qkv_bias") is False:
    bad.append("qkv_bias=False")
  if int(d.get("num_channels", 3)) != 3:
    bad.append(f"num_channels={d['num_channels']}")
  if bad:
    raise common.ConversionError(f"convert: {source} uses settings vlm_jax's ViT does not "
                                 f"implement: {'; '.join(bad)}. Nothing was written")
  try:
    w, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    return dict(width=w, depth=int(d["num_hidden_layers"]), num_heads=heads,
                mlp_dim=int(d["intermediate_size"]), image_size=int(d["image_size"]),
                patch_size=int(d["patch_size"]), ln_eps=float(d.get("layer_norm_eps", 1e-12)),
                num_labels=len(d.get("id2label") or {}))
  except KeyError as e:
    raise common.ConversionError(f"convert: {source} lacks the field {e} of a ViT "
                                 "config.json") from e


def convert(state: dict, f: dict, *, source: str, model: str) -> tuple[dict, int, list]:
  """(params, number of classes (0: no head), the checkpoint parts left out)."""
  prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
  dropped = sorted(k for k in state if k.startswith(prefix + "pooler."))
  r = common.StateReader(state, source, ignore=dropped)
  get = lambda name, shape: r.get(prefix + name, shape)
  w, p, mlp, depth = f["width"], f["patch_size"], f["mlp_dim"], f["depth"]
  grid = f["image_size"] // p
  lin = lambda name, n_out, n_in: (get(f"{name}.weight", (n_out, n_in)),
                                   get(f"{name}.bias", (n_out,)))
  norm = lambda name: common.layer_norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  encoder = {}
  for i in range(depth):
    layer = f"encoder.layer.{i}"
    attn = [lin(f"{layer}.attention.attention.{n}", w, w) for n in ("query", "key", "value")]
    attn.append(lin(f"{layer}.attention.output.dense", w, w))
    encoder[f"block_{i}"] = {
        "ln_1": norm(f"{layer}.layernorm_before"),
        "attn": common.attention(*attn, f["num_heads"]),
        "ln_2": norm(f"{layer}.layernorm_after"),
        "mlp": {"fc1": common.dense(*lin(f"{layer}.intermediate.dense", mlp, w)),
                "fc2": common.dense(*lin(f"{layer}.output.dense", w, mlp))}}
  encoder["encoder_norm"] = norm("layernorm")
  emb = "embeddings"
  image = {
      "embedding": {"kernel": common.conv_patch_kernel(
          get(f"{emb}.patch_embeddings.projection.weight", (w, 3, p, p))),
                    "bias": get(f"{emb}.patch_embeddings.projection.bias", (w,))},
      "cls": get(f"{emb}.cls_token", (1, 1, w)).reshape(w),
      "pos_embedding": get(f"{emb}.position_embeddings", (1, grid * grid + 1, w)).reshape(
          grid * grid + 1, w),
      "encoder": encoder}
  params = {"image": image}
  classes = 0
  if r.has("classifier.weight"):
    classes = int(state["classifier.weight"].shape[0])
    params["head"] = common.dense(r.get("classifier.weight", (classes, w)),
                                  r.get("classifier.bias", (classes,)))
  r.check(f"the ViT described by {model}")
  return params, classes, dropped


def to_config(f: dict, classes: int):
  """The `classification` config of a converted ViT (complete, locked)."""
  from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top
  image = {"name": "vit", "variant": f"B/{f['patch_size']}", "image_size": f["image_size"],
           "width": f["width"], "depth": f["depth"], "num_heads": f["num_heads"],
           "mlp_dim": f["mlp_dim"], "act": "gelu", "ln_eps": f["ln_eps"], "use_bias": True,
           "patch_bias": True, "posemb": "learn", "class_token": True, "ln_pre": False,
           "pool": "cls"}
  # ViTImageProcessor: the whole image resized to the square, scaled to [-1, 1].
  data = {"image_size": f["image_size"], "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "train_crop": "resize", "eval_crop": "resize"}
  user = {"task": "classification",
          "model": {"dtype": "auto", "image": image, "num_classes": classes,
                    "head_zero_init": False},
          "data": data, "evals": {"run": "classification" if classes else ""}}
  return config_utils.complete(user, source="convert")
