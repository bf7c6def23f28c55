"""Check a hand-written VJP against JAX autodiff and float64 finite differences.

`gradcheck(fn, reference, args)` answers, per differentiable argument:

1. does the VJP of `fn` (your `custom_vjp`) equal the VJP of `reference`
   (plain `jnp`, differentiated by JAX) for one random cotangent, leaf by leaf?
2. does it pass the dot-product test against central finite differences in
   float64, ⟨u, vjp(v)⟩ ≈ ⟨v, (f(x + εu) − f(x − εu)) / 2ε⟩, for a random
   direction u? This uses only `fn`'s forward, so it is independent of both
   backward passes.

Errors are norm-wise *per leaf*, `max|a − b| / max|b|` over one array, so a
tiny entry of the reference cannot blow the figure up the way an element-wise
ratio does, and a small leaf cannot hide behind a large one
(`leaf_errors`, `max_leaf_error`).

For the whole matrix of properties (float32, jit and no-jit, vmap,
grad-of-grad, residuals, ...) see `jax_resnet.testing.check_rule`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import gradcheck, ops
    >>> from jax_resnet._x64 import enable_x64
    >>> with enable_x64():  # float64 for this block only (finite differences need it)
    ...     x = jax.random.normal(jax.random.key(0), (4, 5), jnp.float64)
    ...     report = gradcheck.gradcheck(ops.tanh, jnp.tanh, (x,))
    >>> report.ok
    True
    >>> gradcheck.max_leaf_error({"w": jnp.ones(3), "b": jnp.array([1e-3])}, {"w": jnp.ones(3), "b": jnp.array([2e-3])})
    (0.5, "['b']")
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_FD_RTOL",
    "relative_error",
    "leaf_errors",
    "max_leaf_error",
    "worst_leaf",
    "float_argnums",
    "comparison",
    "pullback",
    "restrict",
    "random_like",
    "vdot",
    "is_float",
    "array_error",
    "central_differences",
    "fd_steps",
    "dot_product_errors",
    "ArgReport",
    "GradcheckReport",
    "gradcheck",
]


DEFAULT_RTOL: dict[Any, float] = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-5}
DEFAULT_FD_RTOL = 1e-6


# ----------------------------------------------------------------------------- errors
def array_error(a, e) -> float:
    """max|a − e| / max|e| for two arrays (the absolute error when e is all zeros); NaN stays NaN."""
    a, e = np.asarray(a), np.asarray(e)
    a = a.astype(np.result_type(a.dtype, np.float64))
    e = e.astype(np.result_type(e.dtype, np.float64))
    # np.max, not Python's max: it propagates NaN.
    diff = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    if scale == 0.0:
        return diff
    return diff / scale


def relative_error(actual, expected) -> float:
    """Norm-wise relative error max|a − e| / max|e| (0 if both are 0).

    For two arrays this is the error of `actual` relative to the scale of
    `expected`. For two pytrees it is the *whole-tree* figure, kept for the
    callers that compare small trees of like-sized leaves: the largest error
    anywhere over the largest value anywhere. A leaf much smaller than the
    others can then be entirely wrong and pass, so to judge a gradient tree
    use `max_leaf_error` (or `leaf_errors`), which measures each leaf against
    its own scale.
    """
    a_leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(actual)]
    e_leaves = [np.asarray(e, np.float64) for e in jax.tree.leaves(expected)]
    if len(a_leaves) != len(e_leaves):
        raise ValueError(f"relative_error: pytrees differ ({len(a_leaves)} vs {len(e_leaves)} leaves)")
    diff = max((float(np.max(np.abs(a - e), initial=0.0)) for a, e in zip(a_leaves, e_leaves)), default=0.0)
    scale = max((float(np.max(np.abs(e), initial=0.0)) for e in e_leaves), default=0.0)
    if scale == 0.0:
        return diff
    return diff / scale


def leaf_errors(actual, expected) -> dict[str, float]:
    """Relative error of each leaf against its own scale, keyed by path.

    Each value is `max|a − e| / max|e|` over that one leaf (the absolute error
    where the expected leaf is all zeros); NaN anywhere in a leaf gives NaN.
    Keys are `jax.tree_util.keystr` paths (`"['conv1']['w']"`, `"[0]"`; `""`
    for a bare array), in tree order.

    Args:
      actual: a pytree of arrays.
      expected: a pytree of the same structure and leaf shapes.

    Returns:
      `{path: error}`.

    Raises:
      ValueError: naming the first difference, when the structures or a
        leaf's shape differ (no silent broadcasting).

    Example:
        >>> import numpy as np
        >>> leaf_errors({"w": np.ones(3), "b": np.zeros(2)}, {"w": np.full(3, 2.0), "b": np.zeros(2)})
        {"['b']": 0.0, "['w']": 0.5}
    """
    a_def: Any  # jaxlib's PyTreeDef, which has no type stubs
    e_def: Any
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if a_def != e_def:
        raise ValueError(f"leaf_errors: the trees differ: actual is {a_def}, expected is {e_def}")
    out = {}
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        key = jax.tree_util.keystr(path)
        if np.shape(a) != np.shape(e):
            raise ValueError(f"leaf_errors: leaf {key or '(root)'} has shape {np.shape(a)}, expected {np.shape(e)}")
        out[key] = array_error(a, e)
    return out


def max_leaf_error(actual, expected) -> tuple[float, str]:
    """The worst per-leaf relative error and its path (see `leaf_errors`).

    NaN counts as the worst. An empty tree gives `(0.0, "")`; a bare array's
    path is `""`.

    Returns:
      `(error, path)`: compare `error <= tol` (False for NaN) and name `path`
      in the message.
    """
    return worst_leaf(leaf_errors(actual, expected))


def worst_leaf(errors: Mapping[str, float]) -> tuple[float, str]:
    """`(error, path)` of the largest entry of a `leaf_errors` dict; NaN counts as the largest."""
    worst, where = 0.0, ""
    for key, err in errors.items():
        if math.isnan(err):
            return err, key
        if err > worst:
            worst, where = err, key
    return worst, where


# ----------------------------------------------------------------------------- the core
def is_float(x) -> bool:
    """True for a floating array or scalar."""
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _is_float_tree(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(is_float(leaf) for leaf in leaves)


def float_argnums(args: Sequence[Any]) -> tuple[int, ...]:
    """The positions of the arguments whose leaves are all floating: the ones differentiated by default."""
    return tuple(i for i, a in enumerate(args) if _is_float_tree(a))


def random_like(rng: np.random.Generator, tree):
    """Standard normal draws shaped and typed like each leaf of `tree` (arrays, or `jax.ShapeDtypeStruct` leaves)."""
    # numpy draws: a jax.random call would compile a kernel for every new shape.
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)), tree)


def vdot(a, b) -> jax.Array:
    """⟨a, b⟩ of two pytrees of one structure: the sum over leaves of `jnp.vdot`."""
    return jnp.asarray(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def restrict(f: Callable, args: Sequence[Any], argnums: Sequence[int]) -> Callable:
    """f as a function of the arguments at `argnums` only, the others held at `args`."""

    def g(*diff):
        full = list(args)
        for i, d in zip(argnums, diff):
            full[i] = d
        return f(*full)

    return g


def pullback(f: Callable, args: Sequence[Any], argnums: Sequence[int], ct) -> tuple[Any, tuple]:
    """(`f(*args)`, the VJP of f w.r.t. the arguments at `argnums` for cotangent `ct`)."""
    y, vjp_fn = jax.vjp(restrict(f, args, argnums), *(args[i] for i in argnums))
    return y, vjp_fn(ct)


def central_differences(f: Callable, args, argnums, ct, directions, eps) -> list:
    """⟨ct, (f(x + ε_k u_k) − f(x − ε_k u_k)) / 2ε_k⟩ for each argument k: the right side of the dot-product test."""
    g = restrict(f, args, argnums)
    primals = [args[i] for i in argnums]
    out = []
    for k in range(len(argnums)):
        plus, minus = list(primals), list(primals)
        plus[k] = jax.tree.map(lambda p, u, k=k: p + eps[k] * u, primals[k], directions[k])
        minus[k] = jax.tree.map(lambda p, u, k=k: p - eps[k] * u, primals[k], directions[k])
        out.append(vdot(ct, jax.tree.map(lambda a, b, k=k: (a - b) / (2 * eps[k]), g(*plus), g(*minus))))
    return out


def comparison(fn: Callable, reference: Callable, args, argnums, ct, directions=None, eps=None, *, rule_vjp=True):
    """The computation every check of a rule is made of, in one traceable function (`jax_resnet.testing`
    jits it; `gradcheck` runs it as it is):

      y: `fn(*args)`;  y_ref, want: `reference`'s output and VJP for the cotangent `ct`;
      y_vjp, got: `fn`'s (when `rule_vjp`);  fd: per argument k, ⟨ct, (f(x + ε_k u_k) − f(x − ε_k u_k)) / 2ε_k⟩
      along `directions[k]` with steps `eps[k]` (when `directions` is given): the dot-product test's right side.
    """
    out = {"y": fn(*args)}
    out["y_ref"], out["want"] = pullback(reference, args, argnums, ct)
    if rule_vjp:
        out["y_vjp"], out["got"] = pullback(fn, args, argnums, ct)
    if directions is not None:
        out["fd"] = central_differences(fn, args, argnums, ct, directions, eps)
    return out


def fd_steps(args: Sequence[Any], argnums: Sequence[int], fd_eps: float) -> jax.Array:
    """The finite-difference step per argument, fd_eps · (1 + max|x_k|)."""
    scales = [
        max((float(np.max(np.abs(leaf), initial=0.0)) for leaf in jax.tree.leaves(args[i])), default=0.0)
        for i in argnums
    ]
    return jnp.asarray([fd_eps * (1.0 + s) for s in scales], jnp.float64)


def dot_product_errors(directions: Sequence[Any], cts: Sequence[Any], fd: Sequence[Any]) -> list[float]:
    """The dot-product test per argument k: `|⟨u_k, ct_k⟩ − fd_k| / max(|⟨u_k, ct_k⟩|, |fd_k|)`.

    `cts` is a VJP (rule or reference), `fd` what `central_differences` gave
    for the same cotangent; the sums run in numpy (no kernel to compile).
    """
    out = []
    for u, ct, f in zip(directions, cts, fd):
        lhs = sum(
            float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ct))
        )
        f = float(f)
        out.append(abs(lhs - f) / max(abs(lhs), abs(f), 1e-300))
    return out


# ----------------------------------------------------------------------------- gradcheck
@dataclasses.dataclass(frozen=True)
class ArgReport:
    """The checks for one differentiable argument.

    `max_rel_err` is the worst of `leaf_errors` (each leaf against its own
    scale; NaN counts as worst); for an array argument the one leaf is `""`.
    """

    argnum: int
    max_rel_err: float  # rule VJP vs reference VJP, in the arguments' dtype, worst leaf
    fd_rel_err: float | None  # dot-product test in float64; None when x64 is off
    ok: bool
    leaf_errors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    worst_leaf: str = ""


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """Result of `gradcheck`: per-argument rows and the overall verdict."""

    dtype: str
    forward_rel_err: float
    args: tuple[ArgReport, ...]
    rtol: float
    fd_rtol: float

    @property
    def max_rel_err(self) -> float:
        errs = [a.max_rel_err for a in self.args]
        return next((e for e in errs if math.isnan(e)), max(errs, default=0.0))

    @property
    def fd_ok(self) -> bool | None:
        errs = [a.fd_rel_err for a in self.args if a.fd_rel_err is not None]
        return None if not errs else all(e <= self.fd_rtol for e in errs)

    @property
    def ok(self) -> bool:
        return self.forward_rel_err <= self.rtol and all(a.ok for a in self.args)

    def __str__(self) -> str:
        lines = [
            f"gradcheck in {self.dtype}: {'ok' if self.ok else 'FAIL'} "
            f"(tolerance {self.rtol:.0e}, finite differences {self.fd_rtol:.0e})",
            f"  forward  rel err {self.forward_rel_err:.1e}" + ("" if self.forward_rel_err <= self.rtol else "  FAIL"),
        ]
        for a in self.args:
            fd = "n/a (x64 off)" if a.fd_rel_err is None else f"{a.fd_rel_err:.1e}"
            lines.append(
                f"  argument {a.argnum}  VJP rel err {a.max_rel_err:.1e}  finite differences {fd}  {'ok' if a.ok else 'FAIL'}"
            )
            if len(a.leaf_errors) > 1:
                lines += [f"    leaf {k}: {v:.1e}" for k, v in a.leaf_errors.items()]
        return "\n".join(lines)


def gradcheck(
    fn: Callable,
    reference: Callable,
    args: Sequence[Any],
    *,
    argnums: Sequence[int] | None = None,
    rtol: float | None = None,
    fd_rtol: float = DEFAULT_FD_RTOL,
    fd_eps: float = 1e-6,
    seed: int = 0,
) -> GradcheckReport:
    """Compare `fn`'s VJP with `reference`'s and with finite differences.

    Args:
      fn: the function under test, usually a `jax.custom_vjp`; positional args.
      reference: same signature and forward values, differentiated by JAX.
      args: the positional arguments (arrays or pytrees of arrays). All
        floating arrays share a dtype.
      argnums: which arguments to check; default every floating argument.
      rtol: tolerance on each leaf's norm-wise relative error; default 1e-10
        for float64 and 1e-5 for float32.
      fd_rtol: tolerance of the float64 finite-difference dot-product test.
      fd_eps: finite-difference step, scaled by (1 + max|x|) per argument.
      seed: seeds the cotangent and the finite-difference directions.

    Returns:
      A `GradcheckReport`; `report.ok` is the verdict, `print(report)` the
      table, `report.args[k].leaf_errors` the error of every leaf.
    """
    args = tuple(args)
    if argnums is None:
        argnums = float_argnums(args)
    if not argnums:
        raise ValueError("gradcheck: no floating argument to differentiate; pass `argnums`")
    dtype = jnp.result_type(*(leaf for i in argnums for leaf in jax.tree.leaves(args[i])))
    if rtol is None:
        if dtype not in DEFAULT_RTOL:
            raise ValueError(f"gradcheck: no default tolerance for dtype {dtype}; pass `rtol`")
        rtol = DEFAULT_RTOL[dtype]

    rng = np.random.default_rng(seed)
    ct = random_like(rng, jax.eval_shape(fn, *args))
    fd_errs: list[float | None] = [None] * len(argnums)
    x64, same = bool(jax.config.read("jax_enable_x64")), dtype == jnp.float64
    if x64:
        to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if is_float(a) else a, t)
        args64, ct64 = to64(args), to64(ct)
        directions = random_like(rng, tuple(args64[i] for i in argnums))
        eps = fd_steps(args64, argnums, fd_eps)
    p = comparison(fn, reference, args, argnums, ct, *((directions, eps) if x64 and same else ()))
    y, got, y_ref, want = p["y_vjp"], p["got"], p["y_ref"], p["want"]
    if x64:
        p64 = p if same else comparison(fn, reference, args64, argnums, ct64, directions, eps)
        fd_errs = list(dot_product_errors(directions, p64["got"], p64["fd"]))

    rows = []
    for k, i in enumerate(argnums):
        per_leaf = leaf_errors(got[k], want[k])
        err, where = worst_leaf(per_leaf)
        fd_err = fd_errs[k]
        fd_ok = fd_err is None or fd_err <= fd_rtol
        rows.append(
            ArgReport(
                argnum=i,
                max_rel_err=err,
                fd_rel_err=fd_errs[k],
                ok=err <= rtol and fd_ok,
                leaf_errors=per_leaf,
                worst_leaf=where,
            )
        )
    return GradcheckReport(
        dtype=str(jnp.dtype(dtype)),
        forward_rel_err=max_leaf_error(y, y_ref)[0],
        args=tuple(rows),
        rtol=rtol,
        fd_rtol=fd_rtol,
    )
