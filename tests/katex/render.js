// Parses math segments with KaTeX and reports the ones that fail.
//
// stdin:  JSON [{"file": "norm.md", "line": 105, "tex": "...", "display": false}, ...]
// stdout: JSON [{"file": "norm.md", "line": 105, "message": "KaTeX parse error: ..."}, ...]
//
// A strict-mode complaint (a Unicode character KaTeX has no metrics for, a
// comment that swallows the rest of the segment, ...) is a failure too: such a
// segment renders differently, or not at all, elsewhere.
"use strict";

const katex = require("katex");

function check(segment) {
  const complaints = [];
  const strict = (code, message) => {
    complaints.push(`KaTeX strict (${code}): ${message}`);
    return "ignore";
  };
  try {
    katex.renderToString(segment.tex, { displayMode: segment.display, throwOnError: true, strict });
  } catch (err) {
    complaints.push(err instanceof katex.ParseError ? err.message : `KaTeX crashed: ${err}`);
  }
  return complaints.map((message) => ({ file: segment.file, line: segment.line, message }));
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const failures = JSON.parse(input).flatMap(check);
  process.stdout.write(JSON.stringify({ katex: katex.version, failures }));
});
