"""mkdocs hooks for the jxent site (mkdocs.yml ``hooks:``).

* ``on_config``: every guide in ``docs/`` is in the nav (under "Guides").
* ``on_config``/``on_files``: one reference page per public name,
  ``api/<name>.md`` (a ``::: jxent.<name>`` block for mkdocstrings), for every
  name on an ``<!-- API: ... -->`` line of docs/api.md, listed in the nav
  under "API reference"; ``on_page_markdown`` turns each such line into a
  table of the names and the first line of their docstrings.
* ``on_files``: the pages that live outside ``docs/`` join the site at build
  time, read from where they are: ``notebooks/*.ipynb`` (rendered by
  mkdocs-jupyter with their stored outputs), ``CHANGELOG.md`` as
  ``changelog.md`` and ``examples/*.py`` as ``examples/<name>.md`` (the source
  in a code block). Nothing is copied into ``docs/``, so nothing goes stale.
* ``on_page_markdown``: ``<!-- README: Title -->`` in a page is replaced by that
  section of README.md (``intro`` is the text above the first ``##``), so the
  home page is the README's own text; a missing section fails the build. Links
  are written relative to the file they came from (README.md, docs/x.md,
  CHANGELOG.md) and rewritten to the site's pages.
* ``on_post_page``: LaTeX math (``$…$``/``$$…$$`` in the notebooks' Markdown
  cells, ``pymdownx.arithmatex`` spans in pages) becomes MathML at build time
  with latex2mathml, so the site needs no MathJax and no network; the MathJax
  loader nbconvert adds to notebook pages is removed.
"""

from __future__ import annotations

import html
import posixpath
import re
from pathlib import Path

from latex2mathml.converter import convert as latex_to_mathml
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ API pages

_API_MARK = re.compile(r"^<!-- API: (.+?) -->[ \t]*$", re.M)


def api_names() -> list[str]:
    """The public names docs/api.md lists, in its order."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    return [name for line in _API_MARK.findall(text) for name in line.split()]


def on_config(config):
    """The nav gains a page per public name, and every guide in docs/.

    A guide (``docs/<name>.md`` not already in the nav, not the home page, not
    an API page) joins "Guides" under its own title, so a new one is on the
    site the day it is committed.
    """
    pages = [{name: f"api/{name}.md"} for name in api_names()]
    listed = set(re.findall(r"[\w./-]+\.md", str(config.nav)))
    guides = sorted(p.name for p in (ROOT / "docs").glob("*.md")
                    if p.name not in listed and not p.name.startswith(("_", "api"))
                    and p.name != "index.md")
    for entry in config.nav or []:
        if isinstance(entry, dict) and "API reference" in entry:
            section = entry["API reference"]
            index = next(i for i, e in enumerate(section) if "api.md" in str(e))
            section[index + 1 : index + 1] = pages
        if isinstance(entry, dict) and "Guides" in entry:
            entry["Guides"].extend(guides)
    return config


def _summaries() -> dict[str, str]:
    """The first line of each public docstring, as Markdown."""
    import sys

    import griffe

    sys.path.insert(0, str(ROOT / "docs"))
    from _griffe_rst import markdown as rst_to_markdown

    package = griffe.load("jxent", search_paths=[str(ROOT)])
    out = {}
    for name in api_names():
        doc = package[name].docstring
        out[name] = rst_to_markdown(doc.value.split("\n", 1)[0]) if doc else ""
    return out


def _api_table(names: list[str], uri: str, summaries: dict[str, str]) -> str:
    rows = ["| name | summary |", "|---|---|"]
    for name in names:
        link = posixpath.relpath(f"api/{name}.md", posixpath.dirname(uri) or ".")
        rows.append(f"| [`{name}`]({link}) | {summaries.get(name, '')} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ files


@event_priority(100)  # before mkdocs-jupyter's on_files picks up the notebooks
def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        # A plain File read from the repository root (mkdocs-jupyter wraps it).
        files.append(File(f"notebooks/{path.name}", src_dir=str(ROOT),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    files.append(File.generated(config, "changelog.md", abs_src_path=str(ROOT / "CHANGELOG.md")))
    for name in api_names():
        content = f"::: jxent.{name}\n    options:\n      heading_level: 1\n"
        files.append(File.generated(config, f"api/{name}.md", content=content))
    for path in sorted((ROOT / "examples").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        content = (f"# examples/{path.name}\n\n`python examples/{path.name}`\n\n"
                   f"````python\n{source}````\n")
        files.append(File.generated(config, f"examples/{path.stem}.md", content=content))
    return files


# ------------------------------------------------------------------ markdown

_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_README_MARK = re.compile(r"^<!-- README: (.+?) -->[ \t]*$", re.M)


def _repo_path(src_uri: str) -> str:
    """The repository file a site page comes from."""
    if src_uri == "changelog.md":
        return "CHANGELOG.md"
    if src_uri.startswith("examples/") and src_uri.endswith(".md"):
        return src_uri[: -len(".md")] + ".py"
    if src_uri.startswith("notebooks/"):
        return src_uri
    return "docs/" + src_uri


def _site_path(repo_path: str) -> str | None:
    """The site page of a repository file, or None when it has none."""
    if repo_path == "CHANGELOG.md":
        return "changelog.md"
    if repo_path == "README.md":
        return "index.md"
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    if repo_path.startswith("notebooks/") and repo_path.endswith(".ipynb"):
        return repo_path
    if repo_path.startswith("examples/") and repo_path.endswith(".py"):
        return repo_path[: -len(".py")] + ".md"
    return None


def _relink(markdown: str, from_repo: str, page_uri: str) -> str:
    """Links written relative to ``from_repo``, pointed at the site's pages."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[a-z]+:|#|/", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(from_repo), path))
        site = _site_path(repo)
        if site is None:
            return match.group(0)  # left for mkdocs --strict to report
        rel = posixpath.relpath(site, posixpath.dirname(page_uri) or ".")
        return match.group(1) + rel + ("#" + anchor if anchor else "") + match.group(3)

    return _LINK.sub(fix, markdown)


