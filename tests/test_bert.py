"""BERT and masked-language-model pretraining: the corruption rule, Hugging Face BertModel /
BertForMaskedLM import (logits and [CLS] states equal transformers'), training on a plain text
corpus, sharding, and a BERT text tower in a two-tower model."""
import json
import os

import jax
import numpy as np
import pytest

from vlm_jax import checkpoint
from vlm_jax import config_utils
from vlm_jax import convert
from vlm_jax import inference
from vlm_jax import runtime
from vlm_jax import tasks
from vlm_jax.data import ops
from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tok_lib

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, logged, run_steps, tiny_config, tiny_overrides

pytestmark = pytest.mark.xdist_group("bert")


@pytest.fixture(scope="module")
def tokenizer_path(shapes_data_dir, tmp_path_factory):
  wd = tmp_path_factory.mktemp("tok")
  runtime.load_tokenizer(tiny_config("bert_mlm", shapes_data_dir), str(wd))
  return str(wd / "tokenizer.model")


# ---- the corruption rule ------------------------------------------------------------------------


def test_mask_tokens_follows_bert_rule():
  rng = np.random.default_rng(0)
  special = {0, 2, 3}
  rows = np.full((4000, 20), 0, np.int32)
  rows[:, 0], rows[:, 17] = 2, 3
  rows[:, 1:17] = rng.integers(10, 100, size=(4000, 16))
  chosen_all, changed_to_mask, changed_random, kept = 0, 0, 0, 0
  for row in rows:
    out, chosen = ops.mask_tokens(row, rng, special=special, mask_id=250, random_ids=256,
                                  rate=0.15)
    assert not chosen[[0, 17, 18, 19]].any()                  # specials are never chosen
    assert np.array_equal(out[~chosen], row[~chosen])          # the rest is untouched
    chosen_all += chosen.sum()
    changed_to_mask += (out[chosen] == 250).sum()
    kept += (out[chosen] == row[chosen]).sum()
    changed_random += ((out[chosen] != 250) & (out[chosen] != row[chosen])).sum()
  assert abs(chosen_all / (4000 * 16) - 0.15) < 0.01
  assert abs(changed_to_mask / chosen_all - 0.8) < 0.02
  # Random ids are drawn from the whole vocabulary, so ~1/256 of them equal the original.
  assert abs(kept / chosen_all - 0.1) < 0.02 and abs(changed_random / chosen_all - 0.1) < 0.02
  # A short row still has one position to predict.
  out, chosen = ops.mask_tokens(np.array([2, 40, 3, 0]), np.random.default_rng(1),
                                special=special, mask_id=250, random_ids=256, rate=1e-6)
  assert chosen.tolist() == [False, True, False, False]


def test_mask_id_needs_room_in_the_vocabulary(tokenizer_path):
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  assert ops.mask_token_id(tok, tok.vocab_size + 8) == tok.vocab_size
  with pytest.raises(ValueError, match=f"no mask token.*vocabulary \\({tok.vocab_size}\\) must "
                     f"be at least {tok.vocab_size + 1}"):
    ops.mask_token_id(tok, tok.vocab_size)


# ---- Hugging Face import ------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["red", "green", "blue", "circle", "square", "cross", "a", "the", "at", "top", "left",
         "##s", "##ish", "small", "large"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_folder(tmp_path, cls, seed, extra_vocab=0):
  vocab = SPECIALS + WORDS + [f"w{i}" for i in range(extra_vocab)]
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=36,
                                num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=52, max_position_embeddings=20,
                                type_vocab_size=2, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  model = cls(cfg).eval()
  folder = tmp_path / f"bert{seed}"
  model.save_pretrained(str(folder), safe_serialization=True)
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return model, folder


TEXTS = ["a red circle at the top left", "the small green squares", "blue"]


