"""Pure evaluation pieces: zero-shot / retrieval metrics on hand-computed sets, the classifier from
prompt embeddings, the template and class-name lists, the COCO caption scorer wrapper, and the
linear probe's ridge classifier."""
import numpy as np
import pytest

from vlm_jax.evals import captioning
from vlm_jax.evals import linear_probe
from vlm_jax.evals import retrieval
from vlm_jax.evals import templates
from vlm_jax.evals import zeroshot


# ---- zero-shot ---------------------------------------------------------------------------------


def test_classification_metrics_hand_computed():
  # 5 examples, 4 classes. True-class ranks: 0, 2, 1, 0, 3.
  logits = np.array([
      [0.9, 0.1, 0.0, 0.0],   # label 0: rank 0
      [0.5, 0.1, 0.3, 0.0],   # label 1: 0.5 and 0.3 above -> rank 2
      [0.2, 0.6, 0.4, 0.1],   # label 2: 0.6 above -> rank 1
      [0.0, 0.0, 0.1, 0.7],   # label 3: rank 0
      [0.3, 0.2, 0.4, 0.5],   # label 1: 3 above -> rank 3
  ])
  labels = np.array([0, 1, 2, 3, 1])
  m = zeroshot.classification_metrics(logits, labels, ks=(1, 2, 3, 5))
  assert m["top1"] == pytest.approx(2 / 5)
  assert m["top2"] == pytest.approx(3 / 5)
  assert m["top3"] == pytest.approx(4 / 5)
  assert m["top5"] == pytest.approx(1.0)      # k >= classes: every example is a hit
  # Per-class top-1 recall: class0 1/1, class1 0/2, class2 0/1, class3 1/1 -> mean 0.5.
  assert m["mean_per_class"] == pytest.approx(0.5)


def test_classification_metrics_rejects_bad_labels():
  with pytest.raises(ValueError, match="labels"):
    zeroshot.classification_metrics(np.zeros((2, 3)), np.array([0, -1]))
  with pytest.raises(ValueError, match="labels"):
    zeroshot.classification_metrics(np.zeros((2, 3)), np.array([0, 3]))


def test_classifier_from_embeddings_is_renormalised_mean():
  # Class 0: two orthogonal unit prompts -> mean (0.5, 0.5) -> renormalised (1, 1)/sqrt2.
  # Class 1: prompts of different norms: each is normalised BEFORE averaging.
  e = np.array([[[1.0, 0.0], [0.0, 1.0]],
                [[10.0, 0.0], [0.0, 0.1]]])
  c = zeroshot.classifier_from_embeddings(e)
  np.testing.assert_allclose(c[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
  np.testing.assert_allclose(c[1], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-6)


def test_prompts_are_class_major():
  assert zeroshot.prompts(["cat", "dog"], ["a {}.", "the {}!"]) == [
      "a cat.", "the cat!", "a dog.", "the dog!"]


# ---- retrieval ---------------------------------------------------------------------------------


def _unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_retrieval_metrics_hand_computed_several_captions_per_image():
  # 3 images along the axes; 5 captions: image 0 has captions 0, 1; image 1 has 2, 3; image 2 has 4.
  images = np.eye(3, dtype=np.float32)
  texts = _unit([
      [0.9, 0.3, 0.0],    # cap0 (img0): nearest img0
      [0.1, 0.2, 0.95],   # cap1 (img0): nearest img2 -> img0 ranks 2nd... (0.1 < 0.2): rank 2
      [0.6, 0.5, 0.0],    # cap2 (img1): img0 (0.6) above img1 (0.5) -> rank 1
      [0.0, 0.2, 0.9],    # cap3 (img1): img2 above -> rank 1
      [0.0, 0.3, 0.8],    # cap4 (img2): rank 0
  ])
  ids = np.array([0, 0, 1, 1, 2])
  m = retrieval.retrieval_metrics(images, texts, ids, ks=(1, 2, 3))
  # t2i ranks: 0, 2, 1, 1, 0.
  assert m["t2i_r1"] == pytest.approx(2 / 5)
  assert m["t2i_r2"] == pytest.approx(4 / 5)
  assert m["t2i_r3"] == pytest.approx(1.0)
  # i2t. Scores per image = the texts' coordinate on its axis.
  # img0: [.9487, .1045, .7682, 0, 0]: best positive cap0 is the top text -> rank 0.
  # img1: [.3162, .2090, .6402, .2169, .3511]: positives cap2 (.640) top -> rank 0.
  # img2: [0, .9926, 0, .9762, .9363]: positive cap4 .9363; cap1 and cap3 above -> rank 2.
  assert m["i2t_r1"] == pytest.approx(2 / 3)
  assert m["i2t_r2"] == pytest.approx(2 / 3)
  assert m["i2t_r3"] == pytest.approx(1.0)


def test_retrieval_any_ground_truth_counts_and_chunking(monkeypatch):
  # The second caption of image 0 is its only good one: i2t must still be a hit at k=1.
  images = _unit([[1.0, 0.0], [0.0, 1.0]])
  texts = _unit([[0.0, 1.0], [1.0, 0.05], [0.1, 1.0]])
  ids = np.array([0, 0, 1])
  full = retrieval.retrieval_metrics(images, texts, ids, ks=(1, 2))
  # Image 0: its first caption scores 0 but its second 0.9988 is the top text -> hit.
  # Image 1: its only caption scores .995, but image 0's cap0 scores 1.0 with it -> miss at 1.
  assert full["i2t_r1"] == pytest.approx(0.5)
  assert full["i2t_r2"] == pytest.approx(1.0)
  # t2i: cap0 -> image 1 ranks first (wrong), cap1 -> image 0 right, cap2 -> image 1 right.
  assert full["t2i_r1"] == pytest.approx(2 / 3)
  # Tiny chunks give the same numbers as one block.
  monkeypatch.setattr(retrieval, "_CHUNK", 1)
  assert retrieval.retrieval_metrics(images, texts, ids, ks=(1, 2)) == full


def test_retrieval_random_matches_brute_force():
  rng = np.random.RandomState(0)
  images = _unit(rng.randn(7, 5))
  texts = _unit(rng.randn(16, 5))
  ids = rng.randint(0, 7, size=16)
  m = retrieval.retrieval_metrics(images, texts, ids, ks=(1, 3))
  sims = images @ texts.T
  for k in (1, 3):
    hits = []
    for i in range(7):
      if not np.any(ids == i):
        continue
      top = np.argsort(-sims[i])[:k]
      hits.append(np.any(ids[top] == i))
    assert m[f"i2t_r{k}"] == pytest.approx(np.mean(hits))
    top_img = np.argsort(-sims.T, axis=1)[:, :k]
    assert m[f"t2i_r{k}"] == pytest.approx(np.mean([ids[j] in top_img[j] for j in range(16)]))


def test_retrieval_rejects_bad_ids():
  with pytest.raises(ValueError, match="text_image_ids"):
    retrieval.retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 2]))


