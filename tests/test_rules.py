"""Every registered rule against JAX autodiff and finite differences.

Parametrized over `jax_resnet.rules.REGISTRY`: a new rule is checked by
registering it, never by copying a test. The checks are the public kit,
`jax_resnet.testing.check_rule` (one implementation of the property matrix,
the one users run on their own rules); each rule is checked once and each
test below asserts its share of the report.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from derivation_docs import residuals_documented

from jax_resnet import rules, testing

RULES = list(rules.REGISTRY.values())
# One rule's report is computed once per process and shared by its tests, so
# all of one rule's tests go to the same pytest-xdist worker (`--dist loadgroup`).
BY_RULE = [pytest.param(r, id=r.name, marks=pytest.mark.xdist_group(r.name)) for r in RULES]

# The library's own forwards equal their references more tightly than the
# kit's default (the VJP tolerance): they are the same formulas.
FORWARD_RTOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}

# Which test asserts which properties; together they are the kit's whole matrix.
CHECKS = {
    "test_vjp_matches_autodiff_float64": ("forward", "vjp_float64", "vjp_float64_nojit", "finite_differences"),
    "test_vjp_matches_autodiff_float32": ("vjp_float32",),
    "test_vmap_over_leading_axis": ("vmap",),
    "test_grad_of_grad": ("grad_of_grad",),
    "test_custom_rule_is_what_runs": ("custom_vjp_runs",),
    "test_saved_residuals_are_the_documented_ones": ("residuals",),
    "test_forward_mode_is_refused_with_a_clear_error": ("forward_mode",),
}


@functools.cache
def _report(name: str) -> testing.RuleReport:
    rule = rules.get(name)
    return testing.check(rule, residuals=residuals_documented(rule), forward_rtol=FORWARD_RTOL)


def _assert(rule, test_name):
    _report(rule.name).assert_ok(*CHECKS[test_name])


def test_the_tests_cover_the_whole_matrix():
    checked = [p for props in CHECKS.values() for p in props]
    assert sorted(checked) == sorted(testing.PROPERTIES)


@pytest.mark.parametrize("rule", BY_RULE)
def test_vjp_matches_autodiff_float64(rule):
    """Forward values, the VJP jitted and op by op (≤ rtol, 1e-10), the dot-product test (≤ 1e-6)."""
    _assert(rule, "test_vjp_matches_autodiff_float64")


@pytest.mark.parametrize("rule", BY_RULE)
def test_vjp_matches_autodiff_float32(rule):
    _assert(rule, "test_vjp_matches_autodiff_float32")


@pytest.mark.parametrize("rule", BY_RULE)
def test_vmap_over_leading_axis(rule):
    _assert(rule, "test_vmap_over_leading_axis")


@pytest.mark.parametrize("rule", BY_RULE)
def test_grad_of_grad(rule):
    """Reverse-over-reverse: differentiate the hand-written backward pass itself."""
    _assert(rule, "test_grad_of_grad")


@pytest.mark.parametrize("rule", BY_RULE)
def test_custom_rule_is_what_runs(rule):
    _assert(rule, "test_custom_rule_is_what_runs")


@pytest.mark.parametrize("rule", BY_RULE)
def test_saved_residuals_are_the_documented_ones(rule):
    _assert(rule, "test_saved_residuals_are_the_documented_ones")


@pytest.mark.parametrize("rule", BY_RULE)
def test_forward_mode_is_refused_with_a_clear_error(rule):
    _assert(rule, "test_forward_mode_is_refused_with_a_clear_error")


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
