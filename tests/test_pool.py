"""Pooling beyond the registry: random shapes, windows, strides and paddings;
the max-pool tie convention; bad input.

The registry (tests/test_rules.py) checks the configurations a ResNet uses;
here hypothesis draws the rest.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_resnet.gradcheck import DEFAULT_FD_RTOL, gradcheck
from jax_resnet.ops import pool
from jax_resnet.testing.strategies import pool_cases


# Inputs come from numpy: a jax.random draw would compile anew for every shape.
def _distinct(seed, shape):
    """Distinct values at least 4/size apart in random order: no ties, and no near-ties a finite difference could cross."""
    size = int(np.prod(shape))
    return jnp.asarray(np.random.default_rng(seed).permutation(np.linspace(-2.0, 2.0, size)).reshape(shape))


def _assert_gradcheck(op, reference, x, **config):
    report = gradcheck(jax.jit(functools.partial(op, **config)), jax.jit(functools.partial(reference, **config)), (x,))
    assert report.forward_rel_err <= 1e-12, report
    assert report.args[0].max_rel_err <= 1e-10, report
    assert report.args[0].fd_rel_err <= DEFAULT_FD_RTOL, report


# Every example compiles afresh (new settings, new output shape); eight per test keep the file fast on 2 cores.
@settings(max_examples=8)
@given(pool_cases(max_pad_below_window=True), st.integers(0, 2**16))
def test_max_pool_matches_autodiff_and_finite_differences(case, seed):
    shape, window, stride, padding = case
    _assert_gradcheck(
        pool.max_pool, pool.max_pool_reference, _distinct(seed, shape), window=window, stride=stride, padding=padding
    )


@settings(max_examples=8)
@given(pool_cases(max_pad_below_window=False), st.integers(0, 2**16))
def test_avg_pool_matches_autodiff_and_finite_differences(case, seed):
    shape, window, stride, padding = case
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape))
    _assert_gradcheck(pool.avg_pool, pool.avg_pool_reference, x, window=window, stride=stride, padding=padding)


def test_global_avg_pool_spreads_the_mean_evenly():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4), jnp.float64)
    ct = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    (ct_x,) = jax.vjp(pool.global_avg_pool, x)[1](ct)
    np.testing.assert_allclose(ct_x, np.broadcast_to(np.asarray(ct)[:, None, None, :] / 15, x.shape), rtol=1e-15)


# ---------------------------------------------------------------- ties
def _first_max_grad(x, ct, window, stride, pads):
    """The tie convention written as loops: each window's cotangent goes to its first maximal element, row-major.

    np.argmax over the flattened window returns the first occurrence, which is
    exactly that element.
    """
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, stride, pads
    x_pad = np.pad(np.asarray(x), ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
    ct_pad = np.zeros_like(x_pad)
    for n, i, j, c in np.ndindex(*ct.shape):
        p, q = np.unravel_index(np.argmax(x_pad[n, i * sh : i * sh + kh, j * sw : j * sw + kw, c]), (kh, kw))
        ct_pad[n, i * sh + p, j * sw + q, c] += ct[n, i, j, c]
    return ct_pad[:, top : top + x.shape[1], left : left + x.shape[2], :]


def test_max_pool_ties_send_the_whole_cotangent_to_the_first_maximum():
    # All four 2×2 windows (stride 1) of a constant 3×3 image tie everywhere; each
    # picks its top-left element, so (0,0), (0,1), (1,0), (1,1) receive one window each.
    x = jnp.ones((1, 3, 3, 1), jnp.float64)
    ct = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float64).reshape(1, 2, 2, 1)
    (ct_x,) = jax.vjp(lambda x: pool.max_pool(x, window=2, stride=1, padding="VALID"), x)[1](ct)
    expected = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ct_x[0, :, :, 0], expected)


def test_max_pool_tie_in_a_row_goes_to_the_left_and_in_a_column_to_the_top():
    # One 2×2 window: a tie between (0,1) and (1,0) goes to (0,1), earlier in row-major order.
    x = jnp.array([[0.0, 5.0], [5.0, 1.0]], jnp.float64).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: pool.max_pool(x, window=2, stride=2, padding="VALID").sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


@settings(max_examples=8)
@given(pool_cases(max_pad_below_window=True), st.integers(0, 2**16))
def test_max_pool_ties_match_the_first_maximum_loops(case, seed):
    shape, window, stride, padding = case
    rng = np.random.default_rng(seed)
    # Values in {0, 1, 2}: most windows hold a tie.
    x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float64))
    geom = pool._geometry("max_pool", shape, window, stride, padding)
    # Integer cotangents: sums of them are exact in any order, so the comparison can be exact.
    y_shape = jax.eval_shape(lambda x: pool._max_pool(x, geom), x).shape
    ct = jnp.asarray(rng.integers(-8, 9, y_shape).astype(np.float64))
    grad = jax.jit(lambda x, ct: jax.vjp(lambda x: pool._max_pool(x, geom), x)[1](ct)[0])(x, ct)
    np.testing.assert_array_equal(grad, _first_max_grad(x, np.asarray(ct), geom.window, geom.stride, geom.pads))


# ---------------------------------------------------------------- residuals
@pytest.mark.parametrize("window, dtype", [(3, jnp.int8), (11, jnp.int8), (12, jnp.int32)])
def test_max_pool_saves_a_small_integer_argmax(window, dtype):
    # 11·11 = 121 offsets fit in int8; 12·12 = 144 do not.
    x = jax.ShapeDtypeStruct((1, 12, 12, 2), jnp.float64)
    y, res = jax.eval_shape(
        functools.partial(pool._max_pool_fwd, geom=pool._geometry("max_pool", x.shape, window, 1, "SAME")), x
    )
    assert res.argmax.dtype == dtype and res.argmax.shape == y.shape


# ---------------------------------------------------------------- bad input
X = jnp.zeros((2, 6, 6, 3), jnp.float32)


@pytest.mark.parametrize(
    "op, kwargs, error, match",
    [
        (pool.max_pool, dict(x=jnp.zeros((6, 6, 3))), ValueError, r"max_pool: argument `x` must have rank 4 \(NHWC\)"),
        (
            pool.max_pool,
            dict(x=jnp.zeros((2, 6, 6, 3), jnp.int32)),
            TypeError,
            "max_pool: argument `x` must have a floating dtype",
        ),
        (pool.max_pool, dict(x=X, window=0), ValueError, "max_pool: argument `window`"),
        (pool.max_pool, dict(x=X, stride=(1, 2, 3)), ValueError, "max_pool: argument `stride`"),
        (pool.max_pool, dict(x=X, padding="FULL"), ValueError, "max_pool: argument `padding`"),
        (
            pool.max_pool,
            dict(x=X, window=2, padding=((0, 2), (0, 0))),
            ValueError,
            "max_pool: argument `padding` must be smaller than the window",
        ),
        (
            pool.max_pool,
            dict(x=X, window=7, padding="VALID"),
            ValueError,
            "max_pool: the padded input height 6 is smaller",
        ),
        (pool.avg_pool, dict(x=X[0], window=2, stride=2), ValueError, "avg_pool: argument `x` must have rank 4"),
        (pool.avg_pool, dict(x=X, window=(2, -1), stride=2), ValueError, "avg_pool: argument `window`"),
        (pool.avg_pool, dict(x=X, window=2, stride=2, padding=-1), ValueError, "avg_pool: argument `padding`"),
        (pool.global_avg_pool, dict(x=X[:, :, :, 0]), ValueError, "global_avg_pool: argument `x` must have rank 4"),
        (
            pool.global_avg_pool,
            dict(x=np.arange(4)),
            TypeError,
            "global_avg_pool: argument `x` must have a floating dtype",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_argument(op, kwargs, error, match):
    x = kwargs.pop("x")
    with pytest.raises(error, match=match):
        op(x, **kwargs)
