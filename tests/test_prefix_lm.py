"""The prefix-LM task end to end: shapes questions, its batch fields, training on 1 and 8 devices,
generation, the VQA evaluation, inference.answer and predict --question."""
import json
import os
import re

import jax
import numpy as np
import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import run_steps, tiny_config
from vlm_jax import inference
from vlm_jax import runtime
from vlm_jax import tasks
from vlm_jax import train
from vlm_jax.data import ops
from vlm_jax.data import pipeline
from vlm_jax.data import shapes
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.evals import vqa_accuracy

pytestmark = pytest.mark.xdist_group("prefix_lm")


# ---- data ----------------------------------------------------------------------------------------


def test_shapes_questions_are_true_of_the_scene():
  config = shapes.get_config("tiny")
  kinds = set()
  for i in range(64):
    ex = shapes.generate_example(config, "train", i)
    objs = ex["objects"]
    assert len(ex["questions"]) == 3
    for q in ex["questions"]:
      kinds.add(q["question_type"])
      humans = [a["answer"] for a in q["answers"]]
      assert len(humans) == 10
      truth = q["multiple_choice_answer"]
      assert ops.majority_answer(humans) == truth
      assert vqa_accuracy.question_accuracy(truth, humans) == 1.0   # noise is tolerated
      text = q["question"]
      if q["question_type"] == "how many" and ("objects" in text or "shapes" in text):
        assert truth == str(len(objs["shape"]))
      elif q["question_type"] == "how many":
        plural = next(s for s in shapes.SHAPES if shapes.PLURALS[s] in text)
        assert truth == str(objs["shape"].count(plural))
      elif q["question_type"] == "what colour":
        shape = next(s for s in shapes.SHAPES if re.search(rf"\b{s}\b", text))
        assert objs["colour"][objs["shape"].index(shape)] == truth
      elif q["question_type"] == "is there":
        colour, shape = next((c, s) for c in shapes.COLOUR_NAMES for s in shapes.SHAPES
                             if f"{c} {s}" in text)
        present = any(c == colour and s == shape
                      for c, s in zip(objs["colour"], objs["shape"]))
        assert truth == ("yes" if present else "no")
  assert kinds == {"how many", "what colour", "what shape", "where is", "is there"}
  ids = [q["question_id"] for i in range(20)
         for q in shapes.generate_example(config, "test", i)["questions"]]
  assert len(set(ids)) == len(ids)


def test_prompt_answer_layout_and_truncation():
  row, plen, cut = ops.layout_prompt_answer([11, 12, 13], [21, 22], 8, bos_id=2, eos_id=3,
                                            pad_id=0)
  assert row.tolist() == [11, 12, 13, 2, 21, 22, 3, 0] and plen == 3 and not cut
  # A question too long for the row gives way (cut at its end, counted); the answer stays whole.
  row, plen, cut = ops.layout_prompt_answer(list(range(10, 20)), [21, 22], 8, 2, 3, 0)
  assert row.tolist() == [10, 11, 12, 13, 2, 21, 22, 3] and plen == 4 and cut


class _Tok:
  pad_id, bos_id, eos_id = 0, 2, 3

  def tokenize(self, texts):
    return [[10 + len(w) for w in t.split()] for t in texts]


def test_prefix_lm_op_mixes_skips_and_marks_targets():
  op = ops.PrefixLMText(_Tok(), 12, caption_weight=1.0, vqa_weight=3.0)
  raw = {"captions": ["a red circle."],
         "questions": [{"question_id": 1, "question": "what colour?", "answers": ["red"] * 10}]}
  rng = np.random.default_rng(0)
  kinds = [bool(op(raw, rng, True)["is_vqa"]) for _ in range(2000)]
  assert abs(np.mean(kinds) - 0.75) < 0.04
  batch = op.collate([op(raw, np.random.default_rng(s), True) for s in range(8)]
                     + [op.padding()])
  for row, plen, target, vqa in zip(batch["text"][:8], batch["prompt_len"],
                                    batch["target_mask"], batch["is_vqa"]):
    assert row[plen] == _Tok.bos_id and plen == (2 if vqa else 0)
    # targets: everything after bos up to and including eos
    end = int(np.argmax(row == _Tok.eos_id))
    assert target.tolist() == [plen < i <= end for i in range(12)]
  assert not batch["target_mask"][8].any()
  with pytest.raises(ops.BadExample) as e:
    ops.PrefixLMText(_Tok(), 12, 0.0, 1.0)(
        {"questions": [{"question_id": 1, "question": "q?", "answers": ["", " "]}]},
        np.random.default_rng(0), True)
  assert e.value.reason == "no_answer"
  assert ops.PrefixLMText(_Tok(), 12, 0.0, 1.0).requires == ("questions",)


