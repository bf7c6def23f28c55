"""Input validation shared by the ops: errors that name the op, the argument,
what was expected and what came, raised at trace time (shapes and dtypes are
static under `jit`, so these checks cost nothing in compiled code)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def floating(op: str, name: str, x) -> None:
    """Raise TypeError unless `x` is an array with a floating dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{op}: argument `{name}` must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{op}: argument `{name}` must have a floating dtype (float16/bfloat16/"
            f"float32/float64), got {dtype}; cast it first, e.g. x.astype(jnp.float32)"
        )


def integer(op: str, name: str, x) -> None:
    """Raise TypeError unless `x` is an array with an integer dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{op}: argument `{name}` must be an integer array, got {dtype or type(x).__name__}")


def rank(op: str, name: str, x, expected: int | Sequence[int], layout: str = "") -> None:
    """Raise ValueError unless `x.ndim` is `expected` (an int or a collection of ints)."""
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if x.ndim not in allowed:
        want = " or ".join(str(r) for r in allowed)
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"{op}: argument `{name}` must have rank {want}{hint}, got shape {tuple(x.shape)}")


def shape(op: str, name: str, x, expected: tuple, why: str = "") -> None:
    """Raise ValueError unless `x.shape == expected`."""
    if tuple(x.shape) != tuple(expected):
        reason = f" ({why})" if why else ""
        raise ValueError(f"{op}: argument `{name}` must have shape {tuple(expected)}{reason}, got {tuple(x.shape)}")


def nhwc(op: str, name: str, x) -> tuple[int, int]:
    """Raise unless `x` is a floating [N, H, W, C] array; return its static (H, W)."""
    floating(op, name, x)
    rank(op, name, x, 4, "NHWC")
    return (int(x.shape[1]), int(x.shape[2]))


def same_dtype(op: str, **arrays) -> None:
    """Raise TypeError unless all arrays share one dtype (no silent promotion inside a rule)."""
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"`{n}`: {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: arguments must share one dtype, got {listing}")


def pair(op: str, name: str, value) -> tuple[int, int]:
    """Normalise an int or a pair of positive ints to a pair."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{op}: argument `{name}` must be a positive int or a pair of positive ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def positive_float(op: str, name: str, value) -> float:
    """Normalise a positive Python number (a static setting, never traced)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: argument `{name}` must be a positive number, got {value!r}")
    return float(value)


def padding_form(op: str, value):
    """Check the form of a `padding` setting, before any input size is known.

    Returns "SAME" or "VALID" (upper case), or explicit ((top, bottom), (left,
    right)) pairs, an int p becoming p on all four sides.
    """
    if isinstance(value, str):
        if value.upper() in ("SAME", "VALID"):
            return value.upper()
    elif isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return ((value, value), (value, value))
    else:
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in value)
            if len(pads) == 2 and all(lo >= 0 and hi >= 0 for lo, hi in pads):
                return pads
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"{op}: argument `padding` must be 'SAME', 'VALID', a non-negative int or "
        f"((top, bottom), (left, right)) of non-negative ints, got {value!r}"
    )


def padding(
    op: str,
    value,
    spatial: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resolve `padding` to explicit ((top, bottom), (left, right)).

    Accepts "SAME" (output size ceil(in / stride), the extra pixel at the end,
    as XLA and TensorFlow do), "VALID" (no padding), an int p (p on all four
    sides), or explicit ((top, bottom), (left, right)) of non-negative ints.
    """
    eff = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    form = padding_form(op, value)
    if form == "VALID":
        pads = ((0, 0), (0, 0))
    elif form == "SAME":
        same = []
        for n, k, s in zip(spatial, eff, stride):
            out = -(-n // s)
            total = max((out - 1) * s + k - n, 0)
            same.append((total // 2, total - total // 2))
        pads = (same[0], same[1])
    else:
        pads = form
    for (lo, hi), n, k, axis in zip(pads, spatial, eff, ("height", "width")):
        if n + lo + hi < k:
            raise ValueError(
                f"{op}: the padded input {axis} {n + lo + hi} is smaller than the (dilated) window {k}; "
                f"use a larger input or padding='SAME'"
            )
    return pads
