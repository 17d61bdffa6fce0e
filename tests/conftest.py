"""Test-wide setup: 8 simulated CPU devices (for the sharding tests), fast XLA compiles (see
xla_flags.py) and fp32 everywhere.

This must run before JAX initialises its backends, which is why it lives in conftest.py.
"""
import os

import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags.cpu_devices(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (used by TFDS for preparation) must not grab accelerators or print noise.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