# ---- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(shapes_data_dir, tmp_path_factory):
  cfg = tiny_config("prefixlm", shapes_data_dir)
  wd = tmp_path_factory.mktemp("tok")
  runtime.load_tokenizer(cfg, str(wd))
  return str(wd / "tokenizer.model")


def test_tokenizer_learns_the_questions(tokenizer_path):
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  ids = tok.tokenize(["how many circles are there?"])[0]
  assert tok.unk_id not in ids


def test_one_and_eight_devices_give_the_same_losses(shapes_data_dir, tokenizer_path):
  # Llama-style with grouped-query attention: the kv_heads axis is the one GPT-2 blocks lack.
  cfg = tiny_config("prefixlm", shapes_data_dir, tokenizer_path, optim__lr=3e-3,
                    schedule__warmup_steps=0, model__lm__style="llama")
  cfg.model.lm.num_kv_heads = 1
  field_ops = tasks.get(cfg.task).train_ops(cfg, tok_lib.Tokenizer.load(tokenizer_path))
  it = pipeline.make_train_iterator(cfg.data, field_ops, batch_size=cfg.batch_size)
  batches = [next(it) for _ in range(2)]
  it.close()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  _, ref, _ = run_steps(cfg, batches, devices=jax.devices()[:1])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  state, hist, _ = run_steps(cfg, batches)
  for r, h in zip(ref, hist):
    assert {"lm_loss", "caption_loss", "vqa_loss", "truncated"} <= set(h)
    for key in ("loss", "caption_loss", "vqa_loss", "grad_norm"):
      np.testing.assert_allclose(h[key], r[key], rtol=2e-4, err_msg=key)
  fc = state.params["lm"]["block_0"]["attn"]["query"]["kernel"]   # [embed, heads, kv]
  assert "tensor" in str(fc.sharding.spec) and "fsdp" in str(fc.sharding.spec)


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tokenizer_path, tmp_path_factory):
  """A tiny prefix-LM trained with its own evaluations (caption + vqa) at the end."""
  workdir = str(tmp_path_factory.mktemp("prefixlm"))
  cfg = tiny_config("prefixlm", shapes_data_dir, tokenizer_path, total_steps=30,
                    checkpoint_every_steps=30, **{"evals.run": "caption,vqa",
                                                  "evals.batch_size": 32})
  final = train.train_and_evaluate(cfg, workdir)
  return workdir, final


def test_training_reports_vqa_and_caption_metrics(trained):
  _, final = trained
  for key in ("eval/vqa/shapes/accuracy", "eval/vqa/shapes/accuracy_yes_no",
              "eval/caption/shapes/cider", "eval/caption/shapes/nll"):
    assert key in final and np.isfinite(final[key]), key
  assert final["eval/vqa/shapes/num_questions"] == 64 * 3
  assert 0.0 <= final["eval/vqa/shapes/accuracy"] <= 1.0


def test_generation_continues_the_prompt_like_teacher_forcing(trained, shapes_data_dir):
  workdir, _ = trained
  model = inference.load(workdir)
  ex = [shapes.generate_example(shapes.get_config("tiny"), "test", i) for i in range(3)]
  images = model.load_images([e["image"] for e in ex])
  questions = ["how many objects are there?", "is there a red circle?", "what colour is it?"]
  answers = model.answer(images, questions, max_len=6)
  assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
  # The greedy tokens are the arg-max of the model run teacher-forced on its own output.
  tok = model.tokenizer
  ctx = model.context
  for image, q in zip(images, questions):
    generated = model.generate(image[None], max_len=6, prompts=[q])[0]
    prompt = tok.tokenize([q])[0]
    answer = tok.tokenize([generated])[0]
    row, plen, _ = ops.layout_prompt_answer(prompt, answer, ctx.context_length, tok.bos_id,
                                            tok.eos_id, tok.pad_id)
    logits = model.module.apply({"params": model.params}, image[None], row[None],
                                np.array([plen], np.int32))["caption_logits"]
    want = np.argmax(np.asarray(logits[0, plen:plen + len(answer)]), axis=-1)
    assert want.tolist() == row[plen + 1:plen + 1 + len(answer)].tolist()
  # Beam search of width 1 is greedy search; a wider beam answers too.
  assert model.answer(images, questions, max_len=6, beam=1) == answers
  assert len(model.answer(images, questions, max_len=6, beam=3)) == 3
  # Prompts of different lengths in one batch give what each gives alone.
  together = model.answer(np.concatenate([images[:1], images[:1]]),
                          ["how many objects are there?", "what shape is the large red object?"],
                          max_len=6)
  assert together[0] == model.answer(images[:1], ["how many objects are there?"], max_len=6)[0]
  assert together[1] == model.answer(images[:1], ["what shape is the large red object?"],
                                     max_len=6)[0]


