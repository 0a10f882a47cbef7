"""The front page and the performance page: short, their tables written by the scripts, and
the program output they quote compared with what the program prints (tests/_quoted.py)."""

import pathlib
import re
import sys

import pytest
from _quoted import CHECKED_BY, _mismatch, quotes

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


@pytest.mark.slow
def test_performance_mds_lowered_table_is_what_accelerator_py_prints(monkeypatch, capsys):
    """The one table of docs/performance.md without timings, regenerated (lowering only, ~2 s)."""
    doc = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    header = "| N, D, V | inputs | platform | chunk rows | chunks | products |"
    quoted = doc[doc.index(header):].split("\n<!-- end", 1)[0].strip().splitlines()
    sizes = dict.fromkeys(tuple(map(int, row.split("|")[1].split(","))) for row in quoted[2:])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import accelerator

    accelerator.lowered_table(list(sizes))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-len(quoted):] == quoted


def test_every_quoted_output_is_compared_with_the_program_by_a_test():
    """A ```` ``` ```` block starting ``$ COMMAND`` in README.md or docs/*.md is program output."""
    found = quotes()
    for page, command, _ in found:
        assert command in CHECKED_BY, (
            f"{page} quotes the output of `{command}`, which no test compares with the program: "
            "add it to tests/_quoted.py's CHECKED_BY and call assert_quoted in that test"
        )
    for command, test in CHECKED_BY.items():
        assert f'assert_quoted("{command}"' in (ROOT / test).read_text(encoding="utf-8"), test
    assert {command for _, command, _ in found} == set(CHECKED_BY)


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
