"""Mesh construction, logical-axis rules, FSDP sharding of state, global batches, start-up."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vlm_jax import config_defaults
from vlm_jax import sharding
from train_utils import REPO, free_port
import xla_flags



def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  c = config_defaults.mesh_config()
  c.update(data=data, fsdp=fsdp, tensor=tensor)
  return c


# Mesh.


@pytest.mark.parametrize("cfg,want", [
    (dict(), (8, 1, 1)),
    (dict(data=2, fsdp=-1), (2, 4, 1)),
    (dict(data=-1, tensor=2), (4, 1, 2)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=1, fsdp=8), (1, 8, 1)),
])
def test_make_mesh_sizes(cfg, want):
  mesh = sharding.make_mesh(_mesh_cfg(**cfg))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == want
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  devices = jax.devices()[:4]
  mesh = sharding.make_mesh(_mesh_cfg(data=-1, fsdp=2), devices=devices)
  assert tuple(mesh.shape.values()) == (2, 2, 1)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize("cfg,match", [
    (dict(data=2, fsdp=2, tensor=1),
     r"mesh: data=2, fsdp=2, tensor=1 is 4 devices, but there are 8"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(data=-1, fsdp=3), "divisible by 3; there are 8 devices"),
    (dict(data=0), r"mesh.data: must be a positive int or -1 \(the rest\); got 0"),
    (dict(tensor=1.5), "mesh.tensor: .* got 1.5"),
])
def test_make_mesh_bad_sizes(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh({**dict(data=-1, fsdp=1, tensor=1), **cfg})


# Rules.


def test_rules_from_config_and_validation():
  config = ml_collections.ConfigDict()
  config.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]   # as JSON has them
  assert sharding.logical_rules(config) == sharding.DEFAULT_RULES
  assert sharding.logical_rules(ml_collections.ConfigDict()) == sharding.DEFAULT_RULES
  config.sharding_rules = [("batch", ["data", "fsdp"]), ("embed", "model")]
  with pytest.raises(ValueError, match=r"sharding_rules\[1\] \('embed'\): unknown mesh axis "
                                       r"'model'"):
    sharding.logical_rules(config)
  config.sharding_rules = [("batch", ["data", "fsdp"])]     # lists (e.g. from YAML) are fine
  assert sharding.logical_rules(config) == (("batch", ("data", "fsdp")),)


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _wavy(scale):
  """Deterministic, cheap-to-compile initializer (random normal inits compile slowly on CPU)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    n = int(np.prod(shape))
    return (scale * jnp.sin(jnp.arange(n, dtype=dtype) * 0.7 + n)).reshape(shape)
  return init


