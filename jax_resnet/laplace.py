"""A Laplace approximation of a trained classifier around its MAP parameters, from the GGN.

The posterior over the parameters θ of a network trained with softmax
cross-entropy on N examples is approximated by a Gaussian at the trained θ*,

  p(θ | D) ≈ N(θ*, P⁻¹),   P = Σ_n J_nᵀ H_n J_n + λ I,

the GGN of the summed loss (N times the mean-loss GGN that `jax_resnet.curvature`
returns per batch) plus the precision λ of an isotropic Gaussian prior
(MacKay 1992; Daxberger et al. 2021, "Laplace Redux"). Two structures:

  "diag"  the GGN's diagonal (`curvature.diag_ggn`, or `diag_ggn_mc` with `samples`),
          summed over the training batches: each batch's mean-loss diagonal times its size.
  "kfac"  per dense / conv2d / projection kernel a Kronecker block N·(A ⊗ G), A and G the
          batches' factors (`curvature.kflr`, or `curvature.kfac` with `samples`) averaged
          with weights B_b/N; every other parameter its diagonal. P's log-determinant and
          its samples come from the eigendecompositions of A and G: the block's eigenvalues
          are N·α_i·γ_j + λ, its eigenvectors q_i ⊗ r_j.

`subset` chooses which parameters get the posterior: "last_layer" (default: the head's
kernel and bias; every other parameter stays at θ*, a point mass) or "all". The last layer
is laplace-redux's default too (Daxberger et al. 2021 find it keeps most of the calibration
gain), and on MNIST here it keeps the MAP's accuracy where the diagonal over all parameters,
too wide in distribution, loses half a point (benchmarks/laplace_mnist.md). Everything below
is over the subset alone: P_n its size, ‖θ*‖² its squared norm.

The prior precision λ maximises the Laplace approximation of the log marginal likelihood
(`log_marginal_likelihood`), in closed form from P's eigenvalues:

  log p(D | λ) ≈ log p(D | θ*) − ½ λ ‖θ*‖² + ½ P_n log λ − ½ log det(GGN + λ I)

(P_n parameters; the 2π factors of prior and posterior cancel). Its derivative in log λ
is ½ (P_n − Σ_j λ/(e_j + λ) − λ ‖θ*‖²), decreasing in λ, so the maximum is the
derivative's one root, found by bisection in log λ (`optimize_prior_precision`).

Predictive (`predictive`): the average of softmax over logit samples. Default
"glm", the linearised network f(x, θ*) + J(x)(θ − θ*) with θ ~ N(θ*, P⁻¹)
(Immer et al. 2021; laplace-redux's default): a GGN Laplace is the exact Laplace
approximation of this linear model's posterior, and sampling the network itself
("nn") puts it where the quadratic approximation does not hold, which underfits
(Lawrence 2001; Immer et al. 2021 measure it). J·ε needs forward mode, which the
rules' `custom_vjp` refuse; `curvature.linearize` gets it from reverse mode
alone.

Also the metrics a predictive is judged by: accuracy, NLL and the expected
calibration error with its reliability diagram (`reliability`), and rotated test
images (`rotate`) for the data-shift study `study` runs on a `jax-resnet train`
run's directory (`jax-resnet laplace RUN_DIR`).

Derivation: derivations/curvature.md#laplace-approximation

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import laplace, models
    >>> model = models.residual_mlp(in_features=4, width=8, depth=1, out_features=3)
    >>> params, state = model.init(jax.random.key(0))
    >>> x, y = jnp.ones((6, 4), jnp.float32), jnp.arange(6) % 3
    >>> la = laplace.fit(model, params, state, [(x, y)])
    >>> la.n_data, la.structure, la.prior_precision > 0
    (6, 'diag', True)
    >>> laplace.predictive(la, x, jax.random.key(1), samples=8).shape
    (6, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import checkpoints, curvature, data, models

__all__ = [
    "STRUCTURES",
    "SUBSETS",
    "PREDICTIVES",
    "LOSS",
    "ECE_BINS",
    "ROTATIONS",
    "TABLE_HEADER",
    "KroneckerEig",
    "Laplace",
    "Reliability",
    "fit",
    "subset_mask",
    "ggn_eigenvalues",
    "log_marginal_likelihood",
    "optimize_prior_precision",
    "posterior_precision_diagonal",
    "sample_deviations",
    "linearised_logits",
    "network_logits",
    "predictive",
    "reliability",
    "metrics",
    "plot_reliability",
    "rotate",
    "evaluate",
    "study",
    "format_row",
    "format_table",
    "write",
]

STRUCTURES = ("diag", "kfac")
SUBSETS = ("all", "last_layer")
PREDICTIVES = ("glm", "nn")
LOSS = "softmax_cross_entropy"  # the likelihood: a categorical over the softmax of the logits
ECE_BINS = 15  # Guo et al. 2017's count of equal-width confidence bins


class KroneckerEig(NamedTuple):
    """A kernel's averaged Kronecker factors A [d, d] and G [p, p] by their eigendecompositions:
    A = a_vecs · diag(a_vals) · a_vecsᵀ, G likewise; the summed-loss block is N·(A ⊗ G)."""

    a_vals: jax.Array
    a_vecs: jax.Array
    g_vals: jax.Array
    g_vecs: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Laplace:
    """A fitted Laplace approximation: N(params, P⁻¹), P = (summed-loss GGN) + prior_precision · I.

    Fields:
      model, params, state, train: the network at its MAP parameters, as `models.Model.apply` takes them.
      structure: "diag" or "kfac".
      subset: "all" or "last_layer".
      ggn: a tree like `params` of the summed-loss GGN: diagonal arrays shaped like their leaves,
        and, for "kfac", `KroneckerEig` leaves of the averaged factors at the kernels.
      mask: a tree of bools like `params`: True where a leaf has a posterior (`subset`), False
        where it stays at θ*.
      n_data: N, the training examples it was fitted on.
      log_likelihood: log p(D | θ*) = −Σ_n ℓ_n(θ*), the summed cross-entropy's negative.
      prior_precision: λ.
    """

    model: models.Model
    params: Any
    state: Any
    train: bool
    structure: str
    subset: str
    ggn: Any
    mask: Any
    n_data: int
    log_likelihood: float
    prior_precision: float

    @property
    def num_params(self) -> int:
        """The number of parameters with a posterior, P_n."""
        return sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(self.params), jax.tree.leaves(self.mask)) if m)

    def __repr__(self) -> str:
        return (
            f"Laplace(model={self.model.name!r}, structure={self.structure!r}, subset={self.subset!r}, "
            f"n_data={self.n_data}, prior_precision={self.prior_precision:.4g}, parameters={self.num_params})"
        )


def _is_eig(leaf) -> bool:
    return isinstance(leaf, KroneckerEig)


def _is_kronecker(leaf) -> bool:
    return isinstance(leaf, curvature.Kronecker)


# ------------------------------------------------------------------ fitting
@functools.lru_cache(maxsize=16)
def _batch_curvature(model, structure: str, samples: int | None, train: bool) -> Callable:
    """jitted (params, state, x, y, key) -> (mean-loss curvature tree of the batch, Σ_i log p(y_i | x_i))."""

    def one(params, state, x, y, key):
        kw = dict(loss=LOSS, train=train)
        if structure == "diag":
            ggn = (
                curvature.diag_ggn(model, params, state, x, y, **kw)
                if samples is None
                else curvature.diag_ggn_mc(model, params, state, x, y, key, samples, **kw)
            )
        else:
            ggn = (
                curvature.kflr(model, params, state, x, y, **kw)
                if samples is None
                else curvature.kfac(model, params, state, x, y, key, samples, **kw)
            )
        logits = model.apply(params, state, x, train=train)[0]
        log_lik = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))
        return ggn, log_lik

    return jax.jit(one)


def fit(
    model: models.Model,
    params,
    state,
    batches: Iterable[tuple[Any, Any]],
    *,
    structure: str = "diag",
    subset: str = "last_layer",
    samples: int | None = None,
    key: jax.Array | None = None,
    prior_precision: float | None = None,
    train: bool = False,
) -> Laplace:
    """The Laplace approximation of a trained classifier over the training set `batches`.

    Each batch b of B_b examples gives its mean-loss curvature; the summed-loss GGN is
    Σ_b B_b·diag_b ("diag"), or N·(A ⊗ G) with A = Σ_b (B_b/N)·a_b and G likewise at
    each kernel ("kfac"; other leaves as "diag").

    Args:
      model, params, state: the trained network (`params` its MAP estimate).
      batches: an iterable of (x [B, ...], y [B] integer labels), together the training set
        (each example once; batches may differ in size).
      structure: "diag" or "kfac".
      subset: "last_layer" (default) or "all": the parameters that get a posterior (the last
        layer: the parameters beside the model's last kernel, `spec.weight_paths()[-1]`); the
        curvature costs the same either way.
      samples: None (default) for the exact GGN (`diag_ggn` / `kflr`: C backward passes per
        batch), or M ≥ 1 labels drawn per example (`diag_ggn_mc` / `kfac`: M passes).
      key: a `jax.random` key; required with `samples`.
      prior_precision: λ; None (default) fits it by the marginal likelihood
        (`optimize_prior_precision`).
      train: BatchNorm on batch statistics (True) or running statistics (False, default: the
        network as it is evaluated; the diagonals refuse True with BatchNorm).

    Returns:
      A `Laplace`.

    Derivation: derivations/curvature.md#laplace-approximation
    """
    if structure not in STRUCTURES:
        raise ValueError(f"fit: argument `structure` must be one of {STRUCTURES}, got {structure!r}")
    if subset not in SUBSETS:
        raise ValueError(f"fit: argument `subset` must be one of {SUBSETS}, got {subset!r}")
    if samples is not None:
        _check_samples("fit", samples)
        if key is None:
            raise ValueError("fit: argument `key` is required with `samples` (the labels are drawn)")
    if prior_precision is not None:
        _check_precision("fit", prior_precision)
    one = _batch_curvature(model, structure, samples, train)
    total, n, log_lik = None, 0, 0.0
    for b, (x, y) in enumerate(batches):
        x, y = jnp.asarray(x), jnp.asarray(y)
        if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0] or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(
                f"fit: argument `batches`: batch {b} must be (x [B, ...], y [B] integer labels), "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)} {y.dtype}"
            )
        batch_key = jax.random.fold_in(key, b) if key is not None else jax.random.key(0)
        ggn, ll = one(params, state, x, y, batch_key)
        weighted = jax.tree.map(lambda c, m=x.shape[0]: m * c, ggn)
        total = weighted if total is None else jax.tree.map(jnp.add, total, weighted)
        n += int(x.shape[0])
        log_lik += float(ll)
    if n == 0:
        raise ValueError("fit: argument `batches` holds no examples")
    ggn = jax.tree.map(lambda c: _decompose(c, n) if _is_kronecker(c) else c, total, is_leaf=_is_kronecker)
    la = Laplace(
        model, params, state, train, structure, subset, ggn, subset_mask(model, params, subset), n, log_lik, 1.0
    )
    if prior_precision is None:
        prior_precision = optimize_prior_precision(la)
    return dataclasses.replace(la, prior_precision=float(prior_precision))


def subset_mask(model: models.Model, params, subset: str) -> Any:
    """A tree of bools like `params`: everywhere ("all"), or at the leaves beside the model's last
    kernel ("last_layer": `spec.weight_paths()[-1]` without its leaf name, e.g. ("head",) -> head/w and head/b)."""
    if subset == "all":
        return jax.tree.map(lambda _: True, params)
    _, last = model.spec.weight_paths()[-1]
    parent = tuple(last[:-1])

    def inside(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        return keys[: len(parent)] == parent

    return jax.tree_util.tree_map_with_path(inside, params)


def _decompose(weighted, n: int) -> KroneckerEig:
    """Σ_b B_b·(a_b, g_b) -> the eigendecompositions of the averages A = Σ_b (B_b/N) a_b, G likewise."""
    a_vals, a_vecs = jnp.linalg.eigh(weighted.a / n)
    g_vals, g_vecs = jnp.linalg.eigh(weighted.g / n)
    # Round-off can leave a PSD factor's smallest eigenvalues slightly negative.
    return KroneckerEig(jnp.maximum(a_vals, 0.0), a_vecs, jnp.maximum(g_vals, 0.0), g_vecs)


# ------------------------------------------------- marginal likelihood and λ
def ggn_eigenvalues(la: Laplace) -> np.ndarray:
    """Every eigenvalue e_j of the summed-loss GGN approximation, float64 [P_n]: the diagonal
    entries, and N·α_i·γ_j for each Kronecker block."""

    def values(leaf):
        if _is_eig(leaf):
            return la.n_data * np.outer(np.asarray(leaf.a_vals, np.float64), np.asarray(leaf.g_vals, np.float64))
        return np.asarray(leaf, np.float64)

    leaves, masks = jax.tree.leaves(la.ggn, is_leaf=_is_eig), jax.tree.leaves(la.mask)
    return np.concatenate([values(v).ravel() for v, m in zip(leaves, masks) if m])


def _squared_norm(la: Laplace) -> float:
    """‖θ*‖² over the subset."""
    leaves = zip(jax.tree.leaves(la.params), jax.tree.leaves(la.mask))
    return float(sum(np.sum(np.asarray(p, np.float64) ** 2) for p, m in leaves if m))


def log_marginal_likelihood(la: Laplace, prior_precision: float | None = None) -> float:
    """The Laplace approximation of log p(D | λ) (float64):

      log p(D | θ*) − ½ λ ‖θ*‖² + ½ P_n log λ − ½ Σ_j log(e_j + λ),

    e_j the GGN's eigenvalues (`ggn_eigenvalues`), P_n the number of parameters.

    Args:
      la: a fitted `Laplace`.
      prior_precision: λ > 0; default `la.prior_precision`.

    Derivation: derivations/curvature.md#the-marginal-likelihood-and-the-prior-precision
    """
    lam = la.prior_precision if prior_precision is None else prior_precision
    _check_precision("log_marginal_likelihood", lam)
    e = ggn_eigenvalues(la)
    log_det_ratio = np.sum(np.log(e + lam)) - e.size * math.log(lam)
    return float(la.log_likelihood - 0.5 * (log_det_ratio + lam * _squared_norm(la)))


def optimize_prior_precision(la: Laplace, *, low: float = 1e-8, high: float = 1e8, tol: float = 1e-10) -> float:
    """The λ maximising `log_marginal_likelihood`: the root of its derivative in t = log λ,

      d/dt = ½ (P_n − Σ_j λ/(e_j + λ) − λ ‖θ*‖²),

    which falls monotonically in λ (MacKay's γ = Σ_j e_j/(e_j + λ) = λ‖θ*‖² at the root), by
    bisection in log λ on [low, high] to a relative width `tol`. Returns `low` or `high` when
    the root lies beyond (e.g. θ* = 0 has none: λ → ∞).
    """
    e, norm = ggn_eigenvalues(la), _squared_norm(la)
    slope = lambda lam: e.size - np.sum(lam / (e + lam)) - lam * norm
    lo, hi = math.log(low), math.log(high)
    if slope(low) <= 0:
        return low
    if slope(high) >= 0:
        return high
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(math.exp(mid)) > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


# ------------------------------------------------------------------ sampling
def posterior_precision_diagonal(la: Laplace) -> Any:
    """P's diagonal as a tree like `params`: GGN diagonal + λ at diagonal leaves; at a Kronecker
    leaf, N·diag(A)⊗diag(G) + λ reshaped to the kernel (the block's own diagonal); +∞ outside
    the subset (a point mass at θ*)."""

    def diagonal(leaf, p, inside):
        if not inside:
            return jnp.full(p.shape, jnp.inf, p.dtype)
        if _is_eig(leaf):
            a_diag = jnp.einsum("ik,k,ik->i", leaf.a_vecs, leaf.a_vals, leaf.a_vecs)
            g_diag = jnp.einsum("ik,k,ik->i", leaf.g_vecs, leaf.g_vals, leaf.g_vecs)
            return (la.n_data * jnp.outer(a_diag, g_diag) + la.prior_precision).reshape(p.shape)
        return leaf + la.prior_precision

    return jax.tree.map(diagonal, la.ggn, la.params, la.mask, is_leaf=_is_eig)


def sample_deviations(la: Laplace, key: jax.Array, samples: int) -> Any:
    """`samples` draws of θ − θ* ~ N(0, P⁻¹), a tree like `params` with a leading axis [S].

    Diagonal leaves: z / √(e + λ). Kronecker leaves: Q_A (Z ⊘ √Λ) Q_Gᵀ, Λ_ij = N·α_i·γ_j + λ,
    Z standard normal [d, p]; its covariance (Q_A ⊗ Q_G) Λ⁻¹ (Q_A ⊗ Q_G)ᵀ is the block's P⁻¹
    (row-major flattening of the [d, p] kernel, as `kron(A, G)` indexes it). Zero outside the subset.
    """
    _check_samples("sample_deviations", samples)
    leaves, treedef = jax.tree.flatten(la.ggn, is_leaf=_is_eig)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(la.params)]
    keys = jax.random.split(key, len(leaves))
    lam = la.prior_precision

    def draw(leaf, shape, k, inside):
        if not inside:
            return jnp.zeros((samples, *shape), jax.tree.leaves(leaf)[0].dtype)
        if _is_eig(leaf):
            d, p = leaf.a_vals.shape[0], leaf.g_vals.shape[0]
            z = jax.random.normal(k, (samples, d, p), leaf.a_vecs.dtype)
            scale = 1.0 / jnp.sqrt(la.n_data * jnp.outer(leaf.a_vals, leaf.g_vals) + lam)
            return jnp.einsum("ij,sjk,lk->sil", leaf.a_vecs, z * scale, leaf.g_vecs).reshape(samples, *shape)
        z = jax.random.normal(k, (samples, *shape), leaf.dtype)
        return z / jnp.sqrt(leaf + lam)

    drawn = [draw(*args) for args in zip(leaves, shapes, keys, jax.tree.leaves(la.mask))]
    return jax.tree.unflatten(treedef, drawn)


# --------------------------------------------------------------- predictive
def linearised_logits(la: Laplace, x, deviations) -> jax.Array:
    """f(x, θ*) + J(x)·ε for each draw ε of `deviations` (leading axis S): [S, B, C].

    J·ε by `curvature.linearize`, reverse mode only, one transpose per draw (vmapped).
    """
    return _linearised(la.model, la.train)(la.params, la.state, x, deviations)


def network_logits(la: Laplace, x, deviations) -> jax.Array:
    """f(x, θ* + ε) for each draw ε of `deviations`: [S, B, C], the network itself at sampled parameters."""
    return _network(la.model, la.train)(la.params, la.state, x, deviations)


@functools.lru_cache(maxsize=16)
def _linearised(model, train):
    def logits(params, state, x, deviations):
        z, jvp, _ = curvature.linearize(model, params, state, x, train=train)
        return z + jax.vmap(jvp)(deviations)

    return jax.jit(logits)


@functools.lru_cache(maxsize=16)
def _network(model, train):
    def logits(params, state, x, deviations):
        one = lambda eps: model.apply(jax.tree.map(jnp.add, params, eps), state, x, train=train)[0]
        return jax.vmap(one)(deviations)

    return jax.jit(logits)


def predictive(la: Laplace, x, key: jax.Array, samples: int = 100, *, method: str = "glm") -> jax.Array:
    """The posterior predictive p(y | x, D) ≈ (1/S) Σ_s softmax(logits_s): [B, C].

    Args:
      la: a fitted `Laplace`.
      x: inputs [B, ...].
      key: a `jax.random` key for the S parameter draws (`sample_deviations`).
      samples: S ≥ 1.
      method: "glm" (default; `linearised_logits`: the linearised network, whose posterior the
        GGN Laplace approximates) or "nn" (`network_logits`: the network at sampled parameters).
    """
    _check_method("predictive", method)
    deviations = sample_deviations(la, key, samples)
    logits = (linearised_logits if method == "glm" else network_logits)(la, x, deviations)
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)


# ------------------------------------------------------------------ metrics
class Reliability(NamedTuple):
    """Equal-width confidence bins of a predictive (`reliability`).

    Bin m holds the predictions whose confidence (top probability) lies in [m/M, (m+1)/M),
    the last bin closed at 1. `confidence` and `accuracy` are each bin's means (NaN where
    `counts` is 0); `ece` = `Σ_m (counts_m / n)·|accuracy_m − confidence_m|`.
    """

    edges: np.ndarray  # [M + 1]
    confidence: np.ndarray  # [M]
    accuracy: np.ndarray  # [M]
    counts: np.ndarray  # [M], int (not `count`: a NamedTuple has a method of that name)
    ece: float


def reliability(probs, labels, bins: int = ECE_BINS) -> Reliability:
    """The reliability diagram's bins and the expected calibration error (Guo et al. 2017).

    Args:
      probs: predictive probabilities [n, C] (rows summing to one).
      labels: integer labels [n].
      bins: M ≥ 1 equal-width bins over [0, 1] (default 15).
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"reliability: arguments `probs` [n, C] and `labels` [n] must share n, got {probs.shape} and {labels.shape}"
        )
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"reliability: argument `bins` must be an int ≥ 1, got {bins!r}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, bins) / count
        mean_acc = np.bincount(index, correct, bins) / count
    gaps = np.where(count > 0, np.abs(mean_acc - mean_conf), 0.0)
    ece = float(np.sum(count * gaps) / len(labels))
    return Reliability(np.linspace(0.0, 1.0, bins + 1), mean_conf, mean_acc, count, ece)


def metrics(probs, labels, bins: int = ECE_BINS) -> dict[str, float]:
    """{"accuracy", "nll" (mean −log p_y), "ece"} of predictive probabilities [n, C]."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    p_true = np.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    nll = float(np.mean(-np.log(np.maximum(p_true, np.finfo(np.float64).tiny))))
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    return {"accuracy": accuracy, "nll": nll, "ece": reliability(probs, labels, bins).ece}


def plot_reliability(ax, diagrams: dict[str, Reliability]) -> None:
    """Draw reliability diagrams on a matplotlib `ax`: each bin's accuracy against its mean
    confidence, one line per entry (label: its name and ECE), and the diagonal of perfect calibration."""
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    for name, r in diagrams.items():
        used = r.counts > 0
        ax.plot(r.confidence[used], r.accuracy[used], marker="o", ms=3, label=f"{name} (ECE {r.ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize="small")


# -------------------------------------------------------------- data shift
def rotate(x, degrees: float, fill: Sequence[float] | float = 0.0) -> jax.Array:
    """Images x [N, H, W, C] rotated counter-clockwise by `degrees` about their centres
    (`dm_pix.rotate`, bilinear), the corners filled with `fill` per channel (e.g. a data set's
    black, `Dataset.augmentation.fill`). The rotation is linear in the image, so rotating
    x − fill with zeros outside and adding fill back fills with `fill` exactly."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"rotate: argument `x` must be images [N, H, W, C], got shape {tuple(x.shape)}")
    background = jnp.broadcast_to(jnp.asarray(fill, x.dtype), (x.shape[-1],))
    angle = math.radians(degrees)
    turned = jax.vmap(lambda im: pix.rotate(im - background, angle, mode="constant", cval=0.0))(x)
    return turned + background


# ------------------------------------------------------- the study on a run
def _predict_batches(fn, x, batch_size):
    return np.concatenate([np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def evaluate(
    la: Laplace,
    x,
    y,
    key: jax.Array,
    *,
    samples: int = 100,
    method: str = "glm",
    batch_size: int = 500,
    bins: int = ECE_BINS,
) -> dict[str, dict]:
    """MAP against Laplace on (x, y): {"map": metrics, "laplace": metrics}, plus each one's
    `Reliability` under "reliability". One draw of S deviations serves every batch."""
    _check_method("evaluate", method)
    deviations = sample_deviations(la, key, samples)
    logits = linearised_logits if method == "glm" else network_logits
    forward = _map_probs(la.model, la.train)
    map_probs = _predict_batches(lambda xb: forward(la.params, la.state, xb), x, batch_size)
    la_probs = _predict_batches(
        lambda xb: jnp.mean(jax.nn.softmax(logits(la, xb, deviations), axis=-1), axis=0), x, batch_size
    )
    return {
        "map": metrics(map_probs, y, bins),
        "laplace": metrics(la_probs, y, bins),
        "reliability": {"map": reliability(map_probs, y, bins), "laplace": reliability(la_probs, y, bins)},
    }


@functools.lru_cache(maxsize=16)
def _map_probs(model, train):
    return jax.jit(lambda params, state, x: jax.nn.softmax(model.apply(params, state, x, train=train)[0], axis=-1))


ROTATIONS = (0, 15, 30, 45, 60, 90, 120, 150, 180)


def study(
    run_dir: str | os.PathLike,
    *,
    structure: str = "diag",
    subset: str = "last_layer",
    rotations: Sequence[float] = ROTATIONS,
    samples: int = 100,
    method: str = "glm",
    curvature_samples: int | None = None,
    prior_precision: float | None = None,
    batch_size: int = 500,
    test_examples: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a Laplace approximation to a `jax-resnet train` run and compare it with the MAP network.

    Reads the run's newest checkpoint and config (model, data set, data folder, seed), fits on the
    training set (batches of `batch_size`, in order), and evaluates on the test set rotated by each
    of `rotations` degrees (`rotate`, black corners). Returns the JSON-ready result; `write` saves it.
    """
    started = time.perf_counter()
    tree, meta = checkpoints.load(run_dir)
    config = meta["config"]
    ds = data.load(config["dataset"], config.get("data_dir"), seed=config.get("seed", 0))
    model = models.get(config["model"]).for_data(ds.image_shape, ds.num_classes)
    params, state = tree["params"], tree["state"]
    key = jax.random.key(seed)
    fit_key, eval_key = jax.random.split(key)
    batches = data.batches(ds.x_train, ds.y_train, batch_size, key_or_seed=None, shuffle=False, drop_last=False)
    la = fit(
        model,
        params,
        state,
        batches,
        structure=structure,
        subset=subset,
        samples=curvature_samples,
        key=fit_key if curvature_samples else None,
        prior_precision=prior_precision,
    )
    fit_s = time.perf_counter() - started
    log(
        f"{model.name} from {run_dir} (step {meta['step']}): {structure} Laplace of {subset} ({la.num_params:,} "
        f"parameters) on {la.n_data} {ds.name} training "
        f"examples in {fit_s:.1f} s; prior precision {la.prior_precision:.4g} "
        f"({'fixed' if prior_precision else 'marginal likelihood'}), log marginal likelihood "
        f"{log_marginal_likelihood(la):.1f}"
    )
    x_test, y_test = ds.x_test[:test_examples], ds.y_test[:test_examples]
    fill = ds.augmentation.fill
    rows, diagrams = [], {}
    for degrees in rotations:
        result = evaluate(la, rotate(x_test, degrees, fill), y_test, eval_key, samples=samples, method=method)
        diagrams[degrees] = result.pop("reliability")
        rows.append({"degrees": degrees, **result})
        log(format_row(rows[-1]))
    return {
        "run_dir": str(run_dir),
        "model": model.name,
        "dataset": ds.name,
        "step": meta["step"],
        "structure": structure,
        "subset": subset,
        "posterior_params": la.num_params,
        "curvature": "exact" if curvature_samples is None else f"monte carlo, {curvature_samples} sample(s)",
        "predictive": method,
        "predictive_samples": samples,
        "prior_precision": la.prior_precision,
        "prior_precision_source": "fixed" if prior_precision else "marginal likelihood",
        "log_marginal_likelihood": log_marginal_likelihood(la),
        "n_train": la.n_data,
        "n_test": len(y_test),
        "ece_bins": ECE_BINS,
        "seed": seed,
        "rotations": rows,
        "reliability": {
            str(d): {"map": _bins_json(r["map"]), "laplace": _bins_json(r["laplace"])} for d, r in diagrams.items()
        },
        "timing_s": {"fit": fit_s, "total": time.perf_counter() - started},
    }


def _bins_json(r: Reliability) -> dict:
    nan_to_none = lambda a: [None if not np.isfinite(v) else float(v) for v in a]
    return {"confidence": nan_to_none(r.confidence), "accuracy": nan_to_none(r.accuracy), "count": r.counts.tolist()}


TABLE_HEADER = "rotation   accuracy MAP / LA      NLL MAP / LA       ECE MAP / LA"


def format_row(row: dict) -> str:
    m, a = row["map"], row["laplace"]
    return (
        f"{row['degrees']:>6g}°   {m['accuracy']:8.4f} / {a['accuracy']:.4f}   {m['nll']:7.4f} / {a['nll']:.4f}   "
        f"{m['ece']:7.4f} / {a['ece']:.4f}"
    )


def format_table(result: dict) -> str:
    return "\n".join([TABLE_HEADER, *map(format_row, result["rotations"])])


def write(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` as JSON to `path` atomically: a temporary file beside it, renamed over it once whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_precision(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: argument `prior_precision` must be a finite number > 0, got {value!r}")


def _check_samples(name: str, samples) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"{name}: argument `samples` must be a Python int ≥ 1, got {samples!r}")


def _check_method(name: str, method: str) -> None:
    if method not in PREDICTIVES:
        raise ValueError(f"{name}: argument `method` must be one of {PREDICTIVES}, got {method!r}")
