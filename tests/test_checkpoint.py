"""Checkpoints: restore onto other meshes, atomicity under SIGKILL, init_from messages."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from train_utils import REPO, subprocess_env, tiny_overrides, tree_equal
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_utils
from vlm_jax import runtime

def cfg(kind="coca", **mesh_and_more):
  o = tiny_overrides(None, kind=kind)
  o.update({k.replace("__", "."): v for k, v in mesh_and_more.items()})
  return config_utils.load_config(os.path.join(REPO, f"configs/shapes_{kind}.py:tiny"), o)


def test_data8_checkpoint_restores_on_fsdp8_and_one_device(tmp_path):
  rt = runtime.Runtime.create(cfg(mesh__data=8))
  state = rt.init_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  ck.save(5, state, {"position": 3}, {"config": "{}"})
  ck.close()
  want = jax.device_get(state)

  ck = ckpt_lib.Checkpointer(str(tmp_path))
  fsdp = runtime.Runtime.create(cfg(mesh__data=1, mesh__fsdp=8))
  restored, data_states, meta = ck.restore(None, fsdp.abstract_state)
  assert data_states == [{"position": 3}] and meta == {"config": "{}"}
  assert tree_equal(jax.device_get(restored), want)
  kernel = restored.params["text_projection"]["kernel"]
  assert kernel.sharding.spec == fsdp.state_shardings.params["text_projection"]["kernel"].spec
  assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 8

  one = runtime.Runtime.create(cfg(mesh__data=1), devices=jax.devices()[:1])
  restored1, _, _ = ck.restore(5, one.abstract_state)
  assert tree_equal(jax.device_get(restored1), want)
  assert len(restored1.params["text_projection"]["kernel"].devices()) == 1
  ck.close()


_SAVER = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from vlm_jax import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(sys.argv[1], async_save=True)
    small = {"w": jnp.arange(10.0)}
    ck.save(1, small, {"p": 1}, {})
    ck.wait()
    big = {"w": jnp.ones((64, 1024, 1024), jnp.float32)}   # 256 MB: a save that takes a while
    ck.save(2, big, {"p": 2}, {})
    print("saving", flush=True)
    import time; time.sleep(600)
""")


def test_sigkill_during_save_keeps_latest_checkpoint_valid(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], cwd=REPO,
                          env=subprocess_env(1), stdout=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == "saving", line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  latest = ck.latest_step()
  # Step 2 was being written when the process died: it is either absent (left as a temporary
  # directory, cleaned up now) or complete -- never a broken "latest".
  assert latest in (1, 2)
  shape = (10,) if latest == 1 else (64, 1024, 1024)
  abstract = {"w": jax.ShapeDtypeStruct(shape, np.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  restored, data_states, _ = ck.restore(latest, abstract)
  assert data_states == [{"p": latest}]
  if latest == 1:
    np.testing.assert_array_equal(restored["w"], np.arange(10.0))
  ck.close()


def test_init_from_reports_missing_and_mismatched(tmp_path):
  clip = runtime.Runtime.create(cfg("clip"))
  state = clip.init_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, state, {}, {})
  ck.close()

  ck = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  coca = runtime.Runtime.create(cfg("coca"))
  loaded, messages = ck.restore_params(None, coca.abstract_state.params)
  assert "text_projection/kernel" in loaded
  np.testing.assert_array_equal(loaded["text_projection/kernel"],
                                jax.device_get(state.params["text_projection"]["kernel"]))
  assert any("missing in checkpoint" in m and m.split(": ")[-1].startswith("decoder/")
             for m in messages)

  wide = runtime.Runtime.create(cfg("clip", model__embed_dim=48))
  with pytest.raises(ValueError, match=r"shape mismatch for .*text_projection/kernel.*\(32, 32\)"):
    ck.restore_params(None, wide.abstract_state.params)
  loaded, messages = ck.restore_params(None, wide.abstract_state.params, skip="projection")
  assert "text_projection/kernel" not in loaded and "image/embedding/kernel" in loaded
  assert any("skipped by init_from_skip: text_projection/kernel" in m for m in messages)
  # A model whose blocks are scanned would find none of a plain checkpoint's blocks: refused.
  scanned = runtime.Runtime.create(cfg("clip", model__scan=True, model__remat=True))
  with pytest.raises(ValueError, match=r"stores its Transformer blocks plain and the model "
                                       r"scanned .*--config.model.scan=False"):
    ck.restore_params(None, scanned.abstract_state.params)
  ck.close()


def test_saving_behind_is_measured_and_waited_for(tmp_path, caplog):
  """An async save still in progress does not count as the newest checkpoint, and the next save
  waits for it (with a warning) instead of letting the gap a kill would lose grow."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  ck.save(1, {"w": jnp.arange(10.0)}, {}, {})
  ck.wait()
  assert ck.finished_step() == 1
  big = {"w": jnp.ones((64, 1024, 1024), jnp.float32)}   # 256 MB: a save that takes a while
  ck.save(2, big, {}, {})
  in_progress = ck.manager.is_saving_in_progress()
  assert in_progress, "the 256 MB save finished at once; the test cannot see it in progress"
  assert ck.finished_step() == 1
  with caplog.at_level("WARNING"):
    ck.save(3, {"w": jnp.arange(3.0)}, {}, {})
  assert "the save of step 2 is still being written at step 3" in caplog.text
  assert ck.wait_seconds > 0
  ck.wait()
  assert ck.finished_step() == 3
  ck.close()
