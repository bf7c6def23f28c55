"""Every math segment of derivations/*.md renders.

GitHub renders `$...$` and `$$...$$` in Markdown, but only after its Markdown
layer has had its say: a control character in the file, a `$` left open, or a
backslash escape that the Markdown layer consumes (`\\{` becomes `{`) turns a
formula into a silent mess that no other test notices. This file

- extracts the math segments the way a Markdown reader sees them: code spans
  and fenced code blocks are not math, and `\\$` is a literal dollar;
- checks in Python what KaTeX cannot see: control characters, unbalanced
  `$`, escapes that GitHub strips, a `|` inside math in a table row;
- parses every segment with KaTeX (a real TeX-subset parser, run by node from
  `tests/katex`, installed by `make test` with `npm ci --prefix tests/katex`),
  in one node process for all documents.

Failures name the file and line, and KaTeX's message. GitHub itself renders
with MathJax; KaTeX supports a narrower set of commands, so a formula it
parses is very likely to render on GitHub, in Colab and in most previewers.
"""

import json
import re
import shutil
import subprocess
from typing import NamedTuple

import pytest
from derivation_docs import DERIVATIONS

KATEX_DIR = DERIVATIONS.parent / "tests" / "katex"
DOCS = sorted(DERIVATIONS.glob("*.md"))

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(\n|$)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Backslash escapes of ASCII punctuation that GitHub's Markdown layer consumes before
# the math renderer sees them, with what to write instead.
_GITHUB_STRIPS = {"{": r"\lbrace", "}": r"\rbrace"}


class Segment(NamedTuple):
    file: str
    line: int
    tex: str
    display: bool


