"""Look at the site as a reader would: ``python docs/_screenshots.py [OUT_DIR]``.

Serves the built site (``site/``, built first with ``mkdocs build --strict``
unless ``--no-build``) on 127.0.0.1 and saves three screenshots with headless
Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``):

* ``home.png``: the home page (the README's text);
* ``api-entry.png``: ``softmax_cross_entropy``'s reference entry, whose
  docstring holds a displayed formula;
* ``notebook.png``: notebook 1 down to its first plot, with its math (MathML).

OUT_DIR defaults to /tmp/jxent-docs-screenshots. Not run in CI (installing
Chromium takes longer than the docs step may).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "home.png": "index.html",
    "api-entry.png": "api/softmax_cross_entropy.html",
    "notebook.png": "notebooks/01_information_theory.html",
}
# Tall enough for notebook 1's first plot. (Headless Chromium's --screenshot
# does not scroll to a #fragment: each shot is the top of a page.)
WINDOW = "1280,2400"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="/tmp/jxent-docs-screenshots")
    parser.add_argument("--no-build", action="store_true", help="use the site/ already built")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q"], cwd=ROOT,
                       check=True)
    handler = functools.partial(_Quiet, directory=str(ROOT / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for name, page in PAGES.items():
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                     f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                     f"--screenshot={out / name}", f"--window-size={WINDOW}",
                     f"http://127.0.0.1:{port}/{page}"],
                    check=True, capture_output=True, timeout=120,
                )
            print(out / name)
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
