"""The front page and the performance page: short, their tables written by the scripts, and
the program output they quote compared with what the program prints (tests/_quoted.py)."""

import pathlib
import re
import sys

from _quoted import _mismatch

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


def test_a_quote_is_the_output_but_for_seconds_and_elided_lines():
    output = ["title (5 tokens, 0.7 s)", "a 1.5e-07", "b", "c", "", "Total 3.4 s."]
    quote = ["title (5 tokens, 1.3 s)", "a 1.5e-07", "…", "", "Total 9 s."]
    assert _mismatch(quote, output) is None
    assert _mismatch(["title (5 tokens, 0.7 s)", "…"], output) is None
    assert "is 'a 1.5e-07'" in _mismatch(["title (5 tokens, 0.7 s)", "a 1.6e-07", "…"], output)
    assert "the output goes on: 'b'" in _mismatch(["title (5 tokens, 0.7 s)", "a 1.5e-07"], output)
    assert "does not follow" in _mismatch(["title (5 tokens, 0.7 s)", "…", "d"], output)
    assert "is 'end of output'" in _mismatch([*output, "more"], output)
    # an elision stands for at least one line
    assert "does not follow" in _mismatch(["title (5 tokens, 0.7 s)", "…", "a 1.5e-07"], output[:2])
