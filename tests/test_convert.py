"""Weight import: numerical parity with PyTorch references, key/shape checking, safe reading.

Reference: a randomly initialised Hugging Face `transformers.CLIPModel` (tiny CLIPConfig), every
weight (LayerNorms and biases included) set to random values so that a wrong mapping cannot hide
behind ones and zeros. It is saved the way Hugging Face saves it (`model.safetensors` +
`config.json`) for `--format hf`. For `--format openclip` the same weights are written as an
OpenAI/OpenCLIP state dict (`.pt`, `torch.save` of plain tensors) through the explicit key
mapping `hf_to_openai_state` below -- open_clip itself cannot be imported here (its package needs
a torchvision build matching the CPU torch), so the OpenAI layout is produced from its
documented key names, and its outputs are those of the HF model.
"""
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from vlm_jax import config_utils  # pylint: disable=wrong-import-position
from vlm_jax import convert  # pylint: disable=wrong-import-position
from vlm_jax import tasks  # pylint: disable=wrong-import-position
from vlm_jax.convert import common  # pylint: disable=wrong-import-position
from data_fixtures import shapes_data_dir  # pylint: disable=unused-import,wrong-import-position

# One worker runs the whole module: its reference models are built once.
pytestmark = pytest.mark.xdist_group("convert")

VOCAB, CONTEXT, IMAGE, PATCH, EMBED = 100, 16, 32, 8, 32
TOL = 1e-4

ARCHS = {
    # OpenAI-like: QuickGELU everywhere.
    "quick_gelu": dict(act="quick_gelu", vision=(64, 2, 4, 128), text=(48, 2, 2, 96)),
    # OpenCLIP/LAION-like: exact GELU, different widths / heads / depths per tower.
    "gelu": dict(act="gelu", vision=(48, 1, 3, 96), text=(64, 3, 4, 160)),
}


def hf_config(name, vocab=VOCAB):
  a = ARCHS[name]
  vw, vd, vh, vm = a["vision"]
  tw, td, th, tm = a["text"]
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=tw, num_hidden_layers=td,
                       num_attention_heads=th, intermediate_size=tm,
                       max_position_embeddings=CONTEXT, hidden_act=a["act"],
                       bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
      vision_config=dict(hidden_size=vw, num_hidden_layers=vd, num_attention_heads=vh,
                         intermediate_size=vm, image_size=IMAGE, patch_size=PATCH,
                         hidden_act=a["act"]),
      projection_dim=EMBED)


def openclip_model_json(name):
  """The same architecture as an OpenCLIP model config (model_configs/*.json format)."""
  a = ARCHS[name]
  vw, vd, vh, vm = a["vision"]
  tw, td, th, tm = a["text"]
  return {"embed_dim": EMBED, "quick_gelu": a["act"] == "quick_gelu",
          "vision_cfg": {"image_size": IMAGE, "layers": vd, "width": vw, "patch_size": PATCH,
                         "head_width": vw // vh, "mlp_ratio": vm / vw},
          "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": tw, "heads": th,
                       "layers": td, "mlp_ratio": tm / tw}}


def random_hf_model(name, seed=0, vocab=VOCAB):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config(name, vocab)).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname and pname.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif pname == "logit_scale":
        p.fill_(math.log(20.0))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def hf_to_openai_state(hf_state):
  """Hugging Face CLIPModel keys -> OpenAI/OpenCLIP keys (the inverse of what users convert)."""
  out = {}
  h = lambda k: hf_state[k].detach().clone()
  for tower, src, dst in (("vision", "vision_model.encoder.layers", "visual.transformer.resblocks"),
                          ("text", "text_model.encoder.layers", "transformer.resblocks")):
    layers = {int(k.split(".")[3]) for k in hf_state if k.startswith(src + ".")}
    for i in layers:
      s, d = f"{src}.{i}", f"{dst}.{i}"
      out[f"{d}.attn.in_proj_weight"] = torch.cat(
          [h(f"{s}.self_attn.{n}_proj.weight") for n in "qkv"])
      out[f"{d}.attn.in_proj_bias"] = torch.cat([h(f"{s}.self_attn.{n}_proj.bias") for n in "qkv"])
      for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                   ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{d}.{a}.weight"] = h(f"{s}.{b}.weight")
        out[f"{d}.{a}.bias"] = h(f"{s}.{b}.bias")
  e = "vision_model.embeddings"
  out["visual.conv1.weight"] = h(f"{e}.patch_embedding.weight")
  out["visual.class_embedding"] = h(f"{e}.class_embedding")
  out["visual.positional_embedding"] = h(f"{e}.position_embedding.weight")
  for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"),
               ("visual.ln_post", "vision_model.post_layernorm"),
               ("ln_final", "text_model.final_layer_norm")):
    out[f"{a}.weight"], out[f"{a}.bias"] = h(f"{b}.weight"), h(f"{b}.bias")
  out["visual.proj"] = h("visual_projection.weight").T.contiguous()
  out["token_embedding.weight"] = h("text_model.embeddings.token_embedding.weight")
  out["positional_embedding"] = h("text_model.embeddings.position_embedding.weight")
  out["text_projection"] = h("text_projection.weight").T.contiguous()
  out["logit_scale"] = h("logit_scale")
  return out


