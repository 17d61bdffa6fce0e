"""The train state and the pure train step (contrastive + captioning, grad accumulation, NaN guard).

Everything here is a pure function of (state, batch); `vlm_jax.train` jits it with the mesh's
shardings. The contrastive loss always sees the whole global batch: under `jax.jit` the batch is
one global array, and with gradient accumulation the GradCache scheme below keeps the big-batch
loss.

Gradient accumulation (k = config.grad_accum_steps micro-batches):
  A contrastive loss over B = k*m examples is not a sum of per-micro-batch losses (every image is
  contrasted with every text of the big batch), so summing micro-batch gradients of micro-batch
  losses would give a different -- smaller-batch -- objective, and would count the temperature's
  gradient k times (open_clip's accumulation has both problems). Instead (GradCache, Gao et al.
  2021):
    1. embed all k micro-batches without gradients -> full-batch embeddings E [B, D];
    2. take the big-batch contrastive loss L(E, scale, bias) and its gradient G w.r.t. E, scale,
       bias (cheap: only the B x B logits);
    3. for each micro-batch recompute the forward pass with gradients and back-propagate the
       surrogate <E_j, stop_grad(G_j)> + (scale * G_scale + bias * G_bias) / k, plus its share of
       the (token-weighted) caption loss; the sum over j is exactly dL/dparams of the big batch.
  Memory: one micro-batch of activations plus B x D embeddings; compute: one extra forward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax import losses

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: number of train steps taken (incl. skipped ones)
  params: PyTree                  # the model's 'params' collection (unboxed)
  opt_state: PyTree
  rng: jax.Array                  # uint32 [2]: raw key data (checkpoint-friendly)
  nonfinite_total: jax.Array      # int32: steps skipped because loss/grads were NaN/Inf
  nonfinite_streak: jax.Array     # int32: ... of which the most recent ones in a row

  def as_dict(self) -> dict:
    return {f: getattr(self, f) for f in self.__dataclass_fields__}

  @classmethod
  def from_dict(cls, d: dict) -> "TrainState":
    return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def init_train_state(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                     rng: jax.Array) -> TrainState:
  """Initial state; jit it with `out_shardings` so params are created sharded."""
  params_rng, state_rng = jax.random.split(rng)
  images, text = dummy_inputs(config, batch=1)
  variables = model.init({"params": params_rng, "dropout": params_rng}, images, text)
  params = flax.linen.unbox(variables["params"])
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.key_data(state_rng) if jnp.issubdtype(state_rng.dtype, jax.dtypes.prng_key)
      else state_rng,
      nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32))


def dummy_inputs(config, batch: int = 1):
  size = config.model.image.image_size
  images = jnp.zeros((batch, size, size, 3), jnp.float32)
  text = jnp.zeros((batch, config.model.text.context_length), jnp.int32)
  return images, text


def _caption_terms(outputs, text, loss_config, pad_id):
  """Per-example-separable caption loss pieces: (sum of token NLL / n_tokens, n_tokens)."""
  logits = outputs["caption_logits"][:, :-1]
  targets = text[:, 1:]
  mask = targets != pad_id
  mean = losses.caption_xent(logits, targets, mask,
                             label_smoothing=loss_config.get("label_smoothing", 0.0))
  return mean, jnp.sum(mask.astype(jnp.float32))


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable,
                    config: ml_collections.ConfigDict, *, batch_sharding=None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  batch: dict with global arrays 'image' [B, H, W, 3] and 'text' [B, L]. metrics: float32
  scalars (loss terms, logit scale/bias, grad norm, lr, finite flag, counters).
  `batch_sharding`: NamedSharding of the batch dimension, used to keep each micro-batch spread
  over all devices under gradient accumulation.
  """
  loss_config = config.loss
  pad_id = int(config.model.text.pad_id)
  k = int(config.grad_accum_steps)
  if k < 1 or config.batch_size % k:
    raise ValueError(f"grad_accum_steps={k} must be >= 1 and divide batch_size="
                     f"{config.batch_size}")
  has_caption = bool(loss_config.caption_weight)
  has_contrastive = loss_config.contrastive != "none"

  def apply(params, images, text, rng):
    return model.apply({"params": params}, images, text, train=True, rngs={"dropout": rng})

  def loss_and_grads_single(params, batch, rng):
    def loss_fn(p):
      out = apply(p, batch["image"], batch["text"], rng)
      return losses.total_loss(out, batch["text"], loss_config, pad_id)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads

  def loss_and_grads_accum(params, batch, rng):
    def split(x):
      # Micro-batch j = examples j, j+k, j+2k, ...: with the batch sharded in contiguous blocks,
      # each micro-batch stays spread over every device.
      x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
      if batch_sharding is not None:
        spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
        x = jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
      return x

    def merge(x):  # inverse of split, for [k, m, ...] -> [B, ...]
      return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])

    micro = {"image": split(batch["image"]), "text": split(batch["text"]),
             "j": jnp.arange(k)}
    rngs = lambda j: jax.random.fold_in(rng, j)

    # 1. Embeddings of the whole batch, no gradients.
    def embed(_, mb):
      out = apply(params, mb["image"], mb["text"], rngs(mb["j"]))
      return None, (out["image_embed"], out["text_embed"], out["logit_scale"],
                    out["logit_bias"])
    _, (img, txt, scales, biases) = jax.lax.scan(embed, None, micro)
    img, txt, scale, bias = merge(img), merge(txt), scales[0], biases[0]

    # 2. Big-batch contrastive loss and its gradient w.r.t. the embeddings / scale / bias.
    if has_contrastive:
      def con_fn(img, txt, scale, bias):
        outs = dict(image_embed=img, text_embed=txt, logit_scale=scale, logit_bias=bias)
        return losses.contrastive_loss(outs, loss_config)
      con, g = jax.value_and_grad(con_fn, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
      g_img, g_txt, g_scale, g_bias = jax.tree.map(
          lambda x: loss_config.contrastive_weight * x, g)
      micro["g_img"], micro["g_txt"] = split(g_img), split(g_txt)
    else:
      con = jnp.float32(0.0)
    n_tokens = jnp.sum((batch["text"][:, 1:] != pad_id).astype(jnp.float32))

    # 3. Per micro-batch: recompute with gradients against the cached full-batch gradients.
    def micro_grads(grads_acc, mb):
      j = mb["j"]

      def surrogate(p):
        out = apply(p, mb["image"], mb["text"], rngs(j))
        total = jnp.float32(0.0)
        if has_contrastive:
          total += (jnp.vdot(out["image_embed"], mb["g_img"])
                    + jnp.vdot(out["text_embed"], mb["g_txt"]))
          total += (out["logit_scale"] * g_scale + out["logit_bias"] * g_bias) / k
        cap_sum = jnp.float32(0.0)
        if has_caption:
          mean, n = _caption_terms(out, mb["text"], loss_config, pad_id)
          cap_sum = mean * n            # this micro-batch's summed token NLL
          total += loss_config.caption_weight * cap_sum / jnp.maximum(n_tokens, 1.0)
        return total, cap_sum

      (_, cap_sum), grads = jax.value_and_grad(surrogate, has_aux=True)(params)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return grads_acc, cap_sum

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, cap_sums = jax.lax.scan(micro_grads, zeros, micro)
    cap = jnp.sum(cap_sums) / jnp.maximum(n_tokens, 1.0)
    loss = (loss_config.contrastive_weight * con if has_contrastive else 0.0)
    loss = loss + (loss_config.caption_weight * cap if has_caption else 0.0)
    metrics = dict(loss=loss, contrastive_loss=con, caption_loss=cap, logit_scale=scale,
                   logit_bias=bias)
    return loss, metrics, grads

  loss_and_grads = loss_and_grads_single if k == 1 else loss_and_grads_accum

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads = loss_and_grads(state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves params and optimizer state untouched (and is counted); the
    # update is still computed (static graph) but selected away.
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = 1 - finite.astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_total=state.nonfinite_total + skipped,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    # The optimizer's schedule counts the updates it applied: a skipped step keeps its state,
    # count included. So the rate this step used is at (steps taken - steps skipped).
    lr = schedule(state.step - state.nonfinite_total)
    metrics.update(grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32),
                   param_norm=optax.global_norm(new_state.params),
                   nonfinite_total=new_state.nonfinite_total.astype(jnp.float32),
                   nonfinite_streak=new_state.nonfinite_streak.astype(jnp.float32))
    return new_state, metrics

  return train_step
