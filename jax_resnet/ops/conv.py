"""2-D convolution: forward and hand-derived VJP side by side.

The forward is a strided, dilated, padded, grouped cross-correlation of an
NHWC input with an HWIO kernel. Both cotangents are again correlations:

* ct_x correlates ct_y, with zeros inserted between its pixels (the stride),
  with the kernel flipped in space and its in/out channels swapped;
* ct_w correlates x with ct_y, which plays the kernel, its taps spaced by the
  stride, the window moving by the dilation.

The forward saves x and w and nothing else. Derivation: derivations/conv.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet.ops import _checks, contributions

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("conv2d",)
# The ops with parameters: their names among the rule's positional arguments.
PARAMS = {"conv2d": ("w",)}

# x, ct_x: NHWC; w: HWIO.
_DIMS = ("NHWC", "HWIO", "NHWC")
# ct_w: x is read with its channels as the batch and its batch as the features,
# ct_y is the kernel with N as its in-features, and the result comes out HWIO.
_DIMS_CT_W = ("CHWN", "IHWO", "HWNC")


# --------------------------------------------------------------------------- conv2d
class ConvConfig(NamedTuple):
    """Static settings of one convolution, every field resolved to pairs: the
    core's `nondiff_argnums` argument, made by `conv2d_config`."""

    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    dilation: tuple[int, int]
    groups: int


class Conv2dResiduals(NamedTuple):
    x: jax.Array  # NHWC input, read again by ct_w
    w: jax.Array  # HWIO kernel, read again by ct_x


def _conv2d_value(x, w, config):
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=config.stride,
        padding=config.padding,
        rhs_dilation=config.dilation,
        dimension_numbers=_DIMS,
        feature_group_count=config.groups,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x, w, config):
    return _conv2d_value(x, w, config)


# _conv2d_fwd :: (x, w, ConvConfig) -> (y, Conv2dResiduals)
def _conv2d_fwd(x, w, config):
    return _conv2d_value(x, w, config), Conv2dResiduals(x, w)


