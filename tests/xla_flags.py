"""XLA flags for every process the tests start, this one included.

The test programs are tiny, so compiling them costs far more than running them. XLA's backend
optimisation level 0 (LLVM -O0 for the generated CPU code) compiles them about 40% faster. It
changes how the machine code is optimised, not the program XLA compiles; benchmarks, the demo
and real runs keep XLA's default.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_devices(n: int) -> str:
  """XLA_FLAGS for `n` simulated CPU devices, compiled fast."""
  return f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}"