def readme_sections() -> dict[str, str]:
    """README.md's sections by title; ``intro`` is the text under the title."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head, *rest = re.split(r"^## ", text, flags=re.M)
    sections = {"intro": head.split("\n", 1)[1].strip() + "\n"}
    for part in rest:
        title, _, body = part.partition("\n")
        sections[title.strip()] = body.strip() + "\n"
    return sections


def on_page_markdown(markdown: str, page, config, files) -> str:
    uri = page.file.src_uri
    if _README_MARK.search(markdown):
        sections = readme_sections()

        def include(match: re.Match) -> str:
            title = match.group(1)
            if title not in sections:
                raise PluginError(f"{uri}: README.md has no section '## {title}'")
            return _relink(sections[title], "README.md", uri)

        markdown = _README_MARK.sub(include, markdown)
    if _API_MARK.search(markdown):
        summaries = _summaries()
        markdown = _API_MARK.sub(lambda m: _api_table(m.group(1).split(), uri, summaries),
                                 markdown)
    if uri == "index.md":
        markdown = _link_api_table(markdown, uri)
    if not uri.startswith("notebooks/"):
        markdown = _relink(markdown, _repo_path(uri), uri)
    return markdown


def _link_api_table(markdown: str, uri: str) -> str:
    """In the README's API table, each function's name links to its page."""
    names = set(api_names())

    def link(match: re.Match) -> str:
        code, name = match.group(1), match.group(2)
        if name == "jxent.toy":
            return f"| [{code}](api-toy.md)"
        return f"| [{code}](api/{name}.md)" if name in names else match.group(0)

    markdown = re.sub(r"^\| (`([\w.]+)[^`]*`)", link, markdown, flags=re.M)
    # GitHub wants `a \| b` in a table cell; Python-Markdown keeps a code span's
    # pipes in their cell and would show the backslash.
    return re.sub(r"^\|.*$", lambda row: re.sub(
        r"`[^`]*`", lambda code: code.group(0).replace("\\|", "|"), row.group(0)),
        markdown, flags=re.M)


# ------------------------------------------------------------------ notebooks

_FILES: dict[str, str] = {}  # src_uri -> url of every page, for links inside notebooks
_HEADING = re.compile(r'<h([1-6]) id="([^"]+)">(.*?)</h\1>', re.S)


def on_nav(nav, config, files):
    _FILES.clear()
    _FILES.update({f.src_uri: f.url for f in files if f.is_documentation_page()})
    return nav


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).replace("¶", "").strip()


def on_page_content(content: str, page, config, files) -> str:
    """A notebook's table of contents and title, taken from its rendered headings.

    mkdocs-jupyter builds the table of contents from the Markdown and drops the
    code in a heading ("Padding: `ignore_index`" becomes "Padding:"), so its
    anchors miss nbconvert's heading ids: take ids and titles from the headings.
    """
    if not page.file.src_uri.endswith(".ipynb"):
        return content
    headings = [(m.group(2), _text(m.group(3))) for m in _HEADING.finditer(content)]
    items, stack = [], list(reversed(list(page.toc)))
    while stack:
        item = stack.pop()
        items.append(item)
        stack.extend(reversed(item.children))
    if len(items) == len(headings):
        for item, (anchor, title) in zip(items, headings, strict=True):
            item.id, item.title = anchor, title
    if headings and content.lstrip().find("<h1") >= 0:
        page.title = headings[0][1]  # the title with its code ("no `[tokens, vocab]`")
    return content


def _notebook_links(output: str, page) -> str:
    """Links in a notebook's Markdown, written relative to the notebook, to the site's pages."""

    def fix(match: re.Match) -> str:
        target = html.unescape(match.group(2))
        if re.match(r"[a-z]+:|#|/", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo = posixpath.normpath(posixpath.join("notebooks", path))
        site = _site_path(repo)
        if site is None or site not in _FILES:
            return match.group(0)
        rel = posixpath.relpath(_FILES[site], posixpath.dirname(page.url) or ".")
        return match.group(1) + html.escape(rel + ("#" + anchor if anchor else "")) + match.group(3)

    return re.sub(r'(<a href=")([^"]+)(")', fix, output)


# ------------------------------------------------------------------ math

_ARITHMATEX = re.compile(
    r'<(span|div) class="arithmatex">\s*\\[(\[](.*?)\\[)\]]\s*</\1>', re.S
)
_MD_CELL = re.compile(
    r'(<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown[^"]*"[^>]*>)(.*?)(</div>)', re.S
)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?!\s)([^$\n]+?)(?<![\s\\])\$(?!\$)")
# nbconvert's MathJax block: a comment, a <script src=...> and a configuration.
_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


_FUNCTION = r"<mi>(?:log|ln|exp|max|min|arg|sin|cos|tanh|det)</mi>"
# A thin space after an operator name, as TeX puts it (MathML Core adds none),
# unless a parenthesis follows: "log p", "log_2 8", but "exp(x)".
_FUNCTION_SPACE = re.compile(
    rf"({_FUNCTION}|<msub>{_FUNCTION}.*?</msub>)(?!<mo stretchy=\"false\">&#x00028;)"
)


def _mathml(latex: str, display: bool) -> str:
    mathml = latex_to_mathml(html.unescape(latex).strip(), display="block" if display else "inline")
    mathml = _FUNCTION_SPACE.sub(r'\1<mspace width="0.1667em"></mspace>', mathml)
    return f'<div class="jx-math">{mathml}</div>' if display else mathml


def _cell_math(match: re.Match) -> str:
    body = match.group(2)
    # Keep code spans and blocks untouched.
    parts = re.split(r"(<code.*?</code>|<pre.*?</pre>)", body, flags=re.S)
    for k in range(0, len(parts), 2):
        part = _DISPLAY.sub(lambda m: _mathml(m.group(1), True), parts[k])
        parts[k] = _INLINE.sub(lambda m: _mathml(m.group(1), False), part)
    return match.group(1) + "".join(parts) + match.group(3)


def on_post_page(output: str, page, config) -> str:
    output = _ARITHMATEX.sub(lambda m: _mathml(m.group(3), m.group(1) == "div"), output)
    if page.file.src_uri.endswith(".ipynb"):
        output = _MATHJAX.sub("", output)
        output = _notebook_links(output, page)
        output = _MD_CELL.sub(_cell_math, output)
    return output
