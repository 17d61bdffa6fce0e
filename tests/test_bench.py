"""Benchmarks (bench/): the JSON line, the analytic FLOP count against XLA's, the peak table,
and that the PyTorch peer computes the same model and loss as vlm_jax."""
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax import tasks
from vlm_jax import metrics
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = os.path.join(REPO, "configs/bench_cpu_clip.py:tiny")
# bench/train_step.py on the tiny config: 2 timed steps of batch 4, a fixed peak for the MFU.
TINY_STEP_ARGS = (f"--config={TINY}", "--steps=2", "--warmup=1", "--peak_tflops=0.5",
                  "--config.batch_size=4")


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = xla_flags.cpu_devices(2)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run_script(script: str, *args: str) -> str:
  """Runs bench/`script` with `args` on 2 CPU devices; returns its stdout (fails on exit != 0)."""
  proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _json_line(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.strip()]
  assert len(lines) == 1, f"expected exactly one output line, got: {stdout!r}"
  return json.loads(lines[0])


def test_train_step_prints_one_json_line_and_its_profile_is_summarised(tmp_path):
  """One traced run of bench/train_step.py: its JSON record, then profile_summary on its trace."""
  profile_dir = str(tmp_path / "prof")
  r = _json_line(_run_script("train_step.py", *TINY_STEP_ARGS, f"--profile_dir={profile_dir}"))
  for field in synthetic.FIELDS:
    assert field in r, field
  assert r["impl"] == "vlm_jax" and r["batch_size"] == 4 and r["steps"] == 2
  assert r["num_devices"] == 2                   # the step really ran over the mesh
  assert r["samples_per_s"] > 0 and r["step_time_s"] > 0
  assert r["step_time_min_s"] <= r["step_time_s"]
  assert r["samples_per_s"] == pytest.approx(4 / r["step_time_s"], rel=1e-3)
  assert r["peak_source"] == "flag" and r["peak_tflops_per_device"] == pytest.approx(0.5)
  assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5, rel=1e-3)
  config = config_utils.load_config(TINY, {"batch_size": 4})
  assert r["flops_per_example"] == pytest.approx(flops_per_example(config))
  assert r["peak_memory_bytes"] > 0 and np.isfinite(r["loss"])
  s = _json_line(_run_script("profile_summary.py", profile_dir, "--top=200"))
  assert s["op_time_ms"] > 0 and s["threads"] >= 1
  kinds = {row["kind"]: row for row in s["by_kind"]}
  assert any("fusion" in k for k in kinds), kinds      # XLA's fused ops are in the trace
  assert all(not k.split(".")[-1].isdigit() for k in kinds)   # numeric suffixes grouped away
  # With every kind listed, the fractions add up to the whole and the ms to the total.
  assert sum(r["fraction"] for r in s["by_kind"]) == pytest.approx(1.0, abs=1e-3)
  assert sum(r["ms"] for r in s["by_kind"]) == pytest.approx(s["op_time_ms"], rel=1e-3)
  assert sum(s["busy_threads"].values()) == pytest.approx(1.0, abs=1e-3)


def test_profile_summary_counts_overlapping_operations():
  import profile_summary  # pylint: disable=g-import-not-at-top
  ms = 1_000_000   # events are in ns
  # Thread a runs dot.1 over 0-10 ms and dot.3 over 15-20 ms; thread b a copy over 5-15 ms: of
  # the 20 ms, 15 have one op running and 5 have two.
  events = [(0, 10 * ms, "a", "dot.1"), (5 * ms, 15 * ms, "b", "copy_fusion.2"),
            (15 * ms, 20 * ms, "a", "dot.3")]
  assert profile_summary.busy_thread_fractions(events) == pytest.approx({1: 15 / 20, 2: 5 / 20})
  s = profile_summary.summarize(events)
  assert s["op_time_ms"] == 25.0
  assert s["by_kind"] == [{"kind": "dot", "ms": 15.0, "fraction": 0.6},
                          {"kind": "copy_fusion", "ms": 10.0, "fraction": 0.4}]
  assert s["threads"] == 2


def test_profile_summary_names_a_directory_without_trace(tmp_path, capsys):
  import profile_summary  # pylint: disable=g-import-not-at-top
  assert profile_summary.main([str(tmp_path)]) == 2
  assert str(tmp_path) in capsys.readouterr().err


