"""Writing a benchmark's tables into ``docs/performance.md``, so no figure there is retyped.

Every script accepts ``--update-docs``: what it prints to stdout (its tables)
then also replaces its own section of ``docs/performance.md``, between the
markers ``<!-- begin NAME -->`` and ``<!-- end NAME -->``, preceded by the
command that produced it. Progress goes to stderr and is not written.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Mapping

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def log(message: str) -> None:
    """A time-stamped progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternating_rounds(
    calls: Mapping[str, Callable[[], object]], rounds: int, *, label: str = "",
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call per round; round r starts at the r-th call, so each runs in every slot.

    Each call must block until its result is ready (``jax.block_until_ready``).
    """
    times = {name: [] for name in calls}
    order = list(calls)
    for r in range(rounds):
        if not quiet:
            log(f"round {r + 1}/{rounds}{label}")
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def add_argument(parser) -> None:
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="also write this run's tables into its section of docs/performance.md",
    )


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text):
        self.buffer_.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def section_name(argv: list[str]) -> str:
    """The section a run writes: one per script (the body records the whole command)."""
    return f"benchmarks/{pathlib.Path(argv[0]).name}"


@contextlib.contextmanager
def report(update: bool, argv: list[str] | None = None):
    """Run the body; with ``update``, write what it printed into its section of the doc."""
    argv = list(sys.argv if argv is None else argv)
    if not update:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    name = section_name(argv)
    command = "python " + " ".join(
        shlex.quote(a)
        for a in [f"benchmarks/{pathlib.Path(argv[0]).name}"] + argv[1:]
        if a != "--update-docs"
    )
    stamp = datetime.date.today().isoformat()
    body = f"`{command}` ({stamp}):\n\n{tee.buffer_.getvalue().strip()}\n"
    write_section(name, body)
    print(f"wrote the section {name!r} of {DOC.name}", file=sys.stderr)


def write_section(name: str, body: str, doc: pathlib.Path | None = None) -> None:
    doc = doc or DOC
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)
