"""The notebooks are documentation that runs: execute each one and fail on any error.

Every notebook runs top to bottom in its own fresh ``python3`` kernel started
from this interpreter (so ``04``'s ``XLA_FLAGS``, set before it imports jax,
takes effect and no state leaks between notebooks). A cell that raises -- an
exception or one of the notebooks' own ``assert`` checks -- fails the test
with the cell's traceback. The stored outputs are not compared: they are
refreshed with ``python notebooks/_execute.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = [
    "01_information_theory.ipynb",
    "02_cross_entropy_loss.ipynb",
    "03_mle_toy_model.ipynb",
    "04_large_vocab_and_mesh.ipynb",
    "05_post_training.ipynb",
]
CELL_TIMEOUT_S = 120


def test_every_notebook_is_listed():
    """A new notebook cannot be added without being executed here."""
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    # jupyter_client replaces the kernel spec's bare "python" with sys.executable;
    # check that the kernel really runs in this environment (this venv, this jxent).
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # IPython's colours
        pytest.fail(f"{name} failed:\n{traceback}", pytrace=False)
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert printed == sys.prefix, f"the kernel ran in {printed}, not in {sys.prefix}"
