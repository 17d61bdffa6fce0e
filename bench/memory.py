r"""Compile time and memory per device of the trainer's step, from XLA's own analysis.

  python bench/memory.py --config configs/bench_vit_b16_clip.py --devices 8 \
      --config.mesh.data=1 --config.mesh.fsdp=8 --config.batch_size=16 \
      [--config.model.scan=True --config.model.remat=True --config.model.remat_policy=dots]

The step is the trainer's own (`Runtime.make_step()`: jitted, sharded by `config.mesh`, state
donated), lowered on abstract inputs and compiled; nothing is initialised or run, so a model far
too big for this machine's memory is measured too. `--devices N` simulates N CPU devices (it
sets XLA_FLAGS before JAX starts; ignored on an accelerator). One JSON line: `compile_s`, and per
device, in bytes, what `compiled.memory_analysis()` reports: `argument` (the train state and the
batch), `output`, `alias` (outputs that reuse donated inputs), `temp` (activations and every
other buffer live during the step: what remat and scan change) and `generated_code`, and
`peak_estimate` = argument + output - alias + temp.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _simulated_devices(argv) -> None:
  """--devices N -> XLA_FLAGS for N host devices, before JAX is imported anywhere."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--devices=") else (
        argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else None)
    if value:
      flag = f"--xla_force_host_platform_device_count={int(value)}"
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


if __name__ == "__main__":
  _simulated_devices(sys.argv)

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAGS = {}


def define_flags():
  _FLAGS["devices"] = flags.DEFINE_integer("devices", None,
                                           "Simulated CPU devices (read before JAX starts).")


def measure(config) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  rt = runtime.Runtime.create(config)
  host = synthetic.config_batch(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rt.batch_sharding)
           for k, v in host.items()}
  with rt.context():
    t0 = time.perf_counter()
    lowered = rt.make_step().lower(rt.abstract_state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
            "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
            "generated_code": "generated_code_size_in_bytes"}
  record = {name: int(getattr(m, attr, 0) or 0) for name, attr in fields.items()}
  record["peak_estimate"] = (record["argument"] + record["output"] - record["alias"]
                             + record["temp"])
  model = config.model
  return {"name": "memory", "compile_s": compile_s, **record,
          "scan": bool(model.scan), "remat": bool(model.remat),
          "remat_policy": model.get("remat_policy"),
          "mesh": {k: int(v) for k, v in dict(rt.mesh.shape).items()},
          "batch_size": int(config.batch_size), "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count()}


def main(argv):
  del argv
  cli.start()
  try:
    record = measure(cli.load_config())
  except ValueError as e:
    cli.fail(e)
  synthetic.emit({"config": synthetic.config_spec(sys.argv), **record})


if __name__ == "__main__":
  define_flags()
  cli.run(main)