class Toy(nn.Module):
  """A Transformer-flavoured toy: embedding, attention projection, MLP, scale and a scalar."""
  vocab: int = 32
  width: int = 16
  mlp: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    init = _wavy(0.3)
    table = self.param("embedding", _part(init, ("vocab", "embed")), (self.vocab, self.width))
    x = nn.with_logical_constraint(table[tokens], ("batch", "length", "embed"))
    head_dim = self.width // self.heads
    wq = self.param("query", _part(init, ("embed", "heads", "kv")),
                    (self.width, self.heads, head_dim))
    bq = self.param("query_bias", _part(nn.initializers.zeros, ("heads", "kv")),
                    (self.heads, head_dim))
    wo = self.param("out", _part(init, ("heads", "kv", "embed")),
                    (self.heads, head_dim, self.width))
    q = jnp.einsum("ble,ehk->blhk", x, wq) + bq
    x = x + jnp.einsum("blhk,hke->ble", q, wo)
    h = nn.Dense(self.mlp, name="mlp_in", kernel_init=_part(init, ("embed", "mlp")),
                 bias_init=_part(nn.initializers.zeros, ("mlp",)))(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    x = x + nn.Dense(self.width, name="mlp_out", kernel_init=_part(init, ("mlp", "embed")),
                     use_bias=False)(h)
    x = nn.LayerNorm(name="norm", scale_init=_part(nn.initializers.ones, ("embed",)),
                     bias_init=_part(nn.initializers.zeros, ("embed",)))(x)
    scale = self.param("logit_scale", nn.initializers.constant(2.0), ())
    return scale * x


def _abstract_state(model, tokens):
  def init(rng):
    params = model.init(rng, tokens)["params"]
    return params, optax.adamw(1e-3).init(params)
  return init, jax.eval_shape(init, jax.random.key(0))


def test_rules_map_toy_params_to_partition_specs():
  mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
  tokens = jnp.zeros((8, 4), jnp.int32)
  _, (params, _) = _abstract_state(Toy(), tokens)
  shardings = sharding.logical_to_mesh_sharding(params, mesh, sharding.DEFAULT_RULES)
  specs = jax.tree.map(lambda s: s.spec, shardings)
  assert specs == {
      "embedding": P("tensor", "fsdp"),
      "query": P("fsdp", "tensor", None),
      "query_bias": P(("tensor", "fsdp"), None),   # no 'embed' dim: fsdp shards 'heads'.
      "out": P("tensor", None, "fsdp"),
      "mlp_in": {"kernel": P("fsdp", "tensor"), "bias": P(("tensor", "fsdp"))},
      "mlp_out": {"kernel": P("tensor", "fsdp")},
      "norm": {"scale": P("fsdp"), "bias": P("fsdp")},
      "logit_scale": P(),
  }
  # Same answer as Flax's own mapping where every size divides.
  flax_specs = jax.tree.map(
      lambda s: s.spec,
      nn.logical_to_mesh_sharding(sharding.logical_specs(params), mesh, sharding.DEFAULT_RULES))
  assert flax_specs == specs
  # Activations: the batch takes fsdp first, so the width is not sharded.
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), sharding.DEFAULT_RULES) == \
      P(("data", "fsdp"), None, None)


def test_indivisible_dims_fall_back_to_replication():
  mesh = sharding.make_mesh(_mesh_cfg(data=1, fsdp=4, tensor=2))
  # vocab 33 cannot be split over tensor=2; width 12 cannot be split over fsdp=8 but can over 4.
  _, (params, _) = _abstract_state(Toy(vocab=33, width=12, mlp=24, heads=2),
                                   jnp.zeros((8, 4), jnp.int32))
  shardings = sharding.logical_to_mesh_sharding(params, mesh, sharding.DEFAULT_RULES)
  assert shardings["embedding"].spec == P(None, "fsdp")
  mesh8 = sharding.make_mesh(_mesh_cfg(data=1, fsdp=8))
  shardings = sharding.logical_to_mesh_sharding(params, mesh8, sharding.DEFAULT_RULES)
  assert shardings["norm"]["scale"].spec == P(None)
  assert shardings["mlp_in"]["kernel"].spec == P(None, "tensor")     # tensor=1 divides all
  # A batch dimension that only divides the first of ('data', 'fsdp') keeps that one.
  spec = sharding._fit_spec(P(("data", "fsdp")), (6,), sharding.make_mesh(
      _mesh_cfg(data=2, fsdp=4)), "x")
  assert spec == P("data")


def _bytes_on_device(tree, device):
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def test_fsdp_really_shards_params_and_optimizer_state():
  mesh = sharding.make_mesh(_mesh_cfg(data=1, fsdp=8))
  model = Toy(vocab=32, width=32, mlp=64, heads=4)
  tokens = jnp.zeros((8, 4), jnp.int32)
  init, abstract = _abstract_state(model, tokens)
  state_sharding = sharding.logical_to_mesh_sharding(abstract, mesh, sharding.DEFAULT_RULES)
  # Created directly sharded: no device ever holds the full state.
  params, opt_state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
  kernel = params["mlp_in"]["kernel"].value
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 64)}
  mu = opt_state[0].mu["mlp_in"]["kernel"].value
  assert mu.sharding.spec == P("fsdp", "tensor")

  state = nn.unbox((params, opt_state))
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  for device in jax.devices():
    assert _bytes_on_device(state, device) <= total / 8 * 1.05


