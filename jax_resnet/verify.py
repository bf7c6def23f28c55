"""`jax-resnet verify`: check every registered rule and tabulate the result.

For each entry of `jax_resnet.rules.REGISTRY`, the jitted rule and the jitted
reference are compared with `jax_resnet.gradcheck.gradcheck` in the chosen
dtype (the finite-difference test always runs in float64), and the bytes the
rule's forward saves for the backward pass are counted. float64 is on inside
`verify` only (`jax_resnet._x64.enable_x64`): the process's setting is left as
it was.

Example:
    >>> from jax_resnet import verify
    >>> [row] = verify.verify("float32", ["relu"])
    >>> row["rule"], row["dtype"], row["ok"]
    ('relu', 'float32', True)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from jax_resnet import gradcheck as gc
from jax_resnet import rules as rules_lib
from jax_resnet._x64 import enable_x64

__all__ = [
    "verify_rule",
    "verify",
    "format_table",
]


def verify_rule(rule: rules_lib.Rule, dtype) -> dict:
    """Check one rule, with float64 enabled for the call; returns the JSON row (field names are a stable contract)."""
    with enable_x64():
        return _verify_rule(rule, jnp.dtype(dtype))


def _verify_rule(rule: rules_lib.Rule, dtype) -> dict:
    args = rule.make_args(jax.random.key(0), dtype)
    report = gc.gradcheck(jax.jit(rule.fn), jax.jit(rule.reference), args, rtol=rule.rtol[dtype])
    _, residuals = rule.fwd(*args)
    names = list(inspect.signature(rule.reference).parameters)
    fd_errs = [a.fd_rel_err for a in report.args if a.fd_rel_err is not None]
    return {
        "rule": rule.name,
        "dtype": dtype.name,
        "max_rel_err": report.max_rel_err,
        "per_arg_rel_err": {names[a.argnum]: a.max_rel_err for a in report.args},
        "forward_rel_err": report.forward_rel_err,
        "fd_rel_err": max(fd_errs) if fd_errs else None,
        "fd_ok": report.fd_ok,
        "saved_bytes": int(sum(leaf.nbytes for leaf in jax.tree.leaves(residuals))),
        "input_bytes": int(sum(a.nbytes for a in args)),
        "rtol": report.rtol,
        "derivation": f"derivations/{rule.doc}",
        "ok": report.ok,
    }


def verify(dtype="float64", names: Iterable[str] | None = None) -> list[dict]:
    """Check the named rules (default: all) and return one row each.

    Each check runs with float64 enabled (the finite-difference test needs it
    in either dtype); the process's setting is left as it was.
    """
    selected = [rules_lib.get(n) for n in names] if names else list(rules_lib.REGISTRY.values())
    return [verify_rule(rule, dtype) for rule in selected]


def format_table(rows: list[dict]) -> str:
    """Render rows as a fixed-width table; one line per rule."""
    head = f"{'rule':<40} {'dtype':<8} {'max rel err':>11}  {'per argument':<52} {'fd rel err':>10} {'saved B':>8} {'input B':>8}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        per_arg = " ".join(f"{k}:{v:.1e}" for k, v in r["per_arg_rel_err"].items())
        fd = "n/a" if r["fd_rel_err"] is None else f"{r['fd_rel_err']:.1e}"
        lines.append(
            f"{r['rule']:<40} {r['dtype']:<8} {r['max_rel_err']:>11.2e}  {per_arg:<52} {fd:>10} "
            f"{r['saved_bytes']:>8} {r['input_bytes']:>8}  {'yes' if r['ok'] else 'FAIL'}"
        )
    failed = [r["rule"] for r in rows if not r["ok"]]
    lines.append(
        f"{len(rows) - len(failed)} of {len(rows)} rules pass" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines)