def test_bert_for_masked_lm_logits_and_cls_states(tmp_path):
  model, folder = _bert_folder(tmp_path, transformers.BertForMaskedLM, 0)
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"),
                                   str(tmp_path / "out"))
  loaded = inference.load(out)
  assert loaded.config.task == "masked_lm"
  ids = loaded.tokenize(TEXTS)
  tok = loaded.tokenizer
  assert ids[0, 0] == tok.bos_id == 2 and ops.mask_token_id(tok, 20) == 4    # [CLS], [MASK]
  ids[0, 3] = 4                                                               # one [MASK]
  with torch.no_grad():
    t = torch.tensor(ids, dtype=torch.long)
    ref = model(input_ids=t, attention_mask=(t != 0).long(), output_hidden_states=True)
  real = ids != tok.pad_id
  got = loaded.mlm_logits(ids)
  np.testing.assert_allclose(got[real], ref.logits.numpy()[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(loaded.text_features(ids), ref.hidden_states[-1][:, 0].numpy(),
                             atol=1e-4, rtol=0)


def test_bert_model_pooler_and_fresh_head(tmp_path):
  model, folder = _bert_folder(tmp_path, transformers.BertModel, 1)
  out = convert.convert_checkpoint("hf", str(folder / "model.safetensors"),
                                   str(tmp_path / "out"))
  report = json.loads((tmp_path / "out" / "conversion.json").read_text())
  assert report["pooler"] and "freshly initialised" in report["mlm_head"]
  loaded = inference.load(out)
  ids = loaded.tokenize(TEXTS)
  with torch.no_grad():
    t = torch.tensor(ids, dtype=torch.long)
    ref = model(input_ids=t, attention_mask=(t != 0).long())
  np.testing.assert_allclose(loaded.text_features(ids), ref.pooler_output.numpy(), atol=1e-4,
                             rtol=0)


def test_vocabulary_of_another_size_is_refused(tmp_path):
  _, folder = _bert_folder(tmp_path, transformers.BertForMaskedLM, 2, extra_vocab=5)
  with pytest.raises(convert.ConversionError, match="has 25 tokens but the checkpoint's word "
                     "embedding has 20 rows"):
    convert.convert_checkpoint("hf", str(folder / "model.safetensors"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


# ---- training -----------------------------------------------------------------------------------


def _text_corpus(path, split, n):
  """Shapes captions written as a plain text file, one document a line (+ a blank line and a
  line that is not UTF-8, which is skipped and counted)."""
  captions = shapes.caption_corpus("tiny", split)[:n]
  with open(path, "wb") as f:
    for i, c in enumerate(captions):
      f.write(c.encode() + b"\n")
      if i == 3:
        f.write(b"\n\xff\xfe not utf-8\n")
  return captions


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, tokenizer_path):
  """A tiny BERT trained by masked-LM on a plain text corpus (no images), evaluated on another."""
  root = tmp_path_factory.mktemp("mlm")
  _text_corpus(root / "train.txt", "train", 1000)
  _text_corpus(root / "eval.txt", "test", 100)
  o = tiny_overrides(None, tokenizer_path, "bert_mlm", **{
      "data.source": "text", "data.train_text": str(root / "train.txt"),
      "data.eval_text": str(root / "eval.txt"), "evals.run": "masked_lm", "total_steps": 200,
      "log_every_steps": 10, "optim.lr": 3e-3})
  del o["data.data_dir"]
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_bert_mlm.py:tiny"), o)
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  final = train.train_and_evaluate(cfg, str(root / "run"))
  return cfg, str(root / "run"), final, str(root / "eval.txt")


def test_masked_lm_learns_from_a_text_corpus(mlm_run, tokenizer_path):
  cfg, workdir, final, eval_text = mlm_run
  losses = logged(workdir, keys=("mlm_loss",))
  first, last = losses[min(losses)]["mlm_loss"], losses[max(losses)]["mlm_loss"]
  assert last < first - 1.5, (first, last)
  # It beats always guessing the eval text's most frequent token by a clear margin.
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  with open(eval_text, "rb") as f:
    lines = [l.decode("utf-8", "replace").strip() for l in f if l.strip()]
  ids = np.concatenate([np.asarray(r) for r in tok.tokenize(lines)])
  majority = np.bincount(ids).max() / ids.size
  assert final["eval/masked_lm/text/accuracy"] > majority + 0.1, (final, majority)
  assert final["data/skipped"] >= 1          # the line that is not UTF-8
  assert cfg.model.text.name == "bert"


def test_masked_lm_shards_like_one_device(mlm_run, tokenizer_path):
  cfg = mlm_run[0].copy_and_resolve_references()
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  field_ops = tasks.get(cfg.task).train_ops(cfg, tok)
  it = pipeline.make_train_iterator(cfg.data, field_ops, batch_size=cfg.batch_size, images=False)
  batches = [{k: v for k, v in next(it).items() if k != "mask"} for _ in range(2)]
  it.close()
  assert "image" not in batches[0] and batches[0]["mlm_mask"].any()
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  _, ref, _ = run_steps(cfg, batches, devices=jax.devices()[:1])
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  state, hist, _ = run_steps(cfg, batches)
  for r, h in zip(ref, hist):
    np.testing.assert_allclose(h["mlm_loss"], r["mlm_loss"], rtol=2e-4)
  fc1 = state.params["text"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert "tensor" in str(fc1.sharding.spec)


def test_bert_text_tower_in_a_two_tower_model(mlm_run, shapes_data_dir, tokenizer_path):
  """LiT-style: the masked-LM encoder becomes the text tower of a CLIP model by init_from."""
  cfg, workdir, _, _ = mlm_run
  user = config_utils._import_config_file(  # pylint: disable=protected-access
      os.path.join(REPO, "configs/shapes_clip.py")).get_config("tiny")
  user.model.text = cfg.model.text.to_dict()          # the text section of a BERT tower
  o = {k: v for k, v in tiny_overrides(shapes_data_dir, tokenizer_path, "clip").items()
       if not k.startswith("model.text.")}
  o["init_from"] = f"text={workdir}"
  clip = config_utils.apply_overrides(config_utils.complete(user), o)
  rt = runtime.Runtime.create(clip, jax.devices()[:1])
  state = rt.init_params_from(rt.init_state())
  want = checkpoint.flatten(inference.load(workdir).params["text"])
  got = checkpoint.flatten(jax.device_get(state.params["text"]))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  ids = np.full((2, clip.model.text.context_length), 0, np.int32)
  ids[:, :3] = [2, 40, 3]
  emb = rt.model.apply({"params": state.params}, ids, method="encode_texts")
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
