"""OpenAI CLIP's modified ResNet (RN50, ...): import parity with open_clip's own model code, the
named models against open_clip's model configs, training with BatchNorm, refusals.

Reference: open_clip's `CLIP` with a ResNet image tower, built from an OpenCLIP model config of
unusual sizes (two blocks in stages 2 and 4, an odd attention-pool grid), every weight and
BatchNorm statistic set to random values, saved as a state dict (`torch.save` of tensors) and
converted with `--format openclip`.
"""
import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import openclip_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import config_utils, tasks  # pylint: disable=wrong-import-position
from vlm_jax import convert  # pylint: disable=wrong-import-position
from vlm_jax.convert import configs as arch_lib  # pylint: disable=wrong-import-position
from vlm_jax.models import clip_resnet  # pylint: disable=wrong-import-position

# One worker builds the module fixtures once (xdist would otherwise build them on both).
pytestmark = pytest.mark.xdist_group("clip_resnet")

open_clip_model = openclip_reference.load()
if open_clip_model is None:
  pytest.skip("open_clip is not installed", allow_module_level=True)

MODEL = {"embed_dim": 48, "quick_gelu": True,
         "vision_cfg": {"image_size": 96, "layers": [1, 2, 1, 2], "width": 8, "patch_size": None},
         "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4,
                      "layers": 2}}
TOL = 1e-4


def open_clip_clip(model_json: dict, seed: int = 0):
  torch.manual_seed(seed)
  model = open_clip_model.CLIP(embed_dim=model_json["embed_dim"],
                               vision_cfg=model_json["vision_cfg"],
                               text_cfg=model_json["text_cfg"],
                               quick_gelu=model_json.get("quick_gelu", False))
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
  return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("rn_clip")
  model = open_clip_clip(MODEL)
  torch.save(model.state_dict(), d / "state.pt")
  (d / "model.json").write_text(json.dumps(MODEL))
  out = convert.convert_checkpoint("openclip", str(d / "state.pt"), str(d / "out"),
                                   model=str(d / "model.json"), tokenizer="none")
  return model, d, out


def load_converted(out_dir):
  """(config, model, params) of a converted workdir (no tokenizer fits a 100-id vocabulary)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, "config.json")) as f:
    config = config_utils.config_from_json(f.read())
  state = ocp.PyTreeCheckpointer().restore(os.path.join(out_dir, "checkpoints", "0", "state"))
  return config, tasks.get(config.task).build_model(config), state["params"]


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, 96, 96, 3)).astype(np.float32)
  text = np.zeros((3, 12), np.int32)
  for i, n in enumerate([4, 10, 1]):
    text[i, :n] = rng.integers(1, 99, size=n)
    text[i, n] = 99                           # eos: the largest id, where the tower pools
  return images, text


def test_image_and_text_embeddings_match_open_clip(reference):
  model, _, out = reference
  config, ours, params = load_converted(out)
  assert config.model.image.name == "clip_resnet" and not config.model.image_proj
  assert tuple(config.model.image.blocks) == (1, 2, 1, 2)
  images, text = inputs()
  got = jax.jit(ours.apply)({"params": params}, jnp.asarray(images), jnp.asarray(text))
  with torch.no_grad():
    want_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                    normalize=True).numpy()
    want_text = model.encode_text(torch.from_numpy(text.astype(np.int64)),
                                  normalize=True).numpy()
  for name, a, b in (("image", got["image_embed"], want_image),
                     ("text", got["text_embed"], want_text)):
    err = float(np.max(np.abs(np.asarray(a) - b)))
    assert err <= TOL, f"{name} embeddings: max abs diff {err}"
  assert abs(float(got["logit_scale"]) - float(model.logit_scale.detach().exp())) < 1e-3
  # The tokens a decoder would cross-attend to: the attention pool's outputs at the positions.
  pooled, tokens = jax.jit(lambda p, x: ours.apply({"params": p}, x,
                                                   method=lambda m, x: m.image(x)))(
                                                       params, jnp.asarray(images))
  assert tokens.shape == (3, 9, 48) and pooled.shape == (3, 48)


def test_openai_torchscript_release_format(reference, tmp_path):
  """OpenAI's RN50 files are TorchScript archives: read without torch.jit or unpickling code,
  BatchNorm's integer `num_batches_tracked` included."""
  from test_convert import torchscript_archive  # pylint: disable=g-import-not-at-top
  model, d, _ = reference
  archive = tmp_path / "RN-tiny.pt"
  torchscript_archive(torch.load(d / "state.pt", weights_only=True), archive,
                      text_mask_length=MODEL["text_cfg"]["context_length"])
  out = convert.convert_checkpoint("openclip", str(archive), str(tmp_path / "out"),
                                   model=str(d / "model.json"), tokenizer="none")
  _, ours, params = load_converted(out)
  images, text = inputs(seed=1)
  got = jax.jit(ours.apply)({"params": params}, jnp.asarray(images), jnp.asarray(text))
  with torch.no_grad():
    want = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                              normalize=True).numpy()
  assert float(np.max(np.abs(np.asarray(got["image_embed"]) - want))) <= TOL