def _flops_config(causal):
  """Widths where matmuls dominate, so that XLA's total (which also counts element-wise ops,
  the softmax and the AdamW update) is close to the matmul count."""
  return config_utils.load_config(TINY, {
      "model.image.width": 128, "model.image.mlp_dim": 512, "model.image.depth": 2,
      "model.image.image_size": 32, "model.image.num_heads": 2,
      "model.text.width": 128, "model.text.mlp_dim": 512, "model.text.depth": 2,
      "model.text.context_length": 16, "model.text.vocab_size": 64, "model.text.num_heads": 2,
      "model.text.causal": causal, "model.embed_dim": 64, "batch_size": 8})


def flops_per_example(config):
  return tasks.get(config.task).train_flops_per_example(config)


def test_analytic_flops_match_xla_cost_analysis():
  from vlm_jax import runtime  # pylint: disable=g-import-not-at-top
  # XLA computes causal attention in full (masked), so compare with the bidirectional text tower.
  config = _flops_config(causal=False)
  rt = runtime.Runtime.create(config, devices=jax.devices()[:1])
  host = synthetic.make_batch(8, 32, 16, 64)
  with rt.context():
    step = rt.make_step()
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    compiled = step.lower(rt.abstract_state, abstract_batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  analytic = flops_per_example(config) * config.batch_size
  # XLA's count includes the non-matmul work, so it is a bit larger; the analytic one must not
  # be larger than XLA's and must account for most of it.
  assert 0.85 * xla <= analytic <= 1.02 * xla, (analytic, xla, analytic / xla)


def test_causal_attention_is_counted_at_half():
  full = flops_per_example(_flops_config(causal=False))
  causal = flops_per_example(_flops_config(causal=True))
  depth, length, width = 2, 16, 128
  attention = 3 * depth * 2 * 2 * length * length * width    # 3 x (QK^T + AV), per example
  assert full - causal == pytest.approx(attention / 2)


@pytest.mark.parametrize("kind,key", [
    ("TPU v5 lite", "TPU v5 lite"),       # the longest matching name wins over 'TPU v5'
    ("TPU v5p", "TPU v5p"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("cpu", None)])
def test_device_names_find_their_peak(kind, key):
  device = types.SimpleNamespace(device_kind=kind)   # only the name is looked up
  assert metrics.device_peak_flops(device) == (metrics.PEAK_FLOPS[key] if key else None)


def test_cpu_peak_is_measured_when_not_in_table():
  import train_step  # pylint: disable=g-import-not-at-top
  peak, source = train_step.peak_flops_per_device()
  assert source == "measured_f32_matmul"
  assert 1e8 < peak * jax.local_device_count() < 1e14     # plausible FLOP/s for a CPU


def test_synthetic_batch_layout():
  b = synthetic.make_batch(16, 8, 12, 100, seed=3)
  assert b["image"].shape == (16, 8, 8, 3) and b["image"].dtype == np.float32
  text = b["text"]
  assert text.shape == (16, 12) and text.dtype == np.int32
  assert (text[:, 0] == synthetic.BOS_ID).all()
  for row in text:
    n = int((row != synthetic.PAD_ID).sum())
    assert row[n - 1] == 99 and (row[:n] != synthetic.PAD_ID).all() and (row[n:] == 0).all()
    assert int(np.argmax(row)) == n - 1        # eos = the largest id (argmax pooling finds it)


def test_peer_computes_the_same_loss_as_vlm_jax():
  """Same weights (HF -> vlm_jax converter) and batch give the same contrastive loss, so the peer
  benchmark runs the same function as ours."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import transformers  # pylint: disable=g-import-not-at-top
  import peer_step  # pylint: disable=g-import-not-at-top
  from vlm_jax import convert  # pylint: disable=g-import-not-at-top
  from vlm_jax.convert import configs as convert_configs  # pylint: disable=g-import-not-at-top

  config = config_utils.load_config(TINY)
  m = config.model
  torch.manual_seed(0)
  hf_cfg = peer_step.hf_config(m)
  hf = transformers.CLIPModel(hf_cfg).eval()
  host = synthetic.make_batch(4, m.image.image_size, m.text.context_length, m.text.vocab_size)
  ids = torch.from_numpy(host["text"].astype(np.int64))
  with torch.no_grad():
    want = hf(input_ids=ids, pixel_values=torch.from_numpy(host["image"].transpose(0, 3, 1, 2)),
              attention_mask=(ids != 0).long(), return_loss=True).loss.item()

  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  arch = convert_configs.arch_from_hf_config(hf_cfg.to_dict())
  params = convert.convert_state(state, "hf", arch)
  task = tasks.get(config.task)
  model = task.build_model(config)
  out = model.apply({"params": jax.tree.map(jnp.asarray, params)}, host["image"], host["text"])
  got, _ = task.objective(config, model).loss(out, host)
  assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_peer_rejects_a_model_hf_cannot_express():
  import peer_step  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config(TINY, {"model.image.pool": "map"})
  with pytest.raises(ValueError, match="model.image.pool"):
    peer_step.check_hf_compatible(config.model)


def test_matmul_floor_reads_every_dot_of_a_lowered_program():
  import matmul_floor  # pylint: disable=g-import-not-at-top
  inner = jax.jit(lambda a, b: a @ b)          # lowered as a private function called twice

  def program(a, b, q, k, image, kernel):
    attn = jnp.einsum("bqhd,bkhd->bhqk", q, k)   # batch dims 0 and 2, not leading in q/k
    conv = jax.lax.conv_general_dilated(image, kernel, (2, 2), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return inner(a, b) + inner(b, a), attn, conv

  rng = np.random.default_rng(0)
  args = [rng.standard_normal(s).astype(np.float32) for s in
          [(6, 6), (6, 6), (2, 5, 3, 4), (2, 7, 3, 4), (1, 8, 8, 3), (2, 2, 3, 4)]]
  dots, convolutions = matmul_floor.parse_dots(jax.jit(program).lower(*args).as_text())
  assert convolutions == 1 and len(dots) == 3
  square = [d for d in dots if d.lhs == (6, 6)]
  assert len(square) == 2 and square[0].flops == 2 * 6 * 6 * 6
  (attn,) = [d for d in dots if len(d.lhs) == 4]
  assert attn.lhs_batch == (0, 2) and attn.rhs_batch == (0, 2)
  assert attn.lhs_contract == (3,) and attn.rhs_contract == (3,) and attn.dtype == "f32"
  assert attn.flops == 2 * (2 * 3) * 4 * 5 * 7
  # The einsum used for the PyTorch timing is the same contraction as the dot_general.
  want = jax.lax.dot_general(args[2], args[3], ((attn.lhs_contract, attn.rhs_contract),
                                                (attn.lhs_batch, attn.rhs_batch)))
  np.testing.assert_allclose(np.einsum(attn.einsum(), args[2], args[3]), want, rtol=1e-5,
                             atol=1e-5)


def test_matmul_floor_refuses_a_step_with_loops():
  import matmul_floor  # pylint: disable=g-import-not-at-top
  looped = jax.jit(lambda a: jax.lax.fori_loop(0, 3, lambda i, x: x @ a, a))
  with pytest.raises(ValueError, match="loop"):
    matmul_floor.parse_dots(looped.lower(np.ones((4, 4), np.float32)).as_text())


def check_floor_record(r, batch_size):
  """bench/matmul_floor.py's record on the tiny benchmark (run by compare.sh below)."""
  assert r["impl"] == "matmul_floor" and r["batch_size"] == batch_size
  assert r["dots"] >= r["distinct"] > 0 and 0 < len(r["slowest"]) <= r["distinct"]
  # Forward, input-gradient and weight-gradient dots: three per dense layer, at least.
  config = config_utils.load_config(TINY)
  assert r["dots"] >= 3 * 6 * (config.model.image.depth + config.model.text.depth)
  assert r["convolutions_untimed"] == 2      # patch embedding forward + its weight gradient
  # The dots' FLOPs and the analytic count (which adds the patch-embedding convolution and
  # halves causal attention) describe the same model.
  assert 0.7 < r["matmul_flops_per_step"] / r["analytic_flops_per_step"] < 1.05
  assert r["xla_floor_s"] > 0
  assert r["max_samples_per_s_xla"] == pytest.approx(batch_size / r["xla_floor_s"], rel=1e-3)
  assert r["xla_floor_gflops"] == pytest.approx(
      r["matmul_flops_per_step"] / r["xla_floor_s"] / 1e9, rel=1e-3)
  if r["torch_floor_s"] is not None:          # torch is a test requirement, but optional here
    assert r["torch_floor_s"] > 0 and r["slowest"][0]["torch_gflops"] > 0
  totals = [row["xla_ms_total"] for row in r["slowest"]]
  assert totals == sorted(totals, reverse=True)


@pytest.mark.slow
def test_compare_script_runs_both_then_the_floor_and_summarises(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  script = os.path.join(REPO, "bench", "compare.sh")
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck:
    check = subprocess.run([shellcheck, script], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout
  env = dict(_env(), PYTHON=sys.executable, ROUNDS="1", STEPS="1", WARMUP="1",
             PEER_COMPILE="no", FLOOR_REPEATS="1", TMPDIR=str(tmp_path))
  proc = subprocess.run(["bash", script, TINY, "--config.batch_size=4"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
  assert [r.get("impl") for r in rows[:-1]] == ["vlm_jax", "torch_hf_clip", "matmul_floor"]
  ours, peer, floor, summary = rows
  for field in synthetic.FIELDS:               # the peer prints the same record as vlm_jax
    assert field in peer, field
  assert peer["torch_compile"] is False and peer["batch_size"] == 4
  assert peer["samples_per_s"] > 0 and np.isfinite(peer["loss"])
  assert summary["rounds"] == 1
  check_floor_record(floor, batch_size=4)
  assert summary["ratio_samples_per_s"] == pytest.approx(
      ours["samples_per_s"] / peer["samples_per_s"], rel=1e-3)
  assert summary["ratio_ceiling_at_xla_matmul_floor"] == pytest.approx(
      floor["max_samples_per_s_xla"] / peer["samples_per_s"], rel=1e-3)


def test_option_ab_parses_variants():
  import option_ab  # pylint: disable=g-import-not-at-top
  assert option_ab.parse_variant("base") == ("base", {})
  assert option_ab.parse_variant("v:a=true,b=512,c=0.5,d=x") == (
      "v", {"a": True, "b": 512, "c": 0.5, "d": "x"})
  with pytest.raises(ValueError, match="not OPTION=VALUE"):
    option_ab.parse_variant("v:xla_cpu_enable_fast_math")
  with pytest.raises(ValueError, match="needs a name"):
    option_ab.parse_variant(":a=1")


def test_option_ab_times_variants_round_robin():
  r = [json.loads(l) for l in _run_script(
      "option_ab.py", f"--config={TINY}", "--variant=base",
      "--variant=conc:xla_cpu_enable_concurrency_optimized_scheduler=true",
      "--rounds=2", "--steps_per_round=2").splitlines() if l.strip()]
  assert [x["variant"] for x in r] == ["base", "conc"]
  assert r[1]["options"] == {"xla_cpu_enable_concurrency_optimized_scheduler": True}
  assert all(x["steps"] == 4 and 0 < x["min_step_s"] <= x["median_step_s"] for x in r)
  assert r[0]["speedup"] == 1.0
  assert r[1]["speedup"] == pytest.approx(r[0]["median_step_s"] / r[1]["median_step_s"],
                                          rel=1e-3)
  # The same function on the same state: a scheduling option does not change the loss.
  assert r[1]["loss"] == pytest.approx(r[0]["loss"], rel=1e-5)


def test_option_ab_refuses_a_config_field_that_changes_the_state():
  """(A config field that keeps the state, the guard as lax.cond against jnp.where, is compared
  in the gpu_check dry run below.)"""
  import option_ab  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config(TINY)
  with pytest.raises(ValueError, match="change the train state"):
    option_ab.run(config, [("base", {}), ("wide", {"config.model.embed_dim": 48})], rounds=1,
                  steps_per_round=1)


def test_option_ab_names_an_option_xla_refuses():
  import option_ab  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config(TINY)
  with pytest.raises(ValueError, match="--variant bad: .*xla_cpu_no_such_option"):
    option_ab.run(config, [("base", {}), ("bad", {"xla_cpu_no_such_option": True})], rounds=1,
                  steps_per_round=1)


def test_decode_flop_count_is_xlas_and_the_open_clip_peer_runs():
  """bench/decode.py's FLOPs per cached step against XLA's cost analysis of the model's own
  decoding step (matmuls only on our side: XLA also counts the softmax, norms and GELU), and
  open_clip's CoCa.generate through the peer path on a tiny open_clip CoCa."""
  import decode  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from vlm_jax import models  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config(os.path.join(REPO, "configs/shapes_coca.py:tiny"))
  config.model.decoder.width, config.model.decoder.mlp_dim = 128, 512
  task = tasks.get(config.task)
  model = task.build_model(config)
  params = jax.jit(lambda k: flax.linen.unbox(task.init_params(model, config, k)))(
      jax.random.key(0))
  image_tokens = model.apply({"params": params}, jnp.zeros((4, 32, 32, 3)), method="image_tokens")
  cache = models.init_cache(model, {"params": params}, image_tokens, 16)
  step = jax.jit(lambda cache, tok: model.apply(
      {"params": params, "cache": cache}, image_tokens, tok, decode=True, method="decode",
      mutable=["cache"])).lower(cache, jnp.zeros((4, 1), jnp.int32)).compile()
  d = config.model.decoder
  ours = 4 * decode.cached_flops_per_token(d.width, d.depth, d.mlp_dim,
                                           task.text_spec(config).vocab_size,
                                           image_tokens.shape[1], 16)
  assert 0.85 < ours / step.cost_analysis()["flops"] <= 1.0

  pytest.importorskip("torch")
  tiny = dict(embed_dim=32,
              vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16,
                              attentional_pool=True, attn_pooler_heads=2,
                              attn_pooler_queries=5, output_tokens=True),
              text_cfg=dict(context_length=12, vocab_size=64, width=32, heads=2, layers=1,
                            embed_cls=True, output_tokens=True),
              multimodal_cfg=dict(context_length=12, vocab_size=64, width=32, heads=2, layers=1,
                                  attn_pooler_heads=2))
  # Every weight initialised (open_clip leaves its decoder's vocabulary projection as
  # torch.empty memory; the bench initialises it).
  model = decode.openclip_model(tiny)
  assert all(bool(p.detach().isfinite().all()) for p in model.parameters())
  projection = model.text_decoder.text_projection.detach()
  assert float(projection.std()) == pytest.approx(32 ** -0.5, rel=0.2)
  greedy, beam = decode.openclip_run(2, [4], [1, 3], repeats=1, model_cfg=tiny)
  assert greedy["impl"] == "open_clip" and greedy["beam"] == 1 and greedy["ms_per_token"] > 0
  assert greedy["flops_per_token"] == 2 * decode.openclip_flops_per_token(tiny, 4)
  assert "BeamSearchScorer" in beam["unavailable"] and "ms_per_token" not in beam


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
  """bench/gpu_check.sh at toy sizes on the CPU: the script a lent GPU runs cannot break unseen
  (every stage runs, except two whose script, flags and config other stages already run)."""
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck:
    check = subprocess.run([shellcheck, os.path.join(REPO, "bench", "gpu_check.sh")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout
  env = _env()
  env["PYTHON"] = sys.executable
  proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
  assert not [r for r in records if "failed" in r], records
  by_stage = {}
  for r in records:
    by_stage.setdefault(r["stage"], []).append(r)
  assert set(by_stage) == {"env", "train_step/base", "train_step/scan_remat",
                           "attention_parity", "train_step/flash_attention", "attention_ab",
                           "matmul_floor",
                           "decode", "nonfinite_guard", "train_step/prefix_lm",
                           "prefix_lm_attention_ab"}
  assert by_stage["env"][0]["devices"] == 2
  for stage in ("train_step/base", "train_step/scan_remat", "train_step/prefix_lm"):
    assert by_stage[stage][0]["samples_per_s"] > 0 and by_stage[stage][0]["mfu"] > 0
  assert by_stage["matmul_floor"][0]["xla_floor_s"] > 0
  # Fused attention against the fp32 reference rounds no worse than the bf16 einsum path does.
  parity = {(r["impl"], r["mask"]): r for r in by_stage["attention_parity"]}
  assert {impl for impl, _ in parity} == {"einsum", "xla"} and len(parity) == 6
  for (impl, mask), r in parity.items():
    assert 0 < r["max_abs_diff_out"] <= 1.5 * parity["einsum", mask]["max_abs_diff_out"] + 1e-3
    assert 0 < r["max_abs_diff_grad"] <= 1.5 * parity["einsum", mask]["max_abs_diff_grad"] + 1e-2
  attention = {r["variant"]: r for r in by_stage["attention_ab"]}
  assert set(attention) == {"einsum", "xla"}
  assert attention["xla"]["loss"] == pytest.approx(attention["einsum"]["loss"], rel=1e-4)
  # Two stages only repeat what others run: the dry run records them as skipped, saying why.
  for stage in ("train_step/flash_attention", "prefix_lm_attention_ab"):
    assert by_stage[stage] == [{"stage": stage, "skipped": by_stage[stage][0]["skipped"]}]
    assert by_stage[stage][0]["skipped"].startswith("dry run: ")
  decode = {(r["beam"], r["max_len"]): r for r in by_stage["decode"]}
  assert set(decode) == {(1, 8), (2, 8)}
  assert all(r["captions_per_s"] > 0 and r["ms_per_token"] > 0 for r in decode.values())
  # A config field as a variant: the skip guard inside lax.cond against the reference
  # jnp.where; the same loss, and the program sizes of both.
  guard = {r["variant"]: r for r in by_stage["nonfinite_guard"]}
  assert set(guard) == {"cond", "select"}
  assert guard["select"]["options"] == {"config.nonfinite_guard": "select"}
  assert guard["select"]["loss"] == pytest.approx(guard["cond"]["loss"], rel=1e-6)
  # The select path copies the moments.
  assert 0 < guard["cond"]["hlo_copies"] < guard["select"]["hlo_copies"]
  assert guard["cond"]["hlo_instructions"] < guard["select"]["hlo_instructions"]
  summary = (tmp_path / "summary.md").read_text().splitlines()
  assert summary[0].startswith("jax ") and len([l for l in summary if l.startswith("| ")]) == \
      1 + len(records) - 1       # the header row, then one row per result (env is the title)


def test_gpu_check_deadline_skips_what_it_cannot_finish_and_only_runs_the_named(tmp_path):
  """With the script's DEADLINE spent, every stage is recorded as skipped (none is started);
  --only limits the run to the stages it names."""
  env = {**_env(), "PYTHON": sys.executable, "DEADLINE": "0"}
  proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path),
                         "--only", "decode,matmul_floor"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
  assert [r["stage"] for r in records] == ["env", "matmul_floor", "decode"] or \
      [r["stage"] for r in records] == ["env", "decode", "matmul_floor"]
  assert all("skipped: the script's DEADLINE of 0 s" in r["failed"] for r in records[1:])


def test_gpu_check_without_an_accelerator_refuses_at_once(tmp_path):
  env = _env()
  env["PYTHON"] = sys.executable
  proc = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "JAX finds no GPU or TPU here" in proc.stderr and "--dry-run" in proc.stderr
  assert not (tmp_path / "summary.md").exists()


def test_index_benchmark_prints_exact_and_approximate_figures():
  r = _json_line(_run_script("index.py", "--n=4000", "--dim=32", "--queries=50",
                             "--pq_bytes=8", "--target_recall=0.9"))
  assert r["bench"] == "index" and r["n"] == 4000 and r["k"] == 10
  exact, approximate, compressed = r["exact"], r["approximate"], r["compressed"]
  assert exact["recall_at_10"] == 1.0 and exact["bytes"] == 4000 * 32 * 4
  assert 0.5 < approximate["recall_at_10"] <= 1.0
  assert 1 <= approximate["nprobe"] <= approximate["nlist"]
  assert 0.5 < compressed["recall_at_10"] <= 1.0 and compressed["pq_bytes"] == 8
  assert compressed["bytes"] < approximate["bytes"]
  for method in (exact, approximate, compressed):
    assert method["queries_per_s"] > 0 and method["build_s"] >= 0 and method["bytes"] > 0


def test_caption_formats_counts_each_prediction_by_its_format():
  import caption_formats  # pylint: disable=g-import-not-at-top
  terse = "red circle, small, top left; blue cross, large, center."
  dashed = "small - red circle - top left."          # one object: the object separator unseen
  rows = [{"prediction": terse, "references": [terse]},
          {"prediction": dashed, "references": [terse]},
          {"prediction": "a small red circle.", "references": [terse]},
          {"prediction": "red circle, small, top left.",
           "references": ["red circle, small, top left."]}]
  got = caption_formats.count(rows)
  assert got["captions"] == 4 and got["terse"] == 2 and got["no_format"] == 1
  assert got["as_references"] == 2
  assert got["formats"]["size,thing,position ' - ' '*'"] == 1
