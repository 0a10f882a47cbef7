"""Run the notebooks and store them with their outputs, so plots show on a repository page.

    python notebooks/_execute.py                      # all of them
    python notebooks/_execute.py 02_cross_entropy_loss.ipynb

Each notebook runs top to bottom in a fresh ``python3`` kernel of the current
interpreter (as ``tests/test_notebooks.py`` runs them); a cell that raises
stops the run and nothing is written. Timing metadata is dropped so that
re-running a notebook only changes its outputs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path) -> float:
    """Execute ``path`` in place; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
        coalesce_streams=True,  # one stdout block per cell, however the kernel flushed it
    ).execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return seconds


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("[0-9]*.ipynb"))
    for path in paths:
        seconds = execute(path)
        print(f"{path.name}: {seconds:.1f} s, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