def random_inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  text = np.zeros((batch, CONTEXT), np.int32)
  for i, n in enumerate([5, CONTEXT - 2, 1][:batch]):
    text[i, 0] = VOCAB - 2
    text[i, 1:1 + n] = rng.integers(1, VOCAB - 2, size=n)
    text[i, 1 + n] = VOCAB - 1
  text[0, 2] = 0   # id 0 inside the text (OpenAI's '!' symbol) must not be treated as padding
  return images, text


def hf_outputs(model, images, text):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(text.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy())


def load_converted(out_dir):
  """(config, model, params) from a converted workdir: config.json + the Orbax 'state' item."""
  with open(os.path.join(out_dir, "config.json")) as f:
    config = config_utils.config_from_json(f.read())
  model = tasks.get(config.task).build_model(config)
  state = ocp.PyTreeCheckpointer().restore(os.path.join(out_dir, "checkpoints", "0", "state"))
  assert int(state["step"]) == 0
  return config, model, jax.tree.map(np.asarray, state["params"])


_JITTED = {}


def our_outputs(model, params, images, text):
  # One compiled function per model definition (Linen modules are hashable dataclasses), shared
  # by the tests that convert the same architecture from different formats.
  if model not in _JITTED:
    _JITTED[model] = jax.jit(model.apply)
  out = _JITTED[model]({"params": params}, jnp.asarray(images), jnp.asarray(text))
  logits = out["logit_scale"] * out["image_embed"] @ out["text_embed"].T
  return np.asarray(out["image_embed"]), np.asarray(out["text_embed"]), np.asarray(logits)


def assert_parity(ours, ref):
  for name, a, b in zip(("image_embed", "text_embed", "logits"), ours, ref):
    assert a.shape == b.shape, name
    err = float(np.max(np.abs(a - b)))
    assert err <= TOL, f"{name}: max abs diff {err}"


_REFERENCES = {}


def make_reference(name, tmp_path_factory):
  """(arch name, HF model, dir with model.safetensors + config.json, OpenAI-layout .pt, OpenCLIP
  model json, {format: converted workdir}); built once per arch for the module."""
  if name not in _REFERENCES:
    model = random_hf_model(name)
    d = tmp_path_factory.mktemp(f"hf_{name}")
    model.save_pretrained(str(d))
    assert os.path.exists(d / "model.safetensors")
    pt = d / "openai_state.pt"
    torch.save(hf_to_openai_state(model.state_dict()), pt)
    model_json = d / "openclip_model.json"
    model_json.write_text(json.dumps(openclip_model_json(name)))
    converted = {
        # Random-init models of a 100-id vocabulary: no tokenizer fits them.
        "hf": convert.convert_checkpoint("hf", str(d / "model.safetensors"), str(d / "out_hf"),
                                         tokenizer="none"),
        "openclip": convert.convert_checkpoint("openclip", str(pt), str(d / "out_openclip"),
                                               model=str(model_json), tokenizer="none"),
    }
    _REFERENCES[name] = (name, model, d, pt, model_json, converted)
  return _REFERENCES[name]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def reference(request, tmp_path_factory):
  return make_reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def one_reference(tmp_path_factory):
  """For the checks that do not depend on the architecture."""
  return make_reference("quick_gelu", tmp_path_factory)


def test_hf_parity(reference):
  name, model, _, _, _, converted = reference
  config, ours, params = load_converted(converted["hf"])
  assert config.model.image.act == config.model.text.act == name
  assert config.model.text.pool == "eos" and config.model.image.pool == "cls"
  images, text = random_inputs()
  assert_parity(our_outputs(ours, params, images, text), hf_outputs(model, images, text))
  outputs = _JITTED[ours]({"params": params}, jnp.asarray(images), jnp.asarray(text))
  assert abs(float(outputs["logit_scale"]) - 20.0) < 1e-4
  assert float(outputs["logit_bias"]) == 0.0
  with open(os.path.join(converted["hf"], "conversion.json")) as f:
    assert json.load(f)["format"] == "hf"


