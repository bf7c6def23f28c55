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
            lines = [s for s in "".join(cell["source"]).splitlines() if not s.lstrip().startswith(("!", "%"))]
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


def test_readme_quick_start_prints_what_its_comments_say():
    """Each `print(expr)  # value` line of the README's quick start must print value."""
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    source = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    checked = 0
    lines = []
    for line in source.splitlines():
        m = re.match(r"print\((.*)\)\s+# (\S+)", line)
        if m:
            lines.append(f"assert str({m.group(1)}) == {m.group(2)!r}, ({m.group(1)!r}, str({m.group(1)}))")
            checked += 1
        else:
            lines.append(line)
    assert checked >= 3
    exec(compile("\n".join(lines), "README.md", "exec"), {"__name__": "__readme__"})
