"""Executes notebooks/jaxpref_colab_demo.ipynb end to end on CPU with a few training steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "jaxpref_colab_demo.ipynb"


def test_notebook_is_stored_without_outputs():
  notebook = json.loads(NOTEBOOK.read_text())
  for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
      assert not cell["outputs"] and cell["execution_count"] is None, f"cell {index} has outputs"


@pytest.mark.usefixtures("preferences_dir")
def test_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("JAXPREF_NOTEBOOK_STEPS", "10")
  monkeypatch.setenv("JAXPREF_NOTEBOOK_EVAL_ITEMS", "24")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "backend: cpu" in text
  assert "multitask: step 10" in text and "more: step 10" in text
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) == 2  # one reliability diagram per model
  markdown = [
    o.data["text/markdown"]
    for o in outputs
    if o.output_type == "display_data" and "text/markdown" in o.data
  ]
  ece_table = next(m for m in markdown if "ECE-10" in m)
  for kind in ("multitask", "more"):
    for data in ("helpful", "harmless", "webgpt", "all"):
      assert f"| {kind} | {data} |" in ece_table
    report = json.loads(
      next(tmp_path.glob(f"jaxpref_demo_*/report_{kind}/report.json")).read_text()
    )
    assert 0.0 <= report["all"]["ece_10"] <= 1.0
  picks_table = markdown[-1]
  # 16 queries, each with one best response per model: the counts of each row add up to 16.
  for line in picks_table.splitlines()[2:]:
    assert sum(int(c) for c in line.strip("|").split("|")[1:]) == 16
  assert os.environ["JAXPREF_NOTEBOOK_STEPS"] == "10"
