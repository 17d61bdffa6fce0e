"""Device mesh, logical-axis rules, and the shardings of state and batches.

The mesh has three axes, always in this order:

* `data`   -- pure data parallelism: parameters replicated, batch split.
* `fsdp`   -- fully-sharded data parallelism (ZeRO-3): the batch is split over it too, and the
              parameters and optimizer state are split along their `embed` dimension, so each
              device stores 1/fsdp of them and XLA all-gathers a layer's weights when it runs.
* `tensor` -- tensor (model) parallelism: attention heads, MLP hidden units and the vocabulary
              are split over it (Megatron style); the batch is not.

Model code names every parameter and large activation dimension with a *logical* axis ('batch',
'embed', 'mlp', ...); `DEFAULT_RULES` maps logical axes to mesh axes. Rules are ordered: for each
array the first rule whose mesh axes are still free wins, so an activation
('batch', 'length', 'embed') gets batch -> ('data', 'fsdp') and leaves 'embed' unsharded, while a
kernel ('embed', 'mlp') gets ('fsdp', 'tensor'). Switching between DP, FSDP and TP is therefore a
config change only (`config.mesh`), e.g. `data=-1` (DP), `data=2, fsdp=4`, `fsdp=4, tensor=2`.

Typical use in a trainer::

  maybe_initialize_distributed()              # before anything touches the devices
  mesh = make_mesh(config.mesh)
  rules = logical_rules(config)
  abstract = jax.eval_shape(init_fn, rng)     # boxed (nn.Partitioned) params / optimizer state
  state_sharding = logical_to_mesh_sharding(abstract, mesh, rules)
  state = jax.jit(init_fn, out_shardings=state_sharding)(rng)    # created already sharded
  batch = make_global_batch(host_batch, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):       # for with_logical_constraint
    state, metrics = train_step(state, batch)
"""
import contextlib
import math
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Order matters: the
# batch rule must come first so that activations shard their batch, not their width, over fsdp.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),   # examples: split over every data-parallel device
    ("embed", "fsdp"),       # model width: FSDP shards params/optimizer state along it
    # MLP hidden units, attention heads, vocabulary: tensor parallel. Arrays without an 'embed'
    # dim (biases, the per-head bias) also take 'fsdp' so that FSDP shards them too; where
    # 'embed' already took 'fsdp' (kernels) or 'batch' did (activations), the ('tensor', 'fsdp')
    # rule is skipped and the plain 'tensor' rule after it applies.
    ("mlp", ("tensor", "fsdp")),
    ("mlp", "tensor"),
    ("heads", ("tensor", "fsdp")),
    ("heads", "tensor"),
    ("kv_heads", ("tensor", "fsdp")),   # grouped-query key/value heads (Llama-style LMs)
    ("kv_heads", "tensor"),
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("kv", None),            # per-head dimension
    ("length", None),        # sequence positions
    ("joint", None),         # joint image-text embedding dim (projection outputs)
    ("patch", None),         # patch-embedding input features (p * p * 3)
    ("layers", None),        # stacked-layer axis of nn.scan
    ("classes", None),       # classifier outputs
)


# ----------------------------------------------------------------------------------------------
# Mesh.


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves `config.mesh` (data, fsdp, tensor; one of them may be -1) for `num_devices`."""
  sizes = []
  for name in MESH_AXES:
    size = mesh_config[name]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size < 1 and size != -1):
      raise ValueError(f"mesh.{name}: must be a positive int or -1 (the rest); got {size!r}")
    sizes.append(int(size))
  described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1; got {described}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh: {described} needs a device count divisible by {known}; there "
                       f"are {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: {described} is {math.prod(sizes)} devices, but there are "
                     f"{num_devices}; set one axis to -1 to take the rest")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

  Axis types are Auto: Linen's logical sharding constraints and jit's sharding propagation
  decide the layouts, as Flax expects. `jax.make_mesh` orders the devices by the physical
  topology (TPU torus, GPU NVLink islands), so the last axis ('tensor') gets the closest devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ----------------------------------------------------------------------------------------------
# Logical axis rules.


def _normalize_rules(rules) -> tuple[tuple[str, Any], ...]:
  """Rules as a tuple of (logical, mesh axis | tuple of mesh axes | None), validated."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"sharding_rules[{i}]: expected (logical_axis, mesh_axes); got {rule!r}")
    logical, target = rule
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      names = target
    else:
      names = () if target is None else (target,)
    for name in names:
      if name not in MESH_AXES:
        raise ValueError(f"sharding_rules[{i}] ({logical!r}): unknown mesh axis {name!r}; "
                         f"expected one of {', '.join(MESH_AXES)}")
    out.append((logical, target))
  return tuple(out)


def logical_rules(config=None) -> tuple[tuple[str, Any], ...]:
  """The logical axis rules of an experiment: `config.sharding_rules`, else `DEFAULT_RULES`."""
  rules = None
  if config is not None and "sharding_rules" in config:
    rules = config.sharding_rules
  return _normalize_rules(DEFAULT_RULES if rules is None else rules)


