"""The front page and the performance page: short, and their tables written by the scripts."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    text = "\n".join(lines)
    assert "python -m jxent" in text and "pytest" in text
    assert "docs/performance.md" in text and "docs/distributed.md" in text


def test_every_benchmark_writes_its_section_of_performance_md():
    doc = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name[0] != "_")
    for script in scripts:
        name = f"benchmarks/{script}"
        match = re.search(rf"<!-- begin {re.escape(name)} -->\n(.*?)<!-- end {re.escape(name)} -->",
                          doc, re.S)
        assert match, f"docs/performance.md has no section for {name}"
        body = match.group(1)
        assert body.startswith(f"`python {name}"), f"{name}: the section names no command"
        assert "|---" in body, f"{name}: the section holds no table"


def test_report_replaces_only_its_own_section(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("_report", None)
    import _report

    doc = tmp_path / "performance.md"
    doc.write_text("# P\n\n<!-- begin benchmarks/a.py -->\nold\n<!-- end benchmarks/a.py -->\n"
                   "keep\n")
    monkeypatch.setattr(_report, "DOC", doc)
    with _report.report(True, argv=["benchmarks/a.py", "--x", "1", "--update-docs"]):
        print("| t |\n|---|")
    text = doc.read_text()
    assert "old" not in text and "keep" in text
    assert "`python benchmarks/a.py --x 1` (" in text and "| t |\n|---|" in text
    with _report.report(True, argv=["benchmarks/b.py"]):
        print("new")
    assert "<!-- begin benchmarks/b.py -->" in doc.read_text()
