"""A griffe extension: jxent's docstrings, written for ``help()``, read as Markdown.

The docstrings use a little reStructuredText that Markdown does not know:

* ``:func:`name```, ``:class:`~jxent.Name``` and friends become a link to the
  reference entry when ``name`` is public (``jxent.<name>``, or ``jxent.toy``'s),
  and plain code otherwise;
* a paragraph ending in ``::`` introduces an indented literal block: it becomes a
  fenced Python block;
* a displayed formula, a line holding nothing but one double-backtick span,
  indented below its paragraph, becomes a centred formula
  (``<div class="jx-formula">``) instead of an indented code block that would
  show the backticks.

Double backticks are already Markdown code spans. Nothing else is rewritten.
"""

from __future__ import annotations

import ast
import html
import pathlib
import re

import griffe

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _public(module: str) -> set[str]:
    tree = ast.parse((_ROOT / "jxent" / module).read_text(encoding="utf-8"))
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets
        ):
            return set(ast.literal_eval(stmt.value))
    return set()


PUBLIC = _public("__init__.py")
TOY = _public("toy.py")

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")
_FORMULA = re.compile(r"^(\s+)``([^`].*?)``\s*$")


def _target(name: str) -> str | None:
    """The reference id of a role's target, or None for a private name."""
    short = name.removeprefix("jxent.")
    if short in PUBLIC:
        return f"jxent.{short}"
    if short == "toy":
        return "jxent.toy"
    toy = short.removeprefix("toy.")
    if toy in TOY and (short.startswith("toy.") or name.startswith("jxent.toy.")):
        return f"jxent.toy.{toy}"
    return None


def _role(match: re.Match, module: str) -> str:
    tilde, name = match.groups()
    shown = name.rsplit(".", 1)[-1] if tilde else name
    target = _target(name)
    if target is None and module == "jxent.toy" and name in TOY:
        target = f"jxent.toy.{name}"
    return f"[`{shown}`][{target}]" if target else f"`{shown.lstrip('.')}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def markdown(text: str, module: str = "jxent") -> str:
    """The docstring ``text`` with its reStructuredText turned into Markdown."""
    text = _ROLE.sub(lambda m: _role(m, module), text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            # A literal block: the lines after it indented deeper than it.
            base = _indent(line)
            head = line.rstrip()[:-2].rstrip()
            if head.strip():
                out.append(head + ":")
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                j += 1
            block = lines[i + 1 : j]
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            if block:
                cut = min(_indent(b) for b in block if b.strip())
                pad = " " * base
                out += ["", pad + "```python"]
                out += [pad + b[cut:] if b.strip() else "" for b in block]
                out += [pad + "```", ""]
            i = j
            continue
        formula = _FORMULA.match(line)
        if formula and out and not out[-1].strip():
            # A displayed formula: deeper than the paragraph before it.
            around = next((ln for ln in reversed(out) if ln.strip()), "")
            if _indent(line) > _indent(around):
                out.append(
                    " " * _indent(around)
                    + f'<div class="jx-formula"><code>{html.escape(formula.group(2))}</code></div>'
                )
                i += 1
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring once, when griffe has loaded its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            module = obj.module.path if obj.module is not None else "jxent"
            obj.docstring.value = markdown(obj.docstring.value, module)
