"""Program output quoted in README.md and docs/*.md, compared with what the program prints.

A quoted output is a fenced code block whose first line is ``$ COMMAND``; the
lines after it are the command's standard output. Each command quoted anywhere
is in ``CHECKED_BY``, with the test file that runs it and calls
:func:`assert_quoted` on its output (``tests/test_docs.py`` holds both to it),
so a quote goes stale only with a failing test. The comparison is line by
line and exact, numbers included, but for two documented normalisations:

* wall-clock times vary from run to run: a number followed by `` s`` (``1.3 s``,
  ``(0.7 s)``) reads as ``… s`` on both sides;
* a line holding only ``…`` in the quote stands for one or more lines of the
  output left out (the next quoted line must follow them).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")

CHECKED_BY = {
    "python -m jxent": "tests/test_main.py",
    "python examples/distributed.py": "tests/test_parallel.py",
    "python examples/sharded_nnx.py": "tests/test_integration.py",
    "python examples/multiprocess.py": "tests/test_multiprocess.py",
}

_BLOCK = re.compile(r"^```[^\n]*\n\$ ([^\n]*)\n(.*?)^```$", re.M | re.S)
_SECONDS = re.compile(r"\b\d+(\.\d+)? s\b")
ELIDED = "…"


def quotes() -> list[tuple[str, str, list[str]]]:
    """``(page, command, lines)`` of every quoted output in README.md and docs/*.md."""
    found = []
    for pattern in PAGES:
        for page in sorted(ROOT.glob(pattern)):
            text = page.read_text(encoding="utf-8")
            for match in _BLOCK.finditer(text):
                name = page.relative_to(ROOT).as_posix()
                found.append((name, match.group(1).strip(), match.group(2).splitlines()))
    return found


def run(command: str, timeout: float = 300) -> str:
    """The stdout of ``command`` (``python ...``) run as a user runs it, from the repository root.

    A subprocess with the suite's environment, which ``conftest.py`` leaves as
    it found it: the program's own devices and compiler settings, not the suite's.
    """
    argv = [sys.executable, *shlex.split(command)[1:]]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"`{command}` exited with {proc.returncode}:\n{proc.stdout}" \
        f"\n{proc.stderr}"
    return proc.stdout


def assert_quoted(command: str, output: str) -> None:
    """Every quote of ``command`` is ``output``, up to the normalisations above."""
    quoted = [(page, lines) for page, cmd, lines in quotes() if cmd == command]
    assert quoted, f"no page quotes the output of `{command}`"
    for page, lines in quoted:
        problem = _mismatch(lines, output.splitlines())
        assert problem is None, (
            f"{page}: the quoted output of `{command}` is not what it prints ({problem}); "
            f"the output now:\n{output}"
        )


def _mismatch(quote: list[str], output: list[str]) -> str | None:
    """Where ``quote`` stops matching ``output``, or None."""
    normal = lambda line: _SECONDS.sub("… s", line.rstrip())
    i = 0  # the next output line
    for k, line in enumerate(quote):
        if line == ELIDED:
            continue
        if k > 0 and quote[k - 1] == ELIDED:  # skip at least one output line
            skipped = [j for j in range(i + 1, len(output)) if normal(output[j]) == normal(line)]
            if not skipped:
                return f"quoted line {k + 1} {line!r} does not follow the elided lines"
            i = skipped[0]
        elif i >= len(output) or normal(output[i]) != normal(line):
            got = output[i] if i < len(output) else "end of output"
            return f"quoted line {k + 1} {line!r} is {got!r} in the output"
        i += 1
    if quote and quote[-1] == ELIDED:
        return None if i < len(output) else "nothing left for the final …"
    return None if i == len(output) else f"the output goes on: {output[i]!r}"
