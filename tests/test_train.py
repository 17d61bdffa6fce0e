"""Trainer tests on CPU (8 simulated devices): config, optimizer, train step, meshes, accumulation,
non-finite guard, few-step training on the tiny shapes data."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import
from train_utils import REPO, run_steps, tiny_config
from vlm_jax import config_utils
from vlm_jax import optim
from vlm_jax import runtime
from vlm_jax import tasks
from vlm_jax import train
from vlm_jax.data import pipeline


@pytest.fixture(scope="module")
def tokenizer_path(shapes_data_dir, tmp_path_factory):
  cfg = tiny_config("coca", shapes_data_dir)
  wd = tmp_path_factory.mktemp("tok")
  runtime.load_tokenizer(cfg, str(wd))
  return str(wd / "tokenizer.model")


def real_batches(config, n, tokenizer_path):
  """The first n training batches of the task's fields, as the trainer builds them."""
  from vlm_jax.data import tokenizer as tok_lib
  tok = tok_lib.Tokenizer.load(tokenizer_path)
  field_ops = tasks.get(config.task).train_ops(config, tok)
  it = pipeline.make_train_iterator(config.data, field_ops, batch_size=config.batch_size)
  out = [next(it) for _ in range(n)]
  it.close()
  fields = ["image"] + [f for op in field_ops for f in op.provides]
  return [{f: b[f] for f in fields} for b in out]


# ---- config -------------------------------------------------------------------------------------


def test_config_typo_names_the_key():
  path = os.path.join(REPO, "configs/shapes_coca.py")
  with pytest.raises(config_utils.ConfigError,
                     match=r"no config field 'optim.lrr' \(did you mean optim.lr\?\)"):
    config_utils.load_config(path, ["optim.lrr=1"])
  with pytest.raises(config_utils.ConfigError, match="'total_step' .*total_steps"):
    config_utils.load_config(path, ["total_step=1"])
  with pytest.raises(config_utils.ConfigError, match="optim.lr"):
    config_utils.load_config(path, ["optim.lr=fast"])
  with pytest.raises(config_utils.ConfigError, match="'model.nope.x'"):
    config_utils.load_config(path, ["model.nope.x=1"])


CONFIGS = ["shapes_coca", "shapes_clip", "shapes_siglip", "shapes_captioning", "shapes_classify",
           "shapes_prefixlm", "shapes_bert_mlm", "shapes_lstm_caption", "shapes_fusion_vqa",
           "shapes_fusion_itm", "shapes_resnet_clip", "shapes_resnet_classify",
           "shapes_retrieval_caption", "shapes_retrieval_caption:formats",
           "clip_vit_b16", "siglip_vit_b16", "coca_vit_b32",
           "bench_cpu_clip", "bench_vit_b16_clip", "bench_prefixlm"]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_and_build(name):
  file, _, arg = name.partition(":")
  cfg = config_utils.load_config(os.path.join(REPO, f"configs/{file}.py") + (arg and f":{arg}"),
                                 {"total_steps": 7, "optim.lr": 0.5})
  assert cfg.total_steps == 7 and cfg.optim.lr == 0.5
  task = tasks.get(cfg.task)
  spec = task.text_spec(cfg)
  if spec is not None:
    assert spec.vocab_size >= cfg.tokenizer.vocab_size
  if name in ("shapes_classify", "shapes_resnet_classify"):
    cfg.model.num_classes = 20     # the trainer takes it from the data
  if name == "shapes_fusion_vqa":
    cfg.model.answers = "yes|no|red"   # the trainer takes them from the data
  assert task.train_flops_per_example(cfg) > 0
  model = task.build_model(cfg)
  abstract = jax.eval_shape(lambda: task.init_params(model, cfg, jax.random.key(0)))
  assert jax.tree.leaves(abstract)
  with pytest.raises(AttributeError):
    cfg.new_field = 1          # locked


