"""Reads derivations/*.md: sections by heading, and what each says a rule saves."""

import pathlib
import re

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
