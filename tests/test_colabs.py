"""The notebooks in colabs/: committed without outputs, and runnable top to bottom on CPU.

Each notebook has one code cell tagged "parameters"; the tests replace its source with tiny
settings (a 1-layer model, a few steps on shapes/tiny) and execute the notebook with nbclient in
a fresh kernel, as a user would ("Run all"). The evaluate_checkpoint notebook runs on the
checkpoint the quickstart run wrote (both in one test); vqa_captioning runs in
tests/test_prefix_lm.py on the prefix-LM that module trains. The executed notebooks are checked for
errors and for the figures and printed results each section promises.
"""
import base64
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from data_fixtures import shapes_data_dir  # pylint: disable=unused-import,g-bad-import-order
from train_utils import REPO, tiny_overrides
import xla_flags

COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart.ipynb", "evaluate_checkpoint.ipynb", "vqa_captioning.ipynb")
CELL_TIMEOUT_S = 300


def read(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
  assert cells[0].cell_type == "code"
  return cells[0]


def run_notebook(name, parameters: str, cwd: str):
  """Executes notebook `name` with its parameters cell replaced; returns the executed notebook
  (errors raise nbclient's CellExecutionError, which names the cell and the traceback)."""
  nb = read(name)
  parameters_cell(nb).source = parameters
  # The kernel gets this process's environment without pytest's variables: with
  # PYTEST_CURRENT_TEST set, ipykernel does not capture the OS-level stdout/stderr as it does in
  # Jupyter and Colab (and sys.stderr.fileno() then fails, e.g. in sentencepiece's trainer).
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  # One CPU device, as on a Colab CPU runtime (and it compiles fastest).
  env["XLA_FLAGS"] = xla_flags.cpu_devices(1)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  client.execute(env=env, cwd=cwd)
  return nb


def text_output(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o.output_type == "stream" and o.name == "stdout":
      out.append(o.text)
    elif o.output_type in ("execute_result", "display_data"):
      out.append(o.get("data", {}).get("text/plain", ""))
  return "".join(out)


def images_of(cell) -> list:
  """Decoded PNG figures a cell displayed."""
  return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
          if o.output_type in ("display_data", "execute_result")
          and "image/png" in o.get("data", {})]


def cell_with(nb, snippet):
  cells = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
  assert len(cells) == 1, f"expected one code cell containing {snippet!r}, found {len(cells)}"
  return cells[0]


def png_size(data: bytes):
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---- committed state ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
  nb = read(name)
  nbformat.validate(nb)
  parameters_cell(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "no code cells"
  for i, c in enumerate(code):
    assert c.outputs == [], f"{name}: code cell {i} has committed outputs; clear them"
    assert c.execution_count is None, f"{name}: code cell {i} has an execution count"
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
  first = nb.cells[0].source
  assert f"colab.research.google.com/github/vlm-jax/vlm_jax/blob/main/colabs/{name}" in first
  # The install cell must not reinstall over an importable vlm_jax (the tests rely on it).
  assert "find_spec(\"vlm_jax\") is None" in code[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_call_the_library(name):
  """The notebooks show the library's API; model code and metrics are not re-implemented."""
  source = "\n".join(c.source for c in read(name).cells if c.cell_type == "code")
  assert "inference.load(" in source
  for banned in ("model.apply(", "jax.jit(", "import flax"):
    assert banned not in source, f"{name} re-implements library code: {banned!r}"


# ---- execution ----------------------------------------------------------------------------------


def _tiny_overrides(data_dir):
  o = tiny_overrides(data_dir)
  o["evals.run"] = "zeroshot"          # the cheap one: the notebook prints eval metrics
  return o


def check_quickstart(nb, workdir):
  # The run is a real one: checkpoint, metrics, tokenizer in the workdir.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  assert os.path.isfile(os.path.join(workdir, "metrics.jsonl"))
  assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))

  train_out = text_output(cell_with(nb, "train.train_and_evaluate("))
  assert "trained to step 6" in train_out
  assert "zeroshot/shapes/top1" in train_out

  losses = images_of(cell_with(nb, "viz.plot_losses("))
  assert len(losses) == 1 and min(png_size(losses[0])) > 100

  grid_cell = cell_with(nb, "viz.image_grid(")
  assert "zero-shot accuracy on these 8 images" in text_output(grid_cell)
  assert len(images_of(grid_cell)) == 1

  retrieval_cell = cell_with(nb, "viz.retrieval_examples(")
  out = text_output(retrieval_cell)
  assert "i2t_r1" in out and "t2i_r5" in out
  assert len(images_of(retrieval_cell)) == 1


def check_evaluate_checkpoint(nb, image_dir):
  # The notebook drew its own images (the "your own images" path) and classified them.
  drawn = sorted(os.listdir(image_dir))
  assert len(drawn) >= 3 and all(f.endswith(".png") for f in drawn)

  load_out = text_output(cell_with(nb, "inference.load("))
  assert "coca checkpoint, step 6" in load_out

  zs = cell_with(nb, "viz.label_bars(")
  out = text_output(zs)
  for f in drawn:
    assert f in out, f"no zero-shot prediction printed for {f}"
  assert len(images_of(zs)) == 1

  cap_out = text_output(cell_with(nb, "model.generate("))
  assert all(f in cap_out for f in drawn)

  assert len(images_of(cell_with(nb, "viz.similarity_heatmap("))) == 1


def check_ran_in_order(nb):
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1))
  assert not any(o.output_type == "error" for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)


@pytest.mark.slow
def test_notebooks_run_top_to_bottom(shapes_data_dir, tmp_path):
  """quickstart trains a tiny CoCa; evaluate_checkpoint then loads the checkpoint it wrote. One
  test (not two sharing a fixture) so that pytest-xdist never trains twice."""
  workdir = str(tmp_path / "run")
  params = "\n".join([
      f"WORKDIR = {workdir!r}",
      f"DATA_DIR = {shapes_data_dir!r}",
      "VARIANT = 'tiny'",
      "TOTAL_STEPS = 6",
      f"OVERRIDES = {_tiny_overrides(shapes_data_dir)!r}",
      "NUM_EXAMPLES = 8",
      "MAX_CAPTION_LEN = 5",
  ])
  nb = run_notebook("quickstart.ipynb", params, str(tmp_path))
  check_ran_in_order(nb)
  check_quickstart(nb, workdir)

  image_dir = str(tmp_path / "my_images")
  params = "\n".join([
      f"CHECKPOINT = {workdir!r}",
      "STEP = None",
      "IMAGE_PATHS = []",
      f"IMAGE_DIR = {image_dir!r}",
      "LABELS = None",
      "TEMPLATES = 'shapes'",
      "PROMPTS = None",
      "BEAM = 2",
      "MAX_CAPTION_LEN = 5",
  ])
  nb = run_notebook("evaluate_checkpoint.ipynb", params, str(tmp_path))
  check_ran_in_order(nb)
  check_evaluate_checkpoint(nb, image_dir)