def test_config_files_are_plain_data():
  """Config files import nothing from vlm_jax; the library never imports them."""
  import ast
  for name in os.listdir(os.path.join(REPO, "configs")):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(REPO, "configs", name)).read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not any(m and m.split(".")[0] == "vlm_jax" for m in modules), (name, modules)


def test_unknown_fields_and_tasks_are_named():
  user = {"task": "contrastive", "model": {"embed_dimm": 3, "image": {"widht": 4}},
          "optim": {"lr": "fast"}}
  with pytest.raises(config_utils.ConfigError) as e:
    config_utils.complete(user)
  msg = str(e.value)
  assert "model.embed_dimm (did you mean embed_dim?)" in msg
  assert "model.image.widht (did you mean width?)" in msg
  assert "optim.lr: 'fast' has the wrong type" in msg
  with pytest.raises(config_utils.ConfigError, match="unknown task 'clip'.*contrastive"):
    config_utils.complete({"task": "clip"})
  with pytest.raises(config_utils.ConfigError, match="names no task"):
    config_utils.complete({"model": {}})
  with pytest.raises(config_utils.ConfigError,
                     match="unknown image tower 'resnet9'; known: clip_resnet, resnet, vit"):
    config_utils.complete({"task": "contrastive", "model": {"image": {"name": "resnet9"}}})
  with pytest.raises(config_utils.ConfigError, match="evals.extra.kind: unknown eval kind"):
    config_utils.complete({"task": "contrastive", "evals": {"extra": {"kind": "nope"}}})


def test_config_adds_eval_entries_with_their_defaults():
  cfg = config_utils.complete({"task": "contrastive", "evals": {
      "run": "zeroshot,probe", "probe": {"kind": "linear_probe", "max_train_examples": 50}}})
  assert cfg.evals.probe.max_train_examples == 50
  assert cfg.evals.probe.holdout_fraction == 0.2      # the evaluator's default
  assert cfg.evals.run == "zeroshot,probe"


def test_legacy_saved_config_is_upgraded():
  """A config.json written before tasks existed (model.kind, towers without names) loads."""
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_siglip.py"))
  saved = json.loads(config_utils.config_to_json(cfg))
  del saved["task"]
  saved["model"]["kind"] = "siglip"
  for tower in ("image", "text"):
    del saved["model"][tower]["name"]
  saved["loss"].update(caption_weight=0.0, label_smoothing=0.0)
  saved["data"].update(eval_all_captions=False, eval_max_captions=5)
  upgraded = config_utils.config_from_json(json.dumps(saved))
  assert upgraded.task == "contrastive" and upgraded.loss.contrastive == "sigmoid"
  assert upgraded.model.image.name == "vit" and upgraded.model.logit_bias_init == -10.0


# ---- optimizer ----------------------------------------------------------------------------------


def _params():
  return {"image": {"ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                    "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}},
          "text": {"token_embedding": {"embedding": jnp.ones((8, 4))}},
          "logit_scale": jnp.zeros(())}


def test_weight_decay_mask():
  mask = optim.decay_mask(_params())
  assert mask["image"]["dense"]["kernel"] and mask["text"]["token_embedding"]["embedding"]
  assert not mask["image"]["ln"]["scale"] and not mask["image"]["dense"]["bias"]
  assert not mask["logit_scale"]
  mask = optim.decay_mask(_params(), no_decay="embedding")
  assert not mask["text"]["token_embedding"]["embedding"] and mask["image"]["dense"]["kernel"]


def test_freeze_and_decay_in_update():
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py:tiny"), {
      "freeze": "^image/", "optim.weight_decay": 0.5, "optim.lr": 0.1,
      "schedule.kind": "constant", "schedule.warmup_steps": 0, "optim.grad_clip_norm": 0.0})
  params = _params()
  tx, _ = optim.make_optimizer(cfg, params)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  # Frozen: no update at all (not even decay); trainable matrices decay; scalars do not.
  assert not np.any(updates["image"]["dense"]["kernel"])
  np.testing.assert_allclose(updates["text"]["token_embedding"]["embedding"], -0.1 * 0.5)
  assert float(updates["logit_scale"]) == 0.0
  with pytest.raises(ValueError, match="matches no parameter"):
    cfg2 = config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py:tiny"),
                                    {"freeze": "^nothing/"})
    optim.make_optimizer(cfg2, params)


