"""Spatial pooling over NHWC arrays: forward and hand-derived VJP side by side.

A window of kh×kw offsets reads, for each offset k = (p, q) (row-major,
k = p·kw + q), one strided slice x_k of the padded input; every x_k has the
output's shape. Max pooling is y = max_k x_k, average pooling y = Σ_k x_k / (kh·kw).
The backward passes are the transposes of those slices: whatever reaches
output (i, j) through offset (p, q) goes back to input row i·sh + p − top and
column j·sw + q − left, written with `lax.pad` (interior padding stride − 1),
and the padding is cropped off. Derivations: derivations/pool.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet.ops import _checks

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("max_pool", "avg_pool", "global_avg_pool")


class PoolGeometry(NamedTuple):
    """The static settings of max_pool and avg_pool, resolved for one input shape:
    the core's `nondiff_argnums` argument, made by `max_pool_config` / `avg_pool_config`."""

    window: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    in_hw: tuple[int, int]  # the input's (H, W): several input sizes pool to one output size


def _geometry(op: str, shape: tuple, window, stride, padding) -> PoolGeometry:
    """Validate the settings and resolve `padding` for an input of `shape` [N, H, W, C].

    The configs call it, and so do the references, so that both read the
    settings alike."""
    window = _checks.pair(op, "window", window)
    stride = _checks.pair(op, "stride", stride)
    in_hw = (int(shape[1]), int(shape[2]))
    pads = _checks.padding(op, padding, in_hw, window, stride)
    return PoolGeometry(window, stride, pads, in_hw)


