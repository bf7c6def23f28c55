"""Conventions of the normalization rules and their bad-input errors.

Agreement with `jax.grad`, finite differences, jit, vmap and grad-of-grad are
checked for every registered configuration by tests/test_rules.py; here are
only the decisions that a random argument would not exercise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import gradcheck as gc
from jax_resnet.ops import norm

DTYPES = [jnp.float32, jnp.float64]


def _params(key, channels, dtype):
    k_gamma, k_beta = jax.random.split(key)
    return 1 + 0.5 * jax.random.normal(k_gamma, (channels,), dtype), jax.random.normal(k_beta, (channels,), dtype)


def _input(shape, dtype=jnp.float64, seed=0):
    k_x, k_p = jax.random.split(jax.random.key(seed))
    return (2 * jax.random.normal(k_x, shape, dtype) + 0.5, *_params(k_p, shape[-1], dtype))


def _vjp(fn, args, ct):
    return jax.vjp(fn, *args)[1](ct)


# ------------------------------------------------------------------ batch_norm_train
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])
def test_batch_norm_train_batch_of_one_gives_beta_and_zero_ct_x(dtype, jit):
    """One element per channel: var = 0, x_hat = 0, y = beta, and ct_x = ct_mean exactly."""
    x, gamma, beta = _input((1, 5), dtype)
    fn = jax.jit(norm.batch_norm_train) if jit else norm.batch_norm_train
    y, mean, var = fn(x, gamma, beta)
    np.testing.assert_array_equal(y, jnp.broadcast_to(beta, x.shape))
    np.testing.assert_array_equal(mean, x[0])
    np.testing.assert_array_equal(var, jnp.zeros_like(var))

    keys = jax.random.split(jax.random.key(1), 3)
    ct_y = jax.random.normal(keys[0], x.shape, dtype)
    zeros = jnp.zeros(x.shape[-1:], dtype)
    ct_x, ct_gamma, ct_beta = _vjp(fn, (x, gamma, beta), (ct_y, zeros, zeros))
    np.testing.assert_array_equal(ct_x, jnp.zeros_like(x))  # the y path alone: exactly zero, no NaN
    np.testing.assert_array_equal(ct_gamma, jnp.zeros_like(gamma))
    np.testing.assert_array_equal(ct_beta, ct_y[0])

    # mean = x when m = 1, so the mean's cotangent passes straight through; var's path is 0.
    ct_mean, ct_var = jax.random.normal(keys[1], (5,), dtype), jax.random.normal(keys[2], (5,), dtype)
    ct_x, _, _ = _vjp(fn, (x, gamma, beta), (ct_y, ct_mean, ct_var))
    np.testing.assert_array_equal(ct_x, ct_mean[None])
    # Autodiff of the reference agrees up to rounding: it forms ct_xhat·inv_std − mean(ct_xhat·inv_std)
    # with inv_std = 1/sqrt(eps) ≈ 316, which need not cancel exactly.
    want = _vjp(norm.batch_norm_train_reference, (x, gamma, beta), (ct_y, ct_mean, ct_var))
    assert gc.relative_error(ct_x, want[0]) <= gc.DEFAULT_RTOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (6, 5), (64, 7, 7, 16)])
def test_batch_norm_train_statistics_are_jnp_mean_and_biased_jnp_var(shape, dtype):
    x, gamma, beta = _input(shape, dtype)
    x = x + 100  # a large mean: the one-pass E[x²] − mean² would lose float32 digits here
    axes = tuple(range(x.ndim - 1))
    _, mean, var = norm.batch_norm_train(x, gamma, beta)
    ulps = 8 * jnp.finfo(dtype).eps
    np.testing.assert_allclose(mean, jnp.mean(x, axis=axes), rtol=ulps)
    np.testing.assert_allclose(var, jnp.var(x, axis=axes), rtol=ulps)  # ddof = 0: divides by m, not m − 1
    exact = np.var(np.asarray(x, np.float64), axis=axes)
    np.testing.assert_allclose(var, exact, rtol=20 * jnp.finfo(dtype).eps)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_eps_must_be_positive(eps):
    x, gamma, beta = _input((4, 5))
    with pytest.raises(ValueError, match=r"batch_norm_train: argument `eps` must be a positive number"):
        norm.batch_norm_train(x, gamma, beta, eps=eps)


def test_eps_is_static_never_traced():
    x, gamma, beta = _input((4, 5))
    with pytest.raises(ValueError, match=r"layer_norm: argument `eps` must be a positive number"):
        jax.jit(lambda e: norm.layer_norm(x, gamma, beta, eps=e))(1e-5)
    # A Python number is accepted as it is, an int included, and changes the output.
    y1 = norm.layer_norm(x, gamma, beta, eps=1)
    y2 = norm.layer_norm(x, gamma, beta, eps=1e-5)
    assert y1.dtype == x.dtype and not np.allclose(y1, y2)


# ------------------------------------------------------------------- batch_norm_eval
def test_batch_norm_train_is_eval_composed_with_batch_statistics():
    """Train mode = eval mode fed its own batch statistics; the chain rule ties the two VJPs:

    ct_x(train) = ct_x(eval) + ct_mean(eval)/m + ct_var(eval)·2(x − mean)/m.
    """
    x, gamma, beta = _input((4, 3, 3, 5))
    m = 4 * 3 * 3
    y, mean, var = norm.batch_norm_train(x, gamma, beta)
    np.testing.assert_allclose(norm.batch_norm_eval(x, gamma, beta, mean, var), y, rtol=0, atol=1e-14)

    ct_y = jax.random.normal(jax.random.key(5), x.shape, x.dtype)
    zeros = jnp.zeros_like(mean)
    ct_x_train, ct_gamma_train, ct_beta_train = _vjp(norm.batch_norm_train, (x, gamma, beta), (ct_y, zeros, zeros))
    ct_x, ct_gamma, ct_beta, ct_mean, ct_var = _vjp(norm.batch_norm_eval, (x, gamma, beta, mean, var), ct_y)
    assert gc.relative_error(ct_x + ct_mean / m + ct_var * 2 * (x - mean) / m, ct_x_train) <= 1e-13
    assert gc.relative_error((ct_gamma, ct_beta), (ct_gamma_train, ct_beta_train)) <= 1e-13
    # The statistics are not constants in train mode: dropping their paths changes ct_x.
    assert gc.relative_error(ct_x, ct_x_train) > 1e-3


# ------------------------------------------------------------------------ layer_norm
def test_layer_norm_is_batch_norm_over_the_transposed_axes():
    """Same algebra, other reduced set: layer norm of [N, C] is batch norm of its transpose."""
    x, gamma, beta = _input((3, 6))
    ones, zeros = jnp.ones(3, x.dtype), jnp.zeros(3, x.dtype)
    plain = lambda x: norm.layer_norm(x, jnp.ones_like(gamma), jnp.zeros_like(beta))
    via_batch_norm = lambda x: norm.batch_norm_train(x.T, ones, zeros)[0].T
    assert gc.relative_error(plain(x), via_batch_norm(x)) <= 1e-14
    ct_y = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
    assert gc.relative_error(_vjp(plain, (x,), ct_y), _vjp(via_batch_norm, (x,), ct_y)) <= 1e-13
    # Examples do not mix: the gradient of example 0's output reaches example 0 only.
    rows = jax.grad(lambda x: jnp.vdot(ct_y[0], norm.layer_norm(x, gamma, beta)[0]))(x)
    np.testing.assert_array_equal(rows[1:], jnp.zeros_like(rows[1:]))


# ------------------------------------------------------------------------ group_norm
def test_group_norm_limits_are_layer_norm_and_instance_norm():
    """groups = 1 normalizes each example over H, W and C; groups = C each channel of each example."""
    x, gamma, beta = _input((2, 3, 3, 6))
    n, c = x.shape[0], x.shape[-1]
    ct_y = jax.random.normal(jax.random.key(3), x.shape, x.dtype)

    one_group = lambda x, gamma, beta: norm.group_norm(x, gamma, beta, groups=1)
    as_layer_norm = lambda x, gamma, beta: norm.layer_norm(
        x.reshape(n, -1), jnp.tile(gamma, 9), jnp.tile(beta, 9)
    ).reshape(x.shape)
    per_channel = lambda x, gamma, beta: norm.group_norm(x, gamma, beta, groups=c)
    as_instance_norm = lambda x, gamma, beta: jax.vmap(lambda e: norm.batch_norm_train(e, gamma, beta)[0])(x)

    # Compiled: op by op, each array shape would compile kernels of its own.
    both = jax.jit(lambda f, args: (f(*args), _vjp(f, args, ct_y)), static_argnums=0)
    for got, want in [(one_group, as_layer_norm), (per_channel, as_instance_norm)]:
        (y_got, ct_got), (y_want, ct_want) = both(got, (x, gamma, beta)), both(want, (x, gamma, beta))
        assert gc.relative_error(y_got, y_want) <= 1e-14
        assert gc.relative_error(ct_got, ct_want) <= 1e-13


# -------------------------------------------------------------------------- errors
def _bad_inputs():
    x, gamma, beta = _input((4, 3, 3, 6))
    mean, var = jnp.zeros(6), jnp.ones(6)
    bn, bne, ln, gn = norm.batch_norm_train, norm.batch_norm_eval, norm.layer_norm, norm.group_norm
    return [
        (
            "int-x",
            lambda: bn(x.astype(jnp.int32), gamma, beta),
            TypeError,
            r"batch_norm_train: argument `x` must have a floating dtype",
        ),
        ("list-x", lambda: ln([[1.0, 2.0]], gamma, beta), TypeError, r"layer_norm: argument `x` must be an array"),
        (
            "mixed-dtype",
            lambda: bn(x, gamma.astype(jnp.float32), beta),
            TypeError,
            r"batch_norm_train: arguments must share one dtype, got `x`: float64, `gamma`: float32",
        ),
        (
            "gamma-shape",
            lambda: bn(x, gamma[:5], beta),
            ValueError,
            r"batch_norm_train: argument `gamma` must have shape \(6,\) .*, got \(5,\)",
        ),
        (
            "beta-2d",
            lambda: ln(x, gamma, beta[None]),
            ValueError,
            r"layer_norm: argument `beta` must have shape \(6,\) .*, got \(1, 6\)",
        ),
        (
            "rank-1",
            lambda: ln(x[0, 0, 0], gamma, beta),
            ValueError,
            r"layer_norm: argument `x` must have rank >= 2 .*, got shape \(6,\)",
        ),
        (
            "eval-int-mean",
            lambda: bne(x, gamma, beta, mean.astype(jnp.int32), var),
            TypeError,
            r"batch_norm_eval: argument `mean` must have a floating dtype",
        ),
        (
            "eval-var-shape",
            lambda: bne(x, gamma, beta, mean, var[:3]),
            ValueError,
            r"batch_norm_eval: argument `var` must have shape \(6,\) .*, got \(3,\)",
        ),
        (
            "groups-divide",
            lambda: gn(x, gamma, beta, groups=4),
            ValueError,
            r"group_norm: argument `groups` must divide the 6 channels of x .*, got groups=4",
        ),
        (
            "groups-zero",
            lambda: gn(x, gamma, beta, groups=0),
            ValueError,
            r"group_norm: argument `groups` must be a positive Python int, got 0",
        ),
        (
            "groups-float",
            lambda: gn(x, gamma, beta, groups=2.0),
            ValueError,
            r"group_norm: argument `groups` must be a positive Python int, got 2.0",
        ),
        (
            "group-eps",
            lambda: gn(x, gamma, beta, groups=2, eps=0),
            ValueError,
            r"group_norm: argument `eps` must be a positive number, got 0",
        ),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_inputs_raise_errors_naming_the_op_and_argument(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_forward_values_equal_the_textbook_formula():
    """The references share the rules' forward code, so check that code once
    against the formulas written out independently with jnp.mean / jnp.var."""
    from jax_resnet.ops import norm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3, 3, 6)))
    gamma, beta = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(6))
    eps = 1e-5

    def textbook(x, axes):
        mean, var = jnp.mean(x, axis=axes, keepdims=True), jnp.var(x, axis=axes, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps)

    np.testing.assert_allclose(
        norm.batch_norm_train(x, gamma, beta, eps=eps)[0], gamma * textbook(x, (0, 1, 2)) + beta, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        norm.layer_norm(x, gamma, beta, eps=eps), gamma * textbook(x, (3,)) + beta, rtol=1e-12, atol=1e-12
    )
    grouped = textbook(x.reshape(4, 3, 3, 3, 2), (1, 2, 4)).reshape(x.shape)
    np.testing.assert_allclose(
        norm.group_norm(x, gamma, beta, groups=3, eps=eps), gamma * grouped + beta, rtol=1e-12, atol=1e-12
    )
    mean, var = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.uniform(0.5, 1.5, 6))
    np.testing.assert_allclose(
        norm.batch_norm_eval(x, gamma, beta, mean, var, eps=eps),
        gamma * (x - mean) / jnp.sqrt(var + eps) + beta,
        rtol=1e-12,
        atol=1e-12,
    )