def test_init_from_reads_the_converted_params(one_reference):
  """`train --config.init_from=OUT` reads params with Checkpointer.restore_params."""
  out = one_reference[-1]["hf"]
  config, model, params = load_converted(out)
  size, length = config.model.image.image_size, config.model.text.context_length
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          flax.linen.unbox(abstract["params"]))
  source = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), read_only=True,
                                 async_save=False)
  try:
    flat, messages = source.restore_params(None, abstract)
  finally:
    source.close()
  assert not messages, messages
  expected = flax.traverse_util.flatten_dict(params, sep="/")
  assert sorted(flat) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), v)


def test_openclip_parity(reference):
  _, model, _, _, _, converted = reference
  _, ours, params = load_converted(converted["openclip"])
  images, text = random_inputs(seed=1)
  assert_parity(our_outputs(ours, params, images, text), hf_outputs(model, images, text))


def test_pad_id_zero_would_break_parity(one_reference):
  """Why converted configs set text.pad_id=-1: OpenAI CLIP never masks id 0, a real token."""
  _, model, _, _, _, converted = one_reference
  config, _, params = load_converted(converted["hf"])
  images, text = random_inputs()
  config.model.text.pad_id = 0
  masked = tasks.get(config.task).build_model(config)
  _, text_embed, _ = our_outputs(masked, params, images, text)
  _, ref_text, _ = hf_outputs(model, images, text)
  assert np.max(np.abs(text_embed[0] - ref_text[0])) > 1e-3    # row 0 holds an id 0
  np.testing.assert_allclose(text_embed[1:], ref_text[1:], atol=TOL)


# ---- architecture / keys / file errors: a clear message, nothing written -----------------------


def _assert_nothing_written(tmp_path, out):
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], os.listdir(tmp_path)


def test_other_architecture_is_refused(one_reference, tmp_path):
  _, _, d, pt, _, _ = one_reference
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError, match=r"different architecture than ViT-B-32"
                     r"(.|\n)*vision_width: \d+ in the checkpoint, 768 in ViT-B-32"):
    convert.convert_checkpoint("openclip", str(pt), str(out), model="ViT-B-32")
  _assert_nothing_written(tmp_path, out)
  # Wrong format for the file.
  with pytest.raises(convert.ConversionError, match="use --format hf"):
    convert.convert_checkpoint("openclip", str(d / "model.safetensors"), str(out),
                               model="ViT-B-32")
  with pytest.raises(convert.ConversionError, match="use --format openclip"):
    convert.convert_checkpoint("hf", str(pt), str(out), model=str(d / "config.json"),
                               tokenizer="none")
  _assert_nothing_written(tmp_path, out)


def test_wrong_model_description_is_refused(reference, tmp_path):
  name, _, _, pt, _, _ = reference
  desc = openclip_model_json(name)
  desc["vision_cfg"]["layers"] += 1
  path = tmp_path / "wrong.json"
  path.write_text(json.dumps(desc))
  with pytest.raises(convert.ConversionError, match="vision_layers: \\d+ in the checkpoint"):
    convert.convert_checkpoint("openclip", str(pt), str(tmp_path / "out"), model=str(path),
                               tokenizer="none")


