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


# The longest tests (each a minute or more of subprocess runs) go first: pytest-xdist hands out
# work in collection order, so a long test collected last would run alone on one worker while
# the other idles (longest-first keeps both busy to the end).
LONGEST_FIRST = ("test_readme.py", "test_multiprocess.py", "test_bench.py",
                 "test_train_resume.py", "test_preemption.py", "test_first_hour.py")


def pytest_collection_modifyitems(config, items):
  rank = lambda item: next((i for i, name in enumerate(LONGEST_FIRST)
                            if item.nodeid.split("::")[0].endswith(name)), len(LONGEST_FIRST))
  items.sort(key=rank)      # stable: the order within each file is kept
  _suffix_xdist_groups(config, items)


def _suffix_xdist_groups(config, items):
  """pytest-xdist's `--dist loadgroup` sends the tests of one `xdist_group` to one worker by
  suffixing their node ids with '@<group>' on the workers; xdist 3.8 writes the suffix to
  `item._nodeid`, which pytest 9 no longer reads (node ids live in `item._id`), so the groups
  were silently ignored and module fixtures were built on both workers. Apply the suffix where
  pytest 9 keeps it."""
  if not config.getoption("loadgroup", False):
    return
  from _pytest.nodeid import coerce_node_id  # pylint: disable=g-import-not-at-top
  for item in items:
    groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                     for m in item.iter_markers("xdist_group")})
    if groups and "@" not in item.nodeid:
      item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")  # pylint: disable=protected-access
