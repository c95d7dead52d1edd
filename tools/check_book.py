"""Open every page of the built book in headless Chromium and check what a reader sees.

    python tools/check_book.py [_build/html]      # `make check-book` after `make book`

Each page is served from 127.0.0.1 (no other address is reached: any request elsewhere
is refused and reported, so the book must work offline) and opened at 1280 x 900. A
page fails on:

- a JavaScript error (an uncaught exception or a console error);
- an image that does not load;
- an internal link to a page or an anchor that does not exist;
- visible `Traceback`, `{glue` or `BEGIN HIDDEN` text;
- math left as raw LaTeX (a formula MathJax did not typeset, or a MathJax error);
- a request to another host (the book must not need the network);
- a code cell whose source is wider than the content column (a `pre` that scrolls
  sideways): these are listed one by one, page and first line. Printed outputs may
  scroll (a wide table is better scrolled than wrapped).

Prints one line per problem and a summary; exits 1 if there is any. Chromium is the
Debian package (/usr/bin/chromium, or $CHROMIUM); Playwright drives it, pinned in
requirements.lock, and never downloads a browser.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import sys
import threading
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlsplit

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 180_000               # a page of the book, MathJax included, on a busy machine
FORBIDDEN_TEXT = ("Traceback", "{glue", "BEGIN HIDDEN")
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", ".doctrees", ".jupyter_cache",
             "jupyter_execute"}

# Runs in the page once MathJax has finished: what a reader sees.
PAGE_REPORT = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const rawMath = [...document.querySelectorAll('.math')]
    .filter(el => visible(el) && !el.querySelector('mjx-container'))
    .map(el => el.textContent.trim().slice(0, 60));
  const mathErrors = [...document.querySelectorAll('mjx-merror')]
    .map(el => el.textContent.trim().slice(0, 60));
  const wide = [...document.querySelectorAll('div.cell_input pre')]
    .filter(el => visible(el) && el.scrollWidth > el.clientWidth + 1)
    .map(el => ({first: el.textContent.split('\\n')[0].slice(0, 70),
                 over: el.scrollWidth - el.clientWidth}));
  const images = [...document.images].map(img => img.currentSrc || img.src);
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return {text: document.body.innerText, rawMath, mathErrors, wide, images, links};
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `directory` on a free port of 127.0.0.1; return the server and its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.I)


def book_pages(html: Path) -> list[Path]:
    """Every page of the build; a redirect page (index.html) is replaced by its target."""
    pages = set()
    for path in html.rglob("*.html"):
        if SKIP_DIRS.intersection(path.relative_to(html).parts):
            continue
        redirect = REDIRECT.search(path.read_text(errors="replace")[:1000])
        pages.add((path.parent / redirect.group(1)).resolve() if redirect else path)
    return sorted(pages)


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """The ids a page defines (what `page.html#id` may point at)."""
    return frozenset(re.findall(r'\sid="([^"]+)"', path.read_text(errors="replace")))


def link_problem(html: Path, base: str, url: str) -> str | None:
    """None if an internal link resolves to a file (and anchor) of the build."""
    if not url.startswith(base):
        return None
    parts = urlsplit(url)
    target = html / unquote(parts.path.lstrip("/"))
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"broken link to {target.relative_to(html)}"
    fragment = unquote(parts.fragment)
    if fragment and target.suffix == ".html" and fragment not in anchors(target):
        return f"broken link to {target.relative_to(html)}#{parts.fragment} (no such anchor)"
    return None


def check_page(context, html: Path, base: str, page_path: Path) -> dict[str, list[str]]:
    """Open one page and return its problems by kind."""
    problems: dict[str, list[str]] = defaultdict(list)
    page = context.new_page()
    page.on("pageerror", lambda err: problems["javascript"].append(str(err).splitlines()[0]))
    page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith(
        "Failed to load resource") and problems["javascript"].append(msg.text[:200]))
    failed = set()
    page.on("requestfailed", lambda req: req.url.startswith(base) and failed.add(req.url))
    page.on("response", lambda res: res.status >= 400 and failed.add(res.url))
    url = base + page_path.relative_to(html).as_posix()
    page.goto(url, wait_until="load")
    report = page.evaluate(PAGE_REPORT)
    page.close()
    for word in FORBIDDEN_TEXT:
        for line in report["text"].splitlines():
            if word in line:
                problems["visible text"].append(f"{word!r} in: {line.strip()[:100]}")
    problems["raw LaTeX"] += [f"not typeset: {m}" for m in report["rawMath"]]
    problems["raw LaTeX"] += [f"MathJax error: {m}" for m in report["mathErrors"]]
    problems["wide code"] += [f"{w['over']} px too wide: {w['first']}" for w in report["wide"]]
    for src in sorted(set(report["images"])):
        if src in failed or (src.startswith(base) and link_problem(html, base, src)):
            problems["image"].append(f"does not load: {src.removeprefix(base)}")
    problems["link"] += sorted({p for href in report["links"]
                                if (p := link_problem(html, base, href.split("?")[0]))})
    problems["request"] += sorted(f"failed: {u.removeprefix(base)}" for u in failed
                                  if u not in report["images"])
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", default=str(ROOT / "_build" / "html"),
                        help="the built book (default: _build/html)")
    args = parser.parse_args()
    html = Path(args.html).resolve()
    pages = book_pages(html)
    if not pages:
        print(f"check-book: no pages under {html}; run `make book` first")
        return 1
    server, base = serve(html)
    outside: set[str] = set()
    counts: dict[str, int] = defaultdict(int)
    failing_pages: dict[str, set[str]] = defaultdict(set)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(TIMEOUT_MS)

            def only_local(route):
                if route.request.url.startswith(base):
                    return route.continue_()
                outside.add(route.request.url)
                return route.abort()
            context.route("**/*", only_local)
            for page_path in pages:
                name = page_path.relative_to(html).as_posix()
                for kind, found in check_page(context, html, base, page_path).items():
                    for problem in found:
                        print(f"{name}: {kind}: {problem}")
                        counts[kind] += 1
                        failing_pages[kind].add(name)
            browser.close()
    finally:
        server.shutdown()
    for url in sorted(outside):
        print(f"(book): network: a page asked for {url}; the book must work offline")
        counts["network"] += 1
        failing_pages["network"].add("(book)")
    print(f"check-book: {len(pages)} pages opened")
    for kind in sorted(counts):
        print(f"  {kind}: {counts[kind]} problems on {len(failing_pages[kind])} pages")
    if counts:
        return 1
    print("check-book: no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