def test_missing_unexpected_and_mismatched_keys_are_reported(one_reference):
  name, _, _, pt, _, _ = one_reference
  arch = convert.configs.arch_from_openclip_json(openclip_model_json(name))
  state = common.read_checkpoint(str(pt))
  state.pop("visual.ln_pre.bias")
  state["transformer.resblocks.0.mlp.c_fc.bias"] = np.zeros((3,), np.float32)
  state["visual.extra_head.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state(state, "openclip", arch, source="x.pt", model="tiny")
  msg = str(e.value)
  assert "missing keys (1):\n    visual.ln_pre.bias" in msg
  assert "transformer.resblocks.0.mlp.c_fc.bias: [3] in the checkpoint, expected" in msg
  assert "unexpected keys (1):\n    visual.extra_head.weight" in msg


def test_malformed_files(tmp_path):
  out = tmp_path / "out"
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
  with pytest.raises(convert.ConversionError, match="not a safetensors file"):
    convert.convert_checkpoint("hf", str(bad), str(out), model="ViT-B-32")
  # A valid header whose tensor lies beyond the end of the file (truncated download).
  header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
  trunc = tmp_path / "trunc.safetensors"
  trunc.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)
  with pytest.raises(convert.ConversionError, match="truncated or corrupt"):
    convert.convert_checkpoint("hf", str(trunc), str(out), model="ViT-B-32")
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(b"this is not a checkpoint" * 10)
  with pytest.raises(convert.ConversionError, match="not a (readable )?PyTorch checkpoint"):
    convert.convert_checkpoint("openclip", str(garbage), str(out), model="ViT-B-32")
  torch.save({"a": torch.ones(3)}, tmp_path / "ok.pt")
  data = (tmp_path / "ok.pt").read_bytes()
  (tmp_path / "half.pt").write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match="truncated or corrupt"):
    convert.convert_checkpoint("openclip", str(tmp_path / "half.pt"), str(out), model="ViT-B-32")
  (tmp_path / "bad.npy").write_bytes(b"x")
  with pytest.raises(convert.ConversionError, match="unknown checkpoint type"):
    convert.convert_checkpoint("openclip", str(tmp_path / "bad.npy"), str(out), model="ViT-B-32")
  (tmp_path / "bad.npz").write_bytes(b"x")
  with pytest.raises(convert.ConversionError, match="not a readable .npz archive"):
    convert.convert_checkpoint("big_vision", str(tmp_path / "bad.npz"), str(out))
  with pytest.raises(FileNotFoundError):
    convert.convert_checkpoint("hf", str(tmp_path / "absent.safetensors"), str(out),
                               model="ViT-B-32")
  _assert_nothing_written(tmp_path, out)


class _Payload:
  """Unpickling this would run code; the reader must refuse before that can happen."""
  def __reduce__(self):
    return (os.system, ("echo pwned > " + os.environ.get("PWNED_MARKER", "/dev/null"),))


def torchscript_archive(state, path, *, text_mask_length=0):
  """Writes `state` as a TorchScript archive (the format of OpenAI's original release): a module
  tree whose attribute paths are the keys; text blocks carry OpenAI's causal `attn_mask`."""
  class Node(torch.nn.Module):
    def forward(self, x):
      return x
  root = Node()
  for key, value in state.items():
    *parents, leaf = key.split(".")
    node = root
    for p in parents:
      if not hasattr(node, p):
        node.add_module(p, Node())
      node = getattr(node, p)
    node.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(),
                                                     requires_grad=False))
  if text_mask_length:
    mask = torch.full((text_mask_length,) * 2, float("-inf")).triu(1)
    for name, module in root.named_modules():
      if name.startswith("transformer.resblocks.") and name.count(".") == 2:
        module.register_buffer("attn_mask", mask.clone())
  torch.jit.trace(root, torch.zeros(1)).save(str(path))


def test_torchscript_parity(one_reference, tmp_path):
  """OpenAI's original TorchScript release format, read without torch.jit or unpickling code."""
  _, model, _, pt, model_json, _ = one_reference
  archive = tmp_path / "ViT-tiny.pt"
  torchscript_archive(torch.load(pt, weights_only=True), archive, text_mask_length=CONTEXT)
  state = common.read_checkpoint(str(archive))
  assert "transformer.resblocks.0.attn_mask" in state and "visual.conv1.weight" in state
  out = convert.convert_checkpoint("openclip", str(archive), str(tmp_path / "out"),
                                   model=str(model_json), tokenizer="none")
  _, ours, params = load_converted(out)
  images, text = random_inputs(seed=2)
  assert_parity(our_outputs(ours, params, images, text), hf_outputs(model, images, text))


def test_torchscript_reader_dtypes_and_strides(tmp_path):
  state = {"a.w16": torch.randn(3, 4).half(), "a.wbf16": torch.randn(5).bfloat16(),
           "b.wt": torch.randn(4, 6).T, "b.c.w0": torch.tensor(1.5),
           "b.c.ids": torch.arange(7)}
  path = tmp_path / "dtypes.pt"
  torchscript_archive(state, path)
  got = common.read_checkpoint(str(path))
  assert sorted(got) == sorted(state)
  for k, v in state.items():
    expected = v.float().numpy() if v.is_floating_point() else v.numpy()
    np.testing.assert_array_equal(got[k], expected, err_msg=k)
  # A corrupted archive: a storage record cut short.
  import zipfile  # pylint: disable=g-import-not-at-top
  broken = tmp_path / "broken.pt"
  with zipfile.ZipFile(path) as zin, zipfile.ZipFile(broken, "w") as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      if "/data/" in item.filename and "/.data/" not in item.filename:
        data = data[:2]
      zout.writestr(item, data)
  with pytest.raises(convert.ConversionError, match="truncated or corrupt|overruns"):
    common.read_checkpoint(str(broken))