def _out_hw(geom: PoolGeometry) -> tuple[int, ...]:
    return tuple(
        (n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(geom.in_hw, geom.pads, geom.window, geom.stride)
    )


def _offsets(geom: PoolGeometry):
    """The window offsets (p, q) in row-major order; the k-th is k = p·kw + q."""
    kh, kw = geom.window
    return [(p, q) for p in range(kh) for q in range(kw)]


def _window_slices(x, geom: PoolGeometry, pad_value):
    """[x_k for each offset k]: x_k[n, i, j, c] = x_pad[n, i·sh + p, j·sw + q, c], each of y's shape."""
    (top, bottom), (left, right) = geom.pads
    sh, sw = geom.stride
    oh, ow = _out_hw(geom)
    x_pad = lax.pad(x, jnp.array(pad_value, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    n, _, _, c = x.shape
    return [
        lax.slice(x_pad, (0, p, q, 0), (n, p + (oh - 1) * sh + 1, q + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
        for p, q in _offsets(geom)
    ]


def _place(g, p: int, q: int, geom: PoolGeometry):
    """Transpose of reading x_k at offset (p, q): g[n, i, j, c] goes to x[n, i·sh + p − top, j·sw + q − left, c].

    One `lax.pad`: interior padding sh − 1 spreads the rows of g to every sh-th
    row; the low edge p − top is where the first one lands in x (negative:
    it lands in the top padding and is cropped), the high edge is whatever
    rows of x remain after the last one (negative: bottom padding, cropped).
    """
    (top, _), (left, _) = geom.pads
    sh, sw = geom.stride
    h, w = geom.in_hw
    _, oh, ow, _ = g.shape
    rows = (p - top, h - (p - top) - ((oh - 1) * sh + 1), sh - 1)
    cols = (q - left, w - (q - left) - ((ow - 1) * sw + 1), sw - 1)
    return lax.pad(g, jnp.array(0, g.dtype), ((0, 0, 0), rows, cols, (0, 0, 0)))


# ------------------------------------------------------------------------- max_pool
class MaxPoolResiduals(NamedTuple):
    argmax: jax.Array  # int8 (int32 if kh·kw > 127), y's shape: the first k with x_k == y


def _argmax_dtype(geom: PoolGeometry):
    kh, kw = geom.window
    return jnp.int8 if kh * kw <= 127 else jnp.int32


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, geom):
    return functools.reduce(jnp.maximum, _window_slices(x, geom, -jnp.inf))


# _max_pool_fwd :: (x, PoolGeometry) -> (y, MaxPoolResiduals)
def _max_pool_fwd(x, geom):
    x_k = _window_slices(x, geom, -jnp.inf)
    y = functools.reduce(jnp.maximum, x_k)
    dtype = _argmax_dtype(geom)
    # Walk the offsets backwards so that the first (row-major) maximal offset is the one left standing.
    argmax = jnp.zeros(y.shape, dtype)
    for k in reversed(range(len(x_k))):
        argmax = jnp.where(x_k[k] == y, jnp.array(k, dtype), argmax)
    return y, MaxPoolResiduals(argmax)


# _max_pool_bwd :: (PoolGeometry, MaxPoolResiduals, ct_y) -> (ct_x,)
def _max_pool_bwd(geom, res, ct_y):
    zero = jnp.zeros_like(ct_y)
    ct_x = functools.reduce(
        jnp.add, (_place(jnp.where(res.argmax == k, ct_y, zero), p, q, geom) for k, (p, q) in enumerate(_offsets(geom)))
    )
    return (ct_x,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_config(x, *, window=3, stride=2, padding="SAME") -> PoolGeometry:
    """Validate `max_pool`'s arguments and resolve its static geometry for this x."""
    _checks.nhwc("max_pool", "x", x)
    geom = _geometry("max_pool", x.shape, window, stride, padding)
    for (lo, hi), k, axis in zip(geom.pads, geom.window, ("height", "width")):
        if lo >= k or hi >= k:
            raise ValueError(
                f"max_pool: argument `padding` must be smaller than the window on each side ({axis}: window {k}), "
                f"got {(lo, hi)}; a window wholly in the padding would output -inf"
            )
    return geom


def max_pool(x: jax.Array, *, window=3, stride=2, padding="SAME") -> jax.Array:
    """Max pooling over H and W of an NHWC array, with a hand-derived VJP.

    Forward: y[n, i, j, c] = max_k x_k[n, i, j, c], the maximum over the window
    at (i·sh − top, j·sw − left), padding read as −∞. VJP: ct_x = Σ_k place_k(
    [argmax = k] · ct_y), where argmax is the first k (row-major in the window)
    with x_k = y: a window's whole cotangent goes to its first maximal element.
    Saves the small integer array argmax (int8), not x.

    Args:
      x: [N, H, W, C] floating array.
      window: kh×kw, an int or a pair (static).
      stride: sh×sw, an int or a pair (static).
      padding: "SAME", "VALID", an int p (all four sides) or ((top, bottom),
        (left, right)); every pad must be smaller than the window, so that
        no window lies wholly in the padding.

    Returns:
      y: [N, oh, ow, C], oh = (H + top + bottom − kh) // sh + 1, likewise ow.

    Example:
      >>> x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
      >>> max_pool(x, window=2, stride=2, padding="VALID")[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)

    Derivation: derivations/pool.md#max_pool
    """
    return _max_pool(x, max_pool_config(x, window=window, stride=stride, padding=padding))


def max_pool_reference(x, *, window=3, stride=2, padding="SAME"):
    geom = _geometry("max_pool", x.shape, window, stride, padding)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *geom.window, 1), (1, *geom.stride, 1), ((0, 0), *geom.pads, (0, 0))
    )


# ------------------------------------------------------------------------- avg_pool
class AvgPoolResiduals(NamedTuple):
    """Nothing: the VJP is linear in ct_y and the shapes are static."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool(x, geom):
    kh, kw = geom.window
    return functools.reduce(jnp.add, _window_slices(x, geom, 0)) / (kh * kw)


# _avg_pool_fwd :: (x, PoolGeometry) -> (y, AvgPoolResiduals)
def _avg_pool_fwd(x, geom):
    kh, kw = geom.window
    return functools.reduce(jnp.add, _window_slices(x, geom, 0)) / (kh * kw), AvgPoolResiduals()


# _avg_pool_bwd :: (PoolGeometry, AvgPoolResiduals, ct_y) -> (ct_x,)
def _avg_pool_bwd(geom, res, ct_y):
    kh, kw = geom.window
    ct_y_share = ct_y / (kh * kw)
    return (functools.reduce(jnp.add, (_place(ct_y_share, p, q, geom) for p, q in _offsets(geom))),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool_config(x, *, window, stride, padding="VALID") -> PoolGeometry:
    """Validate `avg_pool`'s arguments and resolve its static geometry for this x."""
    _checks.nhwc("avg_pool", "x", x)
    return _geometry("avg_pool", x.shape, window, stride, padding)


def avg_pool(x: jax.Array, *, window, stride, padding="VALID") -> jax.Array:
    """Average pooling over H and W of an NHWC array, with a hand-derived VJP.

    Forward: y = Σ_k x_k / (kh·kw), padding read as zeros and always counted
    in the divisor (count_include_pad=True). VJP: ct_x = Σ_k place_k(ct_y / (kh·kw)).
    Saves nothing.

    Args:
      x: [N, H, W, C] floating array.
      window: kh×kw, an int or a pair (static).
      stride: sh×sw, an int or a pair (static).
      padding: "SAME", "VALID", an int p or ((top, bottom), (left, right)).

    Returns:
      y: [N, oh, ow, C], oh = (H + top + bottom − kh) // sh + 1, likewise ow.

    Derivation: derivations/pool.md#avg_pool
    """
    return _avg_pool(x, avg_pool_config(x, window=window, stride=stride, padding=padding))


def avg_pool_reference(x, *, window, stride, padding="VALID"):
    geom = _geometry("avg_pool", x.shape, window, stride, padding)
    kh, kw = geom.window
    total = lax.reduce_window(x, 0.0, lax.add, (1, kh, kw, 1), (1, *geom.stride, 1), ((0, 0), *geom.pads, (0, 0)))
    return total / (kh * kw)


# ------------------------------------------------------------------ global_avg_pool
class GlobalAvgPoolConfig(NamedTuple):
    in_hw: tuple[int, int]  # the input's (H, W): ct_y [N, C] does not carry them


class GlobalAvgPoolResiduals(NamedTuple):
    """Nothing: the VJP broadcasts ct_y, and H, W are static."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_avg_pool(x, config):
    return jnp.mean(x, axis=(1, 2))


# _global_avg_pool_fwd :: (x, GlobalAvgPoolConfig) -> (y, GlobalAvgPoolResiduals)
def _global_avg_pool_fwd(x, config):
    return jnp.mean(x, axis=(1, 2)), GlobalAvgPoolResiduals()


# _global_avg_pool_bwd :: (GlobalAvgPoolConfig, GlobalAvgPoolResiduals, ct_y) -> (ct_x,)
def _global_avg_pool_bwd(config, res, ct_y):
    h, w = config.in_hw
    n, c = ct_y.shape
    return (jnp.broadcast_to(ct_y[:, None, None, :] / (h * w), (n, h, w, c)),)


_global_avg_pool.defvjp(_global_avg_pool_fwd, _global_avg_pool_bwd)


def global_avg_pool_config(x) -> GlobalAvgPoolConfig:
    """Validate `global_avg_pool`'s argument and record the static (H, W) of this x."""
    return GlobalAvgPoolConfig(_checks.nhwc("global_avg_pool", "x", x))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W, [N, H, W, C] -> [N, C], with a hand-derived VJP.

    Forward: y[n, c] = (1 / (H·W)) Σ_{h,w} x[n, h, w, c]. VJP: ct_x[n, h, w, c]
    = ct_y[n, c] / (H·W), the same at every position. Saves nothing.

    Args:
      x: [N, H, W, C] floating array.

    Returns:
      y: [N, C].

    Derivation: derivations/pool.md#global_avg_pool
    """
    return _global_avg_pool(x, global_avg_pool_config(x))


def global_avg_pool_reference(x):
    return jnp.mean(x, axis=(1, 2))
