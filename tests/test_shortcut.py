"""Shortcuts beyond the registry: the two gradient paths of a residual block,
option A's channel split, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet.ops import relu, shortcut


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def test_residual_gradient_is_the_weight_path_plus_the_shortcut_path():
    # y = F(x) + x with F(x) = relu(x·W) (a 1×1 block). The cotangent reaching x
    # is ct_y through F plus ct_y itself, the identity shortcut.
    x, w, ct = _normal(0, (2, 4, 4, 3)), _normal(1, (3, 3)), _normal(2, (2, 4, 4, 3))

    def block(x):
        return relu(shortcut.projection(x, w, stride=1))

    (ct_x,) = jax.vjp(lambda x: shortcut.add(block(x), x), x)[1](ct)
    (weight_path,) = jax.vjp(block, x)[1](ct)
    shortcut_path = ct
    np.testing.assert_allclose(ct_x, weight_path + shortcut_path, rtol=1e-14, atol=1e-14)
    # Each path alone is not the gradient: neither vanishes here.
    assert float(jnp.max(jnp.abs(weight_path))) > 0.1


def test_add_passes_the_cotangent_unchanged_to_both_inputs():
    a, b, ct = _normal(0, (2, 3, 3, 2)), _normal(1, (2, 3, 3, 2)), _normal(2, (2, 3, 3, 2))
    ct_a, ct_b = jax.vjp(shortcut.add, a, b)[1](ct)
    np.testing.assert_array_equal(ct_a, ct)
    np.testing.assert_array_equal(ct_b, ct)


def test_shortcut_pad_odd_split_puts_the_extra_zero_channel_after():
    # 3 -> 6 channels: (6 − 3) // 2 = 1 zero channel before, 2 after.
    x = _normal(0, (1, 4, 4, 3))
    y = shortcut.shortcut_pad(x, out_channels=6, stride=1)
    np.testing.assert_array_equal(y[..., 1:4], x)
    np.testing.assert_array_equal(y[..., [0, 4, 5]], 0.0)


def test_shortcut_pad_gradient_reaches_only_the_strided_positions():
    x = _normal(0, (1, 5, 5, 2))
    ct = _normal(1, (1, 3, 3, 4))
    (ct_x,) = jax.vjp(lambda x: shortcut.shortcut_pad(x, out_channels=4, stride=2), x)[1](ct)
    expected = np.zeros((1, 5, 5, 2))
    expected[:, ::2, ::2, :] = ct[..., 1:3]
    np.testing.assert_array_equal(ct_x, expected)


X = jnp.zeros((2, 4, 4, 3), jnp.float32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: shortcut.add(X, X[:, ::2, ::2, :]),
            ValueError,
            r"add: argument `b` must have shape \(2, 4, 4, 3\).*shortcut_pad or projection",
        ),
        (lambda: shortcut.add(X, X.astype(jnp.float64)), TypeError, "add: arguments must share one dtype"),
        (
            lambda: shortcut.add(X, jnp.zeros((2, 4, 4, 3), jnp.int32)),
            TypeError,
            "add: argument `b` must have a floating dtype",
        ),
        (
            lambda: shortcut.shortcut_pad(X, out_channels=2, stride=2),
            ValueError,
            "shortcut_pad: argument `out_channels` must be an int ≥ the input's channels 3",
        ),
        (
            lambda: shortcut.shortcut_pad(X, out_channels=6.0, stride=2),
            ValueError,
            "shortcut_pad: argument `out_channels`",
        ),
        (
            lambda: shortcut.shortcut_pad(X[0], out_channels=6, stride=2),
            ValueError,
            r"shortcut_pad: argument `x` must have rank 4 \(NHWC\)",
        ),
        (lambda: shortcut.shortcut_pad(X, out_channels=6, stride=0), ValueError, "shortcut_pad: argument `stride`"),
        (
            lambda: shortcut.projection(X, jnp.zeros((4, 6), jnp.float32), stride=2),
            ValueError,
            "projection: argument `w` must have shape .*rows must equal x's channels 3",
        ),
        (
            lambda: shortcut.projection(X, jnp.zeros((3, 6, 1), jnp.float32), stride=2),
            ValueError,
            r"projection: argument `w` must have rank 2 \(\[C_in, C_out\]\)",
        ),
        (
            lambda: shortcut.projection(X, jnp.zeros((3, 6), jnp.float64), stride=2),
            TypeError,
            "projection: arguments must share one dtype",
        ),
        (
            lambda: shortcut.projection(X.astype(jnp.int32), jnp.zeros((3, 6), jnp.float32), stride=2),
            TypeError,
            "projection: argument `x` must have a floating dtype",
        ),
        (
            lambda: shortcut.projection(X, jnp.zeros((3, 6), jnp.float32), stride=(2, 2, 2)),
            ValueError,
            "projection: argument `stride`",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
