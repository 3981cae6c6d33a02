"""docs/tutorial.ipynb runs top to bottom on the tiny test model, offline, and draws its figures.

The notebook is executed with nbclient in a python3 kernel of this interpreter, from docs/ (where a
reader opens it), with FSA_MODEL=tiny-test and HF_HUB_OFFLINE=1. Its own asserts check the maths it
shows (Π from Z and U, A_new from Ŝ and the kept set, ...); here: no cell failed, every cell tagged
"figure" drew at least one picture, and the committed file carries no outputs.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "tutorial.ipynb"


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _tagged(nb, tag: str):
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def test_committed_notebook_has_no_outputs():
    nb = _read()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"


def test_tutorial_runs_on_the_tiny_model(tmp_path):
    nb = _read()
    figure_cells = _tagged(nb, "figure")
    assert len(figure_cells) >= 5
    env = {**os.environ, "FSA_MODEL": "tiny-test", "HF_HUB_OFFLINE": "1",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HOME": str(tmp_path / "hf"),  # an empty cache: nothing may be fetched or found there
           "MPLCONFIGDIR": str(tmp_path / "mpl"), "IPYTHONDIR": str(tmp_path / "ipython")}
    client = NotebookClient(nb, kernel_name="python3", timeout=900, startup_timeout=180,
                            resources={"metadata": {"path": str(REPO / "docs")}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), "every code cell ran"
    for cell in code_cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    for cell in figure_cells:
        pictures = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert pictures, f"no figure from:\n{cell.source[:200]}"
    text = "".join(o.get("text", "") for cell in code_cells for o in cell.outputs if o.output_type == "stream")
    assert "tiny-test" in text  # it ran on the test model
    assert "mIoU: ClearCLIP" in text  # and reached the scoring at the end
