"""A test kit for anyone's `jax.custom_vjp`: the registry's whole property matrix, one call away.

`check_rule(fn, reference, make_args)` runs, on arguments that
`make_args(key, dtype)` draws, every property the library's own rules are
tested for (`tests/test_rules.py` is built on this module), and returns a
`RuleReport`: one `PropertyResult` per property, with rows per argument and
per leaf, each error relative to that leaf's own scale.

Properties (the names are stable; `report["vjp_float64"]`), from the one
table `PROPERTY_TABLE` of (name, description, check):

{PROPERTY_TABLE}

Everything float64 runs with x64 switched on for the call (no global
change). Each property is computed in its own try block, so one that raises
(a backward that is not differentiable, a cotangent of the wrong shape) is
reported with its exception and a hint, and the others still run. Cost: four
compilations per rule (float64 with finite differences, float32, vmap,
grad-of-grad) and one eager VJP.

For pytest, `rule_tests([...])` turns a list of `RuleSpec` into one
parametrized test (one item per rule and property); Hypothesis strategies
for convolution and pooling settings are in `jax_resnet.testing.strategies`
(needs the `dev` extra).

Example: a rule of one's own, checked end to end.

    >>> from typing import NamedTuple
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import testing
    >>> class CubeResiduals(NamedTuple):
    ...     x: jax.Array
    >>> @jax.custom_vjp
    ... def cube(x):
    ...     return x**3
    >>> def cube_fwd(x):
    ...     return x**3, CubeResiduals(x)
    >>> def cube_bwd(res, ct_y):
    ...     return (3 * res.x**2 * ct_y,)
    >>> cube.defvjp(cube_fwd, cube_bwd)
    >>> make_args = lambda key, dtype: (jax.random.normal(key, (3, 4), dtype),)
    >>> report = testing.check_rule(cube, lambda x: x**3, make_args, fwd=cube_fwd, residuals=["x"], name="cube")
    >>> report.ok
    True
    >>> print(report)  # doctest: +ELLIPSIS
    cube: ok, 14 of 14 properties pass
      ok    forward             worst 0.0e+00 (tol 1e-10)
      ok    vjp_float64         worst ...
    ...

    The same rule with a wrong factor in its backward (a new `custom_vjp`: JAX's tracing caches, e.g.
    `jax.checkpoint`'s, may keep serving the backward a `custom_vjp` had before `defvjp` was called again):

    >>> @jax.custom_vjp
    ... def cube(x):
    ...     return x**3
    >>> cube.defvjp(cube_fwd, lambda res, ct_y: (2 * res.x**2 * ct_y,))
    >>> report = testing.check_rule(cube, lambda x: x**3, make_args, fwd=cube_fwd, residuals=["x"], name="cube")
    >>> report.failed
    ('vjp_float64', 'vjp_float64_nojit', 'vjp_float32', 'finite_differences', 'vmap', 'grad_of_grad', 'extremes')
    >>> print(report["vjp_float64"])  # doctest: +ELLIPSIS
    FAIL  vjp_float64         the rule's VJP equals the reference's for a random cotangent (float64, jitted)
          VJP w.r.t. argument 0 (x) off by 3.3e-01 in float64 (tol 1e-10): finite differences agree with the reference...
    >>> "the backward is wrong, not the forward" in str(report)
    True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import gradcheck as gc
from jax_resnet._x64 import enable_x64

__all__ = [
    "Property",
    "PROPERTY_TABLE",
    "PROPERTIES",
    "DESCRIPTIONS",
    "SAME_CODE_RTOL",
    "GRAD_OF_GRAD_FACTOR",
    "EXTREMES",
    "EXTREMES_RTOL",
    "REMAT_POLICIES",
    "LOW_PRECISION_RTOL",
    "Row",
    "PropertyResult",
    "RuleReport",
    "RuleSpec",
    "check",
    "check_rule",
    "rule_tests",
]


# The batched rule against the same rule slice by slice: the same code, so only
# the order of a reduction may differ.
SAME_CODE_RTOL = 1e-12
# Grad-of-grad compares second derivatives, one more rounding step deep.
GRAD_OF_GRAD_FACTOR = 10.0
# `extremes`: what each case does to the first argument (float32, numpy: exact denormals); plus a batch of one.
EXTREMES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "typical": lambda a: a,
    "large": lambda a: 1e4 * a,  # logits of ±1e4, activations deep in saturation
    "saturating": lambda a: 25 * a,  # about ±50 for the registry's activations
    "near_constant": lambda a: 1 + 1e-4 * a,  # variance ~1e-8, far below a norm's eps
    "constant": lambda a: np.full_like(a, 0.5),  # exactly constant channels; ties everywhere
    "zeros": np.zeros_like,
    # Below float32's smallest normal, 1.2e-38; XLA's CPU backend flushes them to zero, as GPUs do by default.
    "denormal": lambda a: a * np.float32(1e-39),
}
# The rule in float32 against the reference in float64, each leaf against its own scale (measured worst over
# the library's rules: 7.5e-7, sigmoid at ±50). 1 + 1e-4·x carries its deviations x to only ε₃₂/1e-4 ≈ 1.2e-3
# in float32, so whatever subtracts the mean (a norm) is good to a fraction of that (measured: 3.8e-4).
EXTREMES_RTOL = {"typical": 1e-5, "near_constant": 5e-3}
# `composition`: jax.checkpoint's default policy (None: save nothing but the inputs) and the named one.
REMAT_POLICIES = {"default": None, "nothing_saveable": jax.checkpoint_policies.nothing_saveable}
# Worst leaf of bfloat16 / float16 against float32, arguments rounded to the low dtype (measured worst over the
# library's rules: 1.5e-2, batch_norm_eval, and 1.7e-3, sigmoid).
LOW_PRECISION_RTOL = {jnp.dtype("bfloat16"): 5e-2, jnp.dtype("float16"): 1e-2}
_F64, _F32 = jnp.dtype("float64"), jnp.dtype("float32")


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison: what was compared, the error, its tolerance, and what to look at when it fails."""

    what: str
    error: float | None
    tol: float | None
    ok: bool
    note: str = ""
    dtype: str = ""

    def __str__(self) -> str:
        text = self.what
        if self.error is not None:
            tol = (f" in {self.dtype}" if self.dtype else "") + ("" if self.tol is None else f" (tol {self.tol:.0e})")
            text += f" off by {self.error:.1e}{tol}" if not self.ok else f": {self.error:.1e}{tol}"
        return text + (f": {self.note}" if self.note else "")


