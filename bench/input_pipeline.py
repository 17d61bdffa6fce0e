"""Input pipeline throughput: images/s of one process, for the shapes demo config and for 224px
JPEG tar shards (WebDataset layout) generated into a temporary directory.

  python bench/input_pipeline.py                       # both, defaults below
  python bench/input_pipeline.py --shapes=tiny --batches=20 --skip_wds
  python bench/input_pipeline.py --skip_shapes --wds_images=2048 --threads=8

Compare the printed images/s with the trainer's (global batch / step time / processes): when the
pipeline is not faster, the trainer's `data/wait_seconds` metric grows.
"""
import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from vlm_jax import config_defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import config_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.data import ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position


def measure(it, batch_size, batches, warmup=2):
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t0
  return batches * batch_size / dt, dt


def write_jpeg_shards(folder, num_images, per_shard, size=224, seed=0):
  """Photo-like JPEGs (smooth gradients + noise, quality 90) with short captions."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  paths = []
  for s in range(-(-num_images // per_shard)):
    path = os.path.join(folder, f"{s:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(s * per_shard, min(num_images, (s + 1) * per_shard)):
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        for name, data in ((f"{i:08d}.jpg", buf.getvalue()),
                           (f"{i:08d}.txt", f"a photo of gradient number {i}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="demo", choices=["demo", "tiny"])
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's)")
  parser.add_argument("--batch_size", type=int, default=64, help="per-process batch size")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--threads", type=int, default=4, help="decode threads (data.read_threads)")
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
  parser.add_argument("--wds_images", type=int, default=1024)
  parser.add_argument("--skip_shapes", action="store_true")
  parser.add_argument("--skip_wds", action="store_true")
  args = parser.parse_args()

  tok = tokenizer_lib.train_sentencepiece(
      [f"a photo of gradient number {i}" for i in range(200)]
      + ["a small red circle in the top left.", "two blue squares."], None, vocab_size=128)

  if not args.skip_shapes:
    from vlm_jax.data import shapes  # pylint: disable=g-import-not-at-top
    config = config_utils.load_config(os.path.join(REPO, f"configs/shapes_coca.py:{args.shapes}"))
    config.data.data_dir = args.data_dir
    config.data.read_threads = args.threads
    config.data.worker_count = args.workers
    t0 = time.perf_counter()
    shapes.prepare(args.shapes, args.data_dir)
    print(f"shapes/{args.shapes}: prepared/checked in {time.perf_counter() - t0:.1f}s")
    it = pipeline.make_train_iterator(config.data, [ops.Caption(tok, 24)],
                                      batch_size=args.batch_size)
    ips, dt = measure(it, args.batch_size, args.batches)
    it.close()
    print(f"shapes/{args.shapes} {config.data.image_size}px train: {ips:,.0f} images/s per "
          f"process ({args.batches} batches of {args.batch_size} in {dt:.2f}s, "
          f"{args.threads} threads, {args.workers} workers)")

  if not args.skip_wds:
    with tempfile.TemporaryDirectory() as folder:
      t0 = time.perf_counter()
      write_jpeg_shards(folder, args.wds_images, per_shard=256)
      print(f"wds: wrote {args.wds_images} 224px JPEGs in {time.perf_counter() - t0:.1f}s")
      data = config_defaults.data_config()
      data.update(source="wds", image_size=224, train_shards=os.path.join(folder, "*.tar"),
                  read_threads=args.threads)
      it = pipeline.make_train_iterator(data, [ops.Caption(tok, 32)],
                                        batch_size=args.batch_size)
      ips, dt = measure(it, args.batch_size, args.batches)
      it.close()
      print(f"wds 224px JPEG train (random-resized crop): {ips:,.0f} images/s per process "
            f"({args.batches} batches of {args.batch_size} in {dt:.2f}s, {args.threads} threads)")


if __name__ == "__main__":
  main()
