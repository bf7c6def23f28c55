"""The site's own Sphinx additions (docs/conf.py loads this as the `site_extras` extension).

- A page's link to a module's source file (`[...](../jax_resnet/ops/conv.py)`, which MyST turns
  into a download link) points to the module's API page instead.
- A docstring's `derivations/<file>.md#<anchor>` links to that section of the derivation, through
  MyST's own document-and-anchor reference, so a wrong file or anchor is a build warning.
- The docstrings' plain-text convention for aligned tables and formulas (a line ending in ':'
  before a more deeply indented block) becomes a reST literal block.
- A formula KaTeX cannot parse is a build warning with the page and KaTeX's message.
- The build folder's index.html leads to the front page, docs/index.html.
- sphinxcontrib-katex's server start waits until node listens (it connects as soon as the socket
  file exists), and its 5 s time limits are raised for a loaded machine.
"""

import html
import pathlib
import re
import socket
import subprocess
import time

import sphinxcontrib.katex
from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging

logger = logging.getLogger(__name__)
ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


# ------------------------------------------------------------------ docstrings
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def napoleon_sections() -> set[str]:
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    return set(GoogleDocstring("", Config())._sections)


def preformatted_blocks(lines: list[str], sections: set[str]) -> list[str]:
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


def derivation_links(lines: list[str]) -> list[str]:
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


# ------------------------------------------------------------------ KaTeX
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


def setup(app):
    sections = napoleon_sections()

    def process_docstring(app, what, name, obj, options, lines):
        lines[:] = derivation_links(preformatted_blocks(lines, sections))

    app.connect("autodoc-process-docstring", process_docstring, priority=400)  # before napoleon's
    app.connect("autodoc-skip-member", _skip_namedtuple_field_aliases)
    app.connect("doctree-read", _source_links_to_api)
    app.add_role("derivation", _derivation_role)
    sphinxcontrib.katex.KaTeXServer.start_server_process = classmethod(_start_katex_server)
    # Its 5 s limits on starting node and on one formula are too short for a loaded machine.
    sphinxcontrib.katex.STARTUP_TIMEOUT = sphinxcontrib.katex.RENDER_TIMEOUT = 120.0
    app.connect("build-finished", _write_redirect)
    app.connect("html-page-context", _math_errors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
