r"""Caption decoding speed (greedy and beam search with the KV cache), one JSON line per setting.

  python bench/decode.py --config configs/coca_vit_b32.py [--batch 32] [--lengths 8,32,64] \
      [--beams 1,3] [--repeats 3] [--peer openclip]

The task's own `generate` predict function (what `evaluate` and `inference` run), on a
random-init model and random images (the speed does not depend on the weights), compiled as
`inference` compiles it: once per (beam, token buffer), where the buffer is the length rounded up
to a power of two (`decoding.buffer_length`) and the length itself is an argument, so lengths
that share a buffer share the compiled function. The end-of-sequence id is set to one no sequence
can produce, so every caption is decoded to its full length and ms/token compares across
lengths. Fields: `buffer_len`, `compiled` (whether the first call compiled), `compile_s` (the
first call: compilation, if any, plus one run), `captions_per_s` and `ms_per_token` (median of
`--repeats` timed calls; per token of one caption step for the whole batch). Any task with a
`generate` predict function works (CoCa, the caption-only decoder, the prefix-LM).

`--peer openclip` adds open_clip's `CoCa.generate` on its own coca_ViT-B-32 model (what
configs/coca_vit_b32.py describes), random-init, on the same batch size and lengths, in PyTorch
on this machine's CPU or GPU: greedy as top-k 1 (open_clip has no KV cache: every step runs the
text tower and the multimodal decoder over the whole prefix). Its beam search needs
transformers' `BeamSearchScorer`, which transformers 5 removed; beam records say so instead of
timing it. Records of both have `flops_per_token` (forward matmul FLOPs per generated token, the
whole batch): open_clip's captioning also runs the unimodal text tower over the whole prefix and
cross-attends to 255 pooled image tokens (ours: to the 49 patch tokens), so the speed ratio is
part architecture, part KV cache.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAGS = {}


def define_flags():
  _FLAGS.update(
      batch=flags.DEFINE_integer("batch", 32, "Images per call."),
      lengths=flags.DEFINE_list("lengths", ["8", "32", "64"], "Caption lengths (tokens)."),
      beams=flags.DEFINE_list("beams", ["1", "3"], "Beam sizes (1 = greedy)."),
      repeats=flags.DEFINE_integer("repeats", 3, "Timed calls per setting (median)."),
      seed=flags.DEFINE_integer("seed", 0, "Seed of the weights and images."),
      peer=flags.DEFINE_enum("peer", "", ["", "openclip"],
                             "Also time open_clip's CoCa.generate (see the module docstring)."))


def _median_time(call, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(config, batch: int, lengths, beams, repeats: int, seed: int = 0) -> list:
  """One record per (beam, length)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vlm_jax import decoding  # pylint: disable=g-import-not-at-top
  from vlm_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get(config.task)
  model = task.build_model(config)
  fns = task.predict_fns(config, model)
  if "generate" not in fns:
    raise ValueError(f"task {task.name!r} has no generate predict function (it provides: "
                     f"{', '.join(sorted(fns))})")
  key = jax.random.key(seed)
  params = jax.jit(lambda k: flax.linen.unbox(task.init_params(model, config, k)))(key)
  size = int(config.model.image.image_size)
  images = jax.random.normal(key, (batch, size, size, 3), jnp.float32)
  spec = task.text_spec(config)
  vocab = spec.vocab_size if spec is not None else int(config.model.decoder.vocab_size)
  room = (spec.context_length if spec is not None else int(config.model.decoder.max_length)) - 1
  flops = None
  if task.name in ("coca", "captioning") and config.model.decoder.name == "cross_attention":
    d = config.model.decoder
    image_tokens = jax.eval_shape(lambda p, x: model.apply({"params": p}, x,
                                                           method="image_tokens"),
                                  params, images).shape[1]
    flops = lambda buffer: cached_flops_per_token(int(d.width), int(d.depth), int(d.mlp_dim),
                                                  vocab, image_tokens, buffer)
  compiled = {}
  records = []
  for beam in beams:
    for length in lengths:
      buffer = decoding.buffer_length(length, room)
      fresh = (beam, buffer) not in compiled
      if fresh:
        compiled[beam, buffer] = jax.jit(
            lambda p, b, n, beam=beam, buffer=buffer: fns["generate"](
                p, b, max_len=buffer, stop_at=n, bos_id=1, eos_id=vocab + 1, beam_size=beam)[0])
      fn = compiled[beam, buffer]
      call = lambda fn=fn, length=length: jax.block_until_ready(
          fn(params, {"image": images}, length))
      t0 = time.perf_counter()
      call()
      compile_s = time.perf_counter() - t0
      median = _median_time(call, repeats)
      records.append({
          "name": "decode", "impl": "vlm_jax", "task": task.name, "beam": beam,
          "max_len": length, "buffer_len": buffer, "batch": batch, "compiled": fresh,
          "compile_s": compile_s, "captions_per_s": batch / median,
          "ms_per_token": 1000 * median / length, "device": jax.devices()[0].device_kind,
          "num_devices": 1, **({"flops_per_token": batch * beam * flops(buffer)} if flops
                                else {})})
  return records