# _conv2d_bwd :: (ConvConfig, Conv2dResiduals, ct_y) -> (ct_x, ct_w)
def _conv2d_bwd(config, res, ct_y):
    x, w = res.x, res.w
    kh, kw, c_in, c_out = w.shape
    groups = config.groups
    # Per axis: eff = d(k−1)+1 is the dilated window; rem = (size + lo + hi − eff) mod s
    # counts the trailing input rows that no output window reaches.
    eff = [d * (k - 1) + 1 for d, k in zip(config.dilation, (kh, kw))]
    rem = [(n + lo + hi - e) % s for n, (lo, hi), e, s in zip(x.shape[1:3], config.padding, eff, config.stride)]

    # ct_x: full correlation of the stride-dilated ct_y with the flipped kernel,
    # in/out channels swapped within each group: w_t[p, q, o, c] = w[kh−1−p, kw−1−q, c, o].
    w_flip = w[::-1, ::-1]
    w_t = w_flip.reshape(kh, kw, c_in, groups, c_out // groups)
    w_t = w_t.transpose(0, 1, 4, 3, 2).reshape(kh, kw, c_out // groups, groups * c_in)
    pads_ct_x = [(e - 1 - lo, e - 1 - hi + r) for e, (lo, hi), r in zip(eff, config.padding, rem)]
    ct_x = lax.conv_general_dilated(
        ct_y,
        w_t,
        window_strides=(1, 1),
        padding=pads_ct_x,
        lhs_dilation=config.stride,
        rhs_dilation=config.dilation,
        dimension_numbers=_DIMS,
        feature_group_count=groups,
    )

    # ct_w: x (padded like the forward) correlated with ct_y as the kernel, its taps
    # spaced by the stride, the window moving by the dilation. The input channels
    # are the batch here, so groups pair channel group g of x with output group g
    # of ct_y through batch_group_count. rem ≥ d leaves extra taps past the kernel.
    ct_w = lax.conv_general_dilated(
        x,
        ct_y,
        window_strides=config.dilation,
        padding=config.padding,
        rhs_dilation=config.stride,
        dimension_numbers=_DIMS_CT_W,
        batch_group_count=groups,
    )
    return ct_x, ct_w[:kh, :kw]


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# conv2d_contributions :: (ConvConfig, Conv2dResiduals, ct_y) -> (Weight,)
def conv2d_contributions(config, res, ct_y):
    """What each example contributes to the kernel: G_i = Σ_t A_{i,t}ᵀ δ_{i,t} over the T = Ho·Wo output
    pixels, A_{i,t} the im2col patch [kh·kw·C] that pixel t reads (`_patches`), the kernel
    flattened to [kh·kw·C, O] row-major. A Weight whose patches are formed only where a quantity
    needs them, and whose G_i come without patches from one grouped convolution
    (`_conv2d_batch_grad`). groups = 1 only.

    Derivation: derivations/curvature.md#contributions
    """
    if config.groups != 1:
        raise ValueError(f"conv2d: per-example contributions need groups=1, got groups={config.groups}")
    kernel_hw = res.w.shape[:2]

    def patches():
        # Behind the barrier the patches depend on ct_y, so XLA cannot form them in
        # the forward pass and hold every layer's until its backward (it did: 1.6 GiB
        # for ResNet-20-GN at batch 256).
        x, _ = lax.optimization_barrier((res.x, ct_y))
        return contributions.positions(_patches(x, kernel_hw, config))

    grads = lambda: _conv2d_batch_grad(config, res.x, ct_y, kernel_hw)
    return (contributions.Weight(patches, contributions.positions(ct_y), grads),)


def _patches(x, kernel_hw, config: ConvConfig):
    """im2col: [B, Ho, Wo, kh·kw·C], feature (p, q, c) at (p·kw + q)·C + c, the order of an HWIO kernel's rows.

    One strided slice of the padded input per kernel tap (p, q): the tap reads
    x[s·i + d·p − top, s·j + d·q − left]. (With `lax.conv_general_dilated_patches`,
    a convolution by a one-hot kernel, XLA's CPU compiler spent over 25 minutes
    on ResNet-20-GN's DP step at batch 256 and warned of a slow compile; with
    the slices it took 42 s, measured here.)
    """
    (top, bottom), (left, right) = config.padding
    (sh, sw), (dh, dw) = config.stride, config.dilation
    n, h, w, c = x.shape
    kh, kw = kernel_hw
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    padded = lax.pad(x, jnp.array(0, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    taps = [
        lax.slice(
            padded,
            (0, p * dh, q * dw, 0),
            (n, p * dh + (ho - 1) * sh + 1, q * dw + (wo - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for p in range(kh)
        for q in range(kw)
    ]
    return jnp.stack(taps, axis=3).reshape(n, ho, wo, kh * kw * c)


def _conv2d_batch_grad(config: ConvConfig, x, ct_y, kernel_hw):
    """Each example's kernel gradient, (g [kh, kw, C, B, O], 3), without patches: the kernel
    cotangent's correlation (`_conv2d_bwd`, x's channels as the batch, its
    examples as the features) with the examples kept apart as B feature groups,
    example i's group pairing x_i with δ_i alone. (groups = 1 only.)

    Under a `jit` whose batch is sharded over several devices, XLA's SPMD
    partitioner (jax 0.10, CPU) gets this grouped convolution wrong, as it does
    the one `jax.vmap` of the kernel cotangent writes: values off by up to 24
    for values of order 10, measured on 8 simulated devices. Run per-example
    work on a sharded batch under `jax.shard_map` (`per_example.per_device`), as the DP step
    (`dp.update_fn`) and `per_example.quantities(..., mesh=)` do. The batch-grouped
    form (`batch_group_count = B`) was partitioned right but took over 10
    minutes per ResNet-20-GN step on the CPU against about 10 s, measured."""
    n, c = x.shape[0], x.shape[-1]
    (kh, kw), (ho, wo, o) = kernel_hw, ct_y.shape[1:]
    rhs = ct_y.transpose(1, 2, 0, 3).reshape(ho, wo, 1, n * o)  # [Ho, Wo, 1, B·O]: group i's O kernels
    g = lax.conv_general_dilated(
        x,
        rhs,
        window_strides=config.dilation,
        padding=config.padding,
        rhs_dilation=config.stride,
        dimension_numbers=("CHWN", "HWIO", "HWNC"),
        feature_group_count=n,
    )
    return g[:kh, :kw].reshape(kh, kw, c, n, o), 3


def conv2d_config(x, w, *, stride=1, padding="SAME", dilation=1, groups=1) -> ConvConfig:
    """Validate `conv2d`'s arguments and resolve its settings to a `ConvConfig`.

    Raises TypeError for non-floating or mixed dtypes and ValueError for bad
    ranks, channel counts, strides, dilations, groups or padding; each message
    names `conv2d`, the argument, what was expected and what came.
    """
    op = "conv2d"
    _checks.floating(op, "x", x)
    _checks.floating(op, "w", w)
    _checks.same_dtype(op, x=x, w=w)
    _checks.rank(op, "x", x, 4, "NHWC")
    _checks.rank(op, "w", w, 4, "HWIO")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: argument `groups` must be a positive int, got {groups!r}")
    _, height, width, channels = x.shape
    kh, kw, c_in, c_out = w.shape
    if c_in * groups != channels:
        raise ValueError(
            f"{op}: argument `w` must have in-channels x.shape[-1] / groups = {channels} / {groups} "
            f"(w.shape[2] * groups == C), got w.shape {tuple(w.shape)} with x.shape {tuple(x.shape)}"
        )
    if c_out % groups != 0:
        raise ValueError(
            f"{op}: argument `w` must have out-channels w.shape[3] divisible by groups = {groups}, got w.shape {tuple(w.shape)}"
        )
    stride = _checks.pair(op, "stride", stride)
    dilation = _checks.pair(op, "dilation", dilation)
    pads = _checks.padding(op, padding, (height, width), (kh, kw), stride, dilation)
    return ConvConfig(stride, pads, dilation, groups)


def conv2d(x: jax.Array, w: jax.Array, *, stride=1, padding="SAME", dilation=1, groups=1) -> jax.Array:
    """2-D convolution (cross-correlation), NHWC × HWIO, with a hand-derived VJP.

    Forward, with s the stride, d the dilation, (t, l) the top/left padding and
    g(o) the channel group of output channel o:
      y[n, i, j, o] = Σ_{p, q, c} x[n, s·i + d·p − t, s·j + d·q − l, g(o)·C/G + c] · w[p, q, c, o]
    (x is zero outside its bounds).
    VJP:
      ct_x = ct_y with s−1 zeros between pixels, padded by (d(k−1) − lo, d(k−1) − hi + rem),
             correlated (dilation d) with the kernel flipped in space, in/out swapped per group;
      ct_w[p, q, c, o] = Σ_{n, i, j} x[n, s·i + d·p − t, s·j + d·q − l, g(o)·C/G + c] · ct_y[n, i, j, o],
             a correlation of padded x with ct_y as the kernel (kernel dilation s, stride d).
    Saves x and w.

    Args:
      x: input, shape [N, H, W, C], floating.
      w: kernel, shape [kh, kw, C / groups, O], same dtype as x; O divisible by groups.
      stride: int or (sh, sw), positive.
      padding: "SAME" (output size ceil(H / stride), the odd pixel at the end),
        "VALID", an int, or ((top, bottom), (left, right)).
      dilation: kernel dilation, int or (dh, dw), positive.
      groups: feature groups; groups = C with w.shape[2] = 1 is a depthwise convolution.

    Returns:
      y, shape [N, Ho, Wo, O], Ho = ⌊(H + top + bottom − d(kh − 1) − 1) / s⌋ + 1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
      >>> conv2d(x, w, stride=2).shape
      (1, 4, 4, 4)

    Derivation: derivations/conv.md#conv2d
    """
    config = conv2d_config(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _conv2d(x, w, config)


def conv2d_reference(x, w, *, stride=1, padding="SAME", dilation=1, groups=1):
    # Hands "SAME"/"VALID" to lax as strings, so lax's own padding rule checks ours.
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=_checks.pair("conv2d", "stride", stride),
        padding=_checks.padding_form("conv2d", padding),
        rhs_dilation=_checks.pair("conv2d", "dilation", dilation),
        dimension_numbers=_DIMS,
        feature_group_count=groups,
    )