@dataclasses.dataclass(frozen=True)
class PropertyResult:
    """One property: its rows, or the exception it raised, or why it was skipped."""

    name: str
    rows: tuple[Row, ...] = ()
    error: str | None = None  # "ValueError: ..." when computing the property raised
    hint: str = ""  # what to look at, when it fails
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.error is None and all(r.ok for r in self.rows))

    @property
    def worst(self) -> float | None:
        """The largest error among the rows (NaN counts as largest); None when no row has a number."""
        errs = [r.error for r in self.rows if r.error is not None]
        if not errs:
            return None
        return next((e for e in errs if math.isnan(e)), max(errs))

    def __str__(self) -> str:
        if self.skipped is not None:
            return f"skip  {self.name:<19} {self.skipped}"
        if self.ok:
            worst = self.worst
            tols = [r.tol for r in self.rows if r.tol is not None and r.error == worst]
            figure = "" if worst is None else f"worst {worst:.1e}" + (f" (tol {tols[0]:.0e})" if tols else "")
            return f"ok    {self.name:<19} {figure or 'yes'}"
        lines = [f"FAIL  {self.name:<19} {DESCRIPTIONS.get(self.name, '')}"]
        if self.error is not None:
            lines.append(f"      raised {self.error}")
        lines += [f"      {r}" for r in self.rows if not r.ok]
        if self.hint:
            lines.append(f"      look at: {self.hint}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RuleReport:
    """Every property of one rule. `report.ok`, `report.failed`, `report["vmap"]`, `print(report)`."""

    name: str
    results: tuple[PropertyResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results if not r.ok)

    def __getitem__(self, name: str) -> PropertyResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(
            f"{self.name}: no property {name!r} in this report; it has {', '.join(r.name for r in self.results)}"
        )

    def summary(self, properties: Iterable[str] | None = None) -> str:
        """The report, restricted to `properties` (default all)."""
        chosen = [self[p] for p in properties] if properties is not None else list(self.results)
        failed = [r.name for r in chosen if not r.ok]
        if failed:
            head = f"{self.name}: FAIL, {len(failed)} of {len(chosen)} properties fail: {', '.join(failed)}"
        else:
            head = f"{self.name}: ok, {len(chosen)} of {len(chosen)} properties pass"
        body = [r for r in chosen if not r.ok] + [r for r in chosen if r.ok]
        return "\n".join([head] + ["  " + line for r in body for line in str(r).splitlines()])

    def __str__(self) -> str:
        return self.summary()

    def assert_ok(self, *properties: str) -> None:
        """Raise an AssertionError carrying the report when any of `properties` (default all) fails."""
        chosen = properties or tuple(r.name for r in self.results)
        if not all(self[p].ok for p in chosen):
            raise AssertionError("\n" + self.summary(chosen))


# ----------------------------------------------------------------------------- the checks
@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """A rule to check, for lists of one's own rules (`rule_tests`, `check`).

    The registry's `jax_resnet.rules.Rule` has the same fields (less
    `residuals`), so either can be passed where a spec is expected.

    Attributes:
      name: shown in reports and test ids.
      fn: the rule, positional array arguments (settings bound with `functools.partial`).
      reference: plain `jnp`, same signature and forward values.
      make_args: `(key, dtype) -> tuple` of arguments; floating ones in `dtype`.
      fwd: the rule's forward, `(*args) -> (y, residuals)`; enables `residuals`.
      residuals: the names the derivation says the forward saves.
      rtol: `{dtype: tolerance}` for rule vs reference; default `gradcheck.DEFAULT_RTOL`.
    """

    name: str
    fn: Callable
    reference: Callable
    make_args: Callable[[jax.Array, Any], tuple]
    fwd: Callable | None = None
    residuals: Sequence[str] | None = None
    rtol: Mapping[Any, float] | None = None


def check(rule, **options) -> RuleReport:
    """`check_rule` for a `RuleSpec` or a registry `Rule` (any object with those fields).

    `options` go to `check_rule` and win over the rule's own fields (for
    instance `residuals=` for a registry rule, whose names live in its
    derivation document).
    """
    fields = {k: getattr(rule, k, None) for k in ("fwd", "residuals", "rtol")}
    fields = {k: v for k, v in fields.items() if v is not None}
    return check_rule(rule.fn, rule.reference, rule.make_args, name=rule.name, **{**fields, **options})


def check_rule(
    fn: Callable,
    reference: Callable,
    make_args: Callable[[jax.Array, Any], tuple],
    *,
    name: str = "rule",
    fwd: Callable | None = None,
    residuals: Iterable[str] | None = None,
    rtol: Mapping[Any, float] | None = None,
    forward_rtol: Mapping[Any, float] | None = None,
    fd_rtol: float = gc.DEFAULT_FD_RTOL,
    fd_eps: float = 1e-6,
    seed: int = 0,
    key_impl: str = "rbg",
    properties: Iterable[str] | None = None,
) -> RuleReport:
    """Run every property of the registry's tests on one rule.

    Args:
      fn: the rule (usually a `jax.custom_vjp`), positional arguments only.
      reference: plain-`jnp` twin with the same signature and forward values,
        differentiated by JAX.
      make_args: `(key, dtype) -> tuple` of positional arguments whose
        floating arrays have `dtype`; integer ones (labels) are held fixed.
        Called with float64 and float32, and twice more for `vmap`; keep the
        arrays small and away from kinks and ties.
      name: shown in the report.
      fwd: the rule's forward pass, `(*args) -> (y, residuals)`; without it
        the `residuals` property is skipped.
      residuals: the names the forward must save (from the derivation); with
        `fwd` but without names, only "a NamedTuple, and fwd's y is fn's y" is
        checked.
      rtol: `{dtype: tolerance}` of each leaf's relative error, rule vs
        reference; default `gradcheck.DEFAULT_RTOL` (1e-10, 1e-5).
      forward_rtol: the same for forward values; default `rtol`.
      fd_rtol: tolerance of the dot-product test.
      fd_eps: finite-difference step, scaled by (1 + max|x|) per argument.
      seed: seeds the arguments, cotangents and directions.
      key_impl: the PRNG implementation of the keys `make_args` gets. "rbg"
        (XLA's RandomBitGenerator) compiles several times faster on the CPU
        than "threefry2x32", JAX's default, and each new argument shape
        compiles the generator afresh.
      properties: which of `PROPERTIES` to run (default all, in that order).

    Returns:
      A `RuleReport`; `report.ok` is the verdict, `print(report)` says what
      failed, by how much and what to look at.
    """
    properties = PROPERTIES if properties is None else tuple(properties)
    unknown = [p for p in properties if p not in PROPERTIES]
    if unknown:
        raise ValueError(f"check_rule: unknown properties {unknown}; known: {', '.join(PROPERTIES)}")
    rtol = {jnp.dtype(k): float(v) for k, v in (rtol or gc.DEFAULT_RTOL).items()}
    forward_rtol = {jnp.dtype(k): float(v) for k, v in (forward_rtol or rtol).items()}
    checker = _Checker(
        fn=fn,
        reference=reference,
        make_args=make_args,
        fwd=fwd,
        residuals=None if residuals is None else tuple(residuals),
        rtol=rtol,
        forward_rtol=forward_rtol,
        fd_rtol=fd_rtol,
        fd_eps=fd_eps,
        seed=seed,
        key_impl=key_impl,
    )
    with enable_x64():
        results = tuple(checker.run(p) for p in PROPERTIES if p in properties)
    return RuleReport(name=name, results=results)


def _exception_text(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _hint_for(err: BaseException) -> str:
    text = str(err)
    if "bwd rule" in text and ("shape" in text or "type" in text):
        return (
            "the backward returned a cotangent whose shape is not its argument's: a sum over an axis the forward "
            "broadcast is missing (reduce ct_y over the broadcast axes), or the cotangents are in the wrong order"
        )
    return "the exception above; the rule or its make_args fails before any comparison"


def _arg_names(reference: Callable, n: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(reference).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [f"argument {i} ({params[i]})" if i < len(params) else f"argument {i}" for i in range(n)]


def _stack(trees: Sequence[Any]):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree, k: int):
    return jax.tree.map(lambda leaf: leaf[k], tree)


class _Checker:
    """Computes each property once, sharing the pieces (arguments, the float64 pass) between properties."""

    def __init__(
        self, *, fn, reference, make_args, fwd, residuals, rtol, forward_rtol, fd_rtol, fd_eps, seed, key_impl
    ):
        self.fn, self.reference, self.make_args, self.fwd = fn, reference, make_args, fwd
        self.expected_residuals = residuals
        self.key = lambda offset: jax.random.key(seed + offset, impl=key_impl)
        self.rtol, self.forward_rtol, self.fd_rtol, self.fd_eps, self.seed = rtol, forward_rtol, fd_rtol, fd_eps, seed

    def run(self, prop: str) -> PropertyResult:
        try:
            return _BY_NAME[prop].check(self)
        except _Raised as raised:
            hint = f"{_hint_for(raised.err)}; {raised.more}"
            return PropertyResult(prop, error=_exception_text(raised.err), hint=hint)
        except Exception as err:  # the rule under test may raise anything; the report says what
            return PropertyResult(prop, error=_exception_text(err), hint=_hint_for(err))

    # ------------------------------------------------------------------ shared pieces
    def _tol(self, table: Mapping, dtype) -> float:
        dtype = jnp.dtype(dtype)
        if dtype not in table:
            raise ValueError(f"no tolerance for {dtype.name}: pass rtol={{..., '{dtype.name}': tol}}")
        return table[dtype]

    @functools.cached_property
    def args64(self) -> tuple:
        return tuple(self.make_args(self.key(0), jnp.float64))

    @functools.cached_property
    def argnums(self) -> tuple[int, ...]:
        nums = gc.float_argnums(self.args64)
        if not nums:
            raise ValueError("make_args gave no floating argument to differentiate")
        return nums

    @functools.cached_property
    def names(self) -> list[str]:
        return _arg_names(self.reference, len(self.args64))

    def _cotangent(self, args):
        return gc.random_like(np.random.default_rng(self.seed), jax.eval_shape(self.fn, *args))

    def _fused(self, *, rule_vjp: bool, fd: bool):
        """One jitted program: the plain forward, the reference's VJP, the rule's VJP, the central differences."""
        fn, reference, argnums = self.fn, self.reference, self.argnums

        def run(args, ct, directions, eps):
            return gc.comparison(fn, reference, args, argnums, ct, directions if fd else None, eps, rule_vjp=rule_vjp)

        return jax.jit(run)

    @property
    def pass64(self) -> dict:
        """The float64 pass, computed once; if even the forward raises, every property that needs it says so."""
        out, err = self._pass64_or_error
        if err is not None:
            raise err
        assert out is not None, "the float64 pass gives a result or an error"
        return out

    @functools.cached_property
    def _pass64_or_error(self) -> tuple[dict | None, Exception | None]:
        try:
            return self._float64_pass(), None
        except Exception as err:  # the rule under test
            return None, err

    def _float64_pass(self) -> dict:
        """The float64 pass. If the rule's VJP raises, it is run again without it, so that the forward and the
        finite differences still speak; the error is kept under "rule_error"."""
        args, argnums = self.args64, self.argnums
        ct = self._cotangent(args)
        directions = gc.random_like(np.random.default_rng(self.seed + 1), tuple(args[i] for i in argnums))
        eps = gc.fd_steps(args, argnums, self.fd_eps)
        try:
            out = self._fused(rule_vjp=True, fd=True)(args, ct, directions, eps)
            out["rule_error"] = None
        except Exception as err:  # the rule's backward under test
            out = self._fused(rule_vjp=False, fd=True)(args, ct, directions, eps)
            out["rule_error"] = err
        out["ct"] = ct
        out["fd_ref"] = gc.dot_product_errors(directions, out["want"], out["fd"])
        out["fd_rule"] = None if out["rule_error"] else gc.dot_product_errors(directions, out["got"], out["fd"])
        return out

    def _leaf_rows(self, label: str, k: int, got, want, tol: float, note: Callable[..., str]) -> list[Row]:
        """One row per leaf of argument k: `what` names the argument and, for a pytree argument, the leaf."""
        rows = []
        for path, err in gc.leaf_errors(got, want).items():
            what = f"{label} {self.names[self.argnums[k]]}" + (f" leaf {path}" if path else "")
            ok = err <= tol
            rows.append(Row(what, err, tol, ok, "" if ok else note(path, err)))
        return rows

    def _forward_ok(self) -> bool:
        p = self.pass64
        return gc.max_leaf_error(p["y"], p["y_ref"])[0] <= self._tol(self.forward_rtol, _F64)

    def _vjp64_ok(self, k: int, path: str) -> bool:
        p = self.pass64
        if p["rule_error"] is not None:
            return False
        return gc.leaf_errors(p["got"][k], p["want"][k])[path] <= self._tol(self.rtol, _F64)

    def _vjp64_all_ok(self) -> bool:
        p = self.pass64
        if p["rule_error"] is not None:
            return False
        return gc.max_leaf_error(p["got"], p["want"])[0] <= self._tol(self.rtol, _F64)

    def _fd_note(self, k: int) -> str:
        p = self.pass64
        if not self._forward_ok():
            return "the forward differs from the reference too (see forward): fix the forward first"
        ref_err, rule_err = p["fd_ref"][k], None if p["fd_rule"] is None else p["fd_rule"][k]
        ref_ok = ref_err <= self.fd_rtol
        if rule_err is None:
            return f"finite differences {'agree' if ref_ok else 'disagree'} with the reference ({ref_err:.1e})"
        rule_ok = rule_err <= self.fd_rtol
        if ref_ok and not rule_ok:
            return (
                f"finite differences agree with the reference ({ref_err:.1e}), not with the rule ({rule_err:.1e}): "
                "the backward is wrong, not the forward"
            )
        if rule_ok and not ref_ok:
            return (
                f"finite differences agree with the rule ({rule_err:.1e}), not with the reference ({ref_err:.1e}): "
                "the reference's gradient is wrong, or it is not the same function"
            )
        if not ref_ok:
            return (
                f"finite differences agree with neither (rule {rule_err:.1e}, reference {ref_err:.1e}): the arguments "
                "may sit at a kink or a tie (see make_args), or the forward is not smooth there"
            )
        return (
            f"finite differences agree with both ({rule_err:.1e}, {ref_err:.1e}): the error lies in a direction the "
            "dot-product test did not probe; trust the VJP comparison"
        )

    # ------------------------------------------------------------------ the properties
    def _forward(self) -> PropertyResult:
        p, tol = self.pass64, self._tol(self.forward_rtol, _F64)
        err = gc.max_leaf_error(p["y"], p["y_ref"])[0]
        rows = [Row("output vs the reference's", err, tol, err <= tol, "" if err <= tol else "the forward is wrong")]
        if p["rule_error"] is None:
            err = gc.max_leaf_error(p["y_vjp"], p["y"])[0]
            note = "the forward run under jax.vjp (fwd) is not the plain forward: fwd and the primal function differ"
            rows.append(Row("output under jax.vjp vs the plain call", err, tol, err <= tol, "" if err <= tol else note))
        return PropertyResult("forward", tuple(rows))

    def _vjp_float64(self) -> PropertyResult:
        p, tol = self.pass64, self._tol(self.rtol, _F64)
        if p["rule_error"] is not None:
            notes = "; ".join(f"{self.names[i]}: {self._fd_note(k)}" for k, i in enumerate(self.argnums))
            raise _Raised(p["rule_error"], notes)
        rows = []
        for k in range(len(self.argnums)):
            rows += self._leaf_rows(
                "VJP w.r.t.", k, p["got"][k], p["want"][k], tol, lambda path, err, k=k: self._fd_note(k)
            )
        return PropertyResult("vjp_float64", tuple(dataclasses.replace(r, dtype="float64") for r in rows))

    def _vjp_float64_nojit(self) -> PropertyResult:
        p, tol = self.pass64, self._tol(self.rtol, _F64)
        _, got = gc.pullback(self.fn, self.args64, self.argnums, p["ct"])

        def note(k, path):
            if self._vjp64_ok(k, path):
                return (
                    "right under jit, wrong op by op: the backward depends on being traced (isinstance(..., Tracer), "
                    "a Python branch on a value, a cache filled while tracing, numpy on concrete arrays)"
                )
            return "wrong under jit too (see vjp_float64)"

        rows = []
        for k in range(len(self.argnums)):
            rows += self._leaf_rows("VJP w.r.t.", k, got[k], p["want"][k], tol, lambda path, err, k=k: note(k, path))
        return PropertyResult("vjp_float64_nojit", tuple(dataclasses.replace(r, dtype="float64, no jit") for r in rows))

    def _vjp_float32(self) -> PropertyResult:
        tol, ftol = self._tol(self.rtol, _F32), self._tol(self.forward_rtol, _F32)
        args = tuple(self.make_args(self.key(0), jnp.float32))
        out = self._fused(rule_vjp=True, fd=False)(args, self._cotangent(args), None, None)
        err = gc.max_leaf_error(out["y"], out["y_ref"])[0]
        rows = [
            Row(
                "output vs the reference's",
                err,
                ftol,
                err <= ftol,
                "" if err <= ftol else "the forward is wrong in float32",
            )
        ]

        def note(k, path):
            if self._vjp64_ok(k, path):
                return (
                    "the float64 VJP agrees, so this is float32 rounding: look for cancellation in the backward "
                    "(a difference of nearly equal terms), or give this rule a looser float32 rtol"
                )
            return "wrong in float64 too (see vjp_float64)"

        for k in range(len(self.argnums)):
            rows += self._leaf_rows(
                "VJP w.r.t.", k, out["got"][k], out["want"][k], tol, lambda path, err, k=k: note(k, path)
            )
        return PropertyResult("vjp_float32", tuple(dataclasses.replace(r, dtype="float32") for r in rows))

    def _finite_differences(self) -> PropertyResult:
        p = self.pass64
        if p["rule_error"] is not None:
            raise p["rule_error"]
        rows = []
        for k, i in enumerate(self.argnums):
            err = p["fd_rule"][k]
            ok = err <= self.fd_rtol
            rows.append(
                Row(f"dot-product test, {self.names[i]}", err, self.fd_rtol, ok, "" if ok else self._fd_note(k))
            )
        return PropertyResult("finite_differences", tuple(rows))

    def _vmap(self) -> PropertyResult:
        fn, reference, argnums, tol = self.fn, self.reference, self.argnums, self._tol(self.rtol, _F64)
        slices = [tuple(self.make_args(self.key(s), jnp.float64)) for s in (1, 2)]
        stacked = _stack(slices)
        ct = gc.random_like(np.random.default_rng(self.seed + 2), jax.eval_shape(jax.vmap(fn), *stacked))

        @jax.jit
        def run(stacked, ct):
            batched = lambda f: jax.vmap(lambda a, c: gc.pullback(f, a, argnums, c))(stacked, ct)
            one_by_one = [
                gc.pullback(fn, _unstack(stacked, s), argnums, _unstack(ct, s))[1] for s in range(len(slices))
            ]
            return batched(fn), batched(reference), _stack(one_by_one)

        (y, got), (y_ref, want), sliced = run(stacked, ct)
        err = gc.max_leaf_error(y, y_ref)[0]
        rows = [Row("batched output vs the reference's", err, tol, err <= tol)]
        unbatched_ok = lambda k, path: self._vjp64_ok(k, path)
        for k in range(len(argnums)):

            def note(path, err, k=k):
                if not unbatched_ok(k, path):
                    return "the unbatched VJP is wrong already (see vjp_float64)"
                return "right one by one, wrong batched: a batching rule is wrong"

            rows += self._leaf_rows("batched VJP w.r.t.", k, got[k], want[k], tol, note)
            rows += [
                dataclasses.replace(r, what=r.what + " vs the rule slice by slice")
                for r in self._leaf_rows("batched VJP w.r.t.", k, got[k], sliced[k], SAME_CODE_RTOL, note)
            ]
        first_order_ok = self._vjp64_all_ok()
        if not first_order_ok:
            return PropertyResult("vmap", tuple(rows), hint="fix vjp_float64 first")
        return PropertyResult(
            "vmap",
            tuple(rows),
            hint=(
                "a primitive whose batching is wrong: a pure_callback's vmap_method (under 'expand_dims' the callback "
                "sees the batch as axis 0), a custom_vmap rule, or an axis the rule hard-codes"
            ),
        )

    def _grad_of_grad(self) -> PropertyResult:
        args, argnums = self.args64, self.argnums
        tol = GRAD_OF_GRAD_FACTOR * self._tol(self.rtol, _F64)
        rng = np.random.default_rng(self.seed + 3)
        ct = gc.random_like(rng, jax.eval_shape(self.fn, *args))
        w = gc.random_like(rng, tuple(args[i] for i in argnums))

        def second(f, args, ct, w):
            """∇_x ⟨w, vjp_f(x)(ct)⟩: reverse mode through the backward pass itself."""

            inner = gc.restrict(lambda *full: gc.vdot(w, gc.pullback(f, full, argnums, ct)[1]), args, argnums)

            return jax.grad(inner, argnums=tuple(range(len(argnums))))(*(args[i] for i in argnums))

        hint = (
            "the backward must be differentiable jnp/lax: no numpy or pure_callback, no stop_gradient on a term "
            "that depends on the inputs, no jax.vjp of the forward"
        )
        try:
            want = jax.jit(functools.partial(second, self.reference))(args, ct, w)
        except Exception as err:
            return PropertyResult("grad_of_grad", error="the reference raised " + _exception_text(err))
        try:
            got = jax.jit(functools.partial(second, self.fn))(args, ct, w)
        except Exception as err:  # a backward that cannot be differentiated
            return PropertyResult(
                "grad_of_grad", error=_exception_text(err), hint="differentiating the rule's backward raised: " + hint
            )
        rows = []
        for k in range(len(argnums)):
            note = lambda path, err, k=k: (
                "the first-order VJP is wrong already (see vjp_float64)"
                if not self._vjp64_ok(k, path)
                else "first order right, second order wrong: a stop_gradient in the backward, or a residual that "
                "should carry a derivative held as a constant"
            )
            rows += self._leaf_rows("second derivative w.r.t.", k, got[k], want[k], tol, note)
        first_order_ok = self._vjp64_all_ok()
        return PropertyResult("grad_of_grad", tuple(rows), hint=hint if first_order_ok else "fix vjp_float64 first")

    def _composition(self) -> PropertyResult:
        p, argnums = self.pass64, self.argnums
        if p["rule_error"] is not None:
            raise p["rule_error"]
        tol = self._tol(self.rtol, _F64)  # the same formulas, compiled in another program
        comp = self.edge_pass["composition"]
        note = lambda path, err: "the VJP changes under this transformation: the backward depends on how it is traced"
        rows = []
        for name, got in comp.items():
            for k in range(len(argnums)):
                rows += [
                    dataclasses.replace(r, what=f"{r.what} under {name}")
                    for r in self._leaf_rows("VJP w.r.t.", k, got[k], p["got"][k], tol, note)
                ]
        rows += self._remat_rows(REMAT_POLICIES)
        return PropertyResult("composition", tuple(rows))

    def _remat_rows(self, policies) -> list[Row]:
        """Per policy: no primitive of the rule's forward appears in the VJP's jaxpr more than once more under
        jax.checkpoint than without it (the forward is rematerialized once, never twice)."""
        args, argnums, fn = self.args64, self.argnums, self.fn
        ct = self._cotangent(args)
        diff = tuple(args[i] for i in argnums)
        forward = _primitive_counts(jax.make_jaxpr(lambda *d: jax.vjp(gc.restrict(fn, args, argnums), *d))(*diff))
        vjp = lambda f: _primitive_counts(jax.make_jaxpr(lambda a, c: gc.pullback(f, a, argnums, c))(args, ct))
        plain = vjp(fn)
        rows = []
        for name, policy in policies.items():
            remat = vjp(jax.checkpoint(fn, policy=policy))
            excess = {p: (remat[p] - plain[p], forward[p]) for p in remat if remat[p] - plain[p] > forward[p]}
            note = ", ".join(f"{p}: {extra} more, the forward has {n}" for p, (extra, n) in sorted(excess.items()))
            rows.append(
                Row(
                    f"under jax.checkpoint(policy={name}) the forward runs at most once more",
                    None,
                    None,
                    not excess,
                    ""
                    if not excess
                    else f"{note}: the forward is recomputed more than once (try defvjp(..., optimize_remat=True))",
                )
            )
        return rows

    def _sharded(self) -> PropertyResult:
        devices = jax.devices()
        if len(devices) < 2:
            return PropertyResult(
                "sharded", skipped="one device (simulate more: XLA_FLAGS=--xla_force_host_platform_device_count=8)"
            )
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        fn, argnums, tol = self.fn, self.argnums, self._tol(self.rtol, _F64)
        n = len(devices)
        # One slice per device: the float64 arguments, each floating leaf scaled by its own noise (numpy draws;
        # no new random kernels to compile).
        rng = np.random.default_rng(self.seed + 5)
        vary = lambda a: a * (1 + 0.1 * rng.standard_normal(a.shape)) if gc.is_float(a) else a
        slices = [jax.tree.map(lambda a: vary(np.asarray(a)), self.args64) for _ in range(n)]
        stacked = jax.tree.map(lambda *a: np.stack(a), *slices)
        ct = gc.random_like(rng, jax.eval_shape(jax.vmap(fn), *stacked))
        mesh = Mesh(np.array(devices), ("devices",))
        spread = NamedSharding(mesh, PartitionSpec("devices"))
        from jax import shard_map

        def slice_vjp(args, c):
            return gc.pullback(fn, args, argnums, c)[1]

        def per_device(args, c):  # each device holds a block of one slice
            squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
            return jax.tree.map(lambda a: a[None], slice_vjp(squeeze(args), squeeze(c)))

        @jax.jit
        def run(stacked, ct):
            # shard_map runs the plain, unbatched VJP on each device's slice; jit of vmap leaves the split to
            # XLA's partitioner (and `vmap` equals the plain VJP slice by slice: the `vmap` property).
            spec = PartitionSpec("devices")
            mapped = shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(stacked, ct)
            return mapped, jax.vmap(slice_vjp)(stacked, ct)

        mapped, vmapped = jax.tree.map(np.asarray, run(*jax.device_put((stacked, ct), spread)))
        note = lambda path, err: "the partitioned VJP differs from the plain VJP run on each device"
        rows = []
        for k in range(len(argnums)):
            rows += [
                dataclasses.replace(r, what=f"{r.what}: jit of vmap vs shard_map over {n} devices")
                for r in self._leaf_rows("VJP w.r.t.", k, vmapped[k], mapped[k], tol, note)
            ]
        return PropertyResult("sharded", tuple(rows))

    @functools.cached_property
    def edge_pass(self) -> dict:
        """One jitted program for `composition`, `extremes` and `low_precision`:

        - the rule's float64 VJP (the arguments and cotangent of `pass64`) under each of REMAT_POLICIES, and
          under lax.scan over two copies, the second with twice the cotangent;
        - the rule in float32 and the reference in float64 on every case of EXTREMES (batched with vmap: they
          differ in the first argument only) and on a batch of one;
        - the rule in bfloat16 and float16 on the typical float32 arguments.
        """
        fn, reference, argnums = self.fn, self.reference, self.argnums
        args = [np.asarray(a) for a in self.make_args(self.key(0), jnp.float32)]
        inputs = {
            "first": np.stack([np.asarray(make(args[0]), args[0].dtype) for make in EXTREMES.values()]),
            "rest": tuple(args[1:]),
            "ct": self._cotangent(args),
            "one_args": tuple(_batch_of_one(args)),
        }
        inputs["one_ct"] = self._cotangent(inputs["one_args"])
        up = lambda t: _cast(t, jnp.float64)

        def evaluations(args, ct):
            return {
                "rule": gc.pullback(fn, args, argnums, ct),
                "reference64": gc.pullback(reference, up(args), argnums, up(ct)),
            }

        def scanned(stacked, cts, diff):
            """Σ_s ⟨cts_s, fn(args_s)⟩, summed by lax.scan over the stacked copies of the arguments, each step
            under jax.checkpoint."""
            full = list(stacked)
            for i, d in zip(argnums, diff):
                full[i] = d
            step = jax.checkpoint(lambda total, xs: (total + gc.vdot(xs[1], fn(*xs[0])), None))
            zero = jnp.zeros((), jax.tree.leaves(cts)[0].dtype)
            return jax.lax.scan(step, zero, (tuple(full), cts))[0]

        @jax.jit
        def run(args64, ct64, first, rest, ct, one_args, one_ct):
            composition = {
                f"jax.checkpoint(policy={name})": gc.pullback(jax.checkpoint(fn, policy=policy), args64, argnums, ct64)[
                    1
                ]
                for name, policy in REMAT_POLICIES.items()
            }
            # Two copies of the arguments, the second with twice the cotangent: its gradient is twice the VJP.
            stacked = jax.tree.map(lambda a: jnp.stack([a, a]), tuple(args64))
            cts = jax.tree.map(lambda c: jnp.stack([c, 2 * c]), ct64)
            grads = jax.grad(functools.partial(scanned, stacked, cts))(tuple(stacked[i] for i in argnums))
            composition["lax.scan of jax.checkpoint"] = jax.tree.map(lambda g: g[0], grads)
            composition["lax.scan of jax.checkpoint, the second step (2·ct), halved"] = jax.tree.map(
                lambda g: g[1] / 2, grads
            )
            cases = jax.vmap(lambda a0: evaluations((a0, *rest), ct))(first)
            low = {}
            for dtype in LOW_PRECISION_RTOL:
                low[dtype.name] = gc.pullback(fn, _cast((first[0], *rest), dtype), argnums, _cast(ct, dtype))
            return composition, cases, evaluations(one_args, one_ct), low

        # numpy from here: indexing device arrays would compile a kernel per shape.
        composition, cases, one, low = jax.tree.map(np.asarray, run(self.args64, self.pass64["ct"], **inputs))
        return {
            "composition": composition,
            "cases": _split_cases(cases, one),
            "low": low,
            "dtypes": [a.dtype for a in args],
            "inputs": inputs,
        }

    @functools.cached_property
    def rule64_pass(self) -> dict:
        """The rule in float64 on the cases of `edge_pass`: the truth where only the rule is finite (computed
        only for a rule that is more stable than its reference somewhere)."""
        fn, argnums = self.fn, self.argnums
        up = lambda t: _cast(t, jnp.float64)

        @jax.jit
        def run(first, rest, ct, one_args, one_ct):
            cases = jax.vmap(lambda a0: gc.pullback(fn, up((a0, *rest)), argnums, up(ct)))(first)
            return cases, gc.pullback(fn, up(one_args), argnums, up(one_ct))

        return _split_cases(*jax.tree.map(np.asarray, run(**self.edge_pass["inputs"])))

    def _extremes(self) -> PropertyResult:
        rows = []
        what = ["output"] + [f"VJP w.r.t. {self.names[i]}" for i in self.argnums]
        for case, ev in self.edge_pass["cases"].items():
            leaves = {name: [np.asarray(a, np.float64) for a in jax.tree.leaves(t)] for name, t in ev.items()}
            n = len(leaves["rule"])
            labels = what if n == len(what) else [f"leaf {j}" for j in range(n)]
            for j, label in enumerate(labels):
                rule, ref64 = leaves["rule"][j], leaves["reference64"][j]
                rule64 = None
                if (~np.isfinite(ref64) & np.isfinite(rule)).any():
                    rule64 = np.asarray(jax.tree.leaves(self.rule64_pass[case])[j], np.float64)
                tol = EXTREMES_RTOL.get(case, EXTREMES_RTOL["typical"])
                rows += _extreme_rows(f"{case}: {label}", rule, ref64, rule64, tol)
        return PropertyResult(
            "extremes",
            tuple(rows),
            hint="an exp/log of an unshifted value (subtract the maximum), a division by a variance without eps, "
            "1 − y² where y saturates, a convention at a kink (the reference's, too): compare the two formulas",
        )

    def _low_precision(self) -> PropertyResult:
        p = self.edge_pass
        base = jax.tree.leaves(p["cases"]["typical"]["rule"])
        rows = (
            [
                Row(
                    "float32 arguments give float32 outputs and cotangents (x64 on)",
                    None,
                    None,
                    all(a.dtype == _F32 for a in base if gc.is_float(a)),
                    "got "
                    + ", ".join(sorted({str(a.dtype) for a in base}))
                    + ": a float64 constant promotes the result",
                )
            ]
            if _F32 in p["dtypes"]
            else []
        )
        for name, out in p["low"].items():
            dtype, got = jnp.dtype(name), jax.tree.leaves(out)
            kept = all(a.dtype == dtype for a in got if gc.is_float(a))
            rows.append(
                Row(
                    f"{name} arguments give {name} outputs and cotangents",
                    None,
                    None,
                    kept,
                    "" if kept else "got " + ", ".join(sorted({str(a.dtype) for a in got})),
                )
            )
            tol = LOW_PRECISION_RTOL[dtype]
            for j, (a, b) in enumerate(zip(got, base)):
                err = gc.array_error(np.asarray(a, np.float64), np.asarray(b, np.float64))
                ok = err <= tol
                rows.append(
                    Row(
                        f"{name} vs float32, leaf {j}",
                        err,
                        tol,
                        ok,
                        "" if ok else "cancellation in low precision: accumulate in float32",
                    )
                )
        return PropertyResult("low_precision", tuple(rows))

    def _custom_vjp_runs(self) -> PropertyResult:
        rule = "custom_vjp_call" in str(jax.make_jaxpr(self.fn)(*self.args64))
        ref = "custom_vjp_call" not in str(jax.make_jaxpr(self.reference)(*self.args64))
        return PropertyResult(
            "custom_vjp_runs",
            (
                Row(
                    "the rule goes through custom_vjp",
                    None,
                    None,
                    rule,
                    "" if rule else "no custom_vjp_call in its jaxpr: the hand-written backward never runs",
                ),
                Row(
                    "the reference is plain jnp",
                    None,
                    None,
                    ref,
                    "" if ref else "custom_vjp_call in the reference's jaxpr: it is not an independent check",
                ),
            ),
        )

    def _residuals(self) -> PropertyResult:
        if self.fwd is None:
            return PropertyResult("residuals", skipped="no `fwd` given")
        y, res = self.fwd(*self.args64)
        tol = self._tol(self.forward_rtol, _F64)
        err = gc.max_leaf_error(y, self.pass64["y"])[0]
        rows = [
            Row(
                "fwd's output vs the plain call",
                err,
                tol,
                err <= tol,
                "" if err <= tol else "fwd is not this rule's forward",
            )
        ]
        is_named = isinstance(res, tuple) and hasattr(res, "_fields")
        rows.append(
            Row(
                "residuals are a NamedTuple",
                None,
                None,
                is_named,
                "" if is_named else f"got {type(res).__name__}; name them (a NamedTuple), never res[3]",
            )
        )
        if is_named and self.expected_residuals is not None:
            saved, listed = set(res._fields), set(self.expected_residuals)
            fmt = lambda names: ", ".join(f"`{n}`" for n in sorted(names)) or "nothing"
            ok = saved == listed
            note = f"saves {fmt(saved)}; the derivation lists {fmt(listed)}"
            if saved - listed:
                note += f": {fmt(saved - listed)} saved but not listed (save only what the backward needs)"
            if listed - saved:
                note += f": {fmt(listed - saved)} listed but not saved"
            rows.append(Row("saved residuals are the listed ones", None, None, ok, "" if ok else note))
        return PropertyResult("residuals", tuple(rows))

    def _forward_mode(self) -> PropertyResult:
        args, k = self.args64, self.argnums[0]
        f = gc.restrict(self.fn, args, (k,))
        try:
            jax.jvp(f, (args[k],), (args[k],))
        except TypeError as err:
            ok = "forward-mode" in str(err)
            return PropertyResult(
                "forward_mode",
                (
                    Row(
                        "jax.jvp raises TypeError",
                        None,
                        None,
                        ok,
                        "" if ok else f"a TypeError without 'forward-mode': {err}",
                    ),
                ),
            )
        note = "jax.jvp of the rule succeeded: it is not a custom_vjp (or has a custom_jvp), so forward mode bypasses the hand-written backward"
        return PropertyResult("forward_mode", (Row("jax.jvp raises TypeError", None, None, False, note),))


class Property(NamedTuple):
    """One property of the kit: its stable name, what it asserts, and the method of the kit's checker that
    computes it (`checker -> PropertyResult`)."""

    name: str
    description: str
    check: Callable[..., PropertyResult]


# The kit's properties, in the order they run and are reported: the one place each is listed.
PROPERTY_TABLE: tuple[Property, ...] = (
    Property(
        "forward",
        "the rule's forward equals the reference's (float64), also under jax.vjp",
        _Checker._forward,
    ),
    Property(
        "vjp_float64",
        "the rule's VJP equals the reference's for a random cotangent (float64, jitted)",
        _Checker._vjp_float64,
    ),
    Property(
        "vjp_float64_nojit",
        "the rule's VJP equals the reference's without jit, op by op (a backward that depends on tracing shows here)",
        _Checker._vjp_float64_nojit,
    ),
    Property("vjp_float32", "the rule's VJP equals the reference's in float32, jitted", _Checker._vjp_float32),
    Property(
        "finite_differences",
        "dot-product test ⟨u, vjp(v)⟩ ≈ ⟨v, (f(x+εu) − f(x−εu)) / 2ε⟩ in float64, for the rule and for the "
        "reference: tells which of the two is wrong",
        _Checker._finite_differences,
    ),
    Property(
        "vmap",
        "jax.vmap of the rule's VJP equals the reference's, and the rule slice by slice",
        _Checker._vmap,
    ),
    Property(
        "grad_of_grad",
        "reverse over reverse: the gradient of ⟨w, vjp(v)⟩, rule vs reference (the backward is differentiable)",
        _Checker._grad_of_grad,
    ),
    Property(
        "composition",
        "the VJP under jax.checkpoint (default policy and nothing_saveable) and inside lax.scan equals the plain "
        "VJP (float64); under remat the forward runs at most once more (counted per primitive in the jaxpr)",
        _Checker._composition,
    ),
    Property(
        "sharded",
        "one slice of the arguments per device over all local devices: jit of vmap with sharded arguments gives "
        "what shard_map of the plain VJP gives (skipped on one device)",
        _Checker._sharded,
    ),
    Property(
        "extremes",
        "float32 arguments at the edges (first argument ×1e4, ×25, 1 + 1e-4·x, constant, zeros, denormals; a "
        "batch of one): the rule's forward and VJP are finite wherever the float64 reference fits in float32 and "
        "agree with it to EXTREMES_RTOL; where even the float64 reference overflows, a finite rule agrees with "
        "itself in float64 (more stable than its reference)",
        _Checker._extremes,
    ),
    Property(
        "low_precision",
        "bfloat16 and float16 forward and VJP within LOW_PRECISION_RTOL of float32; outputs and cotangents keep "
        "the arguments' dtype (float32 stays float32 with x64 on)",
        _Checker._low_precision,
    ),
    Property(
        "custom_vjp_runs",
        "`custom_vjp_call` is in the rule's jaxpr and not in the reference's",
        _Checker._custom_vjp_runs,
    ),
    Property(
        "residuals",
        "`fwd` saves a NamedTuple with exactly the names listed in `residuals`",
        _Checker._residuals,
    ),
    Property(
        "forward_mode",
        "jax.jvp of the rule fails with JAX's clear TypeError (custom_vjp has no forward mode), instead of "
        "quietly differentiating something else; second derivatives need no forward mode: `jax_resnet.hvp` is "
        "reverse over reverse",
        _Checker._forward_mode,
    ),
)
_BY_NAME = {p.name: p for p in PROPERTY_TABLE}
PROPERTIES: tuple[str, ...] = tuple(_BY_NAME)
DESCRIPTIONS: dict[str, str] = {p.name: p.description for p in PROPERTY_TABLE}


def _rst_table(table: Sequence[Property], width: int = 74) -> str:
    """The table as the reStructuredText simple table of the module's docstring."""
    first = max(len(p.name) for p in table)
    rule = "=" * first + "  " + "=" * width
    lines = [rule]
    for p in table:
        wrapped = textwrap.wrap(p.description, width)
        lines.append(f"{p.name:<{first}}  {wrapped[0]}")
        lines += [" " * (first + 2) + more for more in wrapped[1:]]
    return "\n".join([*lines, rule])


if __doc__:  # None under python -OO
    __doc__ = __doc__.replace("{PROPERTY_TABLE}", _rst_table(PROPERTY_TABLE))


def _primitive_counts(closed_jaxpr) -> collections.Counter:
    """How often each primitive runs in a jaxpr, inside nested jaxprs too (containers themselves not counted)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    # jax.extend.core.jaxprs_in_params does this from jax 0.10; written out for older jax.
    def jaxprs_in_params(params):
        for value in params.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, Jaxpr):
                    yield v
                elif isinstance(v, ClosedJaxpr):
                    yield v.jaxpr

    counts: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            subs = list(jaxprs_in_params(eqn.params))
            if not subs:
                counts[eqn.primitive.name] += 1
            for sub in subs:
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return counts


def _batch_of_one(args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The arguments with a batch of one: the first argument's leading axis, and that of each argument sharing
    it (same leading size, and the same rank or integer labels), cut to its first entry."""
    n, rank = args[0].shape[0], args[0].ndim
    batched = lambda a: a.ndim > 0 and a.shape[0] == n and (a.ndim == rank or np.issubdtype(a.dtype, np.integer))
    return [a[:1] if i == 0 or batched(a) else a for i, a in enumerate(args)]


def _masked_error(got: np.ndarray, want: np.ndarray, where: np.ndarray) -> float:
    """max|got − want| over `where`, relative to the largest finite |want| of the whole leaf."""
    if not where.any():
        return 0.0
    diff = float(np.max(np.abs(got[where] - want[where])))
    scale = float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0))
    return diff / scale if scale else diff


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if gc.is_float(a) else a, tree)


