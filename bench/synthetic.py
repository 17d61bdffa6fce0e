"""Synthetic batches and result records shared by the vlm_jax and PyTorch benchmark scripts.

Numpy only (no JAX, no torch), so that both `bench/train_step.py` and `bench/peer_step.py`
feed their models exactly the same examples and print the same JSON fields.
"""
import json
import os
import resource
import statistics

from absl import flags
import numpy as np

BOS_ID = 1
PAD_ID = 0

# Fields every benchmark line carries (tests check them; compare.sh reads samples_per_s).
FIELDS = ("impl", "config", "batch_size", "steps", "warmup", "samples_per_s", "step_time_s",
          "step_time_mean_s", "step_time_min_s", "tflops_per_device", "mfu",
          "peak_tflops_per_device", "peak_source", "peak_memory_bytes", "memory_source",
          "device", "num_devices", "threads", "compile_s", "flops_per_example", "cpu_s_per_step")


def make_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int,
               seed: int = 0) -> dict:
  """One batch: `image` float32 [B, H, W, 3] ~ N(0, 1) and `text` int32 [B, L].

  Text rows are `bos t t ... eos pad ...` with random lengths in [L/2, L]; eos is the largest
  id (vocab_size - 1) so that both 'eos' (argmax) pooling and an explicit eos id find it.
  """
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
  text = np.full((batch_size, context_length), PAD_ID, np.int32)
  lengths = rng.integers(max(context_length // 2, 2), context_length + 1, batch_size)
  for i, n in enumerate(lengths):
    text[i, 0] = BOS_ID
    text[i, 1:n - 1] = rng.integers(2, vocab_size - 1, n - 2)
    text[i, n - 1] = vocab_size - 1
  return {"image": image, "text": text}


def config_batch(config, seed: int = 0) -> dict:
  """`make_batch` at the sizes of a benchmark config (batch, image size, context, vocabulary);
  a prefix-LM config gets the fields of its task instead (`prefix_lm_batch`)."""
  m = config.model
  if config.get("task") == "prefix_lm":
    return prefix_lm_batch(config.batch_size, m.image.image_size, m.context_length,
                           m.lm.vocab_size, seed)
  return make_batch(config.batch_size, m.image.image_size, m.text.context_length,
                    m.text.vocab_size, seed)


def prefix_lm_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int,
                    seed: int = 0) -> dict:
  """A prefix-LM batch (`ops.PrefixLMText`'s fields): rows `prompt bos answer eos pad`, half of
  them questions (a prompt of L/4 tokens), half captions (no prompt); the answer's tokens and
  eos are the targets."""
  batch = make_batch(batch_size, image_size, context_length, vocab_size, seed)
  text = batch["text"]    # bos t ... eos pad: as a caption row
  is_vqa = np.arange(batch_size) % 2 == 1
  prompt_len = np.where(is_vqa, context_length // 4, 0).astype(np.int32)
  rng = np.random.default_rng(seed + 1)
  for i in np.flatnonzero(is_vqa):   # prompt tokens in front; the row keeps its length L
    row = np.concatenate([rng.integers(2, vocab_size - 1, prompt_len[i]), text[i]])
    text[i] = row[:context_length]
    if text[i, -1] not in (PAD_ID, vocab_size - 1):
      text[i, -1] = vocab_size - 1
  positions = np.arange(context_length)[None, :]
  target_mask = (positions > prompt_len[:, None]) & (text != PAD_ID)
  return {"image": batch["image"], "text": text, "prompt_len": prompt_len,
          "target_mask": target_mask, "is_vqa": is_vqa,
          "truncated": np.zeros((batch_size,), bool)}


def eos_id(vocab_size: int) -> int:
  return vocab_size - 1


def process_peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_threads() -> int:
  """Cores this process may run on (the affinity mask, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not Linux
    return os.cpu_count() or 1


def summarize(step_times, batch_size: int, flops_per_example: float, num_devices: int,
              peak_flops_per_device: float | None, cpu_times=None) -> dict:
  """Throughput fields from per-step wall times (seconds).

  `cpu_times`: per-step CPU seconds of the whole process (all threads). On a machine shared with
  other jobs, wall time stretches with the load while CPU seconds per step (the work done) stay
  comparable, so both are reported.
  """
  median = statistics.median(step_times)
  samples_per_s = batch_size / median
  tflops = samples_per_s * flops_per_example / num_devices / 1e12
  return {
      "samples_per_s": samples_per_s,
      "step_time_s": median,
      "step_time_mean_s": statistics.fmean(step_times),
      "step_time_min_s": min(step_times),
      "tflops_per_device": tflops,
      "mfu": tflops * 1e12 / peak_flops_per_device if peak_flops_per_device else None,
      "peak_tflops_per_device": (peak_flops_per_device / 1e12 if peak_flops_per_device
                                 else None),
      "cpu_s_per_step": statistics.median(cpu_times) if cpu_times else None,
  }


def config_spec(argv) -> str:
  """The `--config` argument as given on the command line (path[:arg]), for the record."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def emit(record: dict) -> str:
  """Prints the one JSON line (floats to 6 significant digits) and returns it."""
  clean = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in record.items()}
  line = json.dumps(clean, sort_keys=False)
  print(line, flush=True)
  return line


def define_common_flags(warmup_help: str) -> dict:
  """The flags both benchmark scripts take (steps, warmup, seed; the config comes with
  `--config path.py[:arg]` and its `--config.field=value` overrides, see `vlm_jax.cli`), so that
  the two measure the same thing in the same way."""
  return dict(
      steps=flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported)."),
      warmup=flags.DEFINE_integer("warmup", 3, warmup_help),
      seed=flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch."))
