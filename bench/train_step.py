r"""Train-step throughput, TFLOP/s, MFU and peak memory of vlm_jax, as one JSON line.

  python bench/train_step.py --config configs/bench_cpu_clip.py [--steps 10 --warmup 3]
  python bench/train_step.py --config configs/bench_vit_b16_clip.py --config.batch_size=512

The step is the trainer's own (`vlm_jax.runtime.Runtime.create(...).make_step()`: jitted, state
donated, sharded by `config.mesh`), fed one fixed synthetic batch that already lives on the
devices, so the number is the step itself; `--input=host` instead transfers a host batch every
step (what the trainer's prefetcher hides behind the previous step).

Fields: samples/s and step time are from the median of `--steps` individually timed steps after
`--warmup` steps (the first one compiles). TFLOP/s per device = samples/s x training FLOPs per
example / devices, with FLOPs counted analytically from the config (3 x forward matmul FLOPs,
causal attention halved; the task's `train_flops_per_example`). MFU divides that by the
device's peak: the bf16 data-sheet peak for TPUs / GPUs (`vlm_jax.metrics.PEAK_FLOPS`), and on CPU
a large float32 matmul measured in this process on all its cores (so CPU MFU is relative to what
XLA's matmul reaches here, not to a data sheet). Peak memory: the device allocator's peak when it
reports one (GPU / TPU), otherwise the process's peak RSS.

`--profile_dir DIR` writes a `jax.profiler` trace of a few steps (view in TensorBoard /
Perfetto); XLA's optimized HLO can be dumped with XLA_FLAGS=--xla_dump_to=DIR.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def define_flags() -> dict:
  """Command-line flags (defined only when run as a script, so that tests can import this
  module next to the other benchmark script)."""
  return dict(
      **synthetic.define_common_flags("Untimed steps first (the first one compiles)."),
      input=flags.DEFINE_enum("input", "device", ["device", "host"],
                              "device: one batch kept on the devices; host: a numpy batch is "
                              "transferred every step (inside the timing)."),
      peak=flags.DEFINE_float("peak_tflops", None,
                              "Override the per-device peak TFLOP/s for MFU."),
      profile_dir=flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace here."))


# ------------------------------------------------------------------------------------------------
# The step under test. Everything the benchmark needs from the trainer goes through here.


def build(config):
  """(runtime, state, step_fn) from the trainer: the same mesh, optimizer, shardings and jit."""
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  rt = runtime.Runtime.create(config)
  return rt, rt.init_state(), rt.make_step()


def device_batch(rt, host_batch):
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_global_batch(host_batch, rt.mesh)


def build_with_batch(config, seed: int = 0):
  """(runtime, state, step_fn, host batch, device batch): everything a benchmark of the step
  needs."""
  host = synthetic.config_batch(config, seed)
  rt, state, step_fn = build(config)
  return rt, state, step_fn, host, device_batch(rt, host)


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s and memory.


def measure_cpu_matmul_peak(size: int = 2048, repeats: int = 5, seconds: float = 1.0) -> float:
  """FLOP/s of a large float32 matmul in this process (XLA CPU, all intra-op threads).

  The best of `repeats` timings, each `seconds` long at least: on a shared machine the best run
  is the closest to what the cores can do.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  b = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      mm(a, b).block_until_ready()
      n += 1
      dt = time.perf_counter() - t0
      if dt >= seconds / repeats:
        break
    best = min(best, dt / n)
  return 2.0 * size ** 3 / best


def peak_flops_per_device(override_tflops: float | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it came from)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import metrics  # pylint: disable=g-import-not-at-top
  if override_tflops:
    return override_tflops * 1e12, "flag"
  device = jax.local_devices()[0]
  table = metrics.device_peak_flops(device)
  if table:
    return table, f"table:{device.device_kind}"
  if device.platform == "cpu":
    # Virtual CPU devices (--xla_force_host_platform_device_count) share the same cores.
    return measure_cpu_matmul_peak() / jax.local_device_count(), "measured_f32_matmul"
  return None, "unknown"


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the largest allocator peak over local devices, else the process RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device_peak_bytes_in_use"
  return synthetic.process_peak_rss_bytes(), "process_peak_rss"


# ------------------------------------------------------------------------------------------------


def run(config, *, steps: int, warmup: int, input_mode: str = "device",
        peak_tflops: float | None = None, profile_dir: str | None = None,
        seed: int = 0, config_name: str = "") -> dict:
  """Benchmarks the train step of `config`; returns the JSON record (not printed)."""
  import jax  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 1:
    raise ValueError(f"--steps={steps} and --warmup={warmup} must both be >= 1 (the first "
                     "warm-up step compiles)")
  m = config.model
  rt, state, step_fn, host, batch = build_with_batch(config, seed)

  with rt.context():
    t0 = time.perf_counter()
    state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
      state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))

    times, cpu_times = [], []
    for _ in range(steps):
      t0, c0 = time.perf_counter(), time.process_time()
      b = device_batch(rt, host) if input_mode == "host" else batch
      state, out = step_fn(state, b)
      jax.block_until_ready((state, out))
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
    loss = float(out["loss"])

    if profile_dir:
      with jax.profiler.trace(profile_dir):
        for i in range(3):
          with jax.profiler.StepTraceAnnotation("train", step_num=i):
            state, out = step_fn(state, batch)
        jax.block_until_ready((state, out))

  flops = rt.task.train_flops_per_example(config)
  peak, peak_source = peak_flops_per_device(peak_tflops)
  mem, mem_source = peak_memory()
  device = jax.devices()[0]
  record = {"impl": "vlm_jax", "config": config_name, "batch_size": int(config.batch_size),
            "steps": steps, "warmup": warmup}
  record.update(synthetic.summarize(times, config.batch_size, flops, jax.device_count(), peak,
                                    cpu_times))
  record.update({
      "peak_source": peak_source, "peak_memory_bytes": mem, "memory_source": mem_source,
      "device": device.device_kind, "num_devices": jax.device_count(),
      "threads": synthetic.cpu_threads() if device.platform == "cpu" else None,
      "compile_s": compile_s, "flops_per_example": flops, "loss": loss,
      "dtype": str(m.dtype), "input": input_mode, "jax": jax.__version__,
  })
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  f["config"] = cli.load_config()
  record = run(f["config"], steps=f["steps"], warmup=f["warmup"], input_mode=f["input"],
               peak_tflops=f["peak"], profile_dir=f["profile_dir"], seed=f["seed"],
               config_name=synthetic.config_spec(sys.argv))
  synthetic.emit(record)


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(main)