def test_model_gives_same_output_on_every_mesh():
  """DP, FSDP and TP are config changes only: same numbers, different layouts."""
  model = Toy()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (8, 4)), jnp.int32)
  init, abstract = _abstract_state(model, tokens)
  params = nn.unbox(jax.jit(init)(jax.random.key(0))[0])
  apply = lambda p, t: model.apply({"params": p}, t)
  want = jax.jit(apply)(params, tokens)
  rules = sharding.DEFAULT_RULES
  for cfg in (dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)):
    mesh = sharding.make_mesh(_mesh_cfg(**cfg))
    p_sharding = nn.unbox(sharding.logical_to_mesh_sharding(abstract[0], mesh, rules))
    sharded_params = jax.device_put(params, p_sharding)
    batch = sharding.make_global_batch({"tokens": np.asarray(tokens)}, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      got = jax.jit(apply)(sharded_params, batch["tokens"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), got.ndim)


# Batches.


def test_make_global_batch():
  mesh = sharding.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
  rng = np.random.default_rng(1)
  batch = {
      "image": rng.normal(size=(16, 4, 4, 3)).astype(np.float32),
      "text": rng.integers(0, 50, (16, 6)).astype(np.int32),
      "mask": np.arange(16) < 13,
      "captions": [f"caption {i}" for i in range(16)],
  }
  out = sharding.make_global_batch(batch, mesh)
  assert out["captions"] == batch["captions"]
  for key in ("image", "text", "mask"):
    x = out[key]
    assert isinstance(x, jax.Array) and x.shape == batch[key].shape
    assert x.dtype == batch[key].dtype
    assert x.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(x), batch[key])
    # Each device holds its quarter of the batch (replicated over 'tensor').
    for shard in x.addressable_shards:
      assert shard.data.shape[0] == 4
      np.testing.assert_array_equal(shard.data, batch[key][shard.index])
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


# Multi-process start-up.

_LAUNCH_VARS = ("VLM_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_COUNT", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
  for var in _LAUNCH_VARS:
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


def test_single_process_run_does_not_initialize(clean_env):
  assert sharding.multiprocess_environment() is None
  assert sharding.maybe_initialize_distributed() is False
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env,want", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "1"}, "explicit"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ({"SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "node[1-2]"}, "slurm"),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"VLM_JAX_DISTRIBUTED": "0", "OMPI_COMM_WORLD_SIZE": "2"}, None),
    ({"VLM_JAX_DISTRIBUTED": "1"}, "forced"),
])
def test_multiprocess_environment_detection(clean_env, env, want):
  for k, v in env.items():
    clean_env.setenv(k, v)
  assert sharding.multiprocess_environment() == want


_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from vlm_jax import sharding
    assert sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    pid = jax.process_index()
    local = {"x": np.full((2, 3), pid, np.float32) + np.arange(2, dtype=np.float32)[:, None] * 10}
    batch = sharding.make_global_batch(local, mesh)
    total = jax.jit(lambda b: b["x"].sum(axis=1))(batch)
    print(json.dumps({"pid": pid, "count": jax.process_count(), "devices": jax.device_count(),
                      "shape": list(batch["x"].shape),
                      "sums": np.asarray(jax.experimental.multihost_utils.process_allgather(
                          total, tiled=True)).tolist()}))
""")


@pytest.mark.multiprocess
def test_two_processes_assemble_one_global_batch(tmp_path):
  """2 processes x 2 CPU devices on localhost: distributed start-up and a global batch."""
  script = tmp_path / "worker.py"
  script.write_text("import jax.experimental.multihost_utils\n" + _WORKER)
  port = free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(XLA_FLAGS=xla_flags.cpu_devices(2), JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), PYTHONPATH=REPO)
    procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    results.append(__import__("json").loads(out.strip().splitlines()[-1]))
  for r in results:
    assert r["count"] == 2 and r["devices"] == 4 and r["shape"] == [4, 3]
    # Process 0's rows (0, 10) then process 1's (1, 11), each summed over 3 columns.
    assert r["sums"] == [0.0, 30.0, 3.0, 33.0]
