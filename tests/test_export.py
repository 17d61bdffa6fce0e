"""Export (`vlm_jax.export`) and EMA weights.

Tiny CLIP- and SigLIP-layout models are trained for a few steps on the shapes data with
`ema_decay` set, so both the params and their EMA are real trained checkpoints. Exported to
Hugging Face they are loaded with transformers' own CLIPModel / SiglipModel and must give the
embeddings vlm_jax gives; imported back with `vlm_jax.convert` they must give bitwise the same
params. The OpenCLIP export (open_clip itself cannot be imported here: its package needs
torchvision) is imported back bitwise, and its state dict must equal the test's independent
HF -> OpenAI key mapping applied to the transformers-verified HF export.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from vlm_jax import convert  # pylint: disable=wrong-import-position
from vlm_jax import export  # pylint: disable=wrong-import-position
from vlm_jax import inference  # pylint: disable=wrong-import-position
from vlm_jax import runtime  # pylint: disable=wrong-import-position
from vlm_jax import train  # pylint: disable=wrong-import-position
from vlm_jax import train_state as ts  # pylint: disable=wrong-import-position
from data_fixtures import shapes_data_dir, shapes_tokenizer  # pylint: disable=unused-import,wrong-import-position
from test_convert import hf_to_openai_state, load_converted  # pylint: disable=wrong-import-position
from train_utils import REPO, subprocess_env, tiny_config  # pylint: disable=wrong-import-position

# One worker runs the whole module: its trained runs are built once.
pytestmark = pytest.mark.xdist_group("export")

TOL = 1e-4
EMA = 0.9
# The towers in the originals' layouts (everything else: the tiny shapes config).
CLIP_LAYOUT = {"model.image.class_token": True, "model.image.pool": "cls",
               "model.image.ln_pre": True, "model.image.patch_bias": False,
               "model.text.pool": "last", "model.proj_bias": False,
               "model.image.ln_eps": 1e-5, "model.text.ln_eps": 1e-5}   # OpenCLIP's eps
SIGLIP_LAYOUT = {"model.image.pool": "map", "model.image_proj": False, "model.proj_bias": True,
                 "model.text.pad_id": -1, "model.text.pool": "last", "tokenizer.pad": "eos",
                 "model.image.act": "gelu_tanh", "model.text.act": "gelu_tanh"}


def _train(kind, layout, data_dir, tokenizer, workdir, **extra):
  overrides = {k.replace(".", "__"): v for k, v in layout.items()}
  # A constant schedule: a run stopped at step 2 and resumed to 3 sees the same rates.
  overrides.update(total_steps=3, checkpoint_every_steps=2, ema_decay=EMA,
                   schedule__kind="constant", schedule__warmup_steps=1)
  overrides.update(extra)
  train.train_and_evaluate(tiny_config(kind, data_dir, str(tokenizer), **overrides), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def tokenizer_file(shapes_tokenizer, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "shapes.model"
  shapes_tokenizer.save(str(path))
  return path


@pytest.fixture(scope="module")
def clip_run(shapes_data_dir, tokenizer_file, tmp_path_factory):
  return _train("clip", CLIP_LAYOUT, shapes_data_dir, tokenizer_file,
                tmp_path_factory.mktemp("clip_run"))


@pytest.fixture(scope="module")
def siglip_run(shapes_data_dir, tokenizer_file, tmp_path_factory):
  return _train("siglip", SIGLIP_LAYOUT, shapes_data_dir, tokenizer_file,
                tmp_path_factory.mktemp("siglip_run"))


def _inputs(loaded, n=3, seed=0):
  rng = np.random.default_rng(seed)
  size = int(loaded.config.model.image.image_size)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  texts = ["a red circle", "two blue squares on the left", "a small green triangle"][:n]
  return images, loaded.tokenize(texts)


def _hf_embeddings(folder, images, ids, family):
  cls = transformers.SiglipModel if family == "siglip" else transformers.CLIPModel
  model = cls.from_pretrained(str(folder)).eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _flat(params):
  from vlm_jax.models import layers  # pylint: disable=g-import-not-at-top
  return ckpt_lib.flatten(jax.tree.map(np.asarray, layers.unstack_block_params(
      jax.device_get(params))))


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("ema", [False, True])
def test_hf_export_round_trip(family, ema, clip_run, siglip_run, tmp_path):
  run = clip_run if family == "clip" else siglip_run
  report = export.export(run, "hf", str(tmp_path / "hf"), ema=ema)
  assert report["target"] == ("SiglipModel" if family == "siglip" else "CLIPModel")
  assert report["ema"] == ema and report["step"] == 3
  loaded = inference.load(run, ema=ema)
  images, ids = _inputs(loaded)
  ours = (loaded.encode_images(images), loaded.encode_texts(ids))
  scale, bias = loaded.logit_scale_and_bias()
  ref = _hf_embeddings(tmp_path / "hf", images, ids, family)
  for name, a, b in (("image", ours[0], ref[0]), ("text", ours[1], ref[1]),
                     ("logits", scale * ours[0] @ ours[1].T + bias, ref[2])):
    err = float(np.max(np.abs(a - b)))
    assert err <= TOL, f"{family} {name}: max abs diff {err}"
  # Imported back: bitwise the params that were exported.
  back = convert.convert_checkpoint("hf", str(tmp_path / "hf" / "model.safetensors"),
                                    str(tmp_path / "back"), tokenizer="none")
  want, got = _flat(loaded.params), _flat(load_converted(back)[2])
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if family == "siglip":   # its SentencePiece model travels with it
    assert (tmp_path / "hf" / "spiece.model").exists()


def test_openclip_export_round_trip(clip_run, tmp_path):
  export.export(clip_run, "hf", str(tmp_path / "hf"))
  export.export(clip_run, "openclip", str(tmp_path / "oc"))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
  oc_state = load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
  want = hf_to_openai_state(load_torch(str(tmp_path / "hf" / "model.safetensors")))
  assert sorted(oc_state) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(oc_state[k], v.numpy(), err_msg=k)
  model_cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
  assert model_cfg["text_cfg"]["pool_type"] == "eos" and model_cfg["text_cfg"]["eos_id"] == 3
  (tmp_path / "model_cfg.json").write_text(json.dumps(model_cfg))
  back = convert.convert_checkpoint("openclip", str(tmp_path / "oc" / "open_clip_model.safetensors"),
                                    str(tmp_path / "back"), model=str(tmp_path / "model_cfg.json"),
                                    tokenizer="none")
  want, got = _flat(inference.load(clip_run).params), _flat(load_converted(back)[2])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_unrepresentable_models_are_refused_naming_why(shapes_data_dir, tokenizer_file,
                                                       siglip_run, tmp_path):
  # The shapes demo's CLIP pools its image tokens by their mean: CLIPModel cannot.
  cfg = tiny_config("clip", shapes_data_dir)
  reasons = export.problems(cfg, "hf", tokenizer=object())
  assert any("model.image.pool='gap'" in r for r in reasons)
  # A CoCa's decoder is named; --towers-only exports the two towers and says so.
  coca = tiny_config("coca", shapes_data_dir, model__image__class_token=True,
                     model__image__pool="cls", model__image__patch_bias=False,
                     model__text__pool="last")
  assert any("caption decoder" in r for r in export.problems(coca, "hf", tokenizer=object()))
  assert not export.problems(coca, "hf", tokenizer=object(), towers_only=True)
  # A SigLIP to OpenCLIP: refused before anything is written.
  with pytest.raises(export.ExportError, match="timm"):
    export.export(siglip_run, "openclip", str(tmp_path / "oc"))
  assert not (tmp_path / "oc").exists()
  # The CLI: one error line, exit status 1.
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.export", "--workdir", siglip_run,
                         "--format", "openclip", "--out", str(tmp_path / "oc")],
                        capture_output=True, text=True, env=subprocess_env(1), cwd=REPO,
                        check=False)
  assert proc.returncode == 1 and "timm" in proc.stderr, proc.stderr[-2000:]


# ---- EMA ------------------------------------------------------------------------------------------


def test_ema_decay_warmup():
  d = [float(ts.ema_decay_at(0.99, jax.numpy.int32(n), True)) for n in (0, 1, 90, 10_000)]
  np.testing.assert_allclose(d, [1 / 10, 2 / 11, 91 / 100, 0.99], rtol=1e-6)
  assert float(ts.ema_decay_at(0.99, jax.numpy.int32(0), False)) == pytest.approx(0.99)


def test_ema_follows_the_params_step_by_step(shapes_data_dir, tokenizer_file):
  """The EMA in the state equals the recursion e = d e + (1 - d) p over the params after each
  step, with the warmed-up decay."""
  cfg = tiny_config("clip", shapes_data_dir, str(tokenizer_file), ema_decay=EMA)
  rt = runtime.Runtime.create(cfg)
  state = rt.init_state()
  step_fn = rt.make_step()
  from vlm_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tok = tok_lib.Tokenizer.load(str(tokenizer_file))
  it = pipeline.make_train_iterator(cfg.data, rt.task.train_ops(cfg, tok),
                                    batch_size=cfg.batch_size)
  expected = _flat(state.params)
  np.testing.assert_array_equal(_flat(state.ema_params)["logit_scale"], expected["logit_scale"])
  with rt.context():
    for n in range(3):
      batch = next(it)
      batch = {k: batch[k] for k in ("image", "text")}
      state, _ = step_fn(state, batch)
      d = min(EMA, (1 + n) / (10 + n))
      params = _flat(state.params)
      expected = {k: d * expected[k] + (1 - d) * params[k] for k in expected}
  it.close()
  got = _flat(state.ema_params)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_ema_is_checkpointed_and_restored_exactly(clip_run, shapes_data_dir, tokenizer_file,
                                                  tmp_path):
  """Training 3 steps in one go, or resuming its step-2 checkpoint to 3, ends with the same EMA
  (and params)."""
  import shutil  # pylint: disable=g-import-not-at-top
  resumed = tmp_path / "resumed"
  shutil.copytree(clip_run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "3")
  _train("clip", CLIP_LAYOUT, shapes_data_dir, tokenizer_file, resumed)
  for ema in (False, True):
    want = _flat(inference.load(clip_run, ema=ema).params)
    got = _flat(inference.load(str(resumed), ema=ema).params)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"ema={ema} {k}")
  a, b = _flat(inference.load(clip_run, ema=True).params), _flat(inference.load(clip_run).params)
  assert any(not np.array_equal(a[k], b[k]) for k in a)   # the EMA is not the params
  # evals.use_ema=True makes the EMA what evaluate / predict / inference load.
  config = inference.load_config(inference.locate(clip_run))
  config.evals.use_ema = True
  c = _flat(inference.load(clip_run, config=config).params)
  assert all(np.array_equal(a[k], c[k]) for k in a)


def test_ema_refusals(shapes_data_dir, tokenizer_file, tmp_path):
  plain = tmp_path / "plain"
  cfg = tiny_config("clip", shapes_data_dir, str(tokenizer_file), total_steps=1)
  train.train_and_evaluate(cfg, str(plain))
  with pytest.raises(ValueError, match="no EMA weights"):
    inference.load(str(plain), ema=True)
  with pytest.raises(ValueError, match="no EMA weights"):
    export.export(str(plain), "hf", str(tmp_path / "out"), ema=True)
  # Resuming with EMA switched on / off names the setting.
  more = ml_collections.ConfigDict(cfg.to_dict())
  more.total_steps, more.ema_decay = 2, EMA
  with pytest.raises(ValueError, match="has no EMA weights.*ema_decay is set"):
    train.train_and_evaluate(more, str(plain))
  from vlm_jax import preflight  # pylint: disable=g-import-not-at-top
  cfg.evals.use_ema = True
  assert any("evals.use_ema" in p for p in preflight.trainer_problems(cfg))
  cfg.ema_decay = 1.5
  assert any("ema_decay: 1.5" in p for p in preflight.trainer_problems(cfg))
