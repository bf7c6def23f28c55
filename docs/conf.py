"""Sphinx configuration of the documentation site: `make docs` builds it into docs/_build/html.

The stack is the JAX ecosystem's (JAX, optax and Flax build their sites the same way), so a
reader finds the layout they know; docs/README.md says why each piece was chosen.

The source directory is the repository root (`sphinx-build -c docs . docs/_build/html`), and
`include_patterns` picks the pages from where they already live: derivations/*.md, colab/*.ipynb,
CONTRIBUTING.md and docs/. Nothing is copied by hand, and a relative link between two of those files
means the same on the site as on a forge. Two local additions, both in this file:

- a link from a page to a module's source (`[...](../jax_resnet/ops/conv.py)`) becomes a link to
  that module's API page, and a docstring's `derivations/<file>.md#<anchor>` becomes a link to
  the derivation's section; both are checked like any cross-reference (a wrong anchor fails);
- docstrings follow a plain-text convention for aligned tables and formulas (a line ending in ':'
  before an indented block), which becomes a literal block (`_preformatted_blocks`).
"""

import html
import pathlib
import re
import socket
import subprocess
import sys
import time

import sphinxcontrib.katex
from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed copy

project = "jax-resnet"
author = "the jax-resnet authors"
copyright = "the jax-resnet authors; Apache-2.0"
release = version = "0.1.0"

extensions = [
    "myst_nb",  # Markdown (MyST) and notebooks; brings myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings are Google style (Args:, Returns:, Example:)
    "sphinx.ext.viewcode",
    "sphinxcontrib.katex",
]

# ------------------------------------------------------------------ sources
root_doc = "docs/index"
include_patterns = [
    "docs/**",
    "derivations/*.md",
    "derivations/figures/*",
    "colab/*.ipynb",
    "CONTRIBUTING.md",
    "benchmarks/*.png",
]
exclude_patterns = ["docs/_build", ".venv*", "**/node_modules", "runs"]
templates_path = ["docs/_templates"]

# ------------------------------------------------------------------ MyST and notebooks
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # GitHub's anchors, the ones the derivations link to (tests/derivation_docs.py)
nb_execution_mode = "off"  # the notebooks are stored without outputs; tests/test_notebooks.py runs them

# ------------------------------------------------------------------ API reference
autosummary_generate = True
autodoc_member_order = "bysource"
# Each object is documented once, in the module that defines it; a package's re-exports
# (jax_resnet.ops.conv2d is jax_resnet.ops.conv.conv2d) link there.
autodoc_default_options = {"ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False  # a Returns: line is prose here ("(x, y): ..."), not a type to link
napoleon_use_ivar = True  # a NamedTuple's Attributes: section, not a second entry per field
default_role = "literal"  # `x` in a docstring is code, as on a forge

# Every cross-reference must resolve. Other packages' names cannot be linked offline (no
# intersphinx inventories are fetched), so those, and only those, are exempt.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(jax|jaxlib|numpy|optax|flax|orbax|hypothesis|collections|typing|os|pathlib|argparse)\..*"),
]

# ------------------------------------------------------------------ math
# KaTeX renders every formula while the site is built, with the same KaTeX that
# tests/test_render.py parses the derivations with (tests/katex, `npm ci`): a formula it cannot
# parse stops the build, and pages need no script to show their math.
KATEX_DIST = ROOT / "tests" / "katex" / "node_modules" / "katex" / "dist"
if not (KATEX_DIST / "katex.min.js").exists():
    raise RuntimeError(f"KaTeX is not installed at {KATEX_DIST}: run `npm ci --prefix tests/katex` (make docs does)")
katex_prerender = True
katex_js_path = str(KATEX_DIST / "katex.min.js")
katex_css_path = "katex.min.css"  # with its fonts/, from html_static_path


def _start_katex_server(cls, rundir, timeout):
    """sphinxcontrib-katex's server start, waiting until the server listens: the extension
    connects as soon as the socket file exists, which can be before node listens on it
    (ConnectionRefusedError, seen on a loaded 2-core machine)."""
    socket_path = rundir / "katex.sock"
    process = subprocess.Popen(
        cls.build_command(socket=socket_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=rundir
    )
    deadline = time.monotonic() + timeout
    while True:
        if socket_path.is_socket():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(socket_path))
                return process, sock
            except ConnectionRefusedError:
                sock.close()
        if time.monotonic() > deadline:
            process.kill()
            raise sphinxcontrib.katex.KaTeXError(f"the KaTeX server did not listen within {timeout} s")
        time.sleep(0.01)


sphinxcontrib.katex.KaTeXServer.start_server_process = classmethod(_start_katex_server)
# Its 5 s limits on starting node and on one formula are too short for a loaded machine.
sphinxcontrib.katex.STARTUP_TIMEOUT = sphinxcontrib.katex.RENDER_TIMEOUT = 120.0

