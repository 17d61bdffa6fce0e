"""The metric writer: JSON lines and TensorBoard scalars, read back with TensorBoard's reader."""
import numpy as np

from vlm_jax import metrics


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=10, progress_bar=False)
  writer.write(3, {"loss": 1.5, "lr": 0.1, "diverged": float("nan")})
  writer.write(6, {"loss": 1.0, "eval/zeroshot/shapes/top1": 0.75})
  writer.close()

  records = metrics.read_metrics(str(tmp_path))
  assert records == [{"step": 3, "loss": 1.5, "lr": 0.1, "diverged": None},
                     {"step": 6, "loss": 1.0, "eval/zeroshot/shapes/top1": 0.75}]

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert set(acc.Tags()["tensors"]) == {"loss", "lr", "eval/zeroshot/shapes/top1"}  # NaN: none
  loss = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
  assert loss == [(3, 1.5), (6, 1.0)]
  top1 = acc.Tensors("eval/zeroshot/shapes/top1")
  assert [e.step for e in top1] == [6]
  np.testing.assert_allclose(tf.make_ndarray(top1[0].tensor_proto), 0.75)