def test_pickled_objects_are_refused(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  monkeypatch.setenv("PWNED_MARKER", str(marker))
  evil = tmp_path / "evil.pt"
  torch.save({"visual.conv1.weight": torch.zeros(2), "payload": _Payload()}, evil)
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError,
                     match=r"refusing to load .*evil\.pt: it contains pickled objects"):
    convert.convert_checkpoint("openclip", str(evil), str(out), model="ViT-B-32")
  assert not marker.exists()
  _assert_nothing_written(tmp_path, out)
  # A TorchScript archive whose data.pkl references a global other than modules and tensors.
  import zipfile  # pylint: disable=g-import-not-at-top
  torchscript_archive({"visual.conv1.weight": torch.zeros(2)}, tmp_path / "ts.pt")
  evil_ts = tmp_path / "evil_ts.pt"
  payload = pickle.dumps(_Payload(), protocol=2)
  with zipfile.ZipFile(tmp_path / "ts.pt") as zin, zipfile.ZipFile(evil_ts, "w") as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      zout.writestr(item, payload if item.filename.endswith("/data.pkl") else data)
  with pytest.raises(convert.ConversionError,
                     match=r"refusing to load .*evil_ts\.pt: .*unsupported global posix\.system"):
    convert.convert_checkpoint("openclip", str(evil_ts), str(out), model="ViT-B-32")
  assert not marker.exists()
  _assert_nothing_written(tmp_path, out)


def test_refusals_say_what_the_file_is(tmp_path, monkeypatch):
  import tarfile  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "pwned"
  monkeypatch.setenv("PWNED_MARKER", str(marker))
  for protocol in (0, 1):
    old = tmp_path / f"p{protocol}.pt"
    old.write_bytes(pickle.dumps(_Payload(), protocol=protocol))
    with pytest.raises(convert.ConversionError,
                       match=rf"refusing to load .*p{protocol}\.pt: it is a plain pickle "
                             rf"\(protocol {protocol}\), not a PyTorch checkpoint"):
      common.read_checkpoint(str(old))
  legacy = tmp_path / "legacy.pt"        # torch < 0.4 wrote checkpoints as tar archives
  with tarfile.open(legacy, "w") as tar:
    for name in ("sys_info", "pickle", "storages", "tensors"):
      data = pickle.dumps(_Payload(), protocol=2)
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with pytest.raises(convert.ConversionError,
                     match=r"refusing to load .*legacy\.pt: it is a legacy PyTorch \.tar "
                           r"checkpoint"):
    common.read_checkpoint(str(legacy))
  # A TorchScript archive whose module holds no tensor and whose constants.pkl holds the payload.
  torchscript_archive({}, tmp_path / "empty_ts.pt")
  evil = tmp_path / "constants_only.pt"
  with zipfile.ZipFile(tmp_path / "empty_ts.pt") as zin, zipfile.ZipFile(evil, "w") as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      if item.filename.endswith("/constants.pkl"):
        data = pickle.dumps(_Payload(), protocol=2)
      zout.writestr(item, data)
  with pytest.raises(convert.ConversionError,
                     match=r"constants_only\.pt: a TorchScript archive whose module holds no "
                           r"tensors \(its constants.pkl and code are never read"):
    common.read_checkpoint(str(evil))
  assert not marker.exists()


def test_out_dir_is_never_overwritten(one_reference, tmp_path):
  _, _, d, _, _, _ = one_reference
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(convert.ConversionError, match="already exists"):
    convert.convert_checkpoint("hf", str(d / "model.safetensors"), str(out))
  assert os.listdir(out) == ["keep.txt"]


def test_safetensors_reader_matches_the_library(tmp_path):
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(),
             "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
             "scalar": torch.tensor(2.5)}
  path = tmp_path / "t.safetensors"
  safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
  state = common.read_checkpoint(str(path))
  assert sorted(state) == sorted(tensors)
  for k, v in tensors.items():
    expected = v.float().numpy() if v.is_floating_point() else v.numpy()
    np.testing.assert_array_equal(state[k], expected)
    assert state[k].dtype == (np.float32 if v.is_floating_point() else np.int64)


