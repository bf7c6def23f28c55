"""Check that an environment resolved with `uv pip install --resolution lowest-direct`
holds each direct dependency at exactly its declared lower bound.

`make test-lowest` runs this before the suite. Where a bound is lower than what
the other dependencies allow (jax 0.8.1 needs numpy 2.0, so `numpy>=1.26` would
resolve to 2.0.0), the resolver silently installs more and the suite proves
nothing about the declared bound; this makes that an error naming the bound to
raise. It reads the requirements from the installed package's metadata, so it
checks what pyproject.toml says without parsing it.

    python .ci/lowest_bounds.py GROUP ...   # GROUP: "core" (the dependencies), or an extra's name
"""

import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.version import Version


def mismatches(groups: list[str]) -> tuple[list[str], list[str]]:
    """(the direct dependencies checked as "name==version", the problems found) for these groups."""
    checked, problems = [], []
    for line in importlib.metadata.requires("jax-resnet") or []:
        req = Requirement(line)
        group = "core" if req.marker is None else next((g for g in groups if req.marker.evaluate({"extra": g})), None)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if group not in groups or not lower:
            continue
        try:
            installed = Version(importlib.metadata.version(req.name))
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (install with the extras {groups})")
            continue
        checked.append(f"{req.name}=={installed}")
        if installed != lower[0]:
            problems.append(
                f"{req.name}: declared >={lower[0]}, but the lowest resolution installed {installed} "
                f"(another requirement needs it): raise the bound to >={installed} in pyproject.toml"
            )
    return checked, problems


if __name__ == "__main__":
    checked, problems = mismatches(sys.argv[1:])
    print(f"lowest versions ({', '.join(sys.argv[1:])}): {' '.join(checked)}")
    print("\n".join(problems) or "each at its declared lower bound")
    sys.exit(1 if problems else 0)
