"""vlm_jax.viz: the pure helpers against hand-computed values, the plots on small inputs."""
import io

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,g-bad-import-order

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import,g-bad-import-order
from train_utils import tiny_config
from vlm_jax import viz


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close("all")


def test_loss_history_sorts_and_last_record_of_a_step_wins():
  records = [
      {"step": 10, "loss": 3.0, "caption_loss": 2.0},
      {"step": 20, "loss": 2.0, "caption_loss": 1.5},
      {"step": 20, "eval/zeroshot/shapes/top1": 0.5},       # eval records have no loss
      {"step": 15, "loss": 2.5, "caption_loss": None},       # NaN is logged as null
      {"step": 20, "loss": 1.9},                              # a resumed run re-logs step 20
  ]
  h = viz.loss_history(records)
  assert set(h) == {"loss", "caption_loss"}                  # contrastive_loss never logged
  np.testing.assert_array_equal(h["loss"][0], [10, 15, 20])
  np.testing.assert_allclose(h["loss"][1], [3.0, 2.5, 1.9])
  np.testing.assert_array_equal(h["caption_loss"][0], [10, 20])
  np.testing.assert_allclose(h["caption_loss"][1], [2.0, 1.5])


def test_top_k_best_first_stable_ties_and_clipped_k():
  scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(viz.top_k(scores, 3), [[1, 3, 2], [0, 1, 2]])
  assert viz.top_k(scores, 10).shape == (2, 4)
  with pytest.raises(ValueError, match="k=0"):
    viz.top_k(scores, 0)
  with pytest.raises(ValueError, match=r"scores \[N, C\]"):
    viz.top_k(np.zeros(3), 1)


def test_to_uint8_inverts_the_normalisation():
  raw = np.array([[[[0, 128, 255]]]], np.uint8)
  mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
  normalised = (raw / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_array_equal(viz.to_uint8(normalised, mean, std), raw)
  assert viz.to_uint8(np.full((1, 2, 2, 3), 9.0)).max() == 255     # clipped, not wrapped


def test_decode_image_png_bytes_grey_and_arrays():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  np.testing.assert_array_equal(viz.decode_image(buf.getvalue()), rgb)
  np.testing.assert_array_equal(viz.decode_image(np.array(buf.getvalue(), dtype=object)), rgb)
  grey = viz.decode_image(rgb[..., 0])
  assert grey.shape == (5, 7, 3) and (grey[..., 2] == rgb[..., 0]).all()


def test_load_examples_reads_the_shapes_eval_split(shapes_data_dir):
  from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  config = tiny_config("coca", shapes_data_dir)
  ex = viz.load_examples(config.data, "eval", 5)
  assert len(ex["image"]) == len(ex["encoded"]) == len(ex["captions"]) == 5
  assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in ex["image"])
  assert ex["label"].shape == (5,) and ex["label"].min() >= 0
  names = shapes.class_names()
  for caps, label in zip(ex["captions"], ex["label"]):
    assert caps and all(isinstance(c, str) for c in caps)
    # The label is the main object: its colour and shape words occur in every caption.
    colour, shape = names[label].split()
    assert all(colour in c and shape[:4] in c for c in caps), (caps, names[label])


def _images(n, size=8):
  return [np.full((size, size, 3), 40 * i, np.uint8) for i in range(n)]


def test_plots_return_figures_and_check_shapes():
  records = [{"step": s, "loss": 10.0 / s, "contrastive_loss": 5.0 / s} for s in (1, 2, 4)]
  fig = viz.plot_losses(records)
  assert [l.get_label() for l in fig.axes[0].get_lines()] == ["loss", "contrastive_loss"]
  with pytest.raises(ValueError, match="no record"):
    viz.plot_losses([{"step": 1, "lr": 0.1}])

  fig = viz.image_grid(_images(5), [f"caption {i}" for i in range(5)], ncols=2)
  assert len(fig.axes) == 6                    # 3 rows x 2 columns, the last one blank
  assert fig.axes[4].get_title(loc="left") == "caption 4"
  with pytest.raises(ValueError, match="5 images but 2 titles"):
    viz.image_grid(_images(5), ["a", "b"])

  scores = np.array([[0.1, 0.7, 0.3], [0.9, 0.2, 0.4]])
  correct = np.array([[False, True, False], [True, False, False]])
  fig = viz.retrieval_examples(_images(2), ["t0", "t1", "t2"], scores, correct, k=2)
  lines = [t.get_text() for t in fig.axes[1].texts]
  assert lines[0].startswith("1. \u2713 t1") and lines[1].startswith("2. \u2717 t2")
  with pytest.raises(ValueError, match="images x texts"):
    viz.retrieval_examples(_images(3), ["t0", "t1", "t2"], scores)

  fig = viz.similarity_heatmap(scores, _images(2), ["p0", "p1", "p2"])
  heat = fig.axes[0]
  assert [t.get_text() for t in heat.get_xticklabels()] == ["p0", "p1", "p2"]
  outlined = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in heat.patches]
  assert outlined == [(1, 0), (0, 1)]          # each row's best prompt
  with pytest.raises(ValueError, match="images x prompts"):
    viz.similarity_heatmap(scores.T, _images(2), ["p0", "p1", "p2"])

  probs = np.array([[0.2, 0.5, 0.3]])
  fig = viz.label_bars(probs, ["a", "b", "c"], _images(1), k=2)
  assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["c", "b"]   # best on top