# ---- templates ---------------------------------------------------------------------------------


def test_template_and_class_lists():
  assert len(templates.CLIP_IMAGENET_TEMPLATES) == 80
  assert len(set(templates.CLIP_IMAGENET_TEMPLATES)) == 80
  assert all(t.count("{}") == 1 for t in templates.CLIP_IMAGENET_TEMPLATES)
  assert set(templates.CLIP_SIMPLE_TEMPLATES) <= set(templates.CLIP_IMAGENET_TEMPLATES)
  assert len(templates.IMAGENET_CLASSNAMES) == 1000
  assert templates.IMAGENET_CLASSNAMES[0] == "tench"
  assert templates.IMAGENET_CLASSNAMES[999] == "toilet paper"
  assert templates.IMAGENET_CLASSNAMES[207] == "Golden Retriever"
  assert len(templates.CIFAR10_CLASSNAMES) == 10 and len(templates.CIFAR100_CLASSNAMES) == 100
  assert templates.CIFAR100_CLASSNAMES[1] == "aquarium fish"


def test_get_templates_and_classnames():
  assert templates.get_templates("clip80") == templates.CLIP_IMAGENET_TEMPLATES
  assert templates.get_templates("a {}.|the {}") == ("a {}.", "the {}")
  assert len(templates.get_templates("shapes")) >= 1
  with pytest.raises(ValueError, match="unknown template set 'nope'"):
    templates.get_templates("nope")
  with pytest.raises(ValueError, match="exactly one"):
    templates.get_templates(["{} and {}"])
  assert templates.classnames_for("cifar10:3.0.2")[0] == "airplane"
  assert templates.classnames_for("mydata", ["big_dog", "cat"]) == ("big dog", "cat")
  with pytest.raises(ValueError, match="classnames"):
    templates.classnames_for("mydata")
  with pytest.raises(ValueError, match="1000"):
    templates.classnames_for("imagenet2012", ["a", "b"])


# ---- caption scoring ---------------------------------------------------------------------------

