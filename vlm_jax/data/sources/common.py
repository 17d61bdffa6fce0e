"""What every source shares: the raw-example contract, error examples, per-process shares."""

# Raw fields a source can provide (besides the image and the key every example has).
CAPTIONS, LABEL = "captions", "label"


class DataLacks(ValueError):
  """The data lacks what a consumer reads (a raw field, class names): not a broken file, but a
  dataset of another kind. Evaluations chosen automatically are skipped on it, not failed."""


def error(reason, key):
  """A raw example that stands for a record that could not be read."""
  return {"image": None, "captions": [], "label": -1, "key": key, "error": reason}


def even_share(num_examples, process_index, process_count, drop_remainder):
  """[start, end) of this process's contiguous share of `num_examples` records.

  With `drop_remainder` every process gets exactly `num_examples // process_count` records (so
  all processes see the same number of examples per epoch; at most `process_count - 1` records
  are never read); without it the shares differ by at most one and cover every record.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  start = process_index * num_examples // process_count
  if drop_remainder:
    return start, start + num_examples // process_count
  return start, (process_index + 1) * num_examples // process_count