def _openclip_reference():
  """tests/openclip_reference.py: open_clip's model code loaded without torchvision."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  import openclip_reference  # pylint: disable=g-import-not-at-top
  return openclip_reference


def openclip_model(cfg: dict, seed: int = 0, device: str = "cpu"):
  """open_clip's CoCa built from `cfg` (CoCa's arguments), random-init, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  coca_model = _openclip_reference().load_coca()
  if coca_model is None:
    raise ValueError("--peer openclip: open_clip is not installed (`make install-test` "
                     "installs it)")
  torch.manual_seed(seed)
  model = coca_model.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
  # open_clip's multimodal decoder never initialises its vocabulary projection (its
  # init_parameters, which would, is not called, and fails if called: it reads a `transformer`
  # attribute the class does not have), so the projection is torch.empty memory: at times inf
  # or NaN, and then generate fails. Initialise it as that function means to.
  decoder = model.text_decoder
  torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
  return model.eval().to(device)


def openclip_run(batch: int, lengths, beams, repeats: int, seed: int = 0,
                 model_cfg=None) -> list:
  """open_clip's CoCa.generate on its coca_ViT-B-32 model (or `model_cfg`, a dict of CoCa's
  arguments); one record per (beam, length)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  reference = _openclip_reference()
  cfg = dict(model_cfg or reference.model_config("coca_ViT-B-32"))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = openclip_model(cfg, seed, device)
  vocab = cfg["text_cfg"]["vocab_size"]
  size = cfg["vision_cfg"]["image_size"]
  images = torch.randn(batch, 3, size, size, device=device)
  common = {"name": "decode", "impl": "open_clip", "task": "coca", "batch": batch,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
  records = []
  for beam in beams:
    for length in lengths:
      if beam > 1:
        records.append({**common, "beam": beam, "max_len": length,
                        "unavailable": reference.BEAM_SEARCH_UNAVAILABLE})
        continue
      # Greedy = top-k 1; eos and pad ids no sequence produces (as ours), so every caption runs
      # to its full length; seq_len counts the start token.
      def call(length=length):
        out = model.generate(images, generation_type="top_k", top_k=1, seq_len=length + 1,
                             min_seq_len=0, sot_token_id=vocab - 2, eos_token_id=vocab + 1,
                             pad_token_id=vocab + 2)
        if device == "cuda":
          torch.cuda.synchronize()
        assert out.shape == (batch, length + 1), out.shape
      t0 = time.perf_counter()
      call()
      first_s = time.perf_counter() - t0
      median = _median_time(call, repeats)
      records.append({**common, "beam": beam, "max_len": length, "compile_s": first_s,
                      "captions_per_s": batch / median, "ms_per_token": 1000 * median / length,
                      "flops_per_token": batch * openclip_flops_per_token(cfg, length)})
  return records


def cached_flops_per_token(width: int, depth: int, mlp: int, vocab: int, image_tokens: int,
                           buffer: int) -> float:
  """Forward matmul FLOPs (2 x multiply-adds) per generated token of our cross-attention decoder
  with the KV cache: a step projects its own token, attends to the `buffer` cached positions and
  to the image tokens (their keys/values were computed once), runs the MLP and the head."""
  w = width
  per_layer = 4 * w * w + 2 * w * buffer + 2 * w * w + 2 * w * image_tokens + 2 * w * mlp
  return 2.0 * (depth * per_layer + w * vocab)


def openclip_flops_per_token(cfg: dict, length: int) -> float:
  """The same for open_clip's CoCa.generate, averaged over a caption of `length` tokens: step t
  runs the unimodal text tower and the multimodal decoder (per layer a self-attention block and
  a cross-attention block, each with its MLP) over all t tokens, projects the image tokens'
  keys/values in every cross-attention again, and computes the head at every position."""
  text, mm = cfg["text_cfg"], cfg["multimodal_cfg"]
  w, vocab = mm["width"], mm["vocab_size"]
  mlp = int(w * mm.get("mlp_ratio", 4.0))
  # The attentional pooler's first query is the pooled embedding; the others are cross-attended.
  image_tokens = cfg["vision_cfg"].get("attn_pooler_queries", 256) - 1
  tw, tmlp = text["width"], int(text["width"] * text.get("mlp_ratio", 4.0))
  total = 0
  for t in range(1, length + 1):
    text_tower = text["layers"] * t * (4 * tw * tw + 2 * tw * t + 2 * tw * tmlp)
    self_block = t * (4 * w * w + 2 * w * t + 2 * w * mlp)
    cross_block = t * (2 * w * w + 2 * w * image_tokens + 2 * w * mlp) + 2 * w * w * image_tokens
    total += text_tower + mm["layers"] * (self_block + cross_block) + t * w * vocab
  return 2.0 * total / length


def main(argv):
  del argv
  cli.start()
  f = {k: v.value for k, v in _FLAGS.items()}
  lengths, beams = [int(x) for x in f["lengths"]], [int(x) for x in f["beams"]]
  try:
    config = cli.load_config()
    records = run(config, f["batch"], lengths, beams, f["repeats"], f["seed"])
    if f["peer"] == "openclip":
      records += openclip_run(f["batch"], lengths, beams, f["repeats"], f["seed"])
  except ValueError as e:
    cli.fail(e)
  for record in records:
    synthetic.emit({"config": synthetic.config_spec(sys.argv), **record})


if __name__ == "__main__":
  define_flags()
  cli.run(main)
