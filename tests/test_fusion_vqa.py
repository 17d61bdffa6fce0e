"""VQA as classification (late fusion of image and BERT question features): the soft targets,
the answer vocabulary taken from the data, training, and the official-metric evaluation."""
import json
import os

import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax.data import ops
from vlm_jax.evals import vqa_accuracy

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, logged

pytestmark = pytest.mark.xdist_group("fusion_vqa")


def test_answer_scores_are_the_vqa_soft_targets():
  index = {"red": 0, "two": 1, "yes": 2}
  humans = ["red"] * 2 + ["Red "] + ["two"] * 2 + ["blue"] * 5
  scores = ops.answer_scores(humans, index, 3)
  # 3 humans said red (after normalisation): 1.0; 2 said two: 2/3; nobody said yes.
  np.testing.assert_allclose(scores, [1.0, 2 / 3, 0.0], rtol=1e-6)
  # Where the humans agree exactly, the official accuracy of answering is that soft target.
  assert vqa_accuracy.question_accuracy("blue", humans) == ops.answer_scores(
      humans, {"blue": 0}, 1)[0] == 1.0


@pytest.fixture(scope="module")
def fusion_run(shapes_data_dir, tmp_path_factory):
  """The fusion classifier with a ResNet-10 image tower (the config's ViT trains in test_train):
  any registered image tower plugs in, BatchNorm included."""
  root = tmp_path_factory.mktemp("fusion")
  o = {"data.data_dir": shapes_data_dir, "batch_size": 32, "total_steps": 150,
       "optim.lr": 3e-3, "log_every_steps": 25, "checkpoint_every_steps": 150,
       "model.text.width": 32, "model.text.depth": 1,
       "model.text.num_heads": 2, "model.text.mlp_dim": 64, "model.hidden_dim": 64,
       "progress_bar": False, "async_checkpointing": False}
  from configs import shapes_fusion_vqa  # pylint: disable=g-import-not-at-top
  user = shapes_fusion_vqa.get_config("tiny")
  user.model.image = dict(name="resnet", image_size=32, depth=10, width=8)
  cfg = config_utils.apply_overrides(config_utils.complete(user, source="test"), o)
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(root / "run")
  return cfg, workdir, train.train_and_evaluate(cfg, workdir)


def test_answer_vocabulary_comes_from_the_training_answers(fusion_run):
  _, workdir, _ = fusion_run
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())
  answers = saved["model"]["answers"].split("|")
  assert {"yes", "no", "red", "circle", "1"} <= set(answers)
  assert len(answers) == len(set(answers)) <= 100


def test_fusion_classifier_learns_and_is_scored_with_the_vqa_metric(fusion_run):
  _, workdir, final = fusion_run
  losses = logged(workdir, keys=("answer_loss", "answer_score"))
  first, last = losses[min(losses)], losses[max(losses)]
  assert last["answer_loss"] < first["answer_loss"] - 1.0, (first, last)
  assert last["answer_score"] > first["answer_score"] + 0.2, (first, last)
  accuracy = final["eval/vqa/shapes/accuracy"]
  assert accuracy > 0.4, final
  assert final["eval/vqa/shapes/num_questions"] == 64 * 3
  from vlm_jax import inference  # pylint: disable=g-import-not-at-top
  stem = inference.load(workdir).params["image"]["stem_bn"]
  assert np.abs(np.asarray(stem["running_mean"])).max() > 1e-3   # the step wrote BN statistics


# ---- image-text matching (the other late-fusion head) -------------------------------------------


def test_mismatched_pairs_keep_identical_captions_positive():
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax.tasks import image_text_matching  # pylint: disable=g-import-not-at-top
  text = np.array([[2, 5, 3], [2, 6, 3], [2, 5, 3], [2, 7, 3]] * 8, np.int32)
  paired, labels = image_text_matching.mismatched_pairs(text, jax.random.key(0))
  paired, labels = np.asarray(paired), np.asarray(labels)
  same = (paired == text).all(-1)
  np.testing.assert_array_equal(labels, same.astype(np.float32))
  assert 0.2 < 1 - labels.mean() < 0.8           # about half the rows got another's caption


def test_roc_auc_matches_the_pairwise_definition():
  from vlm_jax.evals import matching  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=60), 1)        # rounding makes ties
  labels = (rng.random(60) < 0.4).astype(float)
  pos, neg = scores[labels == 1], scores[labels == 0]
  pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  np.testing.assert_allclose(matching.roc_auc(scores, labels), pairwise, rtol=1e-12)


def test_image_text_matching_learns(shapes_data_dir, tmp_path):
  o = {"data.data_dir": shapes_data_dir, "total_steps": 100, "optim.lr": 5e-3,
       "log_every_steps": 25, "checkpoint_every_steps": 100,
       "model.image.width": 32, "model.image.depth": 1, "model.image.num_heads": 2,
       "model.image.mlp_dim": 64, "model.text.width": 32, "model.text.depth": 1,
       "model.text.num_heads": 2, "model.text.mlp_dim": 64, "model.hidden_dim": 64,
       "progress_bar": False, "async_checkpointing": False}
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_fusion_itm.py:tiny"), o)
  from vlm_jax import train  # pylint: disable=g-import-not-at-top
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert final["eval/matching/shapes/num_pairs"] == 2 * 64
  assert final["eval/matching/shapes/accuracy"] > 0.7, final
  assert final["eval/matching/shapes/auc"] > 0.7, final