# ----------------------------------------------------------------------------------------------
# Shardings.


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, where: str) -> P:
  """Drops mesh axes that do not divide their dimension (or that the mesh lacks).

  A dimension that cannot be split evenly (a 1001-token vocabulary on tensor=2, a tiny test
  model's bias on fsdp=8) is replicated over the offending axes instead of failing: trailing
  axes of a tuple are dropped first, and the change is logged.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries):
    axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    axes = tuple(a for a in axes if a in mesh.axis_names)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    if entry is not None and (axes != (entry if isinstance(entry, tuple) else (entry,))):
      logging.info("sharding: %s dim of size %d cannot be split over %s; using %s",
                   where, dim, entry, axes or "replication")
    fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*fitted)


def _is_boxed(x) -> bool:
  return isinstance(x, meta.Partitioned)


def logical_specs(tree) -> Any:
  """Logical PartitionSpecs of a tree of boxed (`nn.with_logical_partitioning`) values; P() for
  unboxed leaves (e.g. the optimizer's step count)."""
  return nn.get_partition_spec(tree)


def logical_to_mesh_sharding(tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a (possibly abstract) state tree whose params carry logical names.

  Args:
    tree: e.g. `jax.eval_shape(init_fn, rng)`: params and optimizer state where annotated
      arrays are `nn.Partitioned` boxes (optax keeps the boxes on mu/nu); plain leaves are
      replicated.
    mesh: the device mesh.
    rules: logical axis rules (`logical_rules(config)`).

  Returns:
    A tree of `NamedSharding` with one sharding where each box (or plain leaf) was. Boxes are
    pytree nodes with a single child, so this tree is a valid `out_shardings` / `in_shardings`
    prefix for both the boxed tree and its `nn.unbox`-ed version.

  Same mapping as `nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)`,
  except that mesh axes that do not divide a dimension are dropped for that dimension (see
  `_fit_spec`), so odd sizes never make the jit fail.
  """
  rules = _normalize_rules(rules)

  def leaf_sharding(path, x):
    where = jax.tree_util.keystr(path)
    if _is_boxed(x):
      spec = nn.logical_to_mesh_axes(x.names, rules)
      shape = np.shape(x.value)
    else:
      spec, shape = P(), np.shape(x)
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh, where))

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree, is_leaf=_is_boxed)


@contextlib.contextmanager
def mesh_scope(mesh: jax.sharding.Mesh, rules):
  """`jax.set_mesh(mesh)` + Linen's logical axis `rules`: needed while tracing model code that
  constrains shardings by logical names (jit, eval_shape, init)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def abstract_params(init_fn, mesh: jax.sharding.Mesh, rules) -> tuple[Any, Any]:
  """(abstract params, their NamedShardings) of `init_fn() -> boxed params`, without running it.

  The abstract params are unboxed ShapeDtypeStructs carrying their target shardings: what a
  restore should produce, and the `out_shardings` that create params already sharded.
  """
  with mesh_scope(mesh, rules):
    boxed = jax.eval_shape(init_fn)
  shardings = logical_to_mesh_sharding(boxed, mesh, rules)
  unboxed = nn.unbox(boxed)
  shardings = jax.tree.map(lambda _, s: s, unboxed, shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes: Sequence[str] = BATCH_AXES
                   ) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes; other dims replicated."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def make_global_batch(batch, mesh: jax.sharding.Mesh, batch_axes: Sequence[str] = BATCH_AXES):
  """Per-process numpy batch -> global `jax.Array`s split over the batch axes.

  Each process passes only its own examples (global batch / process count of them, in the
  order of its addressable devices); the result is one logical global batch. Numeric array
  leaves are converted; other leaves (e.g. lists of caption strings) are returned unchanged.
  """
  sharding = batch_sharding(mesh, batch_axes)

  def to_global(x):
    if isinstance(x, jax.Array):
      x = np.asarray(x)
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
      return x
    if x.ndim == 0:
      raise ValueError(f"make_global_batch: scalar leaf {x!r} has no batch dimension")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(to_global, batch)


# ----------------------------------------------------------------------------------------------
# Multi-process start-up.


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_env_int(*names: str) -> int | None:
  for name in names:
    value = _env_int(name)
    if value is not None:
      return value
  return None


def multiprocess_environment() -> str | None:
  """Which multi-process launcher this process runs under, or None for a single-process run.

  Detected, in order:
    * `VLM_JAX_DISTRIBUTED=0|1` -- force off / on (on: JAX's own cluster auto-detection).
    * 'explicit': `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES`
      (or `JAX_PROCESS_COUNT`) > 1 and `JAX_PROCESS_ID` (or `JAX_PROCESS_INDEX`).
    * 'slurm': inside `srun` with more than one task (`SLURM_NTASKS` > 1, `SLURM_STEP_NODELIST`).
    * 'openmpi': `mpirun` with more than one rank (`OMPI_COMM_WORLD_SIZE` > 1).
    * 'tpu': a multi-host TPU slice or multislice (`TPU_WORKER_HOSTNAMES` lists more than one
      host, or `MEGASCALE_COORDINATOR_ADDRESS` is set).
  A plain single-host run sets none of these.
  """
  env = os.environ
  forced = env.get("VLM_JAX_DISTRIBUTED")
  if forced is not None and forced.strip() != "":
    return "forced" if forced.strip().lower() in ("1", "true", "yes") else None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    num = _first_env_int("JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT")
    return "explicit" if num is None or num > 1 else None
  if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize` when (and only when) running multi-process.

  Must run before anything queries the devices. Returns True when JAX is now in multi-process
  mode (initialized here or before), False on a single-process run, where nothing is called.
  For the 'explicit' launcher the coordinator, process count and process id come from the
  environment (see `multiprocess_environment`); for the others JAX detects them itself.
  """
  if jax.distributed.is_initialized():
    return True
  kind = multiprocess_environment()
  if kind is None:
    return False
  if kind == "explicit":
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=_first_env_int("JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT"),
        process_id=_first_env_int("JAX_PROCESS_ID", "JAX_PROCESS_INDEX"))
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed initialized (%s): process %d of %d", kind, jax.process_index(),
               jax.process_count())
  return True