# ------------------------------------------------------------------ HTML
html_theme = "sphinx_book_theme"
html_title = "jax-resnet"
html_static_path = [str(KATEX_DIST)]
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_context = {"default_mode": "light"}  # the theme logs a console error when no mode is set


# ------------------------------------------------------------------ local additions
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _napoleon_sections() -> set[str]:
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    return set(GoogleDocstring("", Config())._sections)


def _preformatted_blocks(lines: list[str], sections: set[str]) -> list[str]:
    """The docstrings' plain-text convention, made reST: a line ending in ':' followed (after blank
    lines or not) by more deeply indented lines introduces an aligned table or formula
    (`jax_resnet/ops/__init__.py`, `jax_resnet/cli.py`), which becomes a literal block. Napoleon's
    section headings (Args:, Returns:, ...) and doctests are left alone."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        nxt = lines[j] if j < len(lines) else ""
        header = line.strip().rstrip(":").lower() in sections
        if line.rstrip().endswith(":") and not line.rstrip().endswith("::") and not header and nxt.strip():
            if _indent(nxt) > _indent(line) and not nxt.lstrip().startswith(">>>"):
                out += [line.rstrip() + ":", ""]
                i += 1
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > _indent(line)):
                    out.append(lines[i])
                    i += 1
                out.append("")
                continue
        out.append(line)
        i += 1
    return out


# `derivations/conv.md#conv2d` in a docstring, backticked or not.
_DERIVATION = re.compile(r"`?\bderivations/(\w+)\.md(?:#([\w-]+))?`?")


def _derivation_links(lines: list[str]) -> list[str]:
    """A docstring's derivation pointers become `:derivation:` references (checked, linked)."""
    return [_DERIVATION.sub(lambda m: f":derivation:`{m.group(0).strip('`')}`", line) for line in lines]


def _derivation_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """`:derivation:`derivations/conv.md#conv2d``: MyST's own link to a document and a heading's
    anchor, so MyST resolves it and warns (fails the build) where either is missing."""
    m = _DERIVATION.fullmatch(text)
    env = inliner.document.settings.env
    node = addnodes.pending_xref(
        rawtext,
        refdomain="doc",
        reftype="myst",
        reftarget=f"derivations/{m.group(1)}",
        reftargetid=m.group(2),
        refdoc=env.docname,
        refexplicit=True,
    )
    node += nodes.literal(text, text)
    return [node], []


def _source_links_to_api(app, doctree):
    """A page's link to a module's source file (a download link, as MyST makes it) points to the
    module's API page instead."""
    for node in list(doctree.findall(addnodes.download_reference)):
        target = pathlib.Path(app.env.relfn2path(node["reftarget"], node["refdoc"])[1]).resolve()
        try:
            rel = target.relative_to(ROOT / "jax_resnet")
        except ValueError:
            continue
        parts = ["jax_resnet", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        xref = addnodes.pending_xref(
            "", refdomain="py", reftype="mod", reftarget=".".join(parts), refexplicit=True, refdoc=node["refdoc"]
        )
        xref += node.children
        node.replace_self(xref)


_KATEX_ERROR = re.compile(r'class="katex-error" title="([^"]*)"')


def _math_errors(app, pagename, templatename, context, doctree):
    """A formula KaTeX cannot parse is a build warning (so an error under -W), with the page and
    KaTeX's message; sphinxcontrib-katex itself renders it as a red `.katex-error` span."""
    for m in _KATEX_ERROR.finditer(context.get("body", "")):
        logger.warning("%s", html.unescape(m.group(1)), location=pagename, type="katex", subtype="parse")


_REDIRECT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=docs/index.html">
<title>jax-resnet</title></head>
<body><p><a href="docs/index.html">jax-resnet: the documentation</a></p></body></html>
"""


def _write_redirect(app, exception):
    """The build folder's index.html leads to the front page, docs/index.html (the source
    directory is the repository root, so the front page sits one folder down)."""
    if exception is None and app.builder.format == "html":
        (pathlib.Path(app.outdir) / "index.html").write_text(_REDIRECT, encoding="utf-8")


def _skip_namedtuple_field_aliases(app, what, name, obj, skip, options):
    """NamedTuple fields are documented in their class's Attributes section; the generated
    "Alias for field number N" properties are not listed again."""
    doc = getattr(obj, "__doc__", None) or ""
    return True if doc.startswith("Alias for field number") else None


def setup(app):
    sections = _napoleon_sections()

    def process_docstring(app, what, name, obj, options, lines):
        lines[:] = _derivation_links(_preformatted_blocks(lines, sections))

    app.connect("autodoc-process-docstring", process_docstring, priority=400)  # before napoleon's
    app.connect("autodoc-skip-member", _skip_namedtuple_field_aliases)
    app.connect("doctree-read", _source_links_to_api)
    app.add_role("derivation", _derivation_role)
    app.connect("build-finished", _write_redirect)
    app.connect("html-page-context", _math_errors)