def test_named_models():
  b32 = convert.NAMED_MODELS["ViT-B-32-quickgelu"]
  assert (b32.vision_width, b32.vision_heads, b32.patch_size, b32.embed_dim) == (768, 12, 32, 512)
  assert (b32.vision_act, convert.NAMED_MODELS["ViT-B-32"].vision_act) == ("quick_gelu", "gelu")
  l14 = convert.NAMED_MODELS["ViT-L-14"]
  assert (l14.vision_width, l14.vision_layers, l14.vision_heads, l14.text_heads) == \
      (1024, 24, 16, 12)
  config = convert.configs.to_config(convert.NAMED_MODELS["ViT-B-16-quickgelu"])
  m = config.model
  assert (m.image.class_token, m.image.ln_pre, m.image.pool, m.image.ln_eps) == \
      (True, True, "cls", 1e-5)
  assert (m.text.vocab_size, m.text.context_length, m.text.pool, m.text.causal) == \
      (49408, 77, "eos", True)
  assert config.tokenizer.kind == "bpe"
  # The full-size model builds (shapes only) from the written config.
  task = tasks.get(config.task)
  model = task.build_model(config)
  shapes = jax.eval_shape(lambda: task.init_params(model, config, jax.random.key(0)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(flax.linen.unbox(shapes)))
  assert 149_000_000 < n < 150_000_000    # ViT-B/16 CLIP: 149.6M parameters


def test_cli(one_reference, tmp_path):
  _, _, d, _, _, _ = one_reference
  out = tmp_path / "cli_out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ok = subprocess.run([sys.executable, "-m", "vlm_jax.convert", "--format", "hf",
                       "--checkpoint", str(d / "model.safetensors"), "--out", str(out),
                       "--tokenizer", "none"],
                      capture_output=True, text=True, env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert os.path.exists(out / "config.json") and os.path.isdir(out / "checkpoints" / "0")
  bad = subprocess.run([sys.executable, "-m", "vlm_jax.convert", "--format", "openclip",
                        "--model", "ViT-B-32", "--checkpoint", str(d / "model.safetensors"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env,
                       timeout=120)
  assert bad.returncode == 1 and "use --format hf" in bad.stderr
  assert not os.path.exists(tmp_path / "x")


# ---- OpenAI preprocessing ----------------------------------------------------------------------


def test_openai_preprocessing_matches_transformers():
  pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import openai_preprocess  # pylint: disable=g-import-not-at-top
  proc = pil_clip.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  for h, w in [(48, 64), (70, 50), (32, 32), (100, 33), (57, 40)]:
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    ref = proc(images=[Image.fromarray(arr)], return_tensors="np").pixel_values[0]
    ours = openai_preprocess.preprocess(arr, 32)
    np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-5, err_msg=f"{h}x{w}")
  # Crop offset 7.5 rounds half to even (torchvision), not down: 40x59 -> 32x47, top = 8.
  arr = rng.integers(0, 256, size=(59, 40, 3), dtype=np.uint8)
  resized = Image.fromarray(arr).resize((32, 47), Image.BICUBIC)
  expected = np.asarray(resized, np.float32)[8:40] / 255
  got = openai_preprocess.preprocess(arr, 32, mean=(0, 0, 0), std=(1, 1, 1))
  np.testing.assert_allclose(got, expected, atol=1e-6)


# ---- end to end: convert with the BPE tokenizer, then `python -m vlm_jax.evaluate` -------------


@pytest.mark.slow
def test_converted_checkpoint_runs_through_evaluate(tmp_path, shapes_data_dir):
  import gzip  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
  # A BPE vocabulary (OpenAI file format) whose size the tiny model's vocabulary matches.
  merges = [("c", "i"), ("ci", "r"), ("l", "e</w>"), ("s", "q"), ("r", "e"), ("t", "h"),
            ("th", "e</w>"), ("a", "n"), ("o", "n")]
  vocab_file = tmp_path / "bpe_vocab.txt.gz"
  with gzip.open(vocab_file, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
  model = random_hf_model("quick_gelu", seed=3, vocab=512 + len(merges) + 2)
  model.save_pretrained(str(tmp_path / "hf"))
  out = tmp_path / "converted"
  convert.convert_checkpoint("hf", str(tmp_path / "hf" / "model.safetensors"), str(out),
                             tokenizer=str(vocab_file))
  assert (out / "tokenizer.model").read_bytes() == vocab_file.read_bytes()

  # Point the saved config's eval at the shapes test split.
  config = json.loads((out / "config.json").read_text())
  config["data"].update(name="shapes/tiny", data_dir=shapes_data_dir, eval_split="test")
  config["evals"].update(run="zeroshot", batch_size=64)
  (out / "config.json").write_text(json.dumps(config))

  # The tokenizer travels with the checkpoint: same ids as the BPE file, then HF parity.
  loaded = inference.load(str(out))
  assert isinstance(loaded.tokenizer, bpe.BPETokenizer)
  ids = loaded.tokenize(["a red circle.", "the blue square on the left!"])
  ref = bpe.load(vocab_file).encode(["a red circle.", "the blue square on the left!"], CONTEXT)
  np.testing.assert_array_equal(ids, ref)
  with torch.no_grad():
    ref_text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  ref_text = ref_text.pooler_output if hasattr(ref_text, "pooler_output") else ref_text
  ref_text = torch.nn.functional.normalize(ref_text, dim=-1).numpy()
  np.testing.assert_allclose(loaded.encode_texts(ids), ref_text, atol=TOL)

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", f"--workdir={out}"],
                        capture_output=True, text=True, env=env, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 0
  top1 = metrics["zeroshot/shapes/top1"]
  assert 0.0 <= top1 <= 1.0
  assert (out / "eval" / "metrics_0.json").exists()


# ---- the tokenizer a converted workdir carries -------------------------------------------------


def _tiny_clip_vocab(folder):
  """OpenAI-format merges of a tiny vocabulary, and the same tokenizer as Hugging Face files
  (vocab.json + merges.txt -> CLIPTokenizerFast's tokenizer.json)."""
  import gzip  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
  merges = [("c", "i"), ("ci", "r"), ("l", "e</w>"), ("s", "q"), ("r", "e"), ("t", "h"),
            ("th", "e</w>"), ("a", "n"), ("o", "n")]
  os.makedirs(folder, exist_ok=True)
  gz = os.path.join(folder, "bpe_vocab.txt.gz")
  with gzip.open(gz, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
  encoder = dict(bpe.load(gz)._encoder)  # pylint: disable=protected-access
  # The same two special ids under Hugging Face's names.
  for ours, theirs in zip(bpe._SPECIALS, ("<|startoftext|>", "<|endoftext|>")):  # pylint: disable=protected-access
    encoder[theirs] = encoder.pop(ours)
  hf_dir = os.path.join(folder, "hf_tok")
  os.makedirs(hf_dir)
  with open(os.path.join(hf_dir, "vocab.json"), "w") as f:
    json.dump(encoder, f)
  with open(os.path.join(hf_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  transformers.CLIPTokenizerFast(os.path.join(hf_dir, "vocab.json"),
                                 os.path.join(hf_dir, "merges.txt")).save_pretrained(hf_dir)
  return gz, os.path.join(hf_dir, "tokenizer.json"), len(encoder)


def test_init_from_warns_of_fields_that_change_the_function(one_reference):
  """Fine-tuning converted OpenAI weights with a config whose activation or padding id differs
  loads every param but computes another function: each such field is named, with the value
  that keeps the checkpoint's; precision, memory and kernel settings are not."""
  import copy  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  out = one_reference[-1]["hf"]
  loc = ckpt_lib.locate(out, field="init_from")
  saved = inference.load_config(loc)
  assert runtime.function_differences(saved, loc, "", out) == []
  ours = copy.deepcopy(saved)
  ours.model.image.act = "gelu"                 # the checkpoint's is OpenAI's quick_gelu
  ours.model.text.pad_id = 0                    # converted: -1 (OpenAI never masks padding)
  ours.model.scan, ours.model.remat, ours.model.dtype = True, True, "bfloat16"
  messages = runtime.function_differences(ours, loc, "", out)
  assert len(messages) == 2, messages
  assert "model.image.act is 'gelu' here but 'quick_gelu' in the checkpoint's config" in messages[0]
  assert "--config.model.image.act=quick_gelu" in messages[0]
  assert "model.text.pad_id is 0 here but -1" in messages[1]
  # With a subtree entry (init_from=image=DIR) only that tower is compared.
  assert len(runtime.function_differences(ours, loc, "image", out)) == 1


def test_convert_takes_the_tokenizer_beside_a_hf_checkpoint(tmp_path):
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import bpe  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  gz, tokenizer_json, vocab = _tiny_clip_vocab(str(tmp_path / "vocab"))
  model = random_hf_model("quick_gelu", seed=4, vocab=vocab)
  model.save_pretrained(str(tmp_path / "hf"))
  shutil.copy(tokenizer_json, tmp_path / "hf" / "tokenizer.json")   # as a HF model folder has it
  assert convert.find_tokenizer("hf", str(tmp_path / "hf" / "model.safetensors")) == (
      "hf", str(tmp_path / "hf"))
  out = convert.convert_checkpoint("hf", str(tmp_path / "hf" / "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert isinstance(loaded.tokenizer, hf_tokenizer.HFTokenizer)
  assert loaded.config.tokenizer.kind == "hf"
  texts = ["a red circle.", "the blue square on the left!"]
  # Hugging Face's CLIP tokenizer files give OpenAI's ids.
  np.testing.assert_array_equal(loaded.tokenize(texts), bpe.load(gz).encode(texts, CONTEXT))


def test_hf_export_writes_the_bpe_tokenizer_transformers_loads(tmp_path):
  """An OpenAI-BPE CLIP exported to Hugging Face brings its tokenizer as CLIPTokenizer files:
  AutoTokenizer gives our ids (up to the eos; it pads with the eos), and CLIPModel on those ids
  gives our text embeddings."""
  from vlm_jax import export  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  gz, _, vocab = _tiny_clip_vocab(str(tmp_path / "vocab"))
  random_hf_model("quick_gelu", seed=5, vocab=vocab).save_pretrained(str(tmp_path / "hf"))
  run = convert.convert_checkpoint("hf", str(tmp_path / "hf" / "model.safetensors"),
                                   str(tmp_path / "run"), tokenizer=gz)
  loaded = inference.load(run)
  assert loaded.config.tokenizer.kind == "bpe"
  report = export.export(run, "hf", str(tmp_path / "exported"))
  assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(report["tokenizer_files"])

  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
  texts = ["the red circle.", "an orange square on the left!", "There circle " * 9, "é ü!"]
  ours = loaded.tokenize(texts)
  theirs = np.asarray(hf_tokenizer(texts, padding="max_length", max_length=CONTEXT,
                                   truncation=True)["input_ids"])
  eos = int(ours[0].max())
  assert theirs.shape == ours.shape
  for mine, hf_row in zip(ours, theirs):
    end = list(mine).index(eos) + 1
    assert list(hf_row[:end]) == list(mine[:end]), (hf_row, mine)
    assert set(hf_row[end:].tolist()) <= {eos}
  hf_model = transformers.CLIPModel.from_pretrained(str(tmp_path / "exported")).eval()
  images = np.zeros((len(texts), IMAGE, IMAGE, 3), np.float32)
  _, hf_text, _ = hf_outputs(hf_model, images, theirs)
  np.testing.assert_allclose(loaded.encode_texts(ours), hf_text, atol=1e-4)


def test_convert_without_a_tokenizer_fails_before_reading(one_reference, tmp_path, monkeypatch):
  _, _, d, pt, model_json, _ = one_reference
  # Without --tokenizer the CLIP vocabulary inside an installed open_clip is the default...
  found = convert.installed_clip_bpe()
  assert found is not None and found.endswith(convert.CLIP_BPE_FILE)
  assert convert.find_tokenizer("openclip", str(pt)) == ("bpe", found)
  # ... which cannot serve a 100-id model: the error names both sizes.
  with pytest.raises(convert.ConversionError, match=r"has 49408 ids but the model's vocabulary "
                                                    r"is 100"):
    convert.convert_checkpoint("openclip", str(pt), str(tmp_path / "a"), model=str(model_json))
  # With none to be found, the conversion stops at once, says what to pass, writes nothing.
  monkeypatch.setattr(convert, "installed_clip_bpe", lambda: None)

  def refuse(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the tokenizer was found")
  monkeypatch.setattr(convert, "read_checkpoint", refuse)
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError, match="pass --tokenizer: OpenAI CLIP's "
                                                    "bpe_simple_vocab_16e6.txt.gz"):
    convert.convert_checkpoint("openclip", str(pt), str(out), model=str(model_json))
  _assert_nothing_written(tmp_path, out)
  with pytest.raises(convert.ConversionError, match="--tokenizer .*missing.json does not exist"):
    convert.convert_checkpoint("hf", str(d / "model.safetensors"), str(out),
                               tokenizer=str(tmp_path / "missing.json"))
