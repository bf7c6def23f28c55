"""Sphinx configuration of the documentation site: `make docs` builds it into docs/_build/html.

The stack is the JAX ecosystem's (JAX, optax and Flax build their sites the same way), so a
reader finds the layout they know; docs/README.md says why each piece was chosen.

The source directory is the repository root (`sphinx-build -c docs . docs/_build/html`), and
`include_patterns` picks the pages from where they already live: derivations/*.md, colab/*.ipynb,
CONTRIBUTING.md and docs/. Nothing is copied by hand, and a relative link between two of those files
means the same on the site as on a forge. The site's own additions (links from pages to the API
and from docstrings to the derivations, checks, the docstrings' plain-text tables) are the
`site_extras` extension, docs/_ext/site_extras.py.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed copy
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

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
    "site_extras",  # docs/_ext/site_extras.py
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
    (
        "py:class",
        r"(jax|jaxlib|numpy|np|optax|flax|orbax|hypothesis|collections|typing|os|pathlib|argparse|subprocess)\..*",
    ),
]

# ------------------------------------------------------------------ math
# KaTeX renders every formula while the site is built, with the same KaTeX that
# tests/test_render.py parses the derivations with (tests/katex, `npm ci`): a formula it cannot
# parse fails the build (site_extras), and pages need no script to show their math.
KATEX_DIST = ROOT / "tests" / "katex" / "node_modules" / "katex" / "dist"
if not (KATEX_DIST / "katex.min.js").exists():
    raise RuntimeError(f"KaTeX is not installed at {KATEX_DIST}: run `npm ci --prefix tests/katex` (make docs does)")
katex_prerender = True
katex_js_path = str(KATEX_DIST / "katex.min.js")
katex_css_path = "katex.min.css"  # with its fonts/, from html_static_path

# ------------------------------------------------------------------ HTML
html_theme = "sphinx_book_theme"
html_title = "jax-resnet"
html_static_path = [str(KATEX_DIST)]
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_context = {"default_mode": "light"}  # the theme logs a console error when no mode is set
