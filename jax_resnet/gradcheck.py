"""Check a hand-written VJP against JAX autodiff and float64 finite differences.

`gradcheck(fn, reference, args)` answers, per differentiable argument:

1. does the VJP of `fn` (your `custom_vjp`) equal the VJP of `reference`
   (plain `jnp`, differentiated by JAX) for one random cotangent?
2. does it pass the dot-product test against central finite differences in
   float64, ⟨u, vjp(v)⟩ ≈ ⟨v, (f(x + εu) − f(x − εu)) / 2ε⟩, for a random
   direction u? This uses only `fn`'s forward, so it is independent of both
   backward passes.

Errors are norm-wise, `max|a − b| / max|b|`, so a tiny entry of the reference
cannot blow the figure up the way an element-wise ratio does.

Example:
    >>> import jax, jax.numpy as jnp
    >>> jax.config.update("jax_enable_x64", True)
    >>> from jax_resnet import gradcheck, ops
    >>> x = jax.random.normal(jax.random.key(0), (4, 5), jnp.float64)
    >>> report = gradcheck.gradcheck(ops.tanh, jnp.tanh, (x,))
    >>> report.ok
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_RTOL = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-5}
DEFAULT_FD_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class ArgReport:
    """The checks for one differentiable argument."""

    argnum: int
    max_rel_err: float  # rule VJP vs reference VJP, in the arguments' dtype
    fd_rel_err: float | None  # dot-product test in float64; None when x64 is off
    ok: bool


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
        return max((a.max_rel_err for a in self.args), default=0.0)

    @property
    def fd_ok(self) -> bool | None:
        errs = [a.fd_rel_err for a in self.args if a.fd_rel_err is not None]
        return None if not errs else all(e <= self.fd_rtol for e in errs)

    @property
    def ok(self) -> bool:
        return self.forward_rel_err <= self.rtol and all(a.ok for a in self.args)


def relative_error(actual, expected) -> float:
    """Norm-wise relative error max|a − e| / max|e| over a pytree (0 if both are 0)."""
    a_leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(actual)]
    e_leaves = [np.asarray(e, np.float64) for e in jax.tree.leaves(expected)]
    if len(a_leaves) != len(e_leaves):
        raise ValueError(f"relative_error: pytrees differ ({len(a_leaves)} vs {len(e_leaves)} leaves)")
    diff = max((float(np.max(np.abs(a - e), initial=0.0)) for a, e in zip(a_leaves, e_leaves)), default=0.0)
    scale = max((float(np.max(np.abs(e), initial=0.0)) for e in e_leaves), default=0.0)
    if scale == 0.0:
        return diff
    return diff / scale


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _random_like(rng: np.random.Generator, tree):
    # numpy draws: a jax.random call would compile a kernel for every new shape.
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)), tree)


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


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
      args: the positional arguments (arrays). All floating arrays share a dtype.
      argnums: which arguments to check; default every floating argument.
      rtol: tolerance on the norm-wise relative error; default 1e-10 for
        float64 and 1e-5 for float32.
      fd_rtol: tolerance of the float64 finite-difference dot-product test.
      fd_eps: finite-difference step, scaled by (1 + max|x|) per argument.
      seed: seeds the cotangent and the finite-difference directions.

    Returns:
      A `GradcheckReport`; `report.ok` is the verdict.
    """
    args = tuple(args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float(a))
    if not argnums:
        raise ValueError("gradcheck: no floating argument to differentiate; pass `argnums`")
    dtype = jnp.result_type(*(args[i] for i in argnums))
    if rtol is None:
        if dtype not in DEFAULT_RTOL:
            raise ValueError(f"gradcheck: no default tolerance for dtype {dtype}; pass `rtol`")
        rtol = DEFAULT_RTOL[dtype]

    def restrict(f):
        def g(*diff):
            full = list(args)
            for i, d in zip(argnums, diff):
                full[i] = d
            return f(*full)

        return g

    primals = tuple(args[i] for i in argnums)
    y, vjp_fn = jax.vjp(restrict(fn), *primals)
    y_ref, vjp_ref = jax.vjp(restrict(reference), *primals)
    rng = np.random.default_rng(seed)
    ct = _random_like(rng, y)
    got = vjp_fn(ct)
    want = vjp_ref(ct)

    fd_errs: list[float | None] = [None] * len(argnums)
    if jax.config.jax_enable_x64:
        to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if _is_float(a) else a, t)
        f64 = restrict(lambda *a: fn(*to64(a)))
        p64, ct64 = to64(primals), to64(ct)
        got64 = jax.vjp(f64, *p64)[1](ct64)
        directions = _random_like(rng, p64)
        for k in range(len(argnums)):
            eps = fd_eps * (1.0 + float(jnp.max(jnp.abs(p64[k]), initial=0.0)))
            plus = list(p64)
            minus = list(p64)
            plus[k] = p64[k] + eps * directions[k]
            minus[k] = p64[k] - eps * directions[k]
            fd = _vdot(ct64, jax.tree.map(lambda a, b, eps=eps: (a - b) / (2 * eps), f64(*plus), f64(*minus)))
            lhs = _vdot(directions[k], got64[k])
            scale = max(abs(float(lhs)), abs(float(fd)), 1e-300)
            fd_errs[k] = abs(float(lhs) - float(fd)) / scale

    rows = []
    for k, i in enumerate(argnums):
        err = relative_error(got[k], want[k])
        fd_ok = fd_errs[k] is None or fd_errs[k] <= fd_rtol
        rows.append(ArgReport(argnum=i, max_rel_err=err, fd_rel_err=fd_errs[k], ok=err <= rtol and fd_ok))
    return GradcheckReport(
        dtype=str(jnp.dtype(dtype)),
        forward_rel_err=relative_error(y, y_ref),
        args=tuple(rows),
        rtol=rtol,
        fd_rtol=fd_rtol,
    )
