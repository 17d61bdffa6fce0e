"""Hugging Face GPT2LMHeadModel / LlamaForCausalLM import: next-token logits equal transformers'
on random-init models of unusual sizes, the tokenizer travels with the weights, unsupported
settings are refused by name, and the LM initialises a prefix-LM's LM."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import,g-import-not-at-top
from vlm_jax import convert  # pylint: disable=g-import-not-at-top
from vlm_jax import inference  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.xdist_group("lm_import")
VOCAB = 300
TEXTS = ["a small red circle in the top left.", "how many squares are there?",
         "two blue crosses and a large green triangle.", "is there a yellow square?"] * 20


def _byte_level_tokenizer(folder):
  """A GPT-2-style byte-level BPE (vocab.json + merges.txt) trained on a few captions."""
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator(TEXTS, vocab_size=VOCAB, special_tokens=["<|endoftext|>"])
  tok.save_model(str(folder))
  return tok


def _save(model, folder):
  model.save_pretrained(str(folder), safe_serialization=True)
  return os.path.join(str(folder), "model.safetensors")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gpt2")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=96, n_embd=48, n_layer=2, n_head=3,
                                n_inner=80, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  _save(model, folder)
  _byte_level_tokenizer(folder)
  return folder, model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72,
                                 num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  _save(model, folder)
  _byte_level_tokenizer(folder)
  return folder, model


def _ids(n=3, length=17, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length)).astype(np.int32)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_imported_lm_logits_equal_transformers(which, gpt2_dir, llama_dir, tmp_path):
  folder, model = {"gpt2": gpt2_dir, "llama": llama_dir}[which]
  out = convert.convert_checkpoint("hf", os.path.join(folder, "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert loaded.config.task == "causal_lm" and loaded.config.model.lm.style == which
  ids = _ids()
  with torch.no_grad():
    want = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = loaded.logits(ids)
  assert got.shape == (3, 17, VOCAB)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The tokenizer came along: the same ids as the Hugging Face tokenizer for the same text.
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  ref = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
  text = "two small red circles."
  assert loaded.tokenizer.tokenize([text])[0] == ref.encode(text).ids


def test_llama_with_tied_head_and_no_gqa(tmp_path):
  torch.manual_seed(2)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=32,
                                 tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(cfg).eval()
  path = _save(model, tmp_path / "m")
  _byte_level_tokenizer(tmp_path / "m")
  out = convert.convert_checkpoint("hf", path, str(tmp_path / "out"))
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["model"]["lm"]["tie_embeddings"] is True
  loaded = inference.load(out)
  assert "head" not in loaded.params["lm"]
  ids = _ids(2, 9, seed=3)
  with torch.no_grad():
    want = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(loaded.logits(ids), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field,value,named", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     "rope_parameters.rope_type='yarn'"),
    ("sliding_window", 16, "sliding_window=16"),
    ("attention_bias", True, "attention_bias=True"),
])
def test_unsupported_llama_settings_are_named(field, value, named, llama_dir, tmp_path):
  folder, _ = llama_dir
  d = json.loads((folder / "config.json").read_text())
  d[field] = value
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  with pytest.raises(convert.ConversionError, match=named.replace("[", r"\[")):
    convert.convert_checkpoint("hf", os.path.join(folder, "model.safetensors"),
                               str(tmp_path / "out"), model=str(path))
  assert not (tmp_path / "out").exists()


def test_wrong_depth_and_gpt2_quirks_are_refused(gpt2_dir, tmp_path):
  folder, _ = gpt2_dir
  d = json.loads((folder / "config.json").read_text())
  d["n_layer"] = 3
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  with pytest.raises(convert.ConversionError, match=r"(?s)missing keys.*h\.2\.ln_1\.weight"):
    convert.convert_checkpoint("hf", os.path.join(folder, "model.safetensors"),
                               str(tmp_path / "out"), model=str(path))
  d["n_layer"], d["scale_attn_by_inverse_layer_idx"] = 2, True
  path.write_text(json.dumps(d))
  with pytest.raises(convert.ConversionError, match="scale_attn_by_inverse_layer_idx=True"):
    convert.convert_checkpoint("hf", os.path.join(folder, "model.safetensors"),
                               str(tmp_path / "out"), model=str(path))


def test_prefix_lm_composed_from_two_checkpoints(gpt2_dir, tmp_path, shapes_data_dir):
  """init_from='image=<an image model>,lm=<a converted GPT-2>' puts each sub-tree in place."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import common  # pylint: disable=g-import-not-at-top
  from train_utils import tiny_config  # pylint: disable=g-import-not-at-top
  folder, _ = gpt2_dir
  gpt2 = convert.convert_checkpoint("hf", os.path.join(folder, "model.safetensors"),
                                    str(tmp_path / "gpt2"))
  # An image model: a tiny classifier, initialised and written as a workdir.
  cls_cfg = tiny_config("classify", shapes_data_dir, model__num_classes=5)
  task = tasks.get(cls_cfg.task)
  cls_params = jax.tree.map(np.asarray, task.init_params(task.build_model(cls_cfg), cls_cfg,
                                                         jax.random.key(7)))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cls_params = nn.unbox(cls_params)
  image_dir = common.write_output(str(tmp_path / "image"), cls_params, cls_cfg)

  cfg = tiny_config("prefixlm", shapes_data_dir, init_from=f"image={image_dir},lm={gpt2}",
                    freeze="^lm/")
  cfg.model.image.update(variant=cls_cfg.model.image.variant, posemb=cls_cfg.model.image.posemb)
  cfg.model.lm.update(style="gpt2", width=48, depth=2, num_heads=3, mlp_dim=80, vocab_size=VOCAB,
                      max_length=96)
  cfg.tokenizer.vocab_size = VOCAB
  rt = runtime.Runtime.create(cfg, jax.devices()[:1])
  state = rt.init_params_from(rt.init_state())
  params = jax.device_get(state.params)
  ref = inference.load(gpt2).params
  np.testing.assert_array_equal(params["lm"]["block_1"]["mlp"]["fc1"]["kernel"],
                                ref["lm"]["block_1"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(params["image"]["encoder"]["block_0"]["attn"]["query"]["kernel"],
                                cls_params["image"]["encoder"]["block_0"]["attn"]["query"]["kernel"])
  with pytest.raises(ValueError, match="each entry is subtree=checkpoint"):
    ckpt_lib.init_from_entries(f"{image_dir},lm={gpt2}")
