"""Residual shortcuts: forward and hand-derived VJP side by side.

`add` joins a block's output to its shortcut; `shortcut_pad` (option A) and
`projection` (option B) are the two shortcuts of He et al. 2015, "Deep
Residual Learning for Image Recognition", for blocks that halve the
resolution or widen the channels. Both read x only at the strided positions
x[:, ::sh, ::sw, :], so both VJPs put their cotangent back at those positions
with an interior-padded `lax.pad` and zeros elsewhere. Derivations:
derivations/shortcut.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet.ops import _checks, contributions

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("add", "shortcut_pad", "projection")
# The ops with parameters: their names among the rule's positional arguments.
PARAMS = {"projection": ("w",)}


def _subsample(x, stride):
    """x_s = x[:, ::sh, ::sw, :], the positions a strided 1×1 shortcut reads."""
    sh, sw = stride
    return x[:, ::sh, ::sw, :]


def _unsubsample(ct_x_s, stride, in_hw):
    """Transpose of `_subsample`: ct_x_s[n, i, j, c] goes to ct_x[n, i·sh, j·sw, c], zeros elsewhere.

    Interior padding sh − 1 spreads the rows; the high edge restores the rows
    of x after the last one read, (H − 1) − (oh − 1)·sh of them.
    """
    sh, sw = stride
    h, w = in_hw
    _, oh, ow, _ = ct_x_s.shape
    rows = (0, (h - 1) - (oh - 1) * sh, sh - 1)
    cols = (0, (w - 1) - (ow - 1) * sw, sw - 1)
    return lax.pad(ct_x_s, jnp.array(0, ct_x_s.dtype), ((0, 0, 0), rows, cols, (0, 0, 0)))


# ------------------------------------------------------------------------------ add
class AddResiduals(NamedTuple):
    """Nothing: ∂y/∂a and ∂y/∂b are identities."""


@jax.custom_vjp
def _add(a, b):
    return a + b


# _add_fwd :: (a, b) -> (y, AddResiduals)
def _add_fwd(a, b):
    return a + b, AddResiduals()


# _add_bwd :: (AddResiduals, ct_y) -> (ct_a, ct_b)
def _add_bwd(res, ct_y):
    ct_a = ct_y
    ct_b = ct_y
    return ct_a, ct_b


_add.defvjp(_add_fwd, _add_bwd)


def add(a: jax.Array, b: jax.Array) -> jax.Array:
    """The identity shortcut y = a + b (block output + shortcut), with a hand-derived VJP.

    VJP: ct_a = ct_y and ct_b = ct_y, both unchanged. When a = F(x) is a
    block and b = x its input, the cotangent reaching x is therefore the sum
    of the weight path (ct_y through F) and the shortcut path (ct_y itself).
    No broadcasting: a and b must have one shape. Saves nothing.

    Args:
      a: floating array, the block's output F(x).
      b: floating array of a's shape and dtype, the shortcut.

    Returns:
      y = a + b.

    Derivation: derivations/shortcut.md#add
    """
    _checks.floating("add", "a", a)
    _checks.floating("add", "b", b)
    _checks.same_dtype("add", a=a, b=b)
    _checks.shape(
        "add",
        "b",
        b,
        a.shape,
        "the shape of `a`; the identity shortcut does not broadcast — use shortcut_pad or projection "
        "when the block changes the resolution or the channels",
    )
    return _add(a, b)


def add_reference(a, b):
    return a + b


# --------------------------------------------------------------------- shortcut_pad
class ShortcutPadConfig(NamedTuple):
    stride: tuple[int, int]
    in_hw: tuple[int, int]  # the input's (H, W): several input sizes subsample to one output size
    channel_pads: tuple[int, int]  # zero channels (before, after) the input's


class ShortcutPadResiduals(NamedTuple):
    """Nothing: the VJP is a slice and a strided placement with static shapes."""


def _shortcut_pad_value(x, stride, channel_pads):
    before, after = channel_pads
    return jnp.pad(_subsample(x, stride), ((0, 0), (0, 0), (0, 0), (before, after)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _shortcut_pad(x, config):
    return _shortcut_pad_value(x, config.stride, config.channel_pads)


# _shortcut_pad_fwd :: (x, ShortcutPadConfig) -> (y, ShortcutPadResiduals)
def _shortcut_pad_fwd(x, config):
    return _shortcut_pad_value(x, config.stride, config.channel_pads), ShortcutPadResiduals()


# _shortcut_pad_bwd :: (ShortcutPadConfig, ShortcutPadResiduals, ct_y) -> (ct_x,)
def _shortcut_pad_bwd(config, res, ct_y):
    stride, in_hw, channel_pads = config
    before, after = channel_pads
    # The zero channels are constants: their cotangent is dropped.
    ct_x_s = ct_y[..., before : ct_y.shape[-1] - after]
    return (_unsubsample(ct_x_s, stride, in_hw),)


_shortcut_pad.defvjp(_shortcut_pad_fwd, _shortcut_pad_bwd)


def shortcut_pad_config(x, *, out_channels, stride) -> ShortcutPadConfig:
    """Validate `shortcut_pad`'s arguments and resolve its static settings for this x."""
    in_hw = _checks.nhwc("shortcut_pad", "x", x)
    stride = _checks.pair("shortcut_pad", "stride", stride)
    c_in = x.shape[-1]
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < c_in:
        raise ValueError(
            f"shortcut_pad: argument `out_channels` must be an int ≥ the input's channels {c_in} "
            f"(option A only adds zero channels; use projection to reduce them), got {out_channels!r}"
        )
    before = (out_channels - c_in) // 2
    return ShortcutPadConfig(stride, in_hw, (before, out_channels - c_in - before))


