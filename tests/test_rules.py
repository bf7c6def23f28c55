"""Every registered rule against JAX autodiff and finite differences.

Parametrized over `jax_resnet.rules.REGISTRY`: a new rule is checked by
registering it, never by copying a test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from derivation_docs import residuals_documented

from jax_resnet import gradcheck as gc
from jax_resnet import rules

RULES = list(rules.REGISTRY.values())
IDS = [r.name for r in RULES]


def _args(rule, dtype, seed=0):
    return rule.make_args(jax.random.key(seed), dtype)


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_vjp_matches_autodiff_float64(rule, jit):
    report = gc.gradcheck(
        _maybe_jit(rule.fn, jit),
        _maybe_jit(rule.reference, jit),
        _args(rule, jnp.float64),
        rtol=rule.rtol[jnp.dtype("float64")],
    )
    assert report.forward_rel_err <= 1e-12, report
    for arg in report.args:
        assert arg.max_rel_err <= 1e-10, (rule.name, arg)
        assert arg.fd_rel_err is not None and arg.fd_rel_err <= gc.DEFAULT_FD_RTOL, (rule.name, arg)
    assert report.ok


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_vjp_matches_autodiff_float32(rule):
    report = gc.gradcheck(
        jax.jit(rule.fn), jax.jit(rule.reference), _args(rule, jnp.float32), rtol=rule.rtol[jnp.dtype("float32")]
    )
    assert report.dtype == "float32"
    for arg in report.args:
        assert arg.max_rel_err <= 1e-5, (rule.name, arg)
    assert report.ok, report


def _float_argnums(args):
    return tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))


def _vjp_all(fn, args, ct):
    """VJP of fn w.r.t. its floating arguments, for cotangent ct."""
    nums = _float_argnums(args)

    def g(*diff):
        full = list(args)
        for i, d in zip(nums, diff):
            full[i] = d
        return fn(*full)

    return jax.vjp(g, *(args[i] for i in nums))[1](ct)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_vmap_over_leading_axis(rule):
    a, b = _args(rule, jnp.float64, 1), _args(rule, jnp.float64, 2)
    stacked = jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)
    out = jax.vmap(rule.fn)(*stacked)
    ct = jax.tree.map(lambda y: jax.random.normal(jax.random.key(3), y.shape, y.dtype), out)

    got = jax.vmap(lambda args, c: _vjp_all(rule.fn, args, c))(stacked, ct)
    want = jax.vmap(lambda args, c: _vjp_all(rule.reference, args, c))(stacked, ct)
    assert gc.relative_error(got, want) <= 1e-10
    # The batched rule must equal the rule applied to each slice on its own.
    for k, single in enumerate((a, b)):
        one = _vjp_all(rule.fn, single, jax.tree.map(lambda c, k=k: c[k], ct))
        assert gc.relative_error(jax.tree.map(lambda g, k=k: g[k], got), one) <= 1e-12


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_grad_of_grad(rule):
    """Reverse-over-reverse: differentiate the hand-written backward pass itself."""
    args = _args(rule, jnp.float64)
    nums = _float_argnums(args)
    out = rule.fn(*args)
    keys = jax.random.split(jax.random.key(7), 2)
    ct = jax.tree.map(lambda y: jax.random.normal(keys[0], y.shape, y.dtype), out)
    w = [jax.random.normal(k, args[i].shape, args[i].dtype) for k, i in zip(jax.random.split(keys[1], len(nums)), nums)]

    def second(fn):
        def inner(*diff):
            full = list(args)
            for i, d in zip(nums, diff):
                full[i] = d
            cts = _vjp_all(fn, tuple(full), ct)
            return sum(jnp.vdot(wi, ci) for wi, ci in zip(w, cts))

        return jax.grad(inner, argnums=tuple(range(len(nums))))(*(args[i] for i in nums))

    got, want = second(rule.fn), second(rule.reference)
    assert gc.relative_error(got, want) <= 1e-9, rule.name


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_custom_rule_is_what_runs(rule):
    args = _args(rule, jnp.float64)
    assert "custom_vjp_call" in str(jax.make_jaxpr(rule.fn)(*args)), f"{rule.name} does not go through custom_vjp"
    assert "custom_vjp_call" not in str(jax.make_jaxpr(rule.reference)(*args)), (
        f"{rule.name}: reference must be plain jnp"
    )


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_saved_residuals_are_the_documented_ones(rule):
    args = _args(rule, jnp.float64)
    y, res = rule.fwd(*args)
    assert isinstance(res, tuple) and hasattr(res, "_fields"), f"{rule.name}: residuals must be a NamedTuple"
    assert set(res._fields) == residuals_documented(rule), (rule.name, res._fields)
    # The forward the rule runs under differentiation gives the same values as the plain call.
    assert gc.relative_error(y, rule.fn(*args)) == 0.0


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_forward_mode_is_refused_with_a_clear_error(rule):
    args = _args(rule, jnp.float64)
    nums = _float_argnums(args)
    f = lambda x: rule.fn(*[x if i == nums[0] else a for i, a in enumerate(args)])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (args[nums[0]],), (args[nums[0]],))


def test_relu_derivative_at_zero_is_zero():
    from jax_resnet.ops import relu

    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jax.grad(lambda x: relu(x).sum())(x), [0.0, 0.0, 1.0])


def test_relu_propagates_nan():
    from jax_resnet.ops import relu

    assert bool(jnp.isnan(relu(jnp.array([jnp.nan]))).all())


def test_leaky_relu_derivative_at_zero_is_the_slope():
    from jax_resnet.ops import leaky_relu

    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(jax.grad(lambda x: leaky_relu(x, 0.2).sum())(x), [0.2, 0.2, 1.0])


def test_registry_names_are_unique_and_lookup_explains_misses():
    assert len(rules.REGISTRY) == len(RULES)
    with pytest.raises(KeyError, match="registered"):
        rules.get("no-such-rule")
