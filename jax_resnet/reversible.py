"""Reversible residual couplings and stages (Gomez et al. 2017, "The Reversible
Residual Network"), with one hand-written backward per stage that stores no
activations.

The input's channels are split into two halves (x1, x2) and a *coupling* maps
them to

    y1 = x1 + F(x2),    y2 = x2 + G(y1),

which can be undone from the outputs alone:

    x2 = y2 − G(y1),    x1 = y1 − F(x2).

F and G are pre-activation residual functions without their shortcut
(`blocks.apply_block` on a `preact_basic` or `preact_bottleneck` `BlockSpec`
with `residual=False`): BN, ReLU, conv, ... built from the `OpSet` the caller
passes in, so under `grad="rules"` they are the library's own rules.

A *stage* is the couplings of one resolution, with their parameters stacked
on a leading axis and run by `lax.scan` (compile time flat in depth). Under
a rules `OpSet` the whole stage is one `jax.custom_vjp`
(`_reversible_stage`): its forward saves only the stage's output (and the
parameters and statistics it was given), and its backward walks the couplings
in reverse, rebuilding each one's inputs from its outputs and taking the VJPs
of F and G on the way (`jax.vjp` of F and G, whose ops are themselves
`custom_vjp` rules). Activation memory is that of one coupling, whatever the
depth. Under `opset("autodiff")` the same scan runs on the reference ops and
JAX differentiates it, storing every coupling's activations (optionally
rematerialised per coupling with `jax.checkpoint`, `remat=True`).

A coupling that changes the shape (stride 2, or more channels: the first of
a stage) cannot be inverted; it runs outside the stage as
y1 = s1(x1) + F(x2), y2 = s2(x2) + G(y1) with option-A shortcuts (strided
subsampling, zero-padded channels) or option-B ones (a 1x1 projection per
half), and its ops save what they save. Derivation: derivations/reversible.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet import blocks
from jax_resnet.ops import OpSet, opset

__all__ = [
    "BLOCKS",
    "CouplingSpec",
    "init_coupling",
    "init_stage",
    "coupling",
    "StageConfig",
    "StageResiduals",
    "stage",
    "reconstruct",
    "reconstruction_error",
]


# The residual functions' block kinds: F and G are pre-activation bodies.
BLOCKS = ("basic", "bottleneck")


@dataclasses.dataclass(frozen=True)
class CouplingSpec:
    """Static description of one coupling; hashable, so it can be part of a `custom_vjp`'s config.

    `width` is the channel figure of Gomez et al.'s Table 1; the coupling's
    output has `width · expansion` channels (expansion 4 for bottleneck),
    half of them in each of y1 and y2.
    """

    block: str
    in_channels: int  # both halves together
    width: int
    stride: int = 1
    shortcut: str = "A"  # on a change of shape: "A" (subsample, zero-pad) or "B" (1x1 projection per half)

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"CouplingSpec: `block` must be one of {BLOCKS}, got {self.block!r}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"CouplingSpec: `shortcut` must be 'A' or 'B', got {self.shortcut!r}")
        for field in ("in_channels", "width"):
            value = getattr(self, field)
            if value < 2 or value % 2:
                raise ValueError(f"CouplingSpec: `{field}` must be even and ≥ 2 (split in two halves), got {value}")
        if self.stride not in (1, 2):
            raise ValueError(f"CouplingSpec: `stride` must be 1 or 2, got {self.stride}")

    @property
    def kind(self) -> str:
        return f"preact_{self.block}"

    @property
    def out_channels(self) -> int:
        return self.width * blocks.KINDS[self.kind].expansion

    @property
    def reversible(self) -> bool:
        """True when the inputs can be rebuilt from the outputs (no change of shape)."""
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def projects(self) -> bool:
        """True when the shortcuts have parameters (option B on a change of shape)."""
        return not self.reversible and self.shortcut == "B"

    @property
    def f(self) -> blocks.BlockSpec:
        """The spec of F, x2 (in/2 channels) -> out/2 channels, carrying the stride."""
        return blocks.BlockSpec(self.kind, self.in_channels // 2, self.width // 2, self.stride, residual=False)

    @property
    def g(self) -> blocks.BlockSpec:
        """The spec of G, y1 (out/2 channels) -> out/2 channels."""
        return blocks.BlockSpec(self.kind, self.out_channels // 2, self.width // 2, 1, residual=False)


def init_coupling(key, spec: CouplingSpec, dtype=jnp.float32):
    """Parameters {"f", "g"} and BatchNorm state {"f", "g"} of one coupling (`blocks.init_block` each)."""
    key_f, key_g = jax.random.split(key)
    params_f, state_f = blocks.init_block(key_f, spec.f, dtype)
    params_g, state_g = blocks.init_block(key_g, spec.g, dtype)
    params = {"f": params_f, "g": params_g}
    if spec.projects:
        c_in, c_out = spec.in_channels // 2, spec.out_channels // 2
        for name, k in zip(("proj1", "proj2"), jax.random.split(jax.random.fold_in(key, 1))):
            params[name] = {"w": blocks.he_normal(k, (c_in, c_out), c_in, dtype)}
    return params, {"f": state_f, "g": state_g}


def init_stage(key, spec: CouplingSpec, n: int, dtype=jnp.float32):
    """`n` couplings' parameters and state, stacked on a leading axis of length n."""
    if not spec.reversible:
        raise ValueError(f"init_stage: argument `spec` must be a reversible coupling (no change of shape), got {spec}")
    return jax.vmap(lambda k: init_coupling(k, spec, dtype))(jax.random.split(key, n))