def shortcut_pad(x: jax.Array, *, out_channels: int, stride) -> jax.Array:
    """Option-A (parameter-free) shortcut of He et al. 2015, with a hand-derived VJP.

    Forward: y = x[:, ::sh, ::sw, :] with zero channels added, (out − in) // 2
    before and the rest after (an odd difference puts the extra one after).
    VJP: ct_x = the channels before : out − after of ct_y, placed at the strided
    positions of x, zeros elsewhere. Saves nothing.

    Args:
      x: [N, H, W, C_in] floating array.
      out_channels: C_out ≥ C_in, a static int.
      stride: an int or a pair (static).

    Returns:
      y: [N, ceil(H / sh), ceil(W / sw), C_out].

    Derivation: derivations/shortcut.md#shortcut_pad
    """
    return _shortcut_pad(x, shortcut_pad_config(x, out_channels=out_channels, stride=stride))


def shortcut_pad_reference(x, *, out_channels, stride):
    sh, sw = _checks.pair("shortcut_pad", "stride", stride)
    extra = out_channels - x.shape[-1]
    return jnp.pad(x[:, ::sh, ::sw, :], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


# ----------------------------------------------------------------------- projection
class ProjectionConfig(NamedTuple):
    stride: tuple[int, int]
    in_hw: tuple[int, int]  # the input's (H, W), as for shortcut_pad


class ProjectionResiduals(NamedTuple):
    x_s: jax.Array  # x[:, ::sh, ::sw, :], the only part of x that y reads
    w: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _projection(x, w, config):
    return _subsample(x, config.stride) @ w


# _projection_fwd :: (x, w, ProjectionConfig) -> (y, ProjectionResiduals)
def _projection_fwd(x, w, config):
    x_s = _subsample(x, config.stride)
    return x_s @ w, ProjectionResiduals(x_s, w)


# _projection_bwd :: (ProjectionConfig, ProjectionResiduals, ct_y) -> (ct_x, ct_w)
def _projection_bwd(config, res, ct_y):
    stride, in_hw = config
    # w is shared by every (n, i, j): its cotangent sums over all of them.
    ct_w = jnp.einsum("nijc,nijd->cd", res.x_s, ct_y)
    ct_x = _unsubsample(ct_y @ res.w.T, stride, in_hw)
    return ct_x, ct_w


_projection.defvjp(_projection_fwd, _projection_bwd)


# projection_contributions :: (ProjectionConfig, ProjectionResiduals, ct_y) -> (Weight,)
def projection_contributions(config, res, ct_y):
    """What each example contributes to w: G_i = Σ_t x_s[i, t]ᵀ δ_{i,t} over the T = oh·ow output
    pixels (a Weight with a = x_s, the saved subsample).

    Derivation: derivations/curvature.md#contributions
    """
    return (contributions.Weight(contributions.positions(res.x_s), contributions.positions(ct_y)),)


def projection_config(x, w, *, stride) -> ProjectionConfig:
    """Validate `projection`'s arguments and resolve its static settings for this x."""
    in_hw = _checks.nhwc("projection", "x", x)
    _checks.floating("projection", "w", w)
    _checks.same_dtype("projection", x=x, w=w)
    _checks.rank("projection", "w", w, 2, "[C_in, C_out]")
    _checks.shape("projection", "w", w, (x.shape[-1], w.shape[1]), f"rows must equal x's channels {x.shape[-1]}")
    return ProjectionConfig(_checks.pair("projection", "stride", stride), in_hw)


def projection(x: jax.Array, w: jax.Array, *, stride) -> jax.Array:
    """Option-B shortcut of He et al. 2015: a strided 1×1 convolution, with a hand-derived VJP.

    Forward: y = x_s·W with x_s = x[:, ::sh, ::sw, :]. VJP: ct_W = Σ_{n,i,j}
    x_sᵀ·ct_y, ct_x = ct_y·Wᵀ placed at the strided positions of x, zeros
    elsewhere. Saves x_s (a 1/(sh·sw) share of x) and W.

    Args:
      x: [N, H, W, C_in] floating array.
      w: [C_in, C_out] weights, the dtype of x.
      stride: an int or a pair (static).

    Returns:
      y: [N, ceil(H / sh), ceil(W / sw), C_out].

    Derivation: derivations/shortcut.md#projection
    """
    return _projection(x, w, projection_config(x, w, stride=stride))


def projection_reference(x, w, *, stride):
    sh, sw = _checks.pair("projection", "stride", stride)
    return jnp.matmul(x[:, ::sh, ::sw, :], w)
