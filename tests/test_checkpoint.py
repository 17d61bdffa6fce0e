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
from vlm_jax.models import layers

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
  ck.close()


def _save_params(directory, rt):
  state = rt.init_state()
  ck = ckpt_lib.Checkpointer(str(directory), async_save=False)
  ck.save(1, state, {}, {})
  ck.close()
  return jax.device_get(state.params)


def _assert_sharded_like(loaded: dict, abstract_params):
  for path, want in ckpt_lib.flatten(abstract_params).items():
    assert loaded[path].sharding.is_equivalent_to(want.sharding, len(want.shape)), path


def test_init_from_converts_plain_and_scanned_blocks(tmp_path):
  """Imported weights are stored plain (block_<i>); the pod recipes scan (blocks/, a leading
  depth axis). Each layout restores into a model of the other, on an fsdp mesh, into the
  model's shardings, and the model computes what the checkpoint's model computed."""
  plain = runtime.Runtime.create(cfg("clip", mesh__data=2, mesh__fsdp=4, model__image__depth=2))
  plain_params = _save_params(tmp_path / "plain", plain)
  scanned = runtime.Runtime.create(cfg("clip", mesh__data=2, mesh__fsdp=4, model__image__depth=2,
                                       model__scan=True, model__remat=True))

  ck = ckpt_lib.Checkpointer(str(tmp_path / "plain"), read_only=True)
  loaded, messages = ck.restore_params(None, scanned.abstract_state.params)
  ck.close()
  want = ckpt_lib.flatten(layers.stack_block_params(plain_params))
  assert sorted(loaded) == sorted(want)
  for path, value in want.items():
    np.testing.assert_array_equal(jax.device_get(loaded[path]), value, err_msg=path)
  _assert_sharded_like(loaded, scanned.abstract_state.params)
  assert any("blocks under image/encoder/ are plain and the model's scanned" in m
             for m in messages)
  assert not any("missing" in m or "unused" in m for m in messages), messages

  # The same function: the scanned model on the converted params embeds as the plain one did.
  batch = {"image": np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32),
           "text": np.random.default_rng(1).integers(3, 60, size=(8, 8)).astype(np.int32)}
  for fn in ("encode_images", "encode_texts"):
    embed = lambda rt, params, fn=fn: np.asarray(rt.task.predict_fns(rt.config, rt.model)[fn](
        params, batch))
    np.testing.assert_allclose(embed(scanned, ckpt_lib.unflatten(loaded)),
                               embed(plain, plain_params), rtol=1e-5, atol=1e-6, err_msg=fn)

  # The trainer's path (`--config.init_from`): the scanned run starts from the plain params.
  tuned = runtime.Runtime.create(cfg("clip", mesh__data=2, mesh__fsdp=4, model__image__depth=2,
                                     model__scan=True, model__remat=True,
                                     init_from=str(tmp_path / "plain")))
  started = tuned.init_params_from(tuned.init_state())
  np.testing.assert_array_equal(
      jax.device_get(started.params["image"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"])[1],
      plain_params["image"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"])

  # And back: a scanned checkpoint into the plain model.
  scanned_params = _save_params(tmp_path / "scanned", scanned)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "scanned"), read_only=True)
  loaded, messages = ck.restore_params(None, plain.abstract_state.params)
  want = ckpt_lib.flatten(layers.unstack_block_params(scanned_params))
  assert sorted(loaded) == sorted(want)
  for path, value in want.items():
    np.testing.assert_array_equal(jax.device_get(loaded[path]), value, err_msg=path)
  _assert_sharded_like(loaded, plain.abstract_state.params)
  # init_from_skip names the model's params: one block left out of a restored stack.
  loaded, messages = ck.restore_params(None, plain.abstract_state.params, skip=r"/block_1/")
  assert "image/encoder/block_0/mlp/fc1/kernel" in loaded
  assert not any("/block_1/" in p for p in loaded)
  assert any("skipped by init_from_skip: image/encoder/block_1/mlp/fc1/kernel" in m
             for m in messages)
  # A deeper plain model does not take a shallower scanned stack: the shapes are named.
  deeper = runtime.Runtime.create(cfg("clip", model__image__depth=3))
  with pytest.raises(ValueError, match=r"shape mismatch for image/encoder/blocks/.*checkpoint "
                                       r"\(2, .*vs model \(3, "):
    ck.restore_params(None, deeper.abstract_state.params)
  ck.close()

  # A scanned model some of whose blocks the plain checkpoint lacks keeps those params fresh.
  ck = ckpt_lib.Checkpointer(str(tmp_path / "plain"), read_only=True)
  loaded, messages = ck.restore_params(None, scanned.abstract_state.params, skip=r"/block_1/")
  ck.close()
  assert "image/encoder/blocks/mlp/fc1/kernel" not in loaded and "logit_scale" in loaded
  assert any("kept fresh init: image/encoder/blocks/mlp/fc1/kernel (only 1 of its 2 blocks" in m
             for m in messages)


def test_init_from_resamples_the_image_position_embedding_to_another_grid(tmp_path):
  """Fine-tuning at a higher resolution: the 32 px run's 8x8 position embedding starts the
  48 px model's 12x12 one (resized, into its sharding); every other param loads as it is."""
  low = runtime.Runtime.create(cfg("clip", mesh__data=2, mesh__fsdp=4))
  params = _save_params(tmp_path / "low", low)
  high = runtime.Runtime.create(cfg("clip", mesh__data=2, mesh__fsdp=4,
                                    model__image__image_size=48))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "low"), read_only=True)
  loaded, messages = ck.restore_params(None, high.abstract_state.params)
  ck.close()
  saved = params["image"]["pos_embedding"]
  assert saved.shape[0] == 64 and loaded["image/pos_embedding"].shape[0] == 144
  np.testing.assert_allclose(jax.device_get(loaded["image/pos_embedding"]),
                             layers.resample_grid_posemb(saved, 0, 12), atol=1e-6)
  assert any("image/pos_embedding resampled from a 8x8 grid to 12x12" in m for m in messages)
  assert sorted(loaded) == sorted(ckpt_lib.flatten(high.abstract_state.params))
  _assert_sharded_like(loaded, high.abstract_state.params)
  # A text position embedding of another length is no grid: still a named shape mismatch.
  longer = runtime.Runtime.create(cfg("clip", model__text__context_length=12))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "low"), read_only=True)
  with pytest.raises(ValueError, match=r"shape mismatch for text/pos_embedding"):
    ck.restore_params(None, longer.abstract_state.params)
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