@pytest.mark.parametrize("kind", ["cosine", "rsqrt", "constant"])
def test_schedules(kind):
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py:tiny"), {
      "schedule.kind": kind, "schedule.warmup_steps": 10, "total_steps": 100, "optim.lr": 1.0})
  s = optim.make_schedule(cfg)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  if kind == "cosine":
    assert float(s(100)) < 1e-6 and 0.4 < float(s(55)) < 0.6
  elif kind == "rsqrt":
    np.testing.assert_allclose(float(s(40)), math.sqrt(10 / 40), rtol=1e-6)
  else:
    assert float(s(99)) == 1.0
  with pytest.raises(ValueError, match="schedule.kind"):
    cfg.schedule.kind = "linear"
    optim.make_schedule(cfg)


def test_schedule_follows_total_steps_alone():
  # The demo recipe warms up for 100 steps; --config.total_steps=20 alone used to be refused.
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py"),
                                 {"total_steps": 20, "optim.lr": 1.0})
  assert cfg.schedule.warmup_steps > 20
  warmup, warning = optim.warmup_steps(cfg)
  assert warmup == 2 and "longer than total_steps=20" in warning
  s = optim.make_schedule(cfg)
  np.testing.assert_allclose([float(s(1)), float(s(2))], [0.5, 1.0], rtol=1e-6)
  assert float(s(20)) < 1e-6                      # the cosine still decays within the run
  # A fraction of the run wins over warmup_steps and scales with total_steps.
  cfg.schedule.warmup_fraction = 0.25
  assert optim.warmup_steps(cfg) == (5, None)
  cfg.total_steps = 400
  assert optim.warmup_steps(cfg) == (100, None)
  np.testing.assert_allclose(float(optim.make_schedule(cfg)(50)), 0.5, rtol=1e-6)


# ---- training steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip", "coca", "captioning", "classify"])
def test_loss_falls_for_each_task(kind, shapes_data_dir, tokenizer_path):
  # A classifier's number of classes comes from the data in the trainer; its zero-initialised
  # head needs a larger step to move in a few updates.
  extra = {"model__num_classes": 20, "optim__lr": 1e-2} if kind == "classify" else {}
  cfg = tiny_config(kind, shapes_data_dir, tokenizer_path, **{"optim__lr": 3e-3, **extra},
                    schedule__warmup_steps=0, schedule__kind="constant")
  batches = real_batches(cfg, 2, tokenizer_path)
  # The same two batches again and again: the loss must fall quickly.
  _, hist, _ = run_steps(cfg, batches * 4, devices=jax.devices()[:1])
  first, last = hist[0]["loss"], hist[-1]["loss"]
  assert all(np.isfinite(h["loss"]) for h in hist)
  assert last < 0.9 * first, (first, last)
  terms = {"clip": {"contrastive_loss"}, "siglip": {"contrastive_loss"},
           "coca": {"contrastive_loss", "caption_loss"}, "captioning": {"caption_loss"},
           "classify": {"classification_loss"}}[kind]
  logged = {k for k in hist[-1] if k.endswith("_loss")}
  assert logged == terms and all(hist[-1][k] > 0 for k in terms)
  if kind == "classify":
    assert hist[-1]["accuracy"] > hist[0]["accuracy"]
  if kind == "siglip":
    assert hist[0]["logit_bias"] == pytest.approx(-10.0, abs=0.1)


