"""conv2d beyond the registry: random settings, the corners of the derivation
(padding wider than the window, rows no window reaches) and bad inputs.

The registry entries in `jax_resnet.rules` cover the configurations a residual
network uses; these tests cover the rest of the settings space.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jax_resnet import gradcheck as gc
from jax_resnet.ops import conv
from jax_resnet.testing.strategies import conv2d_cases


def _check(x_shape, w_shape, seed=0, **settings):
    # numpy draws the inputs and jit wraps both sides: eager jax ops would each
    # compile once per new shape, and most examples bring new shapes.
    rng = np.random.default_rng(seed)
    x, w = jnp.asarray(rng.standard_normal(x_shape)), jnp.asarray(rng.standard_normal(w_shape))
    fn = jax.jit(partial(conv.conv2d, **settings))
    reference = jax.jit(partial(conv.conv2d_reference, **settings))
    report = gc.gradcheck(fn, reference, (x, w), seed=seed)
    assert report.forward_rel_err <= 1e-12, report
    for arg in report.args:
        assert arg.max_rel_err <= 1e-10, (settings, arg)
        assert arg.fd_rel_err is not None and arg.fd_rel_err <= gc.DEFAULT_FD_RTOL, (settings, arg)
    assert report.ok, report


# Each example compiles about six convolutions and a random normal per new
# shape (~2 s on the 2-core CI); 12 keeps the file under 40 s.
@settings(max_examples=12)
@given(conv2d_cases())
def test_conv2d_gradcheck_hypothesis(case):
    x_shape, w_shape, settings, seed = case
    _check(x_shape, w_shape, seed, **settings)


@pytest.mark.parametrize(
    "x_shape, w_shape, settings",
    [
        # Top/left padding wider than the dilated window: ct_x's low padding is negative (a crop).
        ((2, 5, 6, 4), (1, 2, 4, 4), dict(padding=((3, 0), (4, 5)), stride=2)),
        # rem = (7 + 0 − 3) mod 3 = 1 ≥ d rows no window reaches: ct_x pads them with
        # zeros, ct_w's correlation runs one tap past the kernel and is cut back.
        ((2, 7, 7, 4), (3, 3, 2, 4), dict(padding="VALID", stride=3, groups=2)),
        # Stride larger than the window: whole input rows between windows get zero gradient.
        ((2, 7, 7, 4), (1, 2, 1, 4), dict(padding="VALID", stride=3, dilation=(1, 2), groups=4)),
    ],
)
def test_conv2d_corner_cases(x_shape, w_shape, settings):
    _check(x_shape, w_shape, **settings)


def test_conv2d_same_puts_the_extra_pixel_at_the_end():
    x = jnp.zeros((1, 6, 6, 1))
    config = conv.conv2d_config(x, jnp.zeros((2, 2, 1, 1)), stride=1, padding="SAME")
    assert config.padding == ((0, 1), (0, 1))
    config = conv.conv2d_config(x, jnp.zeros((3, 3, 1, 1)), stride=2, padding="SAME")
    assert config.padding == ((0, 1), (0, 1))


_X = jnp.zeros((2, 6, 6, 4), jnp.float32)
_W = jnp.zeros((3, 3, 4, 2), jnp.float32)


@pytest.mark.parametrize(
    "x, w, settings, error, match",
    [
        (_X[0], _W, {}, ValueError, r"conv2d: argument `x` must have rank 4 \(NHWC\), got shape \(6, 6, 4\)"),
        (_X, _W[0], {}, ValueError, r"conv2d: argument `w` must have rank 4 \(HWIO\), got shape \(3, 4, 2\)"),
        (_X.astype(jnp.int32), _W, {}, TypeError, r"conv2d: argument `x` must have a floating dtype.*got int32"),
        (_X, _W.astype(jnp.int32), {}, TypeError, r"conv2d: argument `w` must have a floating dtype.*got int32"),
        (
            _X,
            _W.astype(jnp.float16),
            {},
            TypeError,
            r"conv2d: arguments must share one dtype, got `x`: float32, `w`: float16",
        ),
        (
            _X,
            jnp.zeros((3, 3, 3, 2), jnp.float32),
            {},
            ValueError,
            r"conv2d: argument `w` must have in-channels.*got w.shape \(3, 3, 3, 2\)",
        ),
        (
            _X,
            jnp.zeros((3, 3, 2, 3), jnp.float32),
            dict(groups=2),
            ValueError,
            r"conv2d: argument `w` must have out-channels .* divisible by groups = 2",
        ),
        (_X, _W, dict(groups=0), ValueError, r"conv2d: argument `groups` must be a positive int, got 0"),
        (_X, _W, dict(groups=2.0), ValueError, r"conv2d: argument `groups` must be a positive int, got 2.0"),
        (
            _X,
            _W,
            dict(stride=0),
            ValueError,
            r"conv2d: argument `stride` must be a positive int or a pair.*got \(0, 0\)",
        ),
        (_X, _W, dict(stride=(1, 2, 3)), ValueError, r"conv2d: argument `stride`"),
        (
            _X,
            _W,
            dict(dilation=(1, -1)),
            ValueError,
            r"conv2d: argument `dilation` must be a positive int or a pair.*got \(1, -1\)",
        ),
        (_X, _W, dict(padding="FULL"), ValueError, r"conv2d: argument `padding` must be 'SAME', 'VALID'.*got 'FULL'"),
        (_X, _W, dict(padding=-1), ValueError, r"conv2d: argument `padding`.*got -1"),
        (_X, _W, dict(padding=((1, 1),)), ValueError, r"conv2d: argument `padding`"),
        (
            _X[:, :2],
            _W,
            dict(padding="VALID"),
            ValueError,
            r"conv2d: the padded input height 2 is smaller than the \(dilated\) window 3",
        ),
    ],
)
def test_conv2d_rejects_bad_input(x, w, settings, error, match):
    with pytest.raises(error, match=match):
        conv.conv2d(x, w, **settings)


def test_conv2d_checks_inputs_under_jit():
    with pytest.raises(ValueError, match="argument `w` must have in-channels"):
        jax.jit(conv.conv2d)(_X, jnp.zeros((3, 3, 3, 2), jnp.float32))