def _split_cases(cases, one) -> dict:
    """{case: its slice of the vmapped `cases`} and "batch_of_one": `one`."""
    out = {name: jax.tree.map(lambda a, i=i: a[i], cases) for i, name in enumerate(EXTREMES)}
    out["batch_of_one"] = one
    return out


def _extreme_rows(what: str, rule, ref64, rule64, tol: float) -> list[Row]:
    """The float32 rule is finite wherever the float64 reference is finite and fits in float32, and agrees with
    it; where the reference is not finite even in float64, the rule, if finite, agrees with itself in float64
    (`rule64`): a rule more stable than its reference."""
    fits = np.isfinite(ref64) & (np.abs(ref64) <= np.finfo(np.float32).max)
    overflow = fits & ~np.isfinite(rule)
    rows = [
        Row(
            f"{what}: finite wherever the float64 reference fits in float32",
            None,
            None,
            not overflow.any(),
            f"{int(overflow.sum())} entries overflow or are NaN" if overflow.any() else "",
        )
    ]
    err = _masked_error(rule, ref64, fits & np.isfinite(rule))
    ok = err <= tol
    note = "the float32 rule is less accurate than float32 allows, or rule and reference disagree"
    rows.append(Row(f"{what}: float32 vs the float64 reference", err, tol, ok, "" if ok else note, dtype="float32"))
    if rule64 is not None:
        stable = ~np.isfinite(ref64) & np.isfinite(rule)
        err = _masked_error(rule, rule64, stable)
        ok = err <= tol
        rows.append(
            Row(
                f"{what}: finite in {int(stable.sum())} entries where the float64 reference is not (more stable "
                "than it); there vs the rule in float64",
                err,
                tol,
                ok,
                "" if ok else "finite but wrong",
                dtype="float32",
            )
        )
    return rows


