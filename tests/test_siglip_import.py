"""SigLIP import: a Hugging Face `SiglipModel` folder -> a vlm_jax workdir with the same
embeddings and logits, and the SigLIP tokenizer's text rules.

Reference: a randomly initialised `transformers.SiglipModel` of unusual sizes (towers of
different widths, depths and head counts, every weight random so a wrong mapping cannot hide
behind ones and zeros), saved with `save_pretrained` (model.safetensors + config.json).
"""
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import convert  # pylint: disable=wrong-import-position
from vlm_jax.data import tokenizers  # pylint: disable=wrong-import-position
from test_convert import load_converted  # pylint: disable=wrong-import-position

VOCAB, CONTEXT, IMAGE, PATCH = 120, 12, 24, 8
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80)
TEXT = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=72)
TOL = 1e-4


def siglip_config():
  return transformers.SiglipConfig(
      text_config=dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                       projection_size=VISION["hidden_size"], **TEXT),
      vision_config=dict(image_size=IMAGE, patch_size=PATCH, **VISION))


def random_siglip(seed=0):
  torch.manual_seed(seed)
  model = transformers.SiglipModel(siglip_config()).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" in name or "layernorm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name == "logit_scale":
        p.fill_(math.log(117.0))    # above CLIP's cap of 100: SigLIP's is never clipped
      elif name == "logit_bias":
        p.fill_(-12.5)
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  model = random_siglip()
  d = tmp_path_factory.mktemp("hf_siglip")
  model.save_pretrained(str(d))
  out = convert.convert_checkpoint("hf", str(d / "model.safetensors"), str(d / "out"),
                                   tokenizer="none")
  return model, d, out


def inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  # SigLIP's texts: ids, eos (1), then eos as padding up to the full length.
  text = np.ones((batch, CONTEXT), np.int32)
  for i, n in enumerate([4, CONTEXT - 1, 1][:batch]):
    text[i, :n] = rng.integers(2, VOCAB, size=n)
  return images, text


def test_siglip_parity(siglip):
  model, _, out = siglip
  config, ours, params = load_converted(out)
  assert config.loss.contrastive == "sigmoid" and not config.model.image_proj
  assert config.model.image.pool == "map" and not config.model.text.causal
  assert (config.data.eval_crop, tuple(config.data.mean)) == ("resize", (0.5, 0.5, 0.5))
  assert (config.tokenizer.pad, config.tokenizer.canonicalize) == ("eos", True)
  images, text = inputs()
  got = jax.jit(ours.apply)({"params": params}, jnp.asarray(images), jnp.asarray(text))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(text.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  for name, a, b in (("image_embed", got["image_embed"], ref.image_embeds),
                     ("text_embed", got["text_embed"], ref.text_embeds)):
    err = float(np.max(np.abs(np.asarray(a) - b.numpy())))
    assert err <= TOL, f"{name}: max abs diff {err}"
  logits = (got["logit_scale"] * got["image_embed"] @ got["text_embed"].T + got["logit_bias"])
  err = float(np.max(np.abs(np.asarray(logits) - ref.logits_per_image.numpy())))
  assert err <= 1e-3, f"logits: max abs diff {err}"   # scale 117 magnifies the embeddings' error
  assert abs(float(got["logit_scale"]) - 117.0) < 1e-3 and float(got["logit_bias"]) == -12.5


def test_a_clip_description_for_a_siglip_state_is_refused(siglip, tmp_path):
  _, d, _ = siglip
  clip_config = {"model_type": "clip", "projection_dim": 48,
                 "vision_config": {"hidden_size": 48}, "text_config": {"hidden_size": 40}}
  (tmp_path / "clip.json").write_text(json.dumps(clip_config))
  with pytest.raises(convert.ConversionError, match="SiglipModel state dict"):
    convert.convert_checkpoint("hf", str(d / "model.safetensors"), str(tmp_path / "out"),
                               model=str(tmp_path / "clip.json"), tokenizer="none")
  assert not (tmp_path / "out").exists()


def test_naflex_siglip2_is_refused_by_name(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "siglip2", "vision_config": {}, "text_config": {}}))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(convert.ConversionError, match="NaFlex"):
    convert.convert_checkpoint("hf", str(tmp_path / "model.safetensors"), str(tmp_path / "out"),
                               tokenizer="none")


def t5_style_sentencepiece(path):
  """A SentencePiece model in SigLIP's id layout (pad 0, eos 1, unk 2, no bos)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  words = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "the", "small",
           "large", "triangle", "two", "three"]
  rng = np.random.default_rng(0)
  sentences = [" ".join(rng.choice(words, size=6)) for _ in range(300)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(path), vocab_size=40,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
      hard_vocab_limit=False, num_threads=1)
  return str(path) + ".model"


def test_siglip_tokenizer_matches_transformers(tmp_path):
  model_file = t5_style_sentencepiece(tmp_path / "spiece")
  ref = transformers.SiglipTokenizer(vocab_file=model_file, model_max_length=CONTEXT)
  rules = {"pad": "eos", "canonicalize": True}
  ours = tokenizers.with_rules(tokenizers.read("sentencepiece", model_file), rules)
  texts = ["A photo of the RED circle!", "two   large, blue squares.", "green"]
  want = ref(texts, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ours.encode(texts, CONTEXT), np.asarray(want))
  assert ours.pad_id == ours.eos_id == 1
  # The rules survive pickling (grain worker processes receive the tokenizer pickled).
  import pickle  # pylint: disable=g-import-not-at-top
  again = pickle.loads(pickle.dumps(ours))
  np.testing.assert_array_equal(again.encode(texts, CONTEXT), ours.encode(texts, CONTEXT))
  with pytest.raises(ValueError, match="tokenizer.pad"):
    tokenizers.with_rules(ours.tok, {"pad": "zeros"})
