"""Second-order quantities of a loss built from the library's rules.

The rules are `jax.custom_vjp`s, so the loss itself has no forward mode:
`jax.jvp(f, ...)` and `jax.jacfwd(f)` raise JAX's `TypeError: can't apply
forward-mode autodiff (jvp) to a custom_vjp function`. Their backward passes
are plain differentiable `jnp`, so second derivatives are still available, by
differentiating the gradient in reverse mode: `hvp` below. (Forward over
reverse, `jax.jvp(jax.grad(f), (params,), (v,))`, works too: it differentiates
the already-built backward pass, never the rule's forward in forward mode;
`tests/test_models.py` checks both against autodiff.)

The generalised Gauss-Newton matrix (GGN) of the mean loss L = (1/B) Σ_i ℓ_i(z_i),
z_i = f(θ, x_i) the logits of example i and J_i = ∂z_i/∂θ, is

  G = (1/B) Σ_i J_iᵀ H_i J_i,   H_i = ∇²_z ℓ_i (the loss's Hessian in the logits),

and with a factor S_i of H_i (S_i S_iᵀ = H_i, K columns s_{i,k}) its diagonal is

  diag G = (1/B) Σ_i Σ_k (J_iᵀ s_{i,k})²   (elementwise).

J_iᵀ s_{i,k} is what one backward pass with the logits' cotangent s_{i,k}/√B in
row i gives as example i's contribution to a parameter, the per-example tap
`sum_sq` (Σ_i of the squares) or `grad` of `per_example.logits_vjp`: one forward
with taps, then the backward pushed under `jax.vmap` over the K columns (BackPACK's
DiagGGN, Dangel et al. 2020). Quantities, named after BackPACK's:

  diag_ggn            diag G, exact: K = C columns, s_{i,k} = √p_k (e_k − p) (cross-entropy)
  diag_ggn_mc         the same with K = M sampled columns e_ŷ − p, ŷ ~ softmax(z_i)
  batch_diag_ggn      (1/B) diag(J_iᵀ H_i J_i) per example, [B, *shape]; Σ_i = diag_ggn
  batch_diag_ggn_mc   its Monte Carlo twin
  kflr, kfac          Kronecker factors (A, G) of each kernel's block, jnp.kron(A, G) ≈ G_W,
                      exact / sampled columns; the diagonal for every other parameter
  ggn_vp              G·v, matrix free, with no forward mode
  linearize           the logits with v ↦ J v and u ↦ Jᵀ u, reverse mode only (ggn_vp's, laplace's)

Losses (`loss=`): "softmax_cross_entropy" (y: integer labels [B]; H_i = diag(p) − ppᵀ)
and "mse_loss" (the seed's ½‖z_i − y_i‖² averaged over the batch; y: targets [B, C];
H_i = I). BatchNorm in training mode couples the examples, so J_i depends on the
whole batch and one backward cannot separate them: `diag_ggn` and `diag_ggn_mc`
then take one backward per (example, column), B·C (B·M) of them, through the
ordinary rules; the per-example diagonals and the Kronecker factors refuse it
(`CurvatureError`) and take `train=False` (running statistics); `ggn_vp` handles it.

Derivation: derivations/curvature.md.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import ops
    >>> from jax_resnet.curvature import hvp
    >>> f = lambda w: jnp.sum(ops.tanh(w) ** 2)
    >>> w, v = jnp.array([0.0, 0.5]), jnp.array([1.0, 0.0])
    >>> print(hvp(f, w, v))  # H = diag(2(1 − tanh²)(1 − 3 tanh²)): 2 at w = 0
    [2. 0.]
    >>> from jax_resnet import curvature, models
    >>> model = models.residual_mlp(in_features=4, width=8, depth=1, out_features=3)
    >>> params, state = model.init(jax.random.key(0))
    >>> x, y = jnp.ones((5, 4), jnp.float32), jnp.arange(5) % 3
    >>> curvature.diag_ggn(model, params, state, x, y)["out"]["w"].shape
    (8, 3)
    >>> factors = curvature.kflr(model, params, state, x, y)["out"]["w"]  # jnp.kron(a, g) ≈ the block
    >>> factors.a.shape, factors.g.shape
    ((8, 8), (3, 3))
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_resnet import models, per_example
from jax_resnet.ops import OpSet

__all__ = [
    "LOSSES",
    "CurvatureError",
    "BATCHNORM_TRAIN_MESSAGE",
    "Kronecker",
    "hvp",
    "loss_hessian_factor",
    "sampled_factor",
    "diag_ggn",
    "diag_ggn_mc",
    "batch_diag_ggn",
    "batch_diag_ggn_mc",
    "kflr",
    "kfac",
    "ggn_vp",
]


def hvp(f: Callable[[Any], jax.Array], params: Any, v: Any) -> Any:
    """The Hessian-vector product H(params)·v of a scalar function, reverse over reverse.

    H·v = ∇_p ⟨∇f(p), v⟩: one gradient, then the gradient of its inner
    product with v. Both passes are reverse mode, so this works for losses
    built from `custom_vjp` rules (`grad="rules"`), whose backward passes are
    differentiable; it costs about two gradients and never forms H.

    Args:
      f: `params -> scalar`, e.g. `lambda p: loss(model.apply(p, ...))`.
      params: a pytree of floating arrays, the point p.
      v: a pytree of the same structure and leaf shapes as `params`, the direction.

    Returns:
      H·v, a pytree like `params`.

    Raises:
      ValueError: `v` is not shaped like `params` (the message names the first difference).
    """
    _check_like("hvp", params, v)

    def directional(p):
        g = jax.grad(f)(p)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))

    return jax.grad(directional)(params)


def _check_like(name: str, params: Any, v: Any) -> None:
    """ValueError naming the first difference unless `v` has the structure and leaf shapes of `params`."""
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    v_leaves, v_def = jax.tree_util.tree_flatten(v)
    p_def, v_def = typing.cast(Any, p_def), typing.cast(Any, v_def)  # jaxlib's stub declares no PyTreeDef.__ne__
    if p_def != v_def:
        raise ValueError(f"{name}: argument `v` must have the structure of `params`: got {v_def}, expected {p_def}")
    for path_p, a, b in zip(jax.tree_util.tree_flatten_with_path(params)[0], p_leaves, v_leaves):
        if jnp.shape(a) != jnp.shape(b):
            key = jax.tree_util.keystr(path_p[0]) or "(root)"
            raise ValueError(f"{name}: argument `v` leaf {key} has shape {jnp.shape(b)}, expected {jnp.shape(a)}")


# ------------------------------------------------------------- the loss's factor
LOSSES = ("softmax_cross_entropy", "mse_loss")


class CurvatureError(ValueError):
    """The model has no such curvature quantity by this path (BatchNorm in training mode: why)."""


BATCHNORM_TRAIN_MESSAGE = (
    "the model uses BatchNorm in training mode, whose batch statistics couple the examples: every logit "
    "depends on every example, so no example's own share of a parameter's contribution exists in a backward "
    "pass of the batch, and neither per-example quantities nor Kronecker factors (sums of per-example, "
    "per-position terms) are defined by it. diag_ggn and diag_ggn_mc take such a model exactly, at one "
    "backward pass per (example, column): B·C (B·M). Pass train=False (BatchNorm on its running statistics, "
    "the network as evaluated), use a GroupNorm model (norm='group'), or use ggn_vp, which handles the coupling"
)


def loss_hessian_factor(logits: jax.Array, loss: str = "softmax_cross_entropy") -> jax.Array:
    """The exact factor S, [B, C, C]: S_i S_iᵀ = H_i = ∇²_z ℓ_i(z_i) for each example i.

    softmax_cross_entropy: with p = softmax(z_i), H_i = diag(p) − p pᵀ and
    S_i = diag(√p) − p √pᵀ, column k = √p_k (e_k − p):
    S_i S_iᵀ = diag(p) − 2 p pᵀ + p (Σ_k p_k) pᵀ = diag(p) − p pᵀ (Σ_k p_k = 1).
    mse_loss (ℓ_i = ½‖z_i − y_i‖²): H_i = I, S_i = I.
    Neither depends on the targets (cross-entropy's on none whose entries sum to one).

    Args:
      logits: z, floating [B, C].
      loss: one of LOSSES.

    Returns:
      S [B, C, C], S[i, :, k] the k-th column of example i's factor, in the logits' dtype.

    Derivation: derivations/curvature.md#the-loss-hessians-factor
    """
    _check_loss("loss_hessian_factor", loss)
    eye = jnp.eye(logits.shape[-1], dtype=logits.dtype)
    if loss == "mse_loss":
        return jnp.broadcast_to(eye, (*logits.shape, logits.shape[-1]))
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.sqrt(p)[:, None, :] * (eye - p[:, :, None])


def sampled_factor(logits: jax.Array, key: jax.Array, samples: int, loss: str = "softmax_cross_entropy") -> jax.Array:
    """A Monte Carlo factor S, [B, C, M], with E[S_i S_iᵀ] = H_i: M columns drawn from the model's own prediction.

    softmax_cross_entropy: ŷ_m ~ Categorical(softmax(z_i)), column (e_ŷ_m − p)/√M, since
    E[(e_ŷ − p)(e_ŷ − p)ᵀ] = Σ_k p_k (e_k − p)(e_k − p)ᵀ = diag(p) − p pᵀ.
    mse_loss: ŷ_m ~ N(z_i, I) (the Gaussian likelihood whose negative log is ℓ_i up to a
    constant), column (ŷ_m − z_i)/√M = ε_m/√M, E[ε εᵀ] = I.

    Args:
      logits: z, floating [B, C].
      key: a `jax.random` key.
      samples: M ≥ 1, a static Python int.
      loss: one of LOSSES.

    Returns:
      S [B, C, M], in the logits' dtype.

    Derivation: derivations/curvature.md#the-monte-carlo-factor-and-its-variance
    """
    _check_loss("sampled_factor", loss)
    _check_samples("sampled_factor", samples)
    batch, classes = logits.shape
    scale = 1.0 / jnp.sqrt(jnp.asarray(samples, logits.dtype))
    if loss == "mse_loss":
        return scale * jax.random.normal(key, (batch, classes, samples), logits.dtype)
    p = jax.nn.softmax(logits, axis=-1)
    labels = jax.random.categorical(key, logits, axis=-1, shape=(samples, batch))
    columns = jax.nn.one_hot(labels, classes, dtype=logits.dtype) - p  # [M, B, C]
    return scale * jnp.moveaxis(columns, 0, -1)


# -------------------------------------------------------------- the diagonals
def _pushed(name: str, model: models.Model, params, state, x, y, factor, kinds, loss: str, train: bool):
    """Each factor column pushed back through the tapped backward, under `jax.vmap`: a tree of
    `per_example.Quantities` (the `kinds` asked for, a tuple or a function of a leaf's path) per
    parameter leaf, each field with a leading axis over the K columns; or None where BatchNorm in
    training mode couples the examples (the caller decides: `_coupled_diagonal`, or refuse).

    `factor(logits) -> S [B, C, K]`. Column k enters as the logits' cotangent S[:, :, k]/√B, so
    example i's contribution to a parameter is J_iᵀ s_{i,k}/√B and its square carries the mean's 1/B.
    """
    _check_inputs(name, x, y, loss)
    try:
        logits, vjp = per_example.logits_vjp(model, params, state, x, kinds, train=train)
    except per_example.PerExampleError as err:
        if str(err) == per_example.BATCHNORM_MESSAGE:
            return None
        raise CurvatureError(f"{name}: {err}") from err
    _check_targets(name, logits, y, loss)
    columns = jnp.moveaxis(factor(logits), -1, 0) / jnp.sqrt(jnp.asarray(x.shape[0], logits.dtype))
    return per_example.split(jax.vmap(lambda ct: vjp(ct)[0])(columns))[1]


def _field(taps, kind: str):
    return jax.tree.map(lambda q: getattr(q, kind), taps, is_leaf=per_example.is_quantities)


def _refuse_coupled(name: str, taps):
    if taps is None:
        raise CurvatureError(f"{name}: {BATCHNORM_TRAIN_MESSAGE}")
    return taps


def _diagonal(name: str, model, params, state, x, y, factor, loss: str, train: bool):
    """Σ_k Σ_i (J_iᵀ s_{i,k})²/B from the `sum_sq` taps [K, *shape]; with BatchNorm in training
    mode, one backward per (example, column) instead (`_coupled_diagonal`)."""
    taps = _pushed(name, model, params, state, x, y, factor, ("sum_sq",), loss, train)
    if taps is None:
        return _coupled_diagonal(name, model, params, state, x, y, factor, loss, train)
    return jax.tree.map(lambda q: jnp.sum(q, axis=0), _field(taps, "sum_sq"))


def _coupled_diagonal(name: str, model: models.Model, params, state, x, y, factor, loss: str, train: bool):
    """diag G = Σ_j Σ_k (J_jᵀ s_{j,k}/√B)² where every logit depends on every example (BatchNorm in
    training mode): for each example j (a `lax.scan`), its K columns as logits' cotangents with
    row j alone filled, pushed back through the network's ordinary backward under `jax.vmap`, each
    whole gradient squared. B·K backward passes; J_j = ∂z_j/∂θ through the batch statistics.

    Derivation: derivations/curvature.md#batchnorm-in-training-mode
    """
    logits, pullback = jax.vjp(lambda p: model.apply(p, state, x, train=train)[0], params)
    _check_targets(name, logits, y, loss)
    batch = x.shape[0]
    columns = factor(logits) / jnp.sqrt(jnp.asarray(batch, logits.dtype))  # [B, C, K]

    def example(total, j):
        rows = jax.nn.one_hot(j, batch, dtype=logits.dtype)  # [B]
        cts = rows[None, :, None] * jnp.moveaxis(columns[j], -1, 0)[:, None, :]  # [K, B, C]: row j alone
        grads = jax.vmap(lambda ct: pullback(ct)[0])(cts)
        return jax.tree.map(lambda t, g: t + jnp.sum(g * g, axis=0), total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(example, zeros, jnp.arange(batch))[0]


def _batch_diagonal(taps):
    """Σ_k (J_iᵀ s_{i,k})²/B per example from the `grad` taps [K, B, *shape]."""
    return jax.tree.map(lambda g: jnp.sum(g * g, axis=0), _field(taps, "grad"))


def diag_ggn(
    model: models.Model, params, state, x, y, *, loss: str = "softmax_cross_entropy", train: bool = True
) -> Any:
    """The GGN's exact diagonal, diag G = (1/B) Σ_i Σ_k (J_iᵀ s_{i,k})², for the mean loss.

    G = (1/B) Σ_i J_iᵀ H_i J_i, J_i = ∂z_i/∂θ, H_i = S_i S_iᵀ (`loss_hessian_factor`, C columns).
    One forward with taps, then C backward passes of the batch, vmapped; each parameter's
    `sum_grad_squared` tap gives Σ_i (J_iᵀ s_{i,k}/√B)² for column k.

    Args:
      model, params, state: the network, as `models.Model.apply` takes them.
      x: inputs [B, ...].
      y: softmax_cross_entropy: integer labels [B] (G does not depend on them);
        mse_loss: targets [B, C] shaped like the logits.
      loss: one of LOSSES.
      train: False runs BatchNorm on its running statistics; True (default) with
        BatchNorm in the model computes diag G exactly for the coupled batch, from
        one backward of the ordinary rules per (example, column): B·C backward
        passes (`_coupled_diagonal`), against C for a model whose examples stay apart.

    Returns:
      A tree like `params`: each leaf diag G for that parameter.

    Derivation: derivations/curvature.md#diag_ggn
    """
    factor = lambda z: loss_hessian_factor(z, loss)
    return _diagonal("diag_ggn", model, params, state, x, y, factor, loss, train)


def diag_ggn_mc(
    model: models.Model,
    params,
    state,
    x,
    y,
    key: jax.Array,
    samples: int = 1,
    *,
    loss: str = "softmax_cross_entropy",
    train: bool = True,
) -> Any:
    """An unbiased Monte Carlo estimate of diag G from `samples` (M) labels drawn per example
    from the model's own prediction: (1/B) Σ_i (1/M) Σ_m (J_iᵀ (e_ŷ_{i,m} − p_i))² (`sampled_factor`).

    M backward passes of the batch, vmapped, instead of C (with BatchNorm in training mode,
    B·M backward passes, as `diag_ggn`). Its variance falls as 1/M
    (derivations/curvature.md#the-monte-carlo-factor-and-its-variance).

    Args:
      model, params, state, x, y, loss, train: as in `diag_ggn`.
      key: a `jax.random` key for the labels.
      samples: M ≥ 1, a static Python int.

    Returns:
      A tree like `params`.

    Derivation: derivations/curvature.md#diag_ggn_mc
    """
    _check_samples("diag_ggn_mc", samples)
    factor = lambda z: sampled_factor(z, key, samples, loss)
    return _diagonal("diag_ggn_mc", model, params, state, x, y, factor, loss, train)


def batch_diag_ggn(
    model: models.Model, params, state, x, y, *, loss: str = "softmax_cross_entropy", train: bool = True
) -> Any:
    """Each example's share of diag G: (1/B) diag(J_iᵀ H_i J_i), leaves `[B, *shape]`, summing over i to `diag_ggn`.

    BackPACK's BatchDiagGGNExact; here each share carries the mean's 1/B.
    From the per-example `batch_grad` taps of each column, squared and summed over the C
    columns; memory C·B·(parameters) for the taps. BatchNorm in training mode raises
    `CurvatureError`: its examples couple, so no example has a share of its own.

    Arguments as for `diag_ggn`.

    Returns:
      A tree like `params`, each leaf `[B, *param.shape]`.

    Derivation: derivations/curvature.md#batch_diag_ggn
    """
    factor = lambda z: loss_hessian_factor(z, loss)
    taps = _pushed("batch_diag_ggn", model, params, state, x, y, factor, ("grad",), loss, train)
    return _batch_diagonal(_refuse_coupled("batch_diag_ggn", taps))


def batch_diag_ggn_mc(
    model: models.Model,
    params,
    state,
    x,
    y,
    key: jax.Array,
    samples: int = 1,
    *,
    loss: str = "softmax_cross_entropy",
    train: bool = True,
) -> Any:
    """The Monte Carlo twin of `batch_diag_ggn`: (1/B)(1/M) Σ_m (J_iᵀ (e_ŷ_{i,m} − p_i))² per example.

    Arguments as for `diag_ggn_mc`.

    Returns:
      A tree like `params`, each leaf `[B, *param.shape]`; Σ_i is `diag_ggn_mc` with the same key.

    Derivation: derivations/curvature.md#batch_diag_ggn
    """
    _check_samples("batch_diag_ggn_mc", samples)
    factor = lambda z: sampled_factor(z, key, samples, loss)
    taps = _pushed("batch_diag_ggn_mc", model, params, state, x, y, factor, ("grad",), loss, train)
    return _batch_diagonal(_refuse_coupled("batch_diag_ggn_mc", taps))


# ---------------------------------------------------------- Kronecker factors
class Kronecker(NamedTuple):
    """A kernel's GGN block approximated as `jnp.kron(a, g)`, the kernel flattened to [d, p] row-major.

    a: [d, d] over the kernel's inputs (d = fan-in: a dense layer's inputs, a convolution's
      kh·kw·C patch in HWIO row order); g: [p, p] over its outputs.
    """

    a: jax.Array
    g: jax.Array


def _kronecker(name: str, model: models.Model, params, state, x, y, factor, loss: str, train: bool):
    """Every kernel (`model.spec.weight_paths()`) as `Kronecker(A, Σ_k G_k)` from its `kron` taps, and
    every other leaf as its diagonal Σ_k from its `sum_sq` taps, the columns k of `factor` pushed
    back under `jax.vmap` (`_pushed`). A = (1/(B·T)) Σ_{i,t} a aᵀ does not depend on the column."""
    kernels = {path for _, path in model.spec.weight_paths()}
    kinds = lambda path: ("kron",) if path in kernels else ("sum_sq",)
    taps = _refuse_coupled(name, _pushed(name, model, params, state, x, y, factor, kinds, loss, train))

    def one(q):
        if q.kron is None:
            return jnp.sum(q.sum_sq, axis=0)
        a, g = q.kron
        return Kronecker(a[0], jnp.sum(g, axis=0))

    return jax.tree.map(one, taps, is_leaf=per_example.is_quantities)


def kflr(model: models.Model, params, state, x, y, *, loss: str = "softmax_cross_entropy", train: bool = True) -> Any:
    """Kronecker factors of each kernel's GGN block from the exact factor (BackPACK's KFLR), and
    the exact diagonal (`diag_ggn`) of every other parameter, for the mean loss.

    For a kernel W [d, p] used as y_{i,t} = a_{i,t}·W at T positions per example (a dense layer:
    T = 1, or the middle positions of [B, ..., d]; a convolution: the output pixels, a_{i,t}
    the im2col patch; a projection: the output pixels), its GGN block is
    G_W = Σ_{i,k} Σ_{t,t'} (a_{i,t} a_{i,t'}ᵀ) ⊗ (δ_{i,t,k} δ_{i,t',k}ᵀ), δ_{·,k} the cotangent of its
    outputs when column k of the loss Hessian's factor, s_{·,k}/√B, enters at the logits. KFLR
    treats the positions like extra examples (the "expand" convention of Eschenhagen et al.
    2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures",
    as curvlinops' KFAC with `kfac_approx="expand"`) and factors the sum:

      G_W ≈ A ⊗ G,   A = (1/(B·T)) Σ_{i,t} a_{i,t} a_{i,t}ᵀ,   G = Σ_k Σ_{i,t} δ_{i,t,k} δ_{i,t,k}ᵀ,

    so the mean's 1/B sits in G (through the columns' 1/√B) and the 1/(B·T) of the average over
    rows in A. Exact where a has one row per example and is the same across columns: one
    example through a dense layer (B = T = 1) gives G_W = a aᵀ ⊗ Σ_k δ_k δ_kᵀ.
    Cost: one forward, C backward passes (vmapped), plus the factors' d² and p² per kernel.

    Args:
      model, params, state, x, y, loss, train: as in `diag_ggn` (BatchNorm in training mode raises
        `CurvatureError`: its examples couple).

    Returns:
      A tree like `params`: each dense, conv2d and projection kernel a `Kronecker(a [d, d], g [p, p])`,
      `jnp.kron(a, g)` ≈ its GGN block; every other leaf (biases, norm scales and shifts) its exact
      diagonal GGN, shaped like the leaf. A reversible stage's stacked kernel [n, ...] gets one
      pair per coupling, a [n, d, d] and g [n, p, p].

    Derivation: derivations/curvature.md#kflr
    """
    factor = lambda z: loss_hessian_factor(z, loss)
    return _kronecker("kflr", model, params, state, x, y, factor, loss, train)


def kfac(
    model: models.Model,
    params,
    state,
    x,
    y,
    key: jax.Array,
    samples: int = 1,
    *,
    loss: str = "softmax_cross_entropy",
    train: bool = True,
) -> Any:
    """KFAC (Martens and Grosse 2015): `kflr` with `samples` (M) sampled factor columns
    (`sampled_factor`, labels drawn from the model's own prediction), and `diag_ggn_mc`'s
    estimate for every leaf that is not a kernel. E[G] is KFLR's G and A is KFLR's A, so
    `jnp.kron(a, g)` is an unbiased estimate of KFLR's block, its error falling as 1/√M.

    Args:
      model, params, state, x, y, loss, train: as in `kflr`.
      key: a `jax.random` key for the labels.
      samples: M ≥ 1, a static Python int.

    Returns:
      A tree like `params`, as `kflr`'s.

    Derivation: derivations/curvature.md#kfac
    """
    _check_samples("kfac", samples)
    factor = lambda z: sampled_factor(z, key, samples, loss)
    return _kronecker("kfac", model, params, state, x, y, factor, loss, train)


# ------------------------------------------------------------------- ggn_vp
def ggn_vp(
    model: models.Model,
    params,
    state,
    x,
    y,
    v,
    *,
    loss: str = "softmax_cross_entropy",
    train: bool = True,
    grad: str | OpSet = "rules",
) -> Any:
    """G·v = Jᵀ (H/B) J v for the mean loss, matrix free and without forward mode.

    J·v comes from reverse mode alone: u ↦ Jᵀu (the network's VJP at the logits) is
    linear in u, so its own VJP with cotangent v is (Jᵀ)ᵀ v = J v. That differentiates
    the rules' backward passes (plain `jnp`), never a rule's forward in forward mode,
    which `custom_vjp` forbids. Then H_i = S_i S_iᵀ per example (`loss_hessian_factor`),
    the mean's 1/B, and one more VJP, Jᵀ. Cost: about three backward passes. J is the
    Jacobian of the batch's logits, so BatchNorm in training mode (examples coupled)
    is exact here too.

    Args:
      model, params, state, x, y, loss, train: as in `diag_ggn` (BatchNorm allowed in training mode).
      v: a tree of the structure and leaf shapes of `params`.
      grad: "rules" (default), "autodiff" or an `OpSet`, as in `models.Model.apply`.

    Returns:
      G·v, a tree like `params`.

    Derivation: derivations/curvature.md#ggn_vp
    """
    _check_like("ggn_vp", params, v)
    _check_inputs("ggn_vp", x, y, loss)
    logits, jvp, vjp = linearize(model, params, state, x, train=train, grad=grad)
    _check_targets("ggn_vp", logits, y, loss)
    factor = loss_hessian_factor(logits, loss)
    hjv = jnp.einsum("bck,bdk,bd->bc", factor, factor, jvp(v)) / x.shape[0]
    return vjp(hjv)


def linearize(
    model: models.Model, params, state, x, *, train: bool = True, grad: str | OpSet = "rules"
) -> tuple[jax.Array, Callable[[Any], jax.Array], Callable[[jax.Array], Any]]:
    """(z, v ↦ J v, u ↦ Jᵀ u): the batch's logits z = f(θ, x) and the two products with their
    Jacobian J = ∂z/∂θ, from reverse mode alone (what `jax.linearize` gives by forward mode,
    which the rules' `custom_vjp` refuse).

    u ↦ Jᵀu is the network's VJP at the logits, linear in u; the VJP of a linear map A is Aᵀ,
    so the VJP of u ↦ Jᵀu with cotangent v is (Jᵀ)ᵀ v = J v, at any u (zero is used). JAX builds
    it by differentiating the rules' backward passes, plain `jnp`, in reverse mode. Both maps
    can be vmapped (`jax.vmap`) over a leading axis of v or u.

    Args:
      model, params, state, x, train, grad: as in `ggn_vp`.

    Returns:
      (z [B, C], jvp: a tree like `params` -> [B, C], vjp: [B, C] -> a tree like `params`).

    Derivation: derivations/curvature.md#ggn_vp
    """
    logits, pullback = jax.vjp(lambda p: model.apply(p, state, x, train=train, grad=grad)[0], params)
    _, transpose = jax.vjp(lambda u: pullback(u)[0], jnp.zeros_like(logits))
    return logits, lambda v: transpose(v)[0], lambda u: pullback(u)[0]


# ------------------------------------------------------------------- checks
def _check_loss(name: str, loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"{name}: argument `loss` must be one of {LOSSES}, got {loss!r}")


def _check_samples(name: str, samples: int) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"{name}: argument `samples` must be a Python int ≥ 1, got {samples!r}")


def _check_inputs(name: str, x, y, loss: str) -> None:
    """x [B, ...] and y ([B] integer labels or [B, C] targets) sharing B; the loss is known."""
    _check_loss(name, loss)
    want = ("[B]", 1) if loss == "softmax_cross_entropy" else ("[B, C]", 2)
    x_shape, y_shape = tuple(getattr(x, "shape", ())), tuple(getattr(y, "shape", ()))
    if len(x_shape) < 1 or len(y_shape) != want[1] or x_shape[0] != y_shape[0]:
        raise ValueError(
            f"{name}: arguments `x` [B, ...] and `y` {want[0]} ({loss}) must share their leading batch axis, "
            f"got x {x_shape} and y {y_shape}"
        )
    if loss == "softmax_cross_entropy" and not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"{name}: argument `y` must hold integer labels for {loss}, got dtype {y.dtype}")


def _check_targets(name: str, logits, y, loss: str) -> None:
    if loss == "mse_loss" and y.shape != logits.shape:
        raise ValueError(
            f"{name}: argument `y` must be shaped like the outputs {logits.shape} for mse_loss, got {y.shape}"
        )
