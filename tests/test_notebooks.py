"""The Colab notebooks run: every code cell, in order, in one namespace
(shell lines such as `!pip install` are Colab set-up and are skipped)."""

import json
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "colab").glob("*.ipynb"))


def _code(path):
    cells = json.loads(path.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            lines = [l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("!", "%"))]
            yield "\n".join(lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__notebook__"}
    for source in _code(path):
        exec(compile(source, str(path), "exec"), namespace)


def test_notebooks_are_listed_in_the_readme():
    readme = (NOTEBOOKS[0].parent.parent / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"colab/{path.name}" in readme, f"README does not list {path.name}"
