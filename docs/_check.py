"""Check the built documentation site: ``python docs/_check.py [SITE_DIR]``.

Run after ``mkdocs build --strict`` (``bash .ci/docs`` runs both). Fails, listing
every problem, when

1. a name in ``jxent.__all__`` (or a function or class in ``jxent.toy.__all__``)
   has no reference entry in the built site (its page ``api/<name>.html`` with
   an element ``id="jxent.<name>"``, linked from ``api.html``; ``jxent.toy``'s
   in ``api-toy.html``), or its docstring is empty;
2. a public docstring has an empty section (``Args:``, ``Returns:``,
   ``Examples:`` ... with nothing indented under it), an ``Args:`` entry that
   names no parameter of the signature, an ``Args:`` section that leaves a
   parameter out, or an ``Attributes:`` section that does not match a
   NamedTuple's fields;
3. an internal link or resource in the built HTML (``href``/``src`` to a page,
   file or ``#anchor`` of this site) does not resolve, or a page loads a script,
   stylesheet or image from outside the site (it must read offline);
4. a notebook page lacks its stored plots (one ``<img>`` per image output) or
   still holds unrendered ``$…$`` math; the home page lacks the README's tour.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "Args", "Arguments", "Parameters", "Returns", "Yields", "Raises", "Attributes",
    "Examples", "Example", "Note", "Notes", "References", "Warning", "Warnings", "See Also",
)
_HEADER = re.compile(rf"^({'|'.join(SECTIONS)}):[ \t]*$")


class _Page(HTMLParser):
    """The ids, links and loaded resources of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.loads: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "img":
            self.images += 1
        if a.get("href"):
            (self.loads if tag == "link" and a.get("rel") == "stylesheet" else self.links).append(
                a["href"])
        if a.get("src") and tag in ("script", "img", "iframe", "source"):
            self.loads.append(a["src"])


def _external(url: str) -> bool:
    return bool(urlsplit(url).scheme) or url.startswith("//")


def check_links(site: Path) -> list[str]:
    pages = {p: _Page() for p in sorted(site.rglob("*.html"))}
    for path, page in pages.items():
        page.feed(path.read_text(encoding="utf-8"))
    problems = []
    for path, page in pages.items():
        name = path.relative_to(site)
        for url in page.loads:
            if _external(url) and not url.startswith("data:"):
                problems.append(f"{name}: loads {url} from outside the site")
        for url in page.links + page.loads:
            if _external(url) or url.startswith("data:"):
                continue
            parts = urlsplit(url)
            base = site if parts.path.startswith("/") else path.parent  # 404.html: from the root
            target = (base / unquote(parts.path).lstrip("/")).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{name}: link {url!r}: no such file in the site")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{name}: link {url!r}: no anchor #{parts.fragment}")
    return problems


def _sections(doc: str) -> dict[str, list[str]]:
    """Each Google-style section's indented lines (blank lines dropped)."""
    sections: dict[str, list[str]] = {}
    lines = doc.split("\n")
    for i, line in enumerate(lines):
        match = _HEADER.match(line)
        if not match:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt.startswith((" ", "\t")):
                break
            body.append(nxt)
        sections[match.group(1)] = [b for b in body if b.strip()]
    return sections


def _items(body: list[str]) -> list[str]:
    """The names an Args/Attributes section documents (``a, b: ...`` gives two)."""
    if not body:
        return []
    indent = len(body[0]) - len(body[0].lstrip())
    names = []
    for line in body:
        if len(line) - len(line.lstrip()) == indent:
            head = line.strip().split(":", 1)[0]
            names += [n.strip().lstrip("*") for n in head.split(",")]
    return names


def check_docstring(name: str, obj) -> list[str]:
    doc = inspect.getdoc(obj)
    if not doc or not doc.strip():
        return [f"{name}: no docstring"]
    problems = []
    sections = _sections(doc)
    for title, body in sections.items():
        if not body:
            problems.append(f"{name}: empty '{title}:' section")
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
        if "Attributes" in sections and set(_items(sections["Attributes"])) != set(obj._fields):
            problems.append(f"{name}: Attributes {_items(sections['Attributes'])} "
                            f"!= fields {list(obj._fields)}")
    args = sections.get("Args") or sections.get("Arguments")
    if args:
        try:
            params = [p for p in inspect.signature(obj).parameters if p != "self"]
        except (TypeError, ValueError):
            params = None
        if params is not None:
            documented = _items(args)
            for arg in documented:
                if arg not in params:
                    problems.append(f"{name}: Args documents {arg!r}, not a parameter")
            for param in params:
                if param not in documented:
                    problems.append(f"{name}: parameter {param!r} missing from Args")
    return problems


def check_reference(site: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    import jxent
    from jxent import toy

    problems = []

    def ids(page: str) -> set[str]:
        path = site / page
        if not path.exists():
            return set()
        parser = _Page()
        parser.feed(path.read_text(encoding="utf-8"))
        return parser.ids | {"links:" + link for link in parser.links}

    index = ids("api.html")
    for name in jxent.__all__:
        if f"jxent.{name}" not in ids(f"api/{name}.html"):
            problems.append(f"jxent.{name}: no reference page api/{name}.html: add the name "
                            "to an '<!-- API: ... -->' line of docs/api.md")
        elif f"links:api/{name}.html" not in index:
            problems.append(f"jxent.{name}: api.html does not link to api/{name}.html")
        problems += check_docstring(f"jxent.{name}", getattr(jxent, name))
    toy_ids = ids("api-toy.html")
    for name in toy.__all__:
        if callable(getattr(toy, name)):
            if f"jxent.toy.{name}" not in toy_ids:
                problems.append(f"jxent.toy.{name}: no reference entry in api-toy.html")
            problems += check_docstring(f"jxent.toy.{name}", getattr(toy, name))
    return problems


def check_pages(site: Path) -> list[str]:
    problems = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / (notebook.stem + ".html")
        if not page.exists():
            problems.append(f"{notebook.name}: no page")
            continue
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        images = sum(1 for c in cells for o in c.get("outputs", [])
                     if {"image/png", "image/svg+xml"} & set(o.get("data", {})))
        html = page.read_text(encoding="utf-8")
        parser = _Page()
        parser.feed(html)
        if parser.images < images:
            problems.append(f"{page.name}: {parser.images} images, the notebook stores {images}")
        for cell in re.findall(r'<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown[^"]*"'
                               r"[^>]*>(.*?)</div>", html, re.S):
            text = re.sub(r"<code.*?</code>|<pre.*?</pre>", "", cell, flags=re.S)
            if "$" in text:
                problems.append(f"{page.name}: unrendered math: {text[text.index('$'):][:60]!r}")
    index = site / "index.html"
    home = index.read_text(encoding="utf-8") if index.exists() else ""
    if "jxent.softmax_cross_entropy(logits, targets" not in re.sub(r"<[^>]+>", "", home):
        problems.append("index.html: the README's tour is missing")
    return problems


def main(argv: list[str]) -> int:
    site = (Path(argv[1]) if len(argv) > 1 else ROOT / "site").resolve()
    problems = check_reference(site) + check_links(site) + check_pages(site)
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = len(list(site.rglob("*.html")))
    print(f"docs/_check.py: {pages} pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
