"""The test kit catches planted mistakes, each by the property that should, and says so in its report;
per-leaf gradient errors cannot hide a small leaf.

The planted rules are small user-style `custom_vjp`s: dense, y = x @ w + b, with
a square w (so that a transposed matrix still has the right shape), and a
column-centring op for the batching mistake. The library's own rules pass the
kit in tests/test_rules.py.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import gradcheck as gc
from jax_resnet import testing


# ----------------------------------------------------------------------------- a user's dense rule
class DenseResiduals(NamedTuple):
    x: jax.Array
    w: jax.Array


def dense_reference(x, w, b):
    return x @ w + b


def _dense_fwd(x, w, b):
    return x @ w + b, DenseResiduals(x, w)


def _dense_bwd(res, ct_y):
    return ct_y @ res.w.T, res.x.T @ ct_y, ct_y.sum(0)


def dense_rule(bwd=_dense_bwd, fwd=_dense_fwd):
    """A fresh custom_vjp of dense with the given backward (and forward)."""
    rule = jax.custom_vjp(dense_reference)
    rule.defvjp(fwd, bwd)
    return rule


def dense_args(key, dtype):
    kx, kw, kb = jax.random.split(key, 3)
    return (
        jax.random.normal(kx, (4, 5), dtype),
        jax.random.normal(kw, (5, 5), dtype),
        jax.random.normal(kb, (5,), dtype),
    )


def check_dense(bwd=_dense_bwd, fwd=_dense_fwd, **options):
    return testing.check_rule(
        dense_rule(bwd, fwd), dense_reference, dense_args, fwd=fwd, residuals=["x", "w"], name="dense", **options
    )


def failing_rows(result):
    return [str(r) for r in result.rows if not r.ok]


# ----------------------------------------------------------------------------- the control
def test_a_correct_rule_passes_every_property():
    report = check_dense()
    assert report.ok, report
    assert [r.name for r in report.results] == list(testing.PROPERTIES)
    assert str(report).startswith(f"dense: ok, {len(testing.PROPERTIES)} of {len(testing.PROPERTIES)} properties pass")
    # Three arguments, one leaf each: a row per argument, errors at rounding level.
    assert [r.what for r in report["vjp_float64"].rows] == [
        "VJP w.r.t. argument 0 (x)",
        "VJP w.r.t. argument 1 (w)",
        "VJP w.r.t. argument 2 (b)",
    ]
    assert report["vjp_float64"].worst <= 1e-13


# ----------------------------------------------------------------------------- planted mistakes
def test_a_wrong_factor_is_named_with_its_argument_and_blamed_on_the_backward():
    report = check_dense(lambda res, ct_y: (ct_y @ res.w.T, 2 * res.x.T @ ct_y, ct_y.sum(0)))
    assert {"vjp_float64", "vjp_float32", "finite_differences"} <= set(report.failed)
    assert "forward" not in report.failed
    (row,) = failing_rows(report["vjp_float64"])
    assert row.startswith("VJP w.r.t. argument 1 (w) off by 1.0e+00 in float64")  # |2g − g| / |g|
    assert "finite differences agree with the reference" in row and "the backward is wrong, not the forward" in row
    assert "FAIL  vjp_float64" in str(report)


def test_a_transposed_matrix_is_named_with_its_argument():
    report = check_dense(lambda res, ct_y: (ct_y @ res.w, res.x.T @ ct_y, ct_y.sum(0)))
    assert "vjp_float64" in report.failed
    (row,) = failing_rows(report["vjp_float64"])
    assert row.startswith("VJP w.r.t. argument 0 (x) off by") and "the backward is wrong" in row
    assert "argument 1" not in str(report["vjp_float64"])


def test_a_forgotten_sum_over_a_broadcast_axis_is_named():
    report = check_dense(
        lambda res, ct_y: (ct_y @ res.w.T, res.x.T @ ct_y, ct_y), properties=["forward", "vjp_float64"]
    )
    assert report.failed == ("vjp_float64",)
    text = str(report)
    assert "raised ValueError" in text and "a sum over an axis the forward broadcast is missing" in text
    # The forward and the reference still speak: the finite differences agree with the reference.
    assert "argument 2 (b): finite differences agree with the reference" in text


def test_a_backward_right_only_under_jit_is_caught_without_jit():
    def bwd(res, ct_y):
        # A backward that behaves differently on concrete arrays than while traced.
        scale = 1.0 if isinstance(ct_y, jax.core.Tracer) else 0.5
        return scale * ct_y @ res.w.T, res.x.T @ ct_y, ct_y.sum(0)

    report = check_dense(bwd, properties=["vjp_float64", "vjp_float64_nojit"])
    assert report.failed == ("vjp_float64_nojit",)
    (row,) = failing_rows(report["vjp_float64_nojit"])
    assert row.startswith("VJP w.r.t. argument 0 (x) off by 5.0e-01 in float64, no jit")
    assert "right under jit, wrong op by op" in row


class CenterResiduals(NamedTuple):
    pass


def center_reference(x):
    """Subtract each column's mean: y = x − mean over axis 0."""
    return x - x.mean(axis=0)


