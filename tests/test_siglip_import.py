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

# One worker runs the whole module: its reference models are built once.
pytestmark = pytest.mark.xdist_group("siglip_import")

VOCAB, CONTEXT, IMAGE, PATCH = 120, 12, 24, 8
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80)
TEXT = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=72)
TOL = 1e-4


def siglip_config(vocab=VOCAB):
  return transformers.SiglipConfig(
      text_config=dict(vocab_size=vocab, max_position_embeddings=CONTEXT,
                       projection_size=VISION["hidden_size"], **TEXT),
      vision_config=dict(image_size=IMAGE, patch_size=PATCH, **VISION))


def random_siglip(seed=0, vocab=VOCAB):
  torch.manual_seed(seed)
  model = transformers.SiglipModel(siglip_config(vocab)).eval()
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


def hf_to_big_vision(hf_state, scan=False):
  """A SiglipModel state dict written in big_vision's two-tower .npz layout (an independent
  mapping: torch Linear [out, in] -> Flax [in, heads, head_dim] etc.)."""
  h = {k: v.detach().numpy().astype(np.float32) for k, v in hf_state.items()}
  out = {}

  def block(dst, src, width, heads):
    hd = width // heads
    out[f"{dst}/LayerNorm_0/scale"], out[f"{dst}/LayerNorm_0/bias"] = (
        h[f"{src}.layer_norm1.weight"], h[f"{src}.layer_norm1.bias"])
    out[f"{dst}/LayerNorm_1/scale"], out[f"{dst}/LayerNorm_1/bias"] = (
        h[f"{src}.layer_norm2.weight"], h[f"{src}.layer_norm2.bias"])
    for bv, t in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{dst}/MultiHeadDotProductAttention_0/{bv}/kernel"] = (
          h[f"{src}.self_attn.{t}_proj.weight"].T.reshape(width, heads, hd))
      out[f"{dst}/MultiHeadDotProductAttention_0/{bv}/bias"] = (
          h[f"{src}.self_attn.{t}_proj.bias"].reshape(heads, hd))
    out[f"{dst}/MultiHeadDotProductAttention_0/out/kernel"] = (
        h[f"{src}.self_attn.out_proj.weight"].T.reshape(heads, hd, width))
    out[f"{dst}/MultiHeadDotProductAttention_0/out/bias"] = h[f"{src}.self_attn.out_proj.bias"]
    for i, fc in enumerate(("fc1", "fc2")):
      out[f"{dst}/MlpBlock_0/Dense_{i}/kernel"] = h[f"{src}.mlp.{fc}.weight"].T
      out[f"{dst}/MlpBlock_0/Dense_{i}/bias"] = h[f"{src}.mlp.{fc}.bias"]

  vw, vh = VISION["hidden_size"], VISION["num_attention_heads"]
  tw, th = TEXT["hidden_size"], TEXT["num_attention_heads"]
  for i in range(VISION["num_hidden_layers"]):
    block(f"img/Transformer/encoderblock_{i}", f"vision_model.encoder.layers.{i}", vw, vh)
  for i in range(TEXT["num_hidden_layers"]):
    block(f"txt/Encoder_0/encoderblock_{i}", f"text_model.encoder.layers.{i}", tw, th)
  e = "vision_model.embeddings"
  out["img/embedding/kernel"] = h[f"{e}.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = h[f"{e}.patch_embedding.bias"]
  out["img/pos_embedding"] = h[f"{e}.position_embedding.weight"][None]
  out["img/Transformer/encoder_norm/scale"] = h["vision_model.post_layernorm.weight"]
  out["img/Transformer/encoder_norm/bias"] = h["vision_model.post_layernorm.bias"]
  m, hd = "vision_model.head", vw // vh
  out["img/MAPHead_0/probe"] = h[f"{m}.probe"]
  in_w, in_b = h[f"{m}.attention.in_proj_weight"], h[f"{m}.attention.in_proj_bias"]
  for j, bv in enumerate(("query", "key", "value")):
    out[f"img/MAPHead_0/MultiHeadDotProductAttention_0/{bv}/kernel"] = (
        in_w[j * vw:(j + 1) * vw].T.reshape(vw, vh, hd))
    out[f"img/MAPHead_0/MultiHeadDotProductAttention_0/{bv}/bias"] = (
        in_b[j * vw:(j + 1) * vw].reshape(vh, hd))
  out["img/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel"] = (
      h[f"{m}.attention.out_proj.weight"].T.reshape(vh, hd, vw))
  out["img/MAPHead_0/MultiHeadDotProductAttention_0/out/bias"] = h[f"{m}.attention.out_proj.bias"]
  out["img/MAPHead_0/LayerNorm_0/scale"] = h[f"{m}.layernorm.weight"]
  out["img/MAPHead_0/LayerNorm_0/bias"] = h[f"{m}.layernorm.bias"]
  for i, fc in enumerate(("fc1", "fc2")):
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/kernel"] = h[f"{m}.mlp.{fc}.weight"].T
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/bias"] = h[f"{m}.mlp.{fc}.bias"]
  out["txt/Embed_0/embedding"] = h["text_model.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = h["text_model.embeddings.position_embedding.weight"][None]
  out["txt/Encoder_0/encoder_norm/scale"] = h["text_model.final_layer_norm.weight"]
  out["txt/Encoder_0/encoder_norm/bias"] = h["text_model.final_layer_norm.bias"]
  out["txt/head/kernel"] = h["text_model.head.weight"].T
  out["txt/head/bias"] = h["text_model.head.bias"]
  out["t"], out["b"] = h["logit_scale"].reshape(1), h["logit_bias"].reshape(1)
  if scan:   # one `encoderblock` per tower, arrays stacked along a leading depth axis
    for tower, depth in (("img/Transformer", VISION["num_hidden_layers"]),
                         ("txt/Encoder_0", TEXT["num_hidden_layers"])):
      names = {k.split("/", 3)[3] for k in out if k.startswith(f"{tower}/encoderblock_")}
      for n in names:
        out[f"{tower}/encoderblock/{n}"] = np.stack(
            [out.pop(f"{tower}/encoderblock_{i}/{n}") for i in range(depth)])
  return {f"params/{k}": v for k, v in out.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_parity(siglip, tmp_path, scan):
  model, _, _ = siglip
  npz = tmp_path / "siglip.npz"
  np.savez(npz, **hf_to_big_vision(model.state_dict(), scan=scan))
  out = convert.convert_checkpoint("big_vision", str(npz), str(tmp_path / "out"),
                                   tokenizer="none")
  config, ours, params = load_converted(out)
  assert (config.model.image.num_heads, config.model.text.num_heads) == (3, 5)
  assert config.model.text.act == "gelu_tanh" and config.loss.contrastive == "sigmoid"
  images, text = inputs()
  got = jax.jit(ours.apply)({"params": params}, jnp.asarray(images), jnp.asarray(text))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(text.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  for a, b in ((got["image_embed"], ref.image_embeds), (got["text_embed"], ref.text_embeds)):
    assert float(np.max(np.abs(np.asarray(a) - b.numpy()))) <= TOL
  assert abs(float(got["logit_bias"]) + 12.5) < 1e-6


def test_big_vision_refusals(siglip, tmp_path):
  model, d, _ = siglip
  state = hf_to_big_vision(model.state_dict())
  broken = dict(state)
  del broken["params/img/MAPHead_0/LayerNorm_0/bias"]
  broken["params/txt/head/bias"] = np.zeros(7, np.float32)
  np.savez(tmp_path / "broken.npz", **broken)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_checkpoint("big_vision", str(tmp_path / "broken.npz"), str(tmp_path / "o1"),
                               tokenizer="none")
  assert "img/MAPHead_0/LayerNorm_0/bias" in str(e.value) and "txt/head/bias" in str(e.value)
  # An entry that would need unpickling is refused, not loaded.
  np.savez(tmp_path / "pickled.npz", **state, extra=np.array([{"x": 1}], dtype=object))
  with pytest.raises(convert.ConversionError, match="pickled"):
    convert.convert_checkpoint("big_vision", str(tmp_path / "pickled.npz"), str(tmp_path / "o2"),
                               tokenizer="none")
  # A Hugging Face file given as big_vision says which format it is.
  with pytest.raises(convert.ConversionError, match="--format hf"):
    convert.convert_checkpoint("big_vision", str(d / "model.safetensors"), str(tmp_path / "o3"),
                               tokenizer="none")
  # Without a tokenizer a SigLIP is not guessed one (CLIP's BPE would be wrong).
  np.savez(tmp_path / "ok.npz", **state)
  with pytest.raises(convert.ConversionError, match="SentencePiece"):
    convert.convert_checkpoint("big_vision", str(tmp_path / "ok.npz"), str(tmp_path / "o4"))
  assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_imported_siglip_end_to_end_matches_transformers(tmp_path):
  """A SiglipModel folder with its spiece.model beside the weights -> convert (the tokenizer is
  found) -> inference.load: the same token ids as SiglipTokenizer, the same pixels as
  SiglipImageProcessorPil, and zero-shot probabilities equal to the sigmoid of the reference's
  logits for the same prompts."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  spiece = t5_style_sentencepiece(tmp_path / "spiece")
  ref_tok = transformers.SiglipTokenizer(vocab_file=spiece, model_max_length=CONTEXT)
  model = random_siglip(seed=1, vocab=ref_tok.vocab_size)
  folder = tmp_path / "siglip"
  model.save_pretrained(str(folder))
  os.replace(spiece, folder / "spiece.model")
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"), str(tmp_path / "out"))
  loaded = inference.load(out)

  labels = ["red circle", "blue square", "green triangle"]
  prompts = [f"a photo of a {l}." for l in labels]
  ids = ref_tok(prompts, padding="max_length", max_length=CONTEXT)["input_ids"]
  np.testing.assert_array_equal(loaded.tokenize(prompts), np.asarray(ids))

  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate([(40, 30), (24, 24)]):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(rng.integers(0, 255, size=size + (3,), dtype=np.uint8)).save(paths[-1])
  pixels = loaded.load_images(paths)
  processor = transformers.SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
  want = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="np")
  np.testing.assert_allclose(pixels, want["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)

  probs = loaded.classify(pixels, labels, templates="a photo of a {}.")
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids),
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(probs, torch.sigmoid(ref.logits_per_image).numpy(), atol=1e-4)
