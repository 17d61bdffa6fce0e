r"""The PyTorch peer of `bench/train_step.py`: the same CLIP, batch and optimizer in Hugging Face
`transformers.CLIPModel`, printing one JSON line with the same fields.

  python bench/peer_step.py --config configs/bench_cpu_clip.py [--steps 10 --warmup 3]
      [--compile=auto|yes|no] [--threads N]

What is matched, so that the comparison is fair:
  * the model: `CLIPConfig` is built from `config.model` (widths, depths, heads, MLP, context,
    vocabulary, patch, embedding, LayerNorm eps, exact GELU); the vlm_jax config must use the
    OpenAI CLIP layout HF implements (class token, ln_pre, class-token pooling, no patch bias,
    causal text with eos pooling, bias-free projections) -- anything else is an error, not a
    silently different model;
  * the batch: the same synthetic images / token ids (`bench/synthetic.py`), with the padding
    mask passed as `attention_mask` (vlm_jax masks padded keys too);
  * the loss: HF's symmetric softmax contrastive loss with the learned temperature;
  * the optimizer: AdamW with the config's lr / betas / eps / weight decay, decay on matrices
    only (ndim >= 2), the fused CPU kernel when available (else multi-tensor `foreach`);
  * threads: `torch.set_num_threads(<cores of this process>)`, reported;
  * denormals flushed to zero (`torch.set_flush_denormal(True)`), as XLA's CPU runtime does;
  * compilation: `torch.compile` of the whole training forward+loss (`--compile=auto` tries it and
    falls back to eager if it fails); the record says which ran (`torch_compile`).
FLOPs per example are the same analytic count as vlm_jax's; MFU is against a large float32
`torch.mm` measured in this process.
"""
from __future__ import annotations

import os
import platform
import sys
import time
import traceback

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def define_flags() -> dict:
  """Command-line flags (defined only when run as a script, so that tests can import this
  module next to the other benchmark script)."""
  return dict(
      **synthetic.define_common_flags("Untimed steps first (compilation happens here)."),
      compile=flags.DEFINE_enum("compile", "auto", ["auto", "yes", "no"],
                                "torch.compile the training forward: auto = try, else eager."),
      threads=flags.DEFINE_integer("threads", None,
                                   "torch threads (default: this process's cores)."),
      flush_denormal=flags.DEFINE_bool(
          "flush_denormal", True, "Flush denormal floats to zero, as XLA's CPU runtime does."))


def check_hf_compatible(model_cfg):
  """Raises ValueError naming the field when HF CLIPModel cannot compute the same model."""
  i, t = model_cfg.image, model_cfg.text
  required = [
      ("model.image.class_token", i.class_token, True),
      ("model.image.ln_pre", i.ln_pre, True), ("model.image.pool", i.pool, "cls"),
      ("model.image.posemb", i.posemb, "learn"), ("model.image.patch_bias", i.patch_bias, False),
      ("model.image.use_bias", i.use_bias, True), ("model.text.causal", t.causal, True),
      ("model.text.pool", t.pool, "eos"), ("model.text.use_bias", t.use_bias, True),
      ("model.proj_bias", model_cfg.proj_bias, False),
  ]
  for field, value, want in required:
    if value != want:
      raise ValueError(f"{field}={value!r}: the Hugging Face CLIPModel peer needs {want!r}")
  for field, act in (("model.image.act", i.act), ("model.text.act", t.act)):
    if act not in ("gelu", "quick_gelu", "gelu_tanh"):
      raise ValueError(f"{field}={act!r}: no Hugging Face equivalent")
  if i.ln_eps != t.ln_eps:
    raise ValueError(f"model.image.ln_eps={i.ln_eps} != model.text.ln_eps={t.ln_eps}: HF CLIP "
                     "configs take one eps per tower, but keep them equal here for clarity")


_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_config(model_cfg):
  """transformers.CLIPConfig equal to `config.model`."""
  import transformers  # pylint: disable=g-import-not-at-top
  check_hf_compatible(model_cfg)
  i, t = model_cfg.image, model_cfg.text
  from vlm_jax.models import vit  # pylint: disable=g-import-not-at-top
  v = vit.sizes(i)
  vision = dict(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                image_size=int(i.image_size), patch_size=v["patch_size"], num_channels=3,
                hidden_act=_HF_ACT[i.act], layer_norm_eps=float(i.ln_eps),
                projection_dim=int(model_cfg.embed_dim))
  text = dict(vocab_size=int(t.vocab_size), hidden_size=int(t.width),
              intermediate_size=int(t.mlp_dim), num_hidden_layers=int(t.depth),
              num_attention_heads=int(t.num_heads), max_position_embeddings=int(t.context_length),
              hidden_act=_HF_ACT[t.act], layer_norm_eps=float(t.ln_eps),
              pad_token_id=int(t.pad_id), bos_token_id=synthetic.BOS_ID,
              eos_token_id=synthetic.eos_id(int(t.vocab_size)),
              projection_dim=int(model_cfg.embed_dim))
  return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=int(model_cfg.embed_dim),
                                 logit_scale_init_value=float(model_cfg.logit_scale_init))


