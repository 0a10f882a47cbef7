"""A plain ``pip install jxent`` (no extras): its runtime imports, type marker and the tour.

``.ci/run`` proves it end to end in a second fresh virtual environment (``pip
install .``, ``import jxent``, the README's tour as a script); these are the
quick, static half of that check, run with the suite.
"""

import ast
import re
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported at module level (not inside functions) by ``path``."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_a_declared_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0] for req in project["dependencies"]}
    imported = set()
    for path in sorted((ROOT / "jxent").glob("*.py")):
        imported |= _module_level_imports(path)
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "jxent"}
    missing = sorted(third_party - declared)
    assert not missing, f"imported at module level but not in [project].dependencies: {missing}"


def test_the_package_ships_a_py_typed_marker():
    assert (ROOT / "jxent" / "py.typed").is_file()


def readme_tour() -> str:
    """The first ```python block under "## A short tour" in README.md (as `.ci/run` runs it)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## A short tour\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_tour_runs():
    # as a user runs it: jax's default rank promotion, not conftest's strict mode
    with jax.numpy_rank_promotion("allow"):
        exec(compile(readme_tour(), "README.md (A short tour)", "exec"), {})


def test_the_readme_tour_passes_shift_explicitly():
    """`shift` has no default: every sequence_nll / nll_stats call in the tour names it."""
    calls = re.findall(r"jxent\.(?:sequence_nll|nll_stats)\(([^)]*)\)", readme_tour())
    assert calls
    for arguments in calls:
        assert re.search(r"\bshift=(True|False)\b", arguments), arguments