def test_predict_answers_questions(trained, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlm_jax import predict  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  path = tmp_path / "x.png"
  Image.fromarray(shapes.generate_example(shapes.get_config("tiny"), "test", 0)["image"]).save(
      path)
  model = inference.load(workdir)
  results = predict.predict(model, [str(path)], questions=["how many objects are there?",
                                                           "is there a blue square?"])
  assert set(results[0]["answers"]) == {"how many objects are there?",
                                        "is there a blue square?"}
  images = model.load_images([str(path)])
  assert results[0]["answers"]["is there a blue square?"] == model.answer(
      images, ["is there a blue square?"])[0]


def test_vqav2_files_score_like_the_tfds_split(trained, tmp_path):
  """The shapes test split written in the official VQAv2 layout reads back through the vqav2
  source, scores exactly as the TFDS split does, and its results file scores the same with
  the scorer CLI; a missing image is skipped and counted."""
  from vlm_jax.data import write_shapes  # pylint: disable=g-import-not-at-top
  from vlm_jax.evals import vqa  # pylint: disable=g-import-not-at-top
  workdir, final = trained
  paths = write_shapes.write("vqav2", str(tmp_path / "vqa"), "tiny", "test")
  model = inference.load(workdir)
  entry = vqa.default_config(source="vqav2", vqa_questions=paths["questions"],
                             vqa_annotations=paths["annotations"], vqa_images=paths["images"],
                             tag="files", batch_size=32)
  metrics = vqa.evaluate(model.context, "files", entry)
  assert metrics["vqa/files/num_questions"] == 64 * 3
  assert metrics["vqa/files/accuracy"] == pytest.approx(final["eval/vqa/shapes/accuracy"],
                                                        abs=1e-9)
  # `evaluate` writes the answers in the official results format; the scorer reads them.
  from vlm_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = inference.load_config(inference.locate(workdir))
  config.evals.run = "vqa"
  evaluate.evaluate(config, workdir)
  results = os.path.join(workdir, "eval", "vqa_results_shapes_30.json")
  scored = vqa.score_files(paths["questions"], paths["annotations"], results)
  assert scored["overall"] / 100 == pytest.approx(metrics["vqa/files/accuracy"], abs=1e-4)
  assert len(json.loads(open(results).read())) == 64 * 3
  # One image gone: its questions are skipped (counted by the pipeline), the rest still scored.
  first = sorted(os.listdir(paths["images"]))[0]
  os.remove(os.path.join(paths["images"], first))
  metrics = vqa.evaluate(model.context, "files", entry)
  assert metrics["vqa/files/num_questions"] == 63 * 3


def test_vqa_notebook_runs_on_the_trained_model(trained, shapes_data_dir, tmp_path):
  """colabs/vqa_captioning.ipynb top to bottom (TRAIN=False: the module's tiny run)."""
  import test_colabs  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  params = "\n".join([f"WORKDIR = {workdir!r}", f"DATA_DIR = {shapes_data_dir!r}",
                      "VARIANT = 'tiny'", "TOTAL_STEPS = 30", "OVERRIDES = {}", "TRAIN = False",
                      "NUM_EXAMPLES = 4",
                      "QUESTIONS = ['how many objects are there?', 'is there a red square?']"])
  nb = test_colabs.run_notebook("vqa_captioning.ipynb", params, str(tmp_path))
  test_colabs.check_ran_in_order(nb)
  cell = test_colabs.cell_with(nb, "model.answer(")
  out = test_colabs.text_output(cell)
  assert "prefix_lm checkpoint, step 30" in out
  assert out.count("Q: how many objects are there?  A:") == 4
  assert len(test_colabs.images_of(cell)) == 1
