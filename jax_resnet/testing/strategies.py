"""Hypothesis strategies for convolution and pooling settings, for property tests of one's own rules.

These are the strategies `tests/test_conv.py` and `tests/test_pool.py` draw
from. They need Hypothesis, which comes with the `dev` extra
(`pip install "jax-resnet[dev]"`); `jax_resnet.testing` itself does not.

Shapes come from small pools on purpose: every new shape compiles afresh,
while the settings, which decide the derivation's cases (padding wider than
the window, rows no window reaches, stride larger than the window), vary
freely.

Example:
    >>> from hypothesis import given
    >>> from jax_resnet.testing.strategies import conv2d_cases
    >>> @given(conv2d_cases())
    ... def test_my_conv(case):
    ...     x_shape, w_shape, settings, seed = case
    ...     assert x_shape[-1] == w_shape[2] * settings["groups"]
    >>> test_my_conv()
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'jax_resnet.testing.strategies needs hypothesis: pip install "jax-resnet[dev]" (or pip install hypothesis)'
    ) from err

__all__ = ["conv2d_cases", "pool_cases"]

_PADS = st.tuples(st.integers(0, 3), st.integers(0, 3))


@st.composite
def conv2d_cases(draw):
    """`(x_shape, w_shape, settings, seed)` for `conv2d(x, w, **settings)`.

    x is NHWC with N = 2, C = 4, H and W in 5..7 (so even VALID fits the
    largest dilated window, 5); w is HWIO with a 1..3 kernel, I = 4 / groups
    and O = 4. `settings` has `stride` and `dilation` (pairs), `padding`
    ('SAME', 'VALID', an int or explicit pairs) and `groups` (1, 2 or 4);
    `seed` is for drawing the arrays.
    """
    groups = draw(st.sampled_from([1, 2, 4]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    height, width = draw(st.integers(5, 7)), draw(st.integers(5, 7))
    settings = dict(
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=draw(st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 2), st.tuples(_PADS, _PADS))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        groups=groups,
    )
    return (2, height, width, 4), (kh, kw, 4 // groups, 4), settings, draw(st.integers(0, 2**16))


@st.composite
def pool_cases(draw, max_pad_below_window: bool):
    """`(shape, window, stride, padding)` for `max_pool`/`avg_pool(x, window, stride, padding)`.

    `window` is an int or a pair in 1..3, `stride` a pair in 1..3, `padding`
    'SAME', 'VALID', an int or explicit pairs. With `max_pad_below_window`
    every pad is smaller than the window, as max pooling needs (no window of
    padding alone). `shape` is one of a few NHWC shapes (odd, even,
    non-square), so the checks' own small ops compile once per shape.
    """
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    window = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad_h = st.integers(0, kh - 1) if max_pad_below_window else st.integers(0, 2)
    pad_w = st.integers(0, kw - 1) if max_pad_below_window else st.integers(0, 2)
    kind = draw(st.sampled_from(["SAME", "VALID", "int", "explicit"]))
    if kind == "int":
        padding = draw(st.integers(0, min(kh, kw) - 1) if max_pad_below_window else st.integers(0, 2))
    elif kind == "explicit":
        padding = ((draw(pad_h), draw(pad_h)), (draw(pad_w), draw(pad_w)))
    else:
        padding = kind
    shape = draw(st.sampled_from([(2, 6, 6, 2), (1, 5, 7, 3), (2, 7, 4, 1)]))
    return shape, window, stride, padding
