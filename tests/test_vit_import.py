"""Hugging Face ViTModel / ViTForImageClassification import: features, tokens and logits equal
transformers' on random-init models of unusual sizes; unsupported settings are named."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax import convert  # pylint: disable=g-import-not-at-top
from vlm_jax import inference  # pylint: disable=g-import-not-at-top


def _config(**kw):
  return transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=72, image_size=24, patch_size=6,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _pixels(n=2):
  return np.random.default_rng(0).uniform(-1, 1, size=(n, 24, 24, 3)).astype(np.float32)


def test_vit_model_features_and_tokens(tmp_path):
  torch.manual_seed(0)
  model = transformers.ViTModel(_config(), add_pooling_layer=True).eval()
  model.save_pretrained(str(tmp_path / "vit"), safe_serialization=True)
  out = convert.convert_checkpoint("hf", str(tmp_path / "vit" / "model.safetensors"),
                                   str(tmp_path / "out"))
  report = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert "pooler" in report["left_out"][0]
  loaded = inference.load(out)
  assert loaded.config.model.num_classes == 0 and not loaded.has_classifier
  x = _pixels()
  with torch.no_grad():
    hidden = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(loaded.image_features(x), hidden[:, 0], atol=1e-4, rtol=0)
  _, tokens = loaded.module.apply({"params": loaded.params}, x,
                                  method=lambda m, images: m.image(images))
  np.testing.assert_allclose(tokens, hidden[:, 1:], atol=1e-4, rtol=0)


def test_vit_for_image_classification_logits(tmp_path):
  torch.manual_seed(1)
  cfg = _config(id2label={0: "circle", 1: "square", 2: "cross"},
                label2id={"circle": 0, "square": 1, "cross": 2})
  model = transformers.ViTForImageClassification(cfg).eval()
  model.save_pretrained(str(tmp_path / "vit"), safe_serialization=True)
  out = convert.convert_checkpoint("hf", str(tmp_path / "vit" / "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert loaded.class_names == ["circle", "square", "cross"]
  x = _pixels(3)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).logits.numpy()
  got = loaded.context.predict_rows("classify", {"image": x})
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_unsupported_vit_settings_are_named(tmp_path):
  torch.manual_seed(2)
  transformers.ViTModel(_config()).save_pretrained(str(tmp_path / "vit"),
                                                   safe_serialization=True)
  d = json.loads((tmp_path / "vit" / "config.json").read_text())
  d["hidden_act"], d["qkv_bias"] = "relu", False
  (tmp_path / "c.json").write_text(json.dumps(d))
  with pytest.raises(convert.ConversionError, match="hidden_act='relu'.*qkv_bias=False"):
    convert.convert_checkpoint("hf", str(tmp_path / "vit" / "model.safetensors"),
                               str(tmp_path / "out"), model=str(tmp_path / "c.json"))
  assert not os.path.exists(tmp_path / "out")