def make_optimizer(model, config):
  """AdamW as vlm_jax's `optim.make_optimizer` (decay on ndim >= 2); fused kernel if possible."""
  import torch  # pylint: disable=g-import-not-at-top
  o = config.optim
  if o.grad_clip_norm or config.freeze or o.no_decay:
    raise ValueError("optim.grad_clip_norm / freeze / optim.no_decay: the peer implements plain "
                     "AdamW only; set them to 0 / ''")
  if config.schedule.kind != "constant" or config.schedule.warmup_steps:
    raise ValueError("schedule: the peer uses a constant learning rate; set schedule.kind="
                     "'constant' and schedule.warmup_steps=0")
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  kw = dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  try:
    return torch.optim.AdamW(groups, fused=True, **kw), "fused"
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


def measure_cpu_matmul_peak(size: int = 2048, repeats: int = 5, seconds: float = 1.0) -> float:
  """FLOP/s of a large float32 torch.mm in this process (best of `repeats`)."""
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.ones(size, size), torch.ones(size, size)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      torch.mm(a, b)
      n += 1
      dt = time.perf_counter() - t0
      if dt >= seconds / repeats:
        break
    best = min(best, dt / n)
  return 2.0 * size ** 3 / best


def run(config, *, steps: int, warmup: int, compile_mode: str = "auto", threads: int | None = None,
        seed: int = 0, config_name: str = "", flush_denormal: bool = True) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 1:
    raise ValueError(f"--steps={steps} and --warmup={warmup} must both be >= 1")
  if config.task != "contrastive" or config.loss.contrastive != "softmax":
    raise ValueError(f"task={config.task!r}, loss.contrastive={config.loss.get('contrastive')!r}:"
                     " the Hugging Face CLIPModel peer trains the softmax contrastive task only")
  if config.model.dtype not in ("float32", "auto"):
    raise ValueError(f"model.dtype={config.model.dtype!r}: the CPU peer runs float32 only")
  threads = threads or synthetic.cpu_threads()
  torch.set_num_threads(threads)
  # XLA's CPU executables run with denormals flushed to zero; do the same (same arithmetic).
  flushing = bool(torch.set_flush_denormal(flush_denormal)) and flush_denormal
  torch.manual_seed(seed)

  m = config.model
  host = synthetic.config_batch(config, seed)
  pixel_values = torch.from_numpy(host["image"].transpose(0, 3, 1, 2).copy())
  input_ids = torch.from_numpy(host["text"].astype("int64"))
  attention_mask = (input_ids != int(m.text.pad_id)).long()

  model = transformers.CLIPModel(hf_config(m)).train()
  opt, opt_kind = make_optimizer(model, config)

  def loss_fn(pixel_values, input_ids, attention_mask):
    return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                 return_loss=True).loss

  def step(fn):
    opt.zero_grad(set_to_none=True)
    loss = fn(pixel_values, input_ids, attention_mask)
    loss.backward()
    opt.step()
    return loss

  compiled, compile_error = False, None
  fn = loss_fn
  t0 = time.perf_counter()
  if compile_mode in ("auto", "yes"):
    try:
      fn = torch.compile(loss_fn)
      step(fn)   # compiles forward and backward
      compiled = True
    except Exception as e:  # pylint: disable=broad-except
      if compile_mode == "yes":
        raise
      compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      traceback.print_exc(file=sys.stderr)
      fn = loss_fn
  if not compiled:
    step(fn)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    step(fn)

  times, cpu_times = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(fn)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)

  flops = tasks.get(config.task).train_flops_per_example(config)
  peak = measure_cpu_matmul_peak()
  record = {"impl": "torch_hf_clip", "config": config_name, "batch_size": int(config.batch_size),
            "steps": steps, "warmup": warmup}
  record.update(synthetic.summarize(times, config.batch_size, flops, 1, peak, cpu_times))
  record.update({
      "peak_source": "measured_f32_matmul", "peak_memory_bytes": synthetic.process_peak_rss_bytes(),
      "memory_source": "process_peak_rss", "device": platform.processor() or "cpu",
      "num_devices": 1, "threads": threads, "compile_s": compile_s, "flops_per_example": flops,
      "loss": float(loss.detach()), "dtype": "float32", "torch_compile": compiled,
      "compile_error": compile_error, "flush_denormal": flushing,
      "optimizer": f"AdamW({opt_kind})",
      "attn_implementation": model.config._attn_implementation,  # pylint: disable=protected-access
      "torch": torch.__version__, "transformers": transformers.__version__,
  })
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = {k: v.value for k, v in _FLAGS.items()}
  f["config"] = cli.load_config()
  record = run(f["config"], steps=f["steps"], warmup=f["warmup"], compile_mode=f["compile"],
               threads=f["threads"], seed=f["seed"], config_name=synthetic.config_spec(sys.argv),
               flush_denormal=f["flush_denormal"])
  synthetic.emit(record)


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(main)