def test_patch_dropout_trains_a_coca_on_a_sharded_mesh(shapes_data_dir, tokenizer_path):
  """FLIP-style training (half the patches dropped; the caption decoder cross-attends to the
  kept ones) on data=2 x fsdp=4: finite losses that fall, and the FLOPs the trainer logs count
  the kept tokens."""
  common = dict(optim__lr=3e-3, schedule__warmup_steps=0, schedule__kind="constant",
                mesh__data=2, mesh__fsdp=4)
  cfg = tiny_config("coca", shapes_data_dir, tokenizer_path, model__image__patch_dropout=0.5,
                    **common)
  batches = real_batches(cfg, 2, tokenizer_path)
  _, hist, rt = run_steps(cfg, batches * 4)
  assert all(np.isfinite(h["loss"]) for h in hist)
  assert hist[-1]["loss"] < 0.9 * hist[0]["loss"], (hist[0]["loss"], hist[-1]["loss"])
  full = tiny_config("coca", shapes_data_dir, tokenizer_path, **common)
  assert rt.task.train_flops_per_example(cfg) < rt.task.train_flops_per_example(full)
  # The prefix-LM reads image tokens at LM positions: refused by name.
  with pytest.raises(ValueError, match=r"model\.image\.patch_dropout: 0.5: the LM reads"):
    runtime.validate(tiny_config("prefixlm", shapes_data_dir, tokenizer_path,
                                 model__image__patch_dropout=0.5))


MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


@pytest.mark.parametrize("kind,meshes", [
    ("clip", ["data2_fsdp2_tensor2"]),                       # every axis at once: quick
    pytest.param("clip", ["data8", "data2_fsdp4"], marks=pytest.mark.slow),
    # The decoder adds cross-attention and the caption loss; pure data parallelism is the
    # same code path as for clip, so CoCa runs the sharded meshes only.
    pytest.param("coca", ["data2_fsdp4", "data2_fsdp2_tensor2"], marks=pytest.mark.slow),
])
def test_meshes_give_same_losses(kind, meshes, shapes_data_dir, tokenizer_path):
  cfg = tiny_config(kind, shapes_data_dir, tokenizer_path, optim__lr=3e-3,
                    schedule__warmup_steps=0)
  batches = real_batches(cfg, 2, tokenizer_path)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  _, ref, _ = run_steps(cfg, batches, devices=jax.devices()[:1])
  for name in meshes:
    d, f, t = MESHES[name]
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = d, f, t
    state, hist, _ = run_steps(cfg, batches)
    for r, h in zip(ref, hist):
      for key in ("loss", "contrastive_loss", "caption_loss", "grad_norm"):
        if key in r:
          np.testing.assert_allclose(h[key], r[key], rtol=2e-4, err_msg=f"{name} {key}")
    if f > 1:   # FSDP really shards: a kernel's 'embed' dim is split over the fsdp axis
      kernel = state.params["text_projection"]["kernel"]
      assert "fsdp" in str(kernel.sharding.spec)
      assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // f
      mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, jax.Array))
      assert any("fsdp" in str(x.sharding.spec) for x in mu)
    if t > 1:
      fc1 = state.params["text"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
      assert fc1.addressable_shards[0].data.shape[1] == fc1.shape[1] // t
      assert "tensor" in str(fc1.sharding.spec)


# siglip: a global term only; classify: local terms only; coca: both.
@pytest.mark.parametrize("kind", ["siglip", "classify",
                                  pytest.param("coca", marks=pytest.mark.slow)])
def test_grad_accumulation_equals_big_batch(kind, shapes_data_dir, tokenizer_path):
  extra = {"model__num_classes": 20} if kind == "classify" else {}
  cfg = tiny_config(kind, shapes_data_dir, tokenizer_path, batch_size=32, optim__lr=1e-2,
                    schedule__warmup_steps=0, schedule__kind="constant", **extra)
  batches = real_batches(cfg, 2, tokenizer_path)
  state1, big, _ = run_steps(cfg, batches, devices=jax.devices()[:4])
  cfg.grad_accum_steps = 4
  state4, acc, _ = run_steps(cfg, batches, devices=jax.devices()[:4])
  for b, a in zip(big, acc):
    assert set(a) == set(b)
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # Adam divides each gradient element by its own magnitude, so a parameter whose gradient is
  # near zero moves by up to a whole step (lr = 1e-2) for a rounding difference in that gradient:
  # the absolute tolerance is 1% of one step.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4),
               state4.params, state1.params)


