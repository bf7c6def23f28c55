"""Reads derivations/*.md: sections by heading, and what each says a rule saves."""

import ast
import pathlib
import re

import numpy as np

DERIVATIONS = pathlib.Path(__file__).resolve().parent.parent / "derivations"

_HEADING = re.compile(r"^(#{2,3})\s+(.+?)\s*$", re.M)
_SAVES = re.compile(r"^\*\*Saves:\*\*(.*)$", re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def sections(family: str) -> dict[str, str]:
    """Map anchor -> section text for derivations/<family>.md (## and ### headings)."""
    text = (DERIVATIONS / f"{family}.md").read_text()
    marks = list(_HEADING.finditer(text))
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        out[anchor(m.group(2))] = text[m.end() : nxt.start() if nxt else len(text)]
    return out


def section(rule) -> str:
    path = DERIVATIONS / f"{rule.family}.md"
    if not path.exists():
        raise AssertionError(f"{rule.name}: derivations/{rule.family}.md does not exist")
    found = sections(rule.family)
    if rule.section not in found:
        raise AssertionError(
            f"{rule.name}: no section #{rule.section} in derivations/{rule.family}.md (have {sorted(found)})"
        )
    return found[rule.section]


def residuals_documented(rule) -> set[str]:
    """The backticked names on the section's '**Saves:**' line ('nothing' -> empty)."""
    m = _SAVES.search(section(rule))
    if m is None:
        raise AssertionError(f"{rule.name}: section #{rule.section} has no '**Saves:**' line")
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", m.group(1)))


_TEXT_FENCE = re.compile(r"^```text\n(.*?)^```", re.M | re.S)
_ASSIGNMENT = re.compile(r"^(\w+) = (.+)$", re.M)


def worked_example_values(document: str) -> dict[str, np.ndarray]:
    """Every `name = literal` line of the ```text blocks of derivations/<document>,
    as float64 arrays: the printed numbers of a worked example, for a test to recompute."""
    values = {}
    for block in _TEXT_FENCE.findall((DERIVATIONS / document).read_text()):
        for name, literal in _ASSIGNMENT.findall(block):
            assert name not in values, f"{document} defines {name} twice"
            values[name] = np.asarray(ast.literal_eval(literal), dtype=np.float64)
    return values