def _mask(text: str, start: int, end: int) -> str:
    """Blank text[start:end] but keep its newlines, so that line numbers survive."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _without_code(text: str) -> str:
    """`text` with fenced code blocks and code spans blanked out."""
    lines, fence = text.split("\n"), None
    for n, line in enumerate(lines):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            lines[n] = ""
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(" `~"):
                fence = None
            lines[n] = ""
    text = "\n".join(lines)
    i = 0
    while (m := re.compile(r"(?<!\\)`+").search(text, i)) is not None:
        ticks = m.group(0)
        close = re.compile(rf"(?<!`){ticks}(?!`)").search(text, m.end())
        if close is None:  # a lone backtick run is literal text
            i = m.end()
            continue
        text = _mask(text, m.start(), close.end())
        i = close.end()
    return text


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def extract(name: str, text: str) -> tuple[list[Segment], list[str]]:
    """The math segments of one Markdown document, and what is wrong around them."""
    problems = [
        f"{name}:{_line(text, m.start())}: control character {m.group(0)!r} (a backslash escape written out by a tool?)"
        for m in _CONTROL.finditer(text)
    ]
    plain, segments, i = _without_code(text), [], 0
    while i < len(plain):
        c = plain[i]
        if c == "\\":  # `\$` outside math is a literal dollar
            i += 2
            continue
        if c != "$":
            i += 1
            continue
        display = plain.startswith("$$", i)
        opener = 2 if display else 1
        j = i + opener
        while j < len(plain):
            if plain[j] == "\\":
                j += 2
            elif plain.startswith("$$" if display else "$", j):
                break
            elif not display and _PARAGRAPH_BREAK.match(plain, j):  # inline math ends with its paragraph
                j = len(plain)
            else:
                j += 1
        if j >= len(plain):
            delimiter = "$$" if display else "$"
            problems.append(f"{name}:{_line(plain, i)}: unbalanced {delimiter} (write a literal dollar as \\$)")
            i += opener
            continue
        segments.append(Segment(name, _line(plain, i), plain[i + opener : j], display))
        i = j + opener
    rows = text.split("\n")
    for seg in segments:
        for m in re.finditer(r"\\(.)", seg.tex, re.S):
            if m.group(1) in _GITHUB_STRIPS:
                problems.append(
                    f"{seg.file}:{seg.line}: \\{m.group(1)} in math: GitHub's Markdown drops the backslash; "
                    f"write {_GITHUB_STRIPS[m.group(1)]}"
                )
        if not seg.display and rows[seg.line - 1].lstrip().startswith("|") and "|" in seg.tex:
            problems.append(f"{seg.file}:{seg.line}: '|' inside math in a table row splits the cell; write \\vert")
    return segments, problems


def katex_failures(segments: list[Segment]) -> list[str]:
    """Parse every segment with KaTeX in one node process; 'file:line: message' per failure."""
    result = subprocess.run(
        ["node", str(KATEX_DIR / "render.js")],
        input=json.dumps([s._asdict() for s in segments]),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [f"{f['file']}:{f['line']}: {f['message']}" for f in json.loads(result.stdout)["failures"]]


def _needs_katex():
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH: install Node.js (>= 18) to parse the derivations' math with KaTeX")
    if not (KATEX_DIR / "node_modules" / "katex" / "package.json").exists():
        pytest.skip("KaTeX is not installed: run `npm ci --prefix tests/katex` (make test does it when npm is present)")


def _all_documents():
    segments, problems = [], []
    for doc in DOCS:
        found, wrong = extract(doc.name, doc.read_text())
        segments += found
        problems += wrong
    return segments, problems


def test_markdown_around_the_math_is_well_formed():
    segments, problems = _all_documents()
    assert len(segments) > 500  # every document has its formulas
    assert not problems, "\n".join(problems)


def test_katex_parses_every_math_segment():
    _needs_katex()
    segments, _ = _all_documents()
    failures = katex_failures(segments)
    assert not failures, f"{len(failures)} of {len(segments)} math segments do not render:\n" + "\n".join(failures)


# ----------------------------------------------------------- the checker itself
def test_extractor_skips_code_and_literal_dollars():
    text = (
        "Costs \\$5, and `x = $a$` is code, ``a ` $b$`` too.\n"
        "```text\n"
        "y = $c$\n"
        "```\n"
        "Inline $d_1$ and\n"
        "$$\n"
        "e = \\$ + f\n"
        "$$\n"
        "  ~~~\n"
        "$g$\n"
        "  ~~~\n"
        "last $h$, then `$`.\n"
    )
    segments, problems = extract("t.md", text)
    assert problems == []
    assert [(s.line, s.tex, s.display) for s in segments] == [
        (5, "d_1", False),
        (6, "\ne = \\$ + f\n", True),
        (12, "h", False),
    ]


def test_a_backspace_where_a_backslash_b_was_is_caught():
    """The defect norm.md had: `\\bar\\beta` written out with `\\b` as the backspace byte."""
    text = "Title\n\n$\\sum g = \\gamma\\,\x08ar\x08eta$ and more.\n"
    _, problems = extract("norm.md", text)
    assert len(problems) == 2 and all(p.startswith("norm.md:3: control character '\\x08'") for p in problems)


def test_an_inline_brace_escape_and_an_open_dollar_are_caught():
    _, problems = extract("t.md", "The set $\\{x : x > 0\\}$.\n\nA lone $ here.\n\n| a | $|x|$ |\n")
    assert problems == [
        "t.md:3: unbalanced $ (write a literal dollar as \\$)",
        "t.md:1: \\{ in math: GitHub's Markdown drops the backslash; write \\lbrace",
        "t.md:1: \\} in math: GitHub's Markdown drops the backslash; write \\rbrace",
        "t.md:5: '|' inside math in a table row splits the cell; write \\vert",
    ]


def test_katex_reports_a_parse_error_with_file_and_line():
    _needs_katex()
    segments, problems = extract("t.md", "ok $a^2$\n\n$$\n\\frac{a}{b\n$$\n\n$\\notacommand x$\n")
    assert problems == []
    failures = katex_failures(segments)
    assert len(failures) == 2
    assert failures[0].startswith("t.md:3: KaTeX parse error:")
    assert failures[1].startswith("t.md:7: KaTeX parse error: Undefined control sequence: \\notacommand")