def test_nonfinite_step_is_skipped_and_counted(shapes_data_dir, tokenizer_path):
  cfg = tiny_config("clip", shapes_data_dir, tokenizer_path, schedule__warmup_steps=0)
  batch = real_batches(cfg, 1, tokenizer_path)[0]
  rt = runtime.Runtime.create(cfg, jax.devices()[:2])
  state = rt.init_state()
  before = jax.device_get(state.params)
  step = rt.make_step()
  from vlm_jax import sharding
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  with rt.context():
    state, m = step(state, sharding.make_global_batch(bad, rt.mesh))
    assert not np.isfinite(float(m["loss"]))
    assert int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 1
    assert int(state.step) == 1
    from train_utils import tree_equal
    assert tree_equal(jax.device_get(state.params), before)
    state, m = step(state, sharding.make_global_batch(batch, rt.mesh))
  assert np.isfinite(float(m["loss"]))
  assert int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 0
  assert not tree_equal(jax.device_get(state.params), before)
  # The optimizer applied one update (its schedule counts only those); the logged learning rate
  # is the one that update used, not the rate of step 1.
  counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")]
  assert counts and set(counts) == {1}
  assert float(m["lr"]) == pytest.approx(float(rt.schedule(0)), rel=1e-6)
  assert float(rt.schedule(0)) != pytest.approx(float(rt.schedule(1)), rel=1e-6)


def test_skip_guards_give_the_same_states(shapes_data_dir, tokenizer_path):
  """The default guard (the update inside lax.cond) and the reference (jnp.where over an update
  always computed) give the same params, optimizer state and EMA over a non-finite step and
  two finite ones."""
  from vlm_jax import sharding
  from vlm_jax import train_step as step_lib
  from train_utils import tree_equal
  cfg = tiny_config("clip", shapes_data_dir, tokenizer_path, schedule__warmup_steps=0,
                    ema_decay=0.9)
  batch = real_batches(cfg, 1, tokenizer_path)[0]
  rt = runtime.Runtime.create(cfg, jax.devices()[:2])
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  finals = {}
  with rt.context():
    for guard in step_lib.GUARDS:
      fn = step_lib.make_train_step(rt.task.objective(cfg, rt.model), rt.tx, rt.schedule,
                                    batch_sharding=rt.batch_sharding, ema_decay=0.9,
                                    guard=guard)
      step = jax.jit(fn, in_shardings=(rt.state_shardings, rt.batch_sharding),
                     out_shardings=(rt.state_shardings, None), donate_argnums=(0,))
      state = rt.init_state()
      for b in (bad, batch, batch):
        state, _ = step(state, sharding.make_global_batch(b, rt.mesh))
      finals[guard] = jax.device_get(state)
  assert int(finals["cond"].nonfinite_total) == 1
  a, b = finals["cond"], finals["select"]
  for field in ("params", "opt_state", "ema_params", "step", "nonfinite_total"):
    assert tree_equal(getattr(a, field), getattr(b, field)), field
  with pytest.raises(ValueError, match="guard"):
    step_lib.make_train_step(None, rt.tx, rt.schedule, guard="maybe")


