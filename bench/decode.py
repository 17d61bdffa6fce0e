r"""Caption decoding speed (greedy and beam search with the KV cache), one JSON line per setting.

  python bench/decode.py --config configs/coca_vit_b32.py [--batch 32] [--lengths 8,32,64] \
      [--beams 1,3] [--repeats 3]

The task's own `generate` predict function (what `evaluate` and `inference` run), jitted once
per (beam, length), on a random-init model and random images (the speed does not depend on the
weights). The end-of-sequence id is set to one no sequence can produce, so every caption is
decoded to its full length and ms/token compares across lengths. Fields: `compile_s` (the first
call), `captions_per_s` and `ms_per_token` (median of `--repeats` timed calls; per token of one
caption step for the whole batch). Any task with a `generate` predict function works (CoCa, the
caption-only decoder).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAGS = {}


def define_flags():
  _FLAGS.update(
      batch=flags.DEFINE_integer("batch", 32, "Images per call."),
      lengths=flags.DEFINE_list("lengths", ["8", "32", "64"], "Caption lengths (tokens)."),
      beams=flags.DEFINE_list("beams", ["1", "3"], "Beam sizes (1 = greedy)."),
      repeats=flags.DEFINE_integer("repeats", 3, "Timed calls per setting (median)."),
      seed=flags.DEFINE_integer("seed", 0, "Seed of the weights and images."))


def run(config, batch: int, lengths, beams, repeats: int, seed: int = 0) -> list:
  """One record per (beam, length)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get(config.task)
  model = task.build_model(config)
  fns = task.predict_fns(config, model)
  if "generate" not in fns:
    raise ValueError(f"task {task.name!r} has no generate predict function (it provides: "
                     f"{', '.join(sorted(fns))})")
  key = jax.random.key(seed)
  params = jax.jit(lambda k: flax.linen.unbox(task.init_params(model, config, k)))(key)
  size = int(config.model.image.image_size)
  images = jax.random.normal(key, (batch, size, size, 3), jnp.float32)
  spec = task.text_spec(config)
  vocab = spec.vocab_size if spec is not None else int(config.model.decoder.vocab_size)
  records = []
  for beam in beams:
    for length in lengths:
      fn = jax.jit(lambda p, b, beam=beam, length=length: fns["generate"](
          p, b, max_len=length, bos_id=1, eos_id=vocab + 1, beam_size=beam)[0])
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, {"image": images}))
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, {"image": images}))
        times.append(time.perf_counter() - t0)
      median = statistics.median(times)
      records.append({
          "name": "decode", "task": task.name, "beam": beam, "max_len": length, "batch": batch,
          "compile_s": compile_s, "captions_per_s": batch / median,
          "ms_per_token": 1000 * median / length, "device": jax.devices()[0].device_kind,
          "num_devices": 1})
  return records


def main(argv):
  del argv
  cli.start()
  f = {k: v.value for k, v in _FLAGS.items()}
  try:
    config = cli.load_config()
    records = run(config, f["batch"], [int(x) for x in f["lengths"]],
                  [int(x) for x in f["beams"]], f["repeats"], f["seed"])
  except ValueError as e:
    cli.fail(e)
  for record in records:
    synthetic.emit({"config": synthetic.config_spec(sys.argv), **record})


if __name__ == "__main__":
  define_flags()
  cli.run(main)