def test_named_resnet_models_are_open_clips_model_configs():
  names = [n for n in arch_lib.NAMED_MODELS if n.startswith("RN")]
  assert len(names) == 10
  for name in names:
    assert arch_lib.arch_from_openclip_json(openclip_reference.model_config(name),
                                            name) == arch_lib.NAMED_MODELS[name], name
  # RN50 as vlm_jax builds it: open_clip's image tower weight for weight and statistic for
  # statistic (same sizes), and the same number of numbers in all (our text attention keeps
  # q / k / v apart where open_clip stacks them).
  config = arch_lib.to_config(arch_lib.NAMED_MODELS["RN50-quickgelu"])
  model = tasks.get(config.task).build_model(config)
  abstract = jax.eval_shape(lambda: tasks.get(config.task).init_params(
      model, config, jax.random.key(0)))
  sizes = lambda leaves: sorted(int(np.prod(x.shape)) for x in leaves)
  with torch.device("meta"):
    theirs = open_clip_model.CLIP(**openclip_reference.model_config("RN50-quickgelu"))
  theirs = {k: v for k, v in theirs.state_dict().items()
            if not k.endswith(("num_batches_tracked", "attn_mask"))}
  assert sizes(jax.tree.leaves(abstract["image"])) == sizes(
      v for k, v in theirs.items() if k.startswith("visual."))
  assert sum(sizes(jax.tree.leaves(abstract))) == sum(sizes(theirs.values())) > 100e6


def test_a_different_architecture_or_missing_weights_are_refused(reference, tmp_path):
  _, d, _ = reference
  other = json.loads(json.dumps(MODEL))
  other["vision_cfg"]["layers"] = [1, 2, 2, 1]
  (tmp_path / "other.json").write_text(json.dumps(other))
  with pytest.raises(convert.ConversionError,
                     match=r"vision_blocks: \(1, 2, 1, 2\) in the checkpoint, \(1, 2, 2, 1\)"):
    convert.convert_checkpoint("openclip", str(d / "state.pt"), str(tmp_path / "a"),
                               model=str(tmp_path / "other.json"), tokenizer="none")
  state = torch.load(d / "state.pt", weights_only=True)
  del state["visual.layer2.1.bn2.running_var"]
  torch.save(state, tmp_path / "cut.pt")
  with pytest.raises(convert.ConversionError,
                     match=r"missing keys[\s\S]*visual\.layer2\.1\.bn2\.running_var \[16\]"):
    convert.convert_checkpoint("openclip", str(tmp_path / "cut.pt"), str(tmp_path / "b"),
                               model=str(d / "model.json"), tokenizer="none")
  timm = json.loads(json.dumps(MODEL))
  timm["vision_cfg"]["timm_model_name"] = "resnet50"
  (tmp_path / "timm.json").write_text(json.dumps(timm))
  with pytest.raises(convert.ConversionError, match="unsupported: vision_cfg.timm_model_name"):
    convert.convert_checkpoint("openclip", str(d / "state.pt"), str(tmp_path / "c"),
                               model=str(tmp_path / "timm.json"), tokenizer="none")
  assert not [p for p in ("a", "b", "c") if os.path.exists(tmp_path / p)]


def test_training_mode_reports_every_batch_norm_statistic(reference):
  """In training the tower normalises with the batch's statistics and reports new running
  statistics for every BatchNorm (what the train step writes into the params)."""
  from vlm_jax.tasks import base  # pylint: disable=g-import-not-at-top
  _, _, out = reference
  _, ours, params = load_converted(out)
  images, text = inputs()
  got = jax.jit(lambda p, i, t: base.apply_train(ours, p, i, t, rng=jax.random.key(0)))(
      params, jnp.asarray(images), jnp.asarray(text))
  stats = flax.traverse_util.flatten_dict(got[base.STATS_KEY], sep="/")
  running = {k: v for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()
             if k.endswith(("running_mean", "running_var"))}
  # The stem's 3, the 6 blocks' 3 each and the 4 shortcuts' (first block of each stage).
  assert sorted(stats) == sorted(running) and len(running) == 2 * (3 + 3 * 6 + 4)
  for k, new in stats.items():        # momentum 0.9: a tenth of the way to the batch's
    assert not np.allclose(np.asarray(new), np.asarray(running[k])), k
  # Batch statistics, not the running ones: the embeddings differ from evaluation mode's.
  evaluated = jax.jit(ours.apply)({"params": params}, jnp.asarray(images), jnp.asarray(text))
  assert np.abs(np.asarray(got["image_embed"] - evaluated["image_embed"])).max() > 1e-3
  np.testing.assert_allclose(got["text_embed"], evaluated["text_embed"], atol=1e-6)


def test_init_from_a_resnet_with_other_blocks_names_both(reference):
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  _, _, out = reference
  arch = arch_lib.arch_from_openclip_json(MODEL)
  cfg = arch_lib.to_config(dataclasses.replace(arch, vision_blocks=(1, 2, 2, 2)))
  with cfg.unlocked():
    cfg.init_from = out
  rt = runtime.Runtime.create(cfg, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"model.image.blocks is \(1, 2, 1, 2\) but this model's "
                     r"model.image.blocks is \(1, 2, 2, 2\)"):
    rt.init_params_from(rt.init_state())


def test_config_problems_are_named():
  cfg = clip_resnet.default_config()
  cfg.image_size, cfg.width, cfg.blocks = 100, 7, (1, 2, 3)
  problems = " | ".join(clip_resnet.validate(cfg))
  assert "model.image.image_size: 100 must be a multiple of 32" in problems
  assert "model.image.width: 7 must be an even number" in problems
  assert "model.image.blocks: (1, 2, 3) must be four positive block counts" in problems