def test_clip_with_the_step_norm_is_optax_clip():
  """The clip that takes the train step's gradient norm scales like optax's own, given the norm
  or not, below and above the threshold; with `freeze` optax's own is used (the step's norm
  includes the frozen gradients)."""
  from vlm_jax import optim  # pylint: disable=g-import-not-at-top
  grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": -jnp.ones((4,))}
  norm = optax.tree.norm(grads)
  for max_norm in (0.5, 100.0):
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    ours = optim.clip_by_given_global_norm(max_norm)
    for kwargs in ({}, {"grad_norm": norm}):
      got, state = ours.update(grads, ours.init(grads), **kwargs)
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, theirs)
      assert state == optax.EmptyState()
  # A wrong norm shows that the given one is used: twice the norm halves the clipped update.
  clipped, _ = optim.clip_by_given_global_norm(0.5).update(grads, None, grad_norm=2 * norm)
  np.testing.assert_allclose(clipped["b"], -0.5 / (2 * float(norm)), rtol=1e-6)
  # With freeze the optimizer ignores a given norm (it clips the trained gradients by theirs).
  cfg = config_utils.load_config(os.path.join(REPO, "configs/shapes_clip.py:tiny"), {
      "freeze": "^image/", "optim.grad_clip_norm": 1e-3})
  params = _params()
  tx, _ = optim.make_optimizer(cfg, params)
  ones = jax.tree.map(jnp.ones_like, params)
  own, _ = tx.update(ones, tx.init(params), params)
  given, _ = tx.update(ones, tx.init(params), params, grad_norm=jnp.float32(1e6))
  jax.tree.map(np.testing.assert_array_equal, own, given)


def test_clipping_with_the_step_norm_gives_the_same_states(shapes_data_dir, tokenizer_path):
  """optim.clip_with_step_norm (the default) against optax's clip computing the norm again: the
  same params and optimizer state after steps that clip (max norm 0.05)."""
  from vlm_jax import sharding
  batch = None
  finals = {}
  for reuse in (True, False):
    cfg = tiny_config("clip", shapes_data_dir, tokenizer_path, schedule__warmup_steps=0,
                      optim__grad_clip_norm=0.05, optim__clip_with_step_norm=reuse)
    batch = batch or real_batches(cfg, 1, tokenizer_path)[0]
    rt = runtime.Runtime.create(cfg, jax.devices()[:2])
    with rt.context():
      step, state = rt.make_step(), rt.init_state()
      for _ in range(2):
        state, metrics = step(state, sharding.make_global_batch(batch, rt.mesh))
    assert float(metrics["grad_norm"]) > 0.05          # the clip acted
    finals[reuse] = jax.device_get(state)
  for field in ("params", "opt_state"):
    a, b = getattr(finals[True], field), getattr(finals[False], field)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_too_many_nonfinite_steps_stop_the_run(shapes_data_dir, tokenizer_path, tmp_path):
  # exp(1000) = inf: every step is non-finite from the start.
  cfg = tiny_config("clip", shapes_data_dir, tokenizer_path, model__logit_scale_init=1000.0,
                    model__max_logit_scale=float("inf"), total_steps=20, log_every_steps=2,
                    checkpoint_every_steps=2, max_consecutive_nonfinite=3,
                    batch_size=8)
  with pytest.raises(train.NonFiniteError, match="3 consecutive steps with non-finite .*up to "
                                                 "step 3"):
    train.train_and_evaluate(cfg, str(tmp_path))
  # Step 2 (streak 2 < 3) was still a good checkpoint (params untouched); step 4 was not saved.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_every_skipped_step_is_in_the_metrics(shapes_data_dir, tokenizer_path, tmp_path):
  """Checked every step, whatever the log interval: each skipped step is written with the terms
  that were not finite, and the run stops at the step that reaches the limit."""
  cfg = tiny_config("clip", shapes_data_dir, tokenizer_path, model__logit_scale_init=1000.0,
                    model__max_logit_scale=float("inf"), total_steps=20, log_every_steps=100,
                    checkpoint_every_steps=0, max_consecutive_nonfinite=4, batch_size=8)
  with pytest.raises(train.NonFiniteError, match="up to step 4"):
    train.train_and_evaluate(cfg, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert r["nonfinite_streak"] == r["step"] == r["nonfinite_total"]
    terms = set(r["nonfinite_terms"].split(","))
    assert {"loss", "contrastive_loss"} <= terms
    assert all(r[t] is None for t in terms)        # NaN / inf written as null