def _center_rule(vmap_method):
    """center with its backward, ct_x = ct_y − mean(ct_y, axis 0), computed in numpy by a callback."""

    def numpy_bwd(ct_y):
        return np.asarray(ct_y - ct_y.mean(axis=0), ct_y.dtype)

    def bwd(res, ct_y):
        return (
            jax.pure_callback(numpy_bwd, jax.ShapeDtypeStruct(ct_y.shape, ct_y.dtype), ct_y, vmap_method=vmap_method),
        )

    fwd = lambda x: (center_reference(x), CenterResiduals())
    rule = jax.custom_vjp(center_reference)
    rule.defvjp(fwd, bwd)
    return rule


def _center_args(key, dtype):
    return (jax.random.normal(key, (4, 3), dtype),)


def test_a_wrong_batching_rule_is_caught_by_vmap():
    # Under vmap_method="expand_dims" the callback sees the batch as axis 0 and averages over it.
    rule = _center_rule("expand_dims")
    report = testing.check_rule(
        rule, center_reference, _center_args, properties=["vjp_float64", "vjp_float64_nojit", "vmap"]
    )
    assert report.failed == ("vmap",)
    rows = failing_rows(report["vmap"])
    assert rows and all("right one by one, wrong batched" in r for r in rows)
    assert any("vs the rule slice by slice" in r for r in rows)
    assert "pure_callback's vmap_method" in str(report["vmap"])


def test_a_backward_through_numpy_is_caught_by_grad_of_grad():
    # tanh with its backward, ct_x = ct_y · (1 − y²), computed in numpy (batched correctly, slice by slice):
    # only differentiating the backward fails.
    def numpy_derivative(y):
        return np.asarray(1 - y * y, y.dtype)

    def bwd(y, ct_y):
        shape = jax.ShapeDtypeStruct(y.shape, y.dtype)
        return (ct_y * jax.pure_callback(numpy_derivative, shape, y, vmap_method="sequential"),)

    rule = jax.custom_vjp(jnp.tanh)
    rule.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)), bwd)
    report = testing.check_rule(rule, jnp.tanh, _center_args, properties=["vjp_float64", "vmap", "grad_of_grad"])
    assert report.failed == ("grad_of_grad",)
    text = str(report["grad_of_grad"])
    assert "raised" in text and "differentiating the rule's backward raised" in text


def test_a_stop_gradient_in_the_backward_is_caught_by_grad_of_grad():
    def bwd(res, ct_y):
        return ct_y @ jax.lax.stop_gradient(res.w).T, res.x.T @ ct_y, ct_y.sum(0)

    report = check_dense(bwd, properties=["vjp_float64", "grad_of_grad"])
    assert report.failed == ("grad_of_grad",)
    (row,) = failing_rows(report["grad_of_grad"])
    assert row.startswith("second derivative w.r.t. argument 1 (w) off by 1.0e+00")
    assert "first order right, second order wrong" in row


def test_a_residual_the_derivation_does_not_list_is_named():
    class Saved(NamedTuple):
        x: jax.Array
        w: jax.Array
        b: jax.Array

    def fwd(x, w, b):
        return x @ w + b, Saved(x, w, b)

    report = check_dense(fwd=fwd, properties=["residuals"])
    assert report.failed == ("residuals",)
    (row,) = failing_rows(report["residuals"])
    assert "`b` saved but not listed" in row


def test_residuals_must_be_named():
    report = check_dense(fwd=lambda x, w, b: (x @ w + b, (x, w)), properties=["residuals"])
    assert "residuals are a NamedTuple: got tuple" in str(report)


def test_a_plain_function_is_not_a_custom_vjp():
    report = testing.check_rule(
        dense_reference, dense_reference, dense_args, properties=["custom_vjp_runs", "forward_mode"]
    )
    assert report.failed == ("custom_vjp_runs", "forward_mode")
    assert "the hand-written backward never runs" in str(report)