def _shortcut(ops: OpSet, spec: CouplingSpec, params, name, x):
    if spec.reversible:
        return x
    if spec.projects:
        return ops.projection(x, params[name]["w"], stride=spec.stride)
    return ops.shortcut_pad(x, out_channels=spec.out_channels // 2, stride=spec.stride)


def coupling(ops: OpSet, spec: CouplingSpec, params, state, x1, x2, *, train):
    """y1 = s1(x1) + F(x2), y2 = s2(x2) + G(y1); s the identity, or on a change of shape option A
    (both halves alike) or option B (a 1x1 projection per half, "proj1" and "proj2").

    Returns (y1, y2, new_state).
    """
    f, state_f = blocks.apply_block(ops, spec.f, params["f"], state["f"], x2, train=train)
    y1 = ops.add(_shortcut(ops, spec, params, "proj1", x1), f)
    g, state_g = blocks.apply_block(ops, spec.g, params["g"], state["g"], y1, train=train)
    y2 = ops.add(_shortcut(ops, spec, params, "proj2", x2), g)
    return y1, y2, {"f": state_f, "g": state_g}


# ---------------------------------------------------------------- the reversible stage
class StageConfig(NamedTuple):
    """The static settings of `_reversible_stage` (its one `nondiff_argnums` argument)."""

    spec: CouplingSpec
    train: bool
    ops: OpSet  # the ops F and G are built from, in the forward and in the backward
    unroll: bool = False  # the forward scan unrolled: XLA's cost analysis counts a loop's body once


class StageResiduals(NamedTuple):
    params: Any  # the stacked parameters: inputs, not activations
    state: Any  # the stacked BatchNorm statistics the forward was given
    y1: jax.Array  # the stage's output; every coupling's input is rebuilt from it
    y2: jax.Array


def _scan_forward(config: StageConfig, params, state, x1, x2, *, remat=False):
    def body(carry, unit):
        y1, y2, new_state = coupling(config.ops, config.spec, *unit, *carry, train=config.train)
        return (y1, y2), new_state

    (y1, y2), new_state = lax.scan(
        jax.checkpoint(body) if remat else body, (x1, x2), (params, state), unroll=config.unroll
    )
    return y1, y2, new_state


def _coupling_bwd(config: StageConfig, params, state, y1, y2, ct_y1, ct_y2):
    """One coupling undone and differentiated from its outputs and their cotangents.

    Returns (x1, x2, ct_x1, ct_x2, ct_params, ct_state, recomputed_state).
    """
    ops, spec, train = config.ops, config.spec, config.train

    def residual(block_spec):
        return lambda p, s, x: blocks.apply_block(ops, block_spec, p, s, x, train=train)

    # y2 = x2 + G(y1): G's input is an output, so x2 and G's VJP come first.
    g, g_vjp, state_g = jax.vjp(residual(spec.g), params["g"], state["g"], y1, has_aux=True)
    x2 = y2 - g
    ct_params_g, ct_state_g, ct_y1_through_g = g_vjp(ct_y2)
    ct_z1 = ct_y1 + ct_y1_through_g  # y1's whole cotangent: its own and through G
    # y1 = x1 + F(x2), with x2 now known.
    f, f_vjp, state_f = jax.vjp(residual(spec.f), params["f"], state["f"], x2, has_aux=True)
    x1 = y1 - f
    ct_params_f, ct_state_f, ct_x2_through_f = f_vjp(ct_z1)
    ct_x1 = ct_z1
    ct_x2 = ct_y2 + ct_x2_through_f
    ct_params = {"f": ct_params_f, "g": ct_params_g}
    ct_state = {"f": ct_state_f, "g": ct_state_g}
    return x1, x2, ct_x1, ct_x2, ct_params, ct_state, {"f": state_f, "g": state_g}


def _scan_backward(config: StageConfig, params, state, y1, y2, ct_y1, ct_y2):
    """Every coupling undone and differentiated, last to first: (x1, x2, ct_x1, ct_x2, ct_params,
    ct_state, recomputed_state), the last three stacked like `params`."""

    def body(carry, unit):
        *outs, ct_params, ct_state, recomputed = _coupling_bwd(config, *unit, *carry)
        return tuple(outs), (ct_params, ct_state, recomputed)

    carry = (y1, y2, ct_y1, ct_y2)
    (x1, x2, ct_x1, ct_x2), (ct_params, ct_state, recomputed) = lax.scan(body, carry, (params, state), reverse=True)
    return x1, x2, ct_x1, ct_x2, ct_params, ct_state, recomputed


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _reversible_stage(params, state, x1, x2, config):
    return _reversible_stage_fwd(params, state, x1, x2, config)[0]


# _reversible_stage_fwd :: (params, state, x1, x2, StageConfig) -> ((y1, y2, new_state), StageResiduals)
def _reversible_stage_fwd(params, state, x1, x2, config):
    y1, y2, new_state = _scan_forward(config, params, state, x1, x2)
    return (y1, y2, new_state), StageResiduals(params, state, y1, y2)


# _reversible_stage_bwd :: (StageConfig, StageResiduals, (ct_y1, ct_y2, ct_new_state)) -> (ct_params, ct_state, ct_x1, ct_x2)
def _reversible_stage_bwd(config, res, cts):
    ct_y1, ct_y2, _ = cts  # the running statistics are outputs without a gradient path (stop_gradient)
    _, _, ct_x1, ct_x2, ct_params, ct_state, _ = _scan_backward(
        config, res.params, res.state, res.y1, res.y2, ct_y1, ct_y2
    )
    return ct_params, ct_state, ct_x1, ct_x2


_reversible_stage.defvjp(_reversible_stage_fwd, _reversible_stage_bwd)


def stage(
    ops: OpSet,
    spec: CouplingSpec,
    params,
    state,
    x1,
    x2,
    *,
    train: bool,
    remat: bool = False,
    segment: int | None = None,
    unroll: bool = False,
):
    """Run the stacked reversible couplings of one stage; returns (y1, y2, new_state).

    Which backward runs is read off `ops`: `opset("autodiff")` (the reference
    ops) runs a plain `lax.scan` that JAX differentiates, storing every
    coupling's activations (`remat=True`: `jax.checkpoint` per coupling, so
    only each coupling's inputs are stored and the rest is recomputed). Any
    other `OpSet` (`opset("rules")`, or one with a rule swapped out) runs the
    stage under one `custom_vjp` that stores only the stage's output and
    rebuilds the rest in the backward.

    `segment=k` (rules only; the autodiff ops ignore it) splits the stage into n/k runs of k couplings,
    each its own `custom_vjp` inside an outer `lax.scan`: JAX stores each
    run's output (n/k activations) and every reconstruction starts from a
    stored output, so float32 error grows with k instead of n
    (derivations/reversible.md#error-analysis).

    Args:
      ops: the `OpSet` F and G are built from.
      spec: the couplings' shared description; must be reversible.
      params, state: `init_stage`'s pytrees, stacked on a leading axis (n couplings).
      x1, x2: the two halves of the input, NHWC with `spec.in_channels // 2` channels each.
      train: BatchNorm with batch statistics (and updated running statistics) or running ones.
      remat: with the autodiff ops only (the rules ignore it: they store no activations to recompute).
      segment: with the rules only; must divide the number of couplings.
      unroll: unroll the forward's scan, so that XLA's cost analysis (which counts a
        loop's body once) counts every coupling; `models.summary` uses it for FLOPs.
    """
    if not spec.reversible:
        raise ValueError(f"stage: argument `spec` must be a reversible coupling (no change of shape), got {spec}")
    if x1.shape != x2.shape or x1.ndim != 4 or x1.shape[-1] != spec.in_channels // 2:
        raise ValueError(
            f"stage: arguments `x1` and `x2` must be NHWC halves with {spec.in_channels // 2} channels each, "
            f"got shapes {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    config = StageConfig(spec, bool(train), ops, bool(unroll))
    if ops == opset("autodiff"):
        return _scan_forward(config, params, state, x1, x2, remat=remat)
    n = jax.tree.leaves(params)[0].shape[0]
    if segment is None or segment == n:
        return _reversible_stage(params, state, x1, x2, config)
    if segment < 1 or n % segment:
        raise ValueError(f"stage: argument `segment` must divide the {n} couplings, got {segment}")
    runs = lambda tree: jax.tree.map(lambda a: a.reshape(n // segment, segment, *a.shape[1:]), tree)

    def run(carry, unit):
        y1, y2, new_state = _reversible_stage(*unit, *carry, config)
        return (y1, y2), new_state

    (y1, y2), new_state = lax.scan(run, (x1, x2), (runs(params), runs(state)))
    return y1, y2, jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), new_state)


def reconstruct(ops: OpSet, spec: CouplingSpec, params, state, y1, y2, *, train: bool):
    """The stage's inputs rebuilt from its outputs by the backward's own reverse scan.

    Returns (x1, x2, recomputed_state): the state holds the running statistics
    each coupling's F and G computed during the reconstruction (from batch
    statistics when `train`), stacked like `state`; the backward discards
    them, so the forward's update is the only one. For tests and the error
    study: it runs the full backward, with zero cotangents.
    """
    config = StageConfig(spec, bool(train), ops)
    zeros = jnp.zeros_like(y1)
    x1, x2, _, _, _, _, recomputed = _scan_backward(config, params, state, y1, y2, zeros, zeros)
    return x1, x2, recomputed


def reconstruction_error(ops: OpSet, spec: CouplingSpec, params, state, x1, x2, *, train: bool) -> jax.Array:
    """`max(|x̂1 − x1|, |x̂2 − x2|) / max(|x1|, |x2|)`: how far the inputs rebuilt from the stage's
    output (`reconstruct`) land from the true inputs, in the inputs' dtype."""
    y1, y2, _ = stage(ops, spec, params, state, x1, x2, train=train)
    r1, r2, _ = reconstruct(ops, spec, params, state, y1, y2, train=train)
    err = jnp.maximum(jnp.max(jnp.abs(r1 - x1)), jnp.max(jnp.abs(r2 - x2)))
    return err / jnp.maximum(jnp.max(jnp.abs(x1)), jnp.max(jnp.abs(x2)))