PREDICTIONS = [
    "a small red circle in the top left.",
    "two blue squares",
    "A large green triangle in the center.",
    "a yellow cross.",
    "three white circles",
]
REFERENCES = [
    ["a small red circle in the top left.", "a red circle.", "a small red circle."],
    ["two blue squares.", "blue squares in the top right and bottom left."],
    ["a large green triangle in the center.", "a green triangle."],
    ["a small white square in the bottom right.", "a white square."],
    ["three white circles.", "white circles."],
]


@pytest.mark.skipif(not captioning.java_available(), reason="needs Java (PTB tokenizer)")
def test_score_captions_equals_pycocoevalcap():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  # pycocoevalcap's own pipeline (as in its COCOEvalCap.evaluate): PTB tokenise, then score.
  ids = [101, 7, 55, 3, 9]
  gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in r] for i, r in zip(ids, REFERENCES)})
  res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in zip(ids, PREDICTIONS)})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  rouge, _ = Rouge().compute_score(gts, res)

  ours = captioning.score_captions(PREDICTIONS, REFERENCES, ("bleu", "cider", "rouge"),
                                   use_java=True)
  for n in range(4):
    assert ours[f"bleu{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
  assert ours["cider"] == pytest.approx(cider, rel=1e-12)
  assert ours["rouge_l"] == pytest.approx(rouge, rel=1e-12)
  # Sanity of the values themselves: imperfect but far from zero.
  assert 0.5 < ours["bleu1"] < 1.0 and ours["cider"] > 1.0


def test_python_tokenizer_matches_ptb_on_ordinary_captions():
  captions = PREDICTIONS + [c for r in REFERENCES for c in r] + [
      "A man's dog (big), running-fast; isn't it?", "Hello, world! 3.5 m", "two cats: ok..."]
  py = captioning.tokenize_captions({i: [c] for i, c in enumerate(captions)}, use_java=False)
  assert py[0] == ["a small red circle in the top left"]
  assert py[len(captions) - 3] == ["a man 's dog -lrb- big -rrb- running-fast is n't it"]
  if captioning.java_available():
    java = captioning.tokenize_captions({i: [c] for i, c in enumerate(captions)}, use_java=True)
    assert py == java


def test_score_captions_perfect_and_bad_input():
  perfect = captioning.score_captions(["a red circle", "two blue squares"],
                                      [["a red circle"], ["two blue squares"]], ("bleu", "rouge"),
                                      use_java=False)
  assert perfect["bleu1"] == pytest.approx(1.0, abs=1e-6)
  assert perfect["rouge_l"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown"):
    captioning.score_captions(["a"], [["a"]], ("spice",))
  with pytest.raises(ValueError, match="reference"):
    captioning.score_captions(["a"], [[]], ("bleu",), use_java=False)
  with pytest.raises(ValueError, match="predictions"):
    captioning.score_captions(["a", "b"], [["a"]], ("bleu",), use_java=False)


# ---- linear probe --------------------------------------------------------------------------------


def test_ridge_equals_a_direct_solve():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) * np.array([1, 10, 0.1, 1, 5, 2]) + 3.0
  y = rng.integers(0, 4, 50)
  mean, scale, weights, bias = linear_probe.fit_ridge(x, y, 4, [0.0, 0.5])
  # The same minimiser from the normal equations of the standardised, centred problem.
  z = (x - x.mean(0)) / x.std(0)
  onehot = np.eye(4)[y]
  for l2, w in zip([0.0, 0.5], weights):
    want = np.linalg.solve(z.T @ z / 50 + l2 * np.eye(6), z.T @ (onehot - onehot.mean(0)) / 50)
    np.testing.assert_allclose(w, want, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(bias, onehot.mean(0))
  scores = linear_probe.ridge_predict(x[:3], mean, scale, weights[0], bias)
  np.testing.assert_allclose(scores, z[:3] @ weights[0] + bias, rtol=1e-6)


def test_linear_probe_chooses_l2_on_held_out_features():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(3, 8)) * 4
  def sample(n):
    y = rng.integers(0, 3, n)
    return centres[y] + rng.normal(size=(n, 8)), y
  train_x, train_y = sample(200)
  test_x, test_y = sample(100)
  out = linear_probe.linear_probe_top1(train_x, train_y, test_x, test_y, 3, (1e-3, 1e6), 0.2)
  assert out["top1"] > 0.95 and out["l2"] == 1e-3   # a huge l2 flattens every class score
  # Pure noise: chance-level accuracy, not more.
  noise = linear_probe.linear_probe_top1(rng.normal(size=(200, 8)), rng.integers(0, 3, 200),
                                         rng.normal(size=(300, 8)), rng.integers(0, 3, 300),
                                         3, (1e-3, 1.0), 0.2)
  assert noise["top1"] < 0.5
