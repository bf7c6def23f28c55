"""The documentation site as a reader sees it: every page of the built site
(`make docs`, docs/_build/html) opened in headless Chromium.

Each page must load without a JavaScript error or warning in the console and
without a failed request (a missing stylesheet, font or image), show no math
rendering error (KaTeX's `.katex-error`; the site renders formulas while it is
built, so every `.math` element must hold KaTeX's output), and link only to
files and anchors that exist. Screenshots of one derivation page and one API
page go to docs/_build/screenshots/ for a person to look at.

Skipped, with the reason, where the site is not built, Chromium (Debian's
`chromium`) is not installed or playwright (the `docs` extra) is missing.
`.ci/run` installs Chromium, builds the site and runs this file with
`make test-slow` (tests/conftest.py:SLOW).
"""

import functools
import html.parser
import http.server
import pathlib
import shutil
import threading
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
SCREENSHOTS = ROOT / "docs" / "_build" / "screenshots"
SHOTS = {
    "derivation.png": "derivations/conv.html",
    "api.png": "docs/api/generated/jax_resnet.ops.conv.html",
}


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run does)")
    return path


def _pages() -> list[pathlib.Path]:
    if not (SITE / "docs" / "index.html").exists():
        pytest.skip(f"the site is not built at {SITE}: run `make docs`")
    return sorted(p for p in SITE.rglob("*.html") if "_static" not in p.relative_to(SITE).parts)


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)


@functools.cache
def _ids(path: pathlib.Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


def broken_links(site: pathlib.Path, origin: str, page: str, hrefs: list[str]) -> list[str]:
    """The hrefs (absolute, as the browser resolved them) under `origin`, which serves `site`,
    whose file, or whose anchor in that file, does not exist."""
    broken = []
    for href in hrefs:
        if not href.startswith(origin + "/"):
            continue  # another site, mailto:, javascript:
        url = urllib.parse.urlsplit(href)
        target = site / urllib.parse.unquote(url.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{page}: link to {url.path} (no such file)")
        elif url.fragment and target.suffix == ".html" and urllib.parse.unquote(url.fragment) not in _ids(target):
            broken.append(f"{page}: link to {url.path}#{url.fragment} (no such anchor)")
    return broken


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/favicon.ico":  # the browser asks for it on its own; the site sets none
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format, *args):
        pass


def test_every_page_renders_without_errors_and_links_resolve(server):
    pages = _pages()
    chromium = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[docs]'"
    )
    assert len(pages) > 40, f"only {len(pages)} pages in {SITE}"
    problems, math_seen = [], 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        current = {"name": ""}

        def console(message):
            if message.type in ("error", "warning"):
                where = message.location.get("url")
                problems.append(f"{current['name']}: console {message.type}: {message.text} ({where})")

        def response(r):
            if r.status >= 400:
                problems.append(f"{current['name']}: HTTP {r.status}: {r.url}")

        page.on("console", console)
        page.on("pageerror", lambda e: problems.append(f"{current['name']}: JavaScript error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"{current['name']}: request failed: {r.url}"))
        page.on("response", response)
        for path in pages:
            name = str(path.relative_to(SITE))
            current["name"] = name
            page.goto(f"{server}/{name}", wait_until="load")
            if name == "index.html":  # the build folder's index leads to the front page
                page.wait_for_url(f"{server}/docs/index.html")
            errors = page.locator(".katex-error, mjx-merror").count()
            if errors:
                problems.append(f"{name}: {errors} math rendering error(s)")
            unrendered = page.locator(".math:not(:has(.katex))").count()
            if unrendered:
                problems.append(f"{name}: {unrendered} formula(s) without KaTeX output")
            math_seen += page.locator(".math .katex").count()
            hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
            problems += broken_links(SITE, server, name, hrefs)
            if name in SHOTS.values():
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                shot = next(k for k, v in SHOTS.items() if v == name)
                page.screenshot(path=str(SCREENSHOTS / shot))
        browser.close()
    assert not problems, f"{len(problems)} problem(s) in {len(pages)} pages:\n" + "\n".join(problems[:100])
    assert math_seen > 500, f"only {math_seen} rendered formulas in the whole site"
    assert all((SCREENSHOTS / shot).stat().st_size > 10_000 for shot in SHOTS)


# ----------------------------------------------------------- the checker itself
def test_broken_links_names_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.html").write_text('<h1 id="top">A</h1><a name="old"></a>')
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.html").write_text("<p>d</p>")
    origin = "http://127.0.0.1:9"
    hrefs = [
        f"{origin}/a.html#top",
        f"{origin}/a.html#old",
        f"{origin}/d/",
        "https://example.org/x.html",
        f"{origin}/a.html#nope",
        f"{origin}/b.html",
    ]
    assert broken_links(tmp_path, origin, "p.html", hrefs) == [
        "p.html: link to /a.html#nope (no such anchor)",
        "p.html: link to /b.html (no such file)",
    ]


def _site_extras():
    pytest.importorskip("sphinxcontrib.katex", reason="the docs extra is not installed: pip install -e '.[docs]'")
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_extras", ROOT / "docs" / "_ext" / "site_extras.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_text_tables_become_literal_blocks_and_sections_stay():
    extras = _site_extras()
    doc = [
        "Ops, by name (CONTRIBUTING.md):",
        "",
        "  <name>          the rule",
        "  _<name>_fwd     the core's forward, (*arrays[, config])",
        "                  -> (y, residuals)",
        "Forward:",
        "  y = x·w",
        "Args:",
        "  x: the input.",
        "Example:",
        "    >>> 1 + 1",
        "    2",
    ]
    assert extras.preformatted_blocks(doc, extras.napoleon_sections()) == [
        "Ops, by name (CONTRIBUTING.md)::",
        "",
        "",
        "  <name>          the rule",
        "  _<name>_fwd     the core's forward, (*arrays[, config])",
        "                  -> (y, residuals)",
        "",
        "Forward::",
        "",
        "  y = x·w",
        "",
        "Args:",
        "  x: the input.",
        "Example:",
        "    >>> 1 + 1",
        "    2",
    ]


def test_derivation_pointers_become_references():
    extras = _site_extras()
    lines = ["Derivation: derivations/conv.md#conv2d", "see `derivations/norm.md`, not derivations.md"]
    assert extras.derivation_links(lines) == [
        "Derivation: :derivation:`derivations/conv.md#conv2d`",
        "see :derivation:`derivations/norm.md`, not derivations.md",
    ]
