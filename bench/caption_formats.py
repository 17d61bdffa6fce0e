"""Which attribute-list format generated `shapes` captions are written in: prints one JSON line.

  python bench/caption_formats.py RUN/eval/captions_<step>[_<tag>].json

For each caption evaluation in the file (`vlm_jax.evaluate` writes one entry per evaluator),
counts the predictions per format of `vlm_jax.data.shapes` (`terse` and the 34 `FORMATS` a
captioner can be trained on, see `shapes.caption_formats`), those in no format (sentences, mixed
lists), and how many predictions share a format with their references. Used to see whether a
retrieval-augmented captioner follows the caption style of a datastore it was not trained with
(README, Measurements).
"""
import argparse
import collections
import json

from vlm_jax.data import shapes


def format_name(formats):
  """'terse', or "size,thing,position ' - ' '; '" (the object separator '*' where the caption
  cannot show it: one object)."""
  if shapes.TERSE_FORMAT in formats:
    return "terse"
  order, field_separator, object_separator = formats[0]
  if len(formats) > 1:
    object_separator = "*"
  return f"{','.join(order)} {field_separator!r} {object_separator!r}"


def count(rows):
  """{'captions', 'formats': {name: n}, 'no_format', 'terse', 'as_references'} for rows of
  {'prediction', 'references'}."""
  names = collections.Counter()
  as_references = 0
  for row in rows:
    found = shapes.caption_formats(row["prediction"])
    names[format_name(found) if found else "none"] += 1
    wanted = {f for r in row["references"] for f in shapes.caption_formats(r)}
    as_references += bool(wanted & set(found))
  return {"captions": len(rows), "terse": names["terse"], "no_format": names["none"],
          "as_references": as_references,
          "formats": dict(names.most_common())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("captions", help="captions_<step>[_<tag>].json written by vlm_jax.evaluate")
  args = parser.parse_args()
  with open(args.captions) as f:
    entries = json.load(f)
  if not entries:
    raise SystemExit(f"{args.captions}: no caption evaluation in it")
  print(json.dumps({name: count(rows) for name, rows in sorted(entries.items())}))


if __name__ == "__main__":
  main()