# ----------------------------------------------------------------------------- the pytest form
SPECS = [
    testing.RuleSpec("dense", dense_rule(), dense_reference, dense_args, fwd=_dense_fwd, residuals=["x", "w"]),
]
test_user_rules = testing.rule_tests(SPECS, properties=["forward", "vjp_float64", "residuals"])


def test_rule_tests_makes_one_item_per_rule_and_property():
    marks = [m for m in test_user_rules.pytestmark if m.name == "parametrize"]
    (mark,) = marks
    assert mark.kwargs["ids"] == ["dense-forward", "dense-vjp_float64", "dense-residuals"]


def test_assert_ok_raises_with_the_report():
    report = check_dense(
        lambda res, ct_y: (ct_y @ res.w.T, 2 * res.x.T @ ct_y, ct_y.sum(0)), properties=["vjp_float64"]
    )
    with pytest.raises(AssertionError, match=r"dense: FAIL, 1 of 1 properties fail: vjp_float64"):
        report.assert_ok()


def test_unknown_properties_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown properties.*'vmapp'"):
        testing.check_rule(dense_reference, dense_reference, dense_args, properties=["vmapp"])


# ----------------------------------------------------------------------------- per-leaf errors
def test_leaf_errors_measure_each_leaf_against_its_own_scale():
    expected = {"w": np.array([[1.0, -4.0], [2.0, 0.5]]), "b": np.array([1e-3, -2e-3])}
    actual = {"w": expected["w"] + 0.04, "b": np.array([1e-3, 0.0])}
    errors = gc.leaf_errors(actual, expected)
    assert errors == {"['b']": pytest.approx(2e-3 / 2e-3), "['w']": pytest.approx(0.04 / 4.0)}


def test_a_small_leaf_cannot_hide_behind_a_large_one():
    expected = {"w": np.full(3, 100.0), "b": np.array([1e-3])}
    actual = {"w": np.full(3, 100.0), "b": np.array([-1e-3])}  # b entirely wrong
    # The whole-tree figure divides the largest error (2e-3) by the largest value (100): the leaf hides.
    assert gc.relative_error(actual, expected) == pytest.approx(2e-5)
    assert gc.max_leaf_error(actual, expected) == (pytest.approx(2.0), "['b']")


def test_nan_counts_as_the_worst_leaf():
    expected = (np.ones(2), np.ones(2))
    assert gc.max_leaf_error((np.full(2, 50.0), np.array([1.0, np.nan])), expected)[1] == "[1]"
    err, where = gc.max_leaf_error((np.array([np.nan, 1.0]), np.full(2, 50.0)), expected)
    assert np.isnan(err) and where == "[0]"


def test_leaf_errors_refuse_to_broadcast_or_to_match_different_trees():
    with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(4, 3\), expected \(3,\)"):
        gc.leaf_errors({"b": np.ones((4, 3))}, {"b": np.ones(3)})
    with pytest.raises(ValueError, match="the trees differ"):
        gc.leaf_errors({"a": np.ones(1)}, {"b": np.ones(1)})


def test_relative_error_of_single_arrays_is_unchanged():
    a, e = np.array([1.0, 2.5, -3.0]), np.array([1.0, 2.0, -4.0])
    assert gc.relative_error(a, e) == pytest.approx(1.0 / 4.0)
    assert gc.relative_error(np.ones(3), np.zeros(3)) == 1.0  # all-zero reference: the absolute error
    assert gc.max_leaf_error(a, e) == (pytest.approx(0.25), "")


def test_gradcheck_reports_per_leaf():
    """A rule over a parameter dict whose bias gets a wrong cotangent: gradcheck names that leaf."""

    def reference(params, x):
        return x @ params["w"] + params["b"]

    rule = jax.custom_vjp(reference)

    def bwd(res, ct_y):
        params, x = res
        return {"w": x.T @ ct_y, "b": -ct_y.sum(0)}, ct_y @ params["w"].T

    rule.defvjp(lambda params, x: (reference(params, x), (params, x)), bwd)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.standard_normal(2))}
    x = jnp.asarray(rng.standard_normal((4, 3)))
    report = gc.gradcheck(rule, reference, (params, x))
    assert not report.ok
    arg = report.args[0]
    assert arg.worst_leaf == "['b']" and arg.max_rel_err == pytest.approx(2.0)
    assert arg.leaf_errors["['w']"] <= 1e-12
    assert report.args[1].ok
    assert "leaf ['b']: 2.0e+00" in str(report)
