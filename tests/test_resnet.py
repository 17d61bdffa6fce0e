"""ResNet towers with BatchNorm: the normalisation and its running statistics against NumPy, the
statistics written by the train step (and never by the optimizer), the same on 8 devices as on
one (global-batch statistics), and an exact resume."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax import tasks
from vlm_jax.models import resnet
from vlm_jax.tasks import base

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, run_steps, tree_equal

pytestmark = pytest.mark.xdist_group("resnet")


def test_batch_norm_train_and_eval_against_numpy():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 5, 6)).astype(np.float32)
  bn = resnet.BatchNorm(momentum=0.9, epsilon=1e-5)
  params = nn.unbox(bn.init(jax.random.key(0), x)["params"])
  y, updates = bn.apply({"params": params}, x, True, mutable=[base.STAT_UPDATES])
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  stats = updates[base.STAT_UPDATES]
  n = 4 * 5 * 5
  np.testing.assert_allclose(stats["running_mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  params = dict(params, running_mean=jnp.asarray(mean), running_var=jnp.asarray(var))
  np.testing.assert_allclose(bn.apply({"params": params}, x, False),
                             (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth,blocks", [(18, 8), (50, 16)])
def test_resnet_shapes_params_and_flops(depth, blocks):
  cfg = config_utils.complete({"task": "classification", "model": {
      "num_classes": 3, "image": {"name": "resnet", "depth": depth, "width": 4,
                                  "image_size": 64}}})
  model = tasks.get(cfg.task).build_model(cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 64, 64, 3)))
  image = variables["params"]["image"]
  assert sum(k.startswith("stage_") for k in image) == blocks
  leaves = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  assert all(isinstance(leaf, nn.Partitioned) for _, leaf in leaves)
  pooled, tokens = jax.eval_shape(
      lambda v, x: model.apply(nn.unbox(v), x, method=lambda m, x: m.image(x)),
      variables, jnp.zeros((2, 64, 64, 3)))
  assert pooled.shape == (2, resnet.width(cfg.model.image))
  assert tokens.shape == (2, resnet.num_tokens(cfg.model.image), pooled.shape[1])
  assert tasks.get(cfg.task).forward_flops(cfg) > 0
  with pytest.raises(ValueError, match="model.image.depth: 26 is not a ResNet depth"):
    resnet.from_config(config_utils.complete({"task": "classification", "model": {
        "image": {"name": "resnet", "depth": 26}}}).model.image)


def _config(shapes_data_dir, **extra):
  o = {"data.data_dir": shapes_data_dir, "batch_size": 16, "progress_bar": False,
       "evals.run": "", "async_checkpointing": False, "model.image.width": 8,
       "model.image.depth": 10,
       "model.text.width": 32, "model.text.depth": 1, "model.text.num_heads": 2,
       "model.text.mlp_dim": 64, "model.embed_dim": 32, "schedule.kind": "constant",
       "schedule.warmup_steps": 0, "optim.lr": 3e-3}
  o.update(extra)
  return config_utils.load_config(os.path.join(REPO, "configs/shapes_resnet_clip.py:tiny"), o)


@pytest.fixture(scope="module")
def batches(shapes_data_dir):
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = _config(shapes_data_dir)
  import tempfile  # pylint: disable=g-import-not-at-top
  tok = runtime.load_tokenizer(cfg, tempfile.mkdtemp())
  ops_ = tasks.get(cfg.task).train_ops(cfg, tok)
  it = pipeline.make_train_iterator(cfg.data, ops_, batch_size=cfg.batch_size)
  out = [{k: next(it)[k] for k in ("image", "text")} for _ in range(2)]
  it.close()
  return cfg, out


def test_statistics_written_by_the_step_and_the_same_on_eight_devices(batches):
  """The train step writes the running statistics the forward pass reports (the optimizer never
  moves them), and 8 devices (data 2, fsdp 2, tensor 2) give the losses and statistics of one:
  the batch statistics are those of the global batch."""
  cfg, data = batches
  from vlm_jax import runtime, sharding  # pylint: disable=g-import-not-at-top
  rt = runtime.Runtime.create(cfg, jax.devices()[:1])
  state = rt.init_state()
  params0 = jax.device_get(state.params)
  step, ref = rt.make_step(), []
  with rt.context():
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    reported = jax.jit(rt.task.forward_fn(rt.model))(
        state.params, sharding.make_global_batch(data[0], rt.mesh), rng)["_stat_updates"]
    for i, b in enumerate(data):
      state, m = step(state, sharding.make_global_batch(b, rt.mesh))
      ref.append(float(m["loss"]))
      if i == 0:
        got = jax.device_get(state.params["image"]["stem_bn"])
        want = jax.device_get(reported["image"]["stem_bn"])
        np.testing.assert_allclose(got["running_mean"], want["running_mean"], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(got["running_var"], want["running_var"], rtol=1e-5)
        assert np.abs(got["running_mean"]).max() > 1e-3     # they moved off their init
        assert not np.allclose(got["scale"], params0["image"]["stem_bn"]["scale"])
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  sharded, hist, _ = run_steps(cfg, data)
  np.testing.assert_allclose([h["loss"] for h in hist], ref, rtol=2e-4)
  path = lambda p: p["image"]["stage_2_block_0"]["bn_1"]["running_var"]
  np.testing.assert_allclose(jax.device_get(path(sharded.params)),
                             jax.device_get(path(state.params)), rtol=1e-4)
  assert "tensor" in str(path(sharded.params).sharding.spec)


def test_resume_is_exact_with_batch_norm(shapes_data_dir, tmp_path):
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  cfg = _config(shapes_data_dir, checkpoint_every_steps=3, total_steps=6, keep_checkpoints=2)
  train.train_and_evaluate(cfg, str(tmp_path / "straight"))
  # The same run stopped after step 3: its checkpoints without the last one.
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  a = inference.load(str(tmp_path / "straight")).params
  b = inference.load(str(tmp_path / "resumed")).params
  assert tree_equal(a, b)
  assert np.abs(np.asarray(a["image"]["stem_bn"]["running_mean"])).max() > 1e-3


# ---- Hugging Face import ------------------------------------------------------------------------


def _hf_resnet(tmp_path, cls, layer_type, depths, hidden_sizes, seed, **kw):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=hidden_sizes, depths=depths,
                                  layer_type=layer_type, **kw)
  model = cls(transformers)(cfg).eval()
  with torch.no_grad():   # statistics and affine terms away from their initial values
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  folder = tmp_path / f"{layer_type}{seed}"
  model.save_pretrained(str(folder), safe_serialization=True)
  return torch, model, folder


@pytest.mark.parametrize("layer_type,depths,hidden_sizes", [
    ("bottleneck", [3, 4, 6, 3], [32, 64, 128, 256]),      # ResNet-50's blocks, width 8
    ("basic", [2, 2, 2, 2], [8, 16, 32, 64]),              # ResNet-18's
])
def test_hf_resnet_model_pooled_features(tmp_path, layer_type, depths, hidden_sizes):
  from vlm_jax import convert, inference  # pylint: disable=g-import-not-at-top
  torch, model, folder = _hf_resnet(tmp_path, lambda t: t.ResNetModel, layer_type, depths,
                                    hidden_sizes, 0)
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert loaded.config.model.image.depth == (50 if layer_type == "bottleneck" else 18)
  x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
  np.testing.assert_allclose(loaded.image_features(x), want[:, :, 0, 0], atol=1e-4, rtol=0)


def test_hf_resnet_classifier_logits_and_refusals(tmp_path):
  from vlm_jax import convert, inference  # pylint: disable=g-import-not-at-top
  torch, model, folder = _hf_resnet(
      tmp_path, lambda t: t.ResNetForImageClassification, "basic", [1, 1, 1, 1], [8, 16, 32, 64],
      1, id2label={0: "circle", 1: "square"}, label2id={"circle": 0, "square": 1})
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert loaded.class_names == ["circle", "square"]
  x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).logits.numpy()
  np.testing.assert_allclose(loaded.context.predict_rows("classify", {"image": x}), want,
                             atol=1e-4, rtol=0)
  # A depth vlm_jax does not build, and v1 downsampling, are named; nothing is written.
  import json  # pylint: disable=g-import-not-at-top
  d = json.loads((folder / "config.json").read_text())
  d.update(depths=[2, 3, 2, 2], downsample_in_bottleneck=True)
  (tmp_path / "c.json").write_text(json.dumps(d))
  with pytest.raises(convert.ConversionError,
                     match=r"depths=\[2, 3, 2, 2\].*downsample_in_bottleneck=True"):
    convert.convert_checkpoint("hf", str(folder / "model.safetensors"), str(tmp_path / "bad"),
                               model=str(tmp_path / "c.json"))
  assert not os.path.exists(tmp_path / "bad")


def test_init_from_a_resnet_of_another_depth_names_both(tmp_path):
  from vlm_jax import convert, runtime  # pylint: disable=g-import-not-at-top
  _, _, folder = _hf_resnet(tmp_path, lambda t: t.ResNetModel, "basic", [1, 1, 1, 1],
                            [8, 16, 32, 64], 2)
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"),
                                   str(tmp_path / "rn10"))
  cfg = config_utils.complete({"task": "classification", "init_from": out, "model": {
      "num_classes": 2, "image": {"name": "resnet", "depth": 18, "width": 8,
                                  "image_size": 224}}})
  rt = runtime.Runtime.create(cfg, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"model.image.depth is 10 but this model's "
                     r"model.image.depth is 18"):
    rt.init_params_from(rt.init_state())