class _Raised(Exception):
    """A property that raised, with what could still be said (the finite-difference verdict)."""

    def __init__(self, err: BaseException, more: str):
        super().__init__(str(err))
        self.err, self.more = err, more


# ----------------------------------------------------------------------------- pytest
def rule_tests(rules: Iterable, *, properties: Iterable[str] | None = None, **options) -> Callable:
    """A pytest test function parametrized over `rules` × `properties`.

    Each rule is checked once (the first of its items computes the report; the
    others read it), and each item asserts one property, so a failure names
    the rule and the property in its id and prints the report's lines for it.
    A test file for a list of one's own rules is three lines:

        from jax_resnet import testing
        from my_package.rules import MY_RULES  # a list of testing.RuleSpec
        test_my_rules = testing.rule_tests(MY_RULES)

    Args:
      rules: `RuleSpec`s (or registry `Rule`s: any objects with `name`, `fn`,
        `reference`, `make_args`, optionally `fwd`, `residuals`, `rtol`).
      properties: which properties to test (default all).
      **options: passed to `check_rule` for every rule (e.g. `forward_rtol=`).
        `residuals` may be a callable `rule -> names`.

    Returns:
      A function to assign to a `test_*` name at module level.
    """
    import pytest

    rules, properties = list(rules), PROPERTIES if properties is None else tuple(properties)
    residuals = options.pop("residuals", None)

    @functools.cache
    def report(index: int) -> RuleReport:
        rule = rules[index]
        extra = dict(options)
        if residuals is not None:
            extra["residuals"] = residuals(rule) if callable(residuals) else residuals
        return check(rule, properties=properties, **extra)

    cases = [(i, p) for i in range(len(rules)) for p in properties]

    @pytest.mark.parametrize("index, prop", cases, ids=[f"{rules[i].name}-{p}" for i, p in cases])
    def test_rule(index: int, prop: str) -> None:
        result = report(index)[prop]
        if result.skipped is not None:
            pytest.skip(f"{rules[index].name}: {prop}: {result.skipped}")
        report(index).assert_ok(prop)

    return test_rule
