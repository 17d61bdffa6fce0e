"""The table of a `bench/gpu_check.sh` run: one row per result line of OUT/results.jsonl.

  python bench/gpu_summary.py runs/gpu_check/results.jsonl
"""
import json
import sys

COLUMNS = (("samples_per_s", "samples/s"), ("tflops_per_device", "TFLOP/s/dev"), ("mfu", "MFU"),
           ("peak_memory_gib", "peak GiB"), ("compile_s", "compile s"),
           ("xla_floor_s", "matmul floor s"), ("max_samples_per_s_xla", "floor samples/s"),
           ("captions_per_s", "captions/s"), ("ms_per_token", "ms/token"),
           ("median_step_s", "step s"), ("speedup", "speedup"),
           ("max_abs_diff_out", "max |diff| out"), ("max_abs_diff_grad", "max |diff| grad"))


def fmt(value):
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def rows(records):
  env = next((r for r in records if r.get("stage") == "env"), {})
  yield (f"jax {env.get('jax')} on {env.get('devices')} x {env.get('device_kind')} "
         f"({env.get('nvidia_smi') or env.get('backend')})")
  yield ""
  yield "| stage | setting | " + " | ".join(title for _, title in COLUMNS) + " | note |"
  yield "|---|---|" + "---|" * len(COLUMNS) + "---|"
  for r in records:
    if r.get("stage") == "env":
      continue
    if r.get("peak_memory_bytes"):
      r = {**r, "peak_memory_gib": r["peak_memory_bytes"] / 2**30}
    setting = ", ".join(f"{k}={r[k]}" for k in ("batch_size", "beam", "max_len", "batch",
                                                "variant") if k in r)
    if "mask" in r:   # attention_parity
      setting = f"impl={r.get('impl')}, mask={r['mask']}"
    note = r.get("failed") or r.get("skipped") or r.get("not_available") or r.get("error") or ""
    if r.get("failed") and r.get("error_tail"):
      note += ": " + r["error_tail"][-1][:120]
    yield (f"| {r['stage']} | {setting} | " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS)
           + f" | {note} |")


def main(path):
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  print("\n".join(rows(records)))


if __name__ == "__main__":
  main(sys.argv[1])
