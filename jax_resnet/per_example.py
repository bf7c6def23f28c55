"""Per-example quantities from one forward and one backward pass of the rules.

`jax.grad` returns the batch's gradient, a sum over examples. Because every
backward pass here is hand-written, each parameterised rule can also return,
from the activations it saved and the cotangent it receives, what each example
contributed (BackPACK's first-order extensions, Dangel et al. 2020):

  batch_grad         g_i = ∇ℓ_i for every example i        [B, *param.shape] per leaf
  batch_l2           ‖g_i‖² per example and leaf            [B] per leaf
  sum_grad_squared   Σ_i g_i², elementwise                   param.shape per leaf
  variance           (1/B) Σ_i g_i² − ḡ², ḡ = (1/B) Σ_i g_i   param.shape per leaf

where ℓ_i is example i's softmax cross-entropy and the training loss is their
mean, L = (1/B) Σ_i ℓ_i, so Σ_i g_i / B is `jax.grad` of L (returned too).

How the quantities leave a `custom_vjp` backward: every parameter leaf p is
replaced by `Tapped(p, tap)`, `tap` a zero array shaped like the quantity.
`per_example_ops` is an `OpSet` generated from the ops' specs (`ops.SPECS`):
every op whose spec has `contributions` (dense, conv2d, projection, group_norm,
layer_norm and batch_norm_eval, BatchNorm on running statistics, reached with
`logits_vjp(..., train=False)`) accepts `Tapped` parameters and calls one
generic core, `_tapped`, with the taps as extra arguments; its forward is the
rule's forward (`spec.fwd`) and its backward is the rule's backward
(`spec.bwd`) plus the quantities, returned as the taps' cotangents, computed
from what the op says each example contributes at each position
(`spec.contributions`: a `contributions.Weight` or `.Vector` per parameter).
So `jax.grad` with respect to the tapped parameters gives the ordinary gradient
(the `value` fields) and the quantities (the `tap` fields) from the model's own
`spec.forward`, one forward and one backward, no `vmap` of the model, under
`jit` or not. The ordinary rules are untouched, and an op with parameters adds
its `PARAMS` entry and `<name>_contributions` in its own module, nothing here.

Inside a backward, a layer sees a = its inputs at T positions (T = 1 for a
dense layer on [B, d], the output pixels for a convolution, whose a_{i,t} is
the im2col patch) and δ = the cotangent of its outputs, which carries the
loss's 1/B. Its weight's contribution from example i is Σ_t a_{i,t}ᵀ δ_{i,t}
= g_i / B (for a convolution formed without patches, by one convolution with
the examples as feature groups). Squared norms take the cheaper (in memory)
of two forms per layer: instantiating the B contributions (d·p numbers per
example) or the Gram form ‖Σ_t a_tᵀδ_t‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t') (the
inputs at T positions and two T×T matrices per example); `norm_path` chooses:
"auto" takes the Gram form when T·d + 2·T² ≤ d·p (`use_gram`).

DP-SGD's clipped sum (`jax_resnet.dp.clipped_grad_sum`) keeps each example's contribution
where the backward instantiates it anyway, and a Gram-form dense or projection
kernel's inputs and output cotangents, and sums them with the clip factors
once the norms are known (book-keeping); Gram-form convolutions get theirs
from a second backward that XLA cuts off below them.

BatchNorm in training mode normalises with statistics of the whole batch, so
an example's gradient depends on the other examples: asking for per-example
quantities of such a model raises `PerExampleError`; the GroupNorm presets
(`resnet20_gn`, `resnet18_gn`) are the per-example-friendly twins.

Derivation: derivations/per_example.md.

    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import models, per_example
    >>> model = models.residual_mlp(in_features=4, width=8, depth=1, out_features=3)
    >>> params, state = model.init(jax.random.key(0))
    >>> x, y = jnp.ones((5, 4), jnp.float32), jnp.arange(5) % 3
    >>> out = per_example.batch_l2(model, params, state, x, y)
    >>> per_example.total(out.value).shape
    (5,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet import models
from jax_resnet.ops import RULES, SPECS, OpSet, OpSpec, contributions

__all__ = [
    "QUANTITIES",
    "NORM_PATHS",
    "KINDS",
    "PerExampleError",
    "BATCHNORM_MESSAGE",
    "Tapped",
    "Quantities",
    "TapConfig",
    "PerExample",
    "LayerCost",
    "use_gram",
    "per_example_ops",
    "tap",
    "split",
    "check_batch",
    "logits_vjp",
    "loss_cotangent",
    "is_quantities",
    "quantities",
    "per_device",
    "batch_grad",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "total",
    "norm_costs",
    "gram_kernels",
    "check_model",
]

QUANTITIES = ("batch_grad", "batch_l2", "sum_grad_squared", "variance")
NORM_PATHS = ("auto", "gram", "grads")


class PerExampleError(ValueError):
    """The model or the request has no per-example quantities (e.g. BatchNorm in training mode)."""


BATCHNORM_MESSAGE = (
    "per-example quantities: the model uses BatchNorm in training mode, whose mean and variance are taken over "
    "the whole batch. Each example's gradient of its own loss exists, but one backward pass of the batch cannot "
    "separate it (the cotangent reaching one example's activations carries every example's loss), and changing "
    "one example changes every other example's gradient, so clipping each gradient does not bound one example's "
    "influence on the step; use a GroupNorm model (presets resnet20_gn, resnet18_gn, or norm='group' on "
    "cifar_resnet / imagenet_resnet)"
)


class Tapped(NamedTuple):
    """A parameter with a zero-valued tap; the tap's cotangent is the parameter's per-example quantity."""

    value: jax.Array
    tap: jax.Array


KINDS = ("grad", "l2", "sum_sq", "io", "kron")


class Quantities(NamedTuple):
    """One leaf's tap (zeros) or its cotangent: a field per kind asked for, None for the others.

    grad: `[B, *shape]`, example i's contribution G_i; l2: [B], ‖G_i‖²; sum_sq: shape, Σ_i G_i²;
    io: (a [B, T, d], δ [B, T, p]), a dense or projection kernel's inputs and output
    cotangents at its T positions, G_i = Σ_t a_{i,t}ᵀ δ_{i,t} (DP-SGD's book-keeping);
    kron: (A [d, d], G [p, p]) of a weight used as y = a·W, A = (1/(B·T)) Σ_{i,t} a aᵀ,
    G = Σ_{i,t} δ δᵀ (curvature's KFAC and KFLR; a kernel [..., p] has d = its size / p).
    """

    grad: jax.Array | None = None
    l2: jax.Array | None = None
    sum_sq: jax.Array | None = None
    io: tuple[jax.Array, jax.Array] | None = None
    kron: tuple[jax.Array, jax.Array] | None = None


class TapConfig(NamedTuple):
    """What the taps carry, static: `kinds`, a tuple of KINDS; `norm_path` for l2 (see `use_gram`)."""

    kinds: tuple[str, ...]
    norm_path: str = "auto"


# ---------------------------------------------------------- per-layer algebra
def use_gram(positions: int, d: int, p: int, norm_path: str = "auto") -> bool:
    """Whether a weight [d, p] used at `positions` (T) positions takes the Gram form for its norms.

    Memory per example, beyond what the backward holds anyway: the Gram form
    needs the layer's inputs at the T positions (for a convolution the im2col
    patches, a new array) and the a·a and δ·δ matrices, T·d + 2·T²; the
    instantiated form holds the example's gradient, d·p. "auto" takes the Gram
    form when T·d + 2·T² ≤ d·p. For a dense layer the T·d charge overcounts (its
    input is held anyway). Multiply-adds per example, T²·(d + p) against T·d·p,
    can disagree: the two criteria differ by 2·T² against T·p, so where 2·T > p
    memory is the stricter (ResNet-18-GN's stage-3 first conv, T = 196, d = 1152,
    p = 256, instantiates though the Gram form needs fewer multiply-adds);
    "auto" follows memory (derivations/per_example.md#batch_l2).
    """
    if norm_path == "auto":
        return positions * d + 2 * positions * positions <= d * p
    return norm_path == "gram"


def _quantities(form, config: TapConfig, op: str) -> Quantities:
    """One parameter's quantities from its contribution form (`contributions.Weight` or `.Vector`)."""
    if isinstance(form, contributions.Weight):
        if "io" in config.kinds and callable(form.inputs):
            raise PerExampleError(f"per-example quantities: {op} keeps no inputs and cotangents (kind 'io')")
        return _weight_quantity(form.inputs, form.delta, config, form.grads)
    unsupported = [k for k in ("io", "kron") if k in config.kinds]
    if unsupported:
        raise PerExampleError(
            f"per-example quantities: a parameter of {op} is applied elementwise; kinds {unsupported} "
            "are for weights used as y = a·W"
        )
    return _vector_quantity(form.per_example(), config)


def _weight_quantity(a, delta, config: TapConfig, grads=None) -> Quantities:
    """The quantities of W [d, p] in y_t = a_t·W at T positions (a `contributions.Weight`).

    a: [B, T, d], or a function giving it, called only where a kind needs it (a
    convolution's patches are a new array); δ: [B, T, p]. Example i contributes
    G_i = Σ_t a_{i,t}ᵀ δ_{i,t}, [d, p]; `grads`, if given, is a function giving
    the contributions in the kernel's layout without a (a convolution's:
    `conv2d_contributions`). kron: the Kronecker factors of the "expand"
    convention, (1/(B·T)) Σ_{i,t} a_{i,t} a_{i,t}ᵀ [d, d] and Σ_{i,t} δ_{i,t} δ_{i,t}ᵀ [p, p]
    (derivations/curvature.md#kflr).
    """
    batch, t, d = (jax.eval_shape(a) if callable(a) else a).shape
    a_of = functools.cache(a if callable(a) else lambda: a)  # formed once, where a kind needs it
    p = delta.shape[-1]
    gram = "l2" in config.kinds and use_gram(t, d, p, config.norm_path)
    rest = tuple(k for k in config.kinds if k in ("grad", "l2", "sum_sq") and not (gram and k == "l2"))
    # One position: Σ_i (a_i δ_iᵀ)² = (a²)ᵀ δ² elementwise, one matmul, no B·d·p array; [d, p] is
    # the kernel's own layout only without `grads` (a convolution's kernel is [kh, kw, C, O]).
    outer_squares = "sum_sq" in rest and t == 1 and "grad" not in rest and grads is None
    rest = tuple(k for k in rest if not (outer_squares and k == "sum_sq"))
    out = Quantities()
    if outer_squares:
        out = out._replace(sum_sq=jnp.einsum("btd,btp->dp", a_of() ** 2, delta**2))
    if rest:
        g, axis = grads() if grads is not None else (jnp.einsum("btd,btp->bdp", a_of(), delta), 0)
        instantiated = _vector_quantity(g, config._replace(kinds=rest), axis)
        out = instantiated if out.sum_sq is None else instantiated._replace(sum_sq=out.sum_sq)
    if gram:
        gram_a = jnp.einsum("btd,bsd->bts", a_of(), a_of())
        gram_delta = jnp.einsum("btp,bsp->bts", delta, delta)
        out = out._replace(l2=jnp.sum(gram_a * gram_delta, axis=(1, 2)))
    if "io" in config.kinds:
        out = out._replace(io=(a_of(), delta))
    if "kron" in config.kinds:
        factor_a = jnp.einsum("btd,bte->de", a_of(), a_of()) / (batch * t)
        out = out._replace(kron=(factor_a, jnp.einsum("btp,btq->pq", delta, delta)))
    return out


def _vector_quantity(g, config: TapConfig, batch_axis: int = 0) -> Quantities:
    """The quantities from instantiated per-example contributions g, examples along `batch_axis`."""
    kinds = config.kinds
    rest = tuple(i for i in range(g.ndim) if i != batch_axis)
    return Quantities(
        grad=jnp.moveaxis(g, batch_axis, 0) if "grad" in kinds else None,
        l2=jnp.sum(g * g, axis=rest) if "l2" in kinds else None,
        sum_sq=jnp.sum(g * g, axis=batch_axis) if "sum_sq" in kinds else None,
    )


# ------------------------------------------------- the tapped ops, generated
class _Tap(NamedTuple):
    """The static side of one tapped call: the op's spec, its config for these arrays (None for
    an op without settings) and each parameter's TapConfig, in `spec.params` order."""

    spec: OpSpec
    config: Any
    taps: tuple[TapConfig, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tapped(static, arrays, taps):
    return static.spec.forward(static.config, *arrays)[0]


# _tapped_fwd :: (_Tap, arrays, taps) -> (y, the rule's residuals)
def _tapped_fwd(static, arrays, taps):
    return static.spec.forward(static.config, *arrays)


# _tapped_bwd :: (_Tap, residuals, ct_y) -> (the rule's cotangents, one Quantities per parameter)
def _tapped_bwd(static, res, ct_y):
    spec = static.spec
    forms = spec.contribute(static.config, res, ct_y)
    quantities = tuple(_quantities(form, config, spec.name) for form, config in zip(forms, static.taps))
    return tuple(spec.backward(static.config, res, ct_y)), quantities


_tapped.defvjp(_tapped_fwd, _tapped_bwd)


def _tapped_op(spec: OpSpec, norm_path: str) -> Callable:
    """`spec`'s rule for plain arrays; with its parameters `Tapped`, the rule's own forward and
    backward (`_tapped`) returning each parameter's quantities, from `spec.contributions`, as
    its tap's cotangent. A clear error where a tapped parameter would lose its quantity."""

    def op(*args, **settings):
        tapped = tuple(i for i, a in enumerate(args) if isinstance(a, Tapped))
        if not tapped and not any(isinstance(v, Tapped) for v in settings.values()):
            return spec.fn(*args, **settings)
        if spec.contributions is None:
            if spec.name == "batch_norm_train":
                raise PerExampleError(BATCHNORM_MESSAGE)
            raise PerExampleError(
                f"per-example quantities: op {spec.name!r} has no per-example rule for its parameters"
            )
        if tapped != spec.params:
            raise PerExampleError(
                f"per-example quantities: {spec.name}'s parameters (positional arguments {spec.params}) must all "
                f"be tapped, or none; got tapped arguments {tapped}"
            )
        arrays = tuple(a.value if isinstance(a, Tapped) else a for a in args)
        if spec.config is None:
            jax.eval_shape(functools.partial(spec.fn, **settings), *arrays)  # the rule's checks, at no runtime cost
            config = None
        else:
            config = spec.config(*arrays, **settings)
        taps = tuple(args[i].tap for i in spec.params)
        kinds = tuple(TapConfig(tuple(k for k in KINDS if getattr(t, k) is not None), norm_path) for t in taps)
        return _tapped(_Tap(spec, config, kinds), arrays, taps)

    op.__name__ = spec.name
    return op


@functools.lru_cache(maxsize=8)
def per_example_ops(norm_path: str = "auto") -> OpSet:
    """The rules, every op with `contributions` in its spec (dense, conv2d, projection,
    group_norm, layer_norm, batch_norm_eval) accepting `Tapped` parameters (plain arrays
    run the ordinary rule); any other op raises `PerExampleError` when handed a `Tapped`
    one (BatchNorm in training: why). Each parameter's tap says which kinds it carries;
    `norm_path` as in `use_gram`. Generated from `ops.SPECS`: an op with parameters needs
    only its `PARAMS` entry and `<name>_contributions` (CONTRIBUTING.md)."""
    return OpSet(**{name: _tapped_op(spec, norm_path) for name, spec in SPECS.items()})


# ---------------------------------------------------------------- the driver
class PerExample(NamedTuple):
    """loss: the batch's mean loss; grads: its gradient (= `jax.grad`); value: the quantity, per leaf."""

    loss: jax.Array
    grads: Any
    value: Any


def _is_tap(node) -> bool:
    return isinstance(node, Tapped)


def _taps(p, batch: int, kinds, positions: int | None = None) -> Quantities:
    zeros = lambda shape: jnp.zeros(shape, p.dtype)
    taps = {"grad": (batch, *p.shape), "l2": (batch,), "sum_sq": p.shape}
    taps = {kind: zeros(shape) for kind, shape in taps.items() if kind in kinds}
    if "io" in kinds:  # a [d, p] kernel at `positions` positions
        taps["io"] = (zeros((batch, positions, p.shape[0])), zeros((batch, positions, p.shape[1])))
    if "kron" in kinds:  # a kernel [..., p] flattened to [d, p]
        d, outputs = p.size // p.shape[-1], p.shape[-1]
        taps["kron"] = (zeros((d, d)), zeros((outputs, outputs)))
    return Quantities(**taps)


def tap(params, batch: int, kinds, positions: dict | None = None, stacked=()):
    """Every leaf p of `params` as `Tapped(p, Quantities of zeros)`, one field per kind, for `batch`
    examples; `kinds` is a tuple of KINDS for every leaf, or a function of a leaf's path
    (a tuple of dict keys and list indices, as `spec.weight_paths()` writes them) giving its
    tuple; `positions` maps the path of each leaf tapped for "io" to its layer's T.
    A leaf under a path of `stacked` (a reversible stage's, [couplings, ...]) gets one tap per
    coupling, stacked alike, so that the stage's scan hands each coupling its own."""
    kinds_of = kinds if callable(kinds) else lambda path: kinds
    positions = positions or {}

    def one(key_path, p):
        path = models.path_of(key_path)
        make = lambda q: _taps(q, batch, kinds_of(path), positions.get(path))
        return Tapped(p, jax.vmap(make)(p) if _is_stacked(path, stacked) else make(p))

    return jax.tree_util.tree_map_with_path(one, params)


def _is_stacked(path: tuple, stacked) -> bool:
    return any(path[: len(prefix)] == tuple(prefix) for prefix in stacked)


def _unstacked(tapped, stacked):
    """The taps' cotangents of stacked leaves (`tap`) in the layout of the others: per-example
    gradients [couplings, B, ...] -> [B, couplings, ...], squared norms summed over the couplings;
    sums of squares are already elementwise; Kronecker factors stay one per coupling."""

    def one(key_path, t):
        if not _is_stacked(models.path_of(key_path), stacked):
            return t
        q = t.tap
        if q.io is not None:
            raise PerExampleError(
                "per-example quantities: a reversible stage keeps no inputs and cotangents (kind 'io')"
            )
        grad = None if q.grad is None else jnp.moveaxis(q.grad, 0, 1)
        return Tapped(t.value, q._replace(grad=grad, l2=None if q.l2 is None else jnp.sum(q.l2, axis=0)))

    return jax.tree_util.tree_map_with_path(one, tapped, is_leaf=_is_tap)


def split(tapped):
    """A tree of `Tapped` -> (tree of values, tree of taps)."""
    values = jax.tree.map(lambda t: t.value, tapped, is_leaf=_is_tap)
    taps = jax.tree.map(lambda t: t.tap, tapped, is_leaf=_is_tap)
    return values, taps


def check_batch(x, y, *, least: int = 1) -> int:
    """The batch size B of (x, y), at least `least`; PerExampleError otherwise."""
    if getattr(x, "ndim", 0) < 1 or getattr(y, "ndim", 0) != 1 or x.shape[0] != y.shape[0]:
        raise PerExampleError(
            "per-example quantities: arguments `x` [B, ...] and `y` [B] must share their leading batch axis, "
            f"got x {tuple(getattr(x, 'shape', ()))} and y {tuple(getattr(y, 'shape', ()))}"
        )
    if x.shape[0] < least:
        raise PerExampleError(f"per-example quantities: need a batch of at least {least} examples, got {x.shape[0]}")
    return x.shape[0]


def logits_vjp(
    model: models.Model, params, state, x, kinds, norm_path: str = "auto", positions=None, *, train: bool = True
):
    """One forward pass with taps: (logits, vjp), vjp(ct_logits) -> tree of `Tapped(ct_param, Quantities)`;
    `kinds` and `positions` as in `tap`; `train=False` runs BatchNorm on its running statistics
    (the network as evaluated), whose scale and shift then have per-example quantities.
    A reversible stage's stacked parameters (`spec.stacked_paths()`) are tapped per coupling and
    their quantities come back through the stage's own rebuilding backward.

    The quantities are those of the loss whose cotangent at the logits is
    ct_logits (per example: its row of ct_logits), before any rescaling by B.
    """
    if norm_path not in NORM_PATHS:
        raise ValueError(f"per-example quantities: `norm_path` must be one of {NORM_PATHS}, got {norm_path!r}")
    ops = per_example_ops(norm_path)
    forward = lambda tapped: model.apply(tapped, state, x, train=train, grad=ops)[0]
    stacked: tuple = getattr(getattr(model, "spec", None), "stacked_paths", tuple)()  # RevNets only
    logits, vjp = jax.vjp(forward, tap(params, x.shape[0], kinds, positions, stacked))
    return logits, lambda ct_logits: (_unstacked(vjp(ct_logits)[0], stacked),)


def loss_cotangent(logits, y):
    """(L, ct_logits): the mean cross-entropy and its cotangent at the logits, by the rule (rows carry 1/B)."""
    loss, vjp = jax.vjp(lambda z: RULES.softmax_cross_entropy(z, y), logits)
    return loss, vjp(jnp.ones_like(loss))[0]


def _backward(model, params, state, x, y, kinds, norm_path):
    logits, vjp = logits_vjp(model, params, state, x, kinds, norm_path)
    loss, ct_logits = loss_cotangent(logits, y)
    grads, taps = split(vjp(ct_logits)[0])
    return (
        loss,
        grads,
        {kind: jax.tree.map(lambda q, k=kind: getattr(q, k), taps, is_leaf=is_quantities) for kind in kinds},
    )


def is_quantities(node) -> bool:
    """Whether `node` is a tap's `Quantities` (the leaves of a tree of taps)."""
    return isinstance(node, Quantities)


# quantity -> (the tap kind it reads, the power of B that undoes the loss's 1/B in δ)
_KIND = {"batch_grad": ("grad", 1), "batch_l2": ("l2", 2), "sum_grad_squared": ("sum_sq", 2), "variance": ("sum_sq", 2)}


def quantities(
    model: models.Model, params, state, x, y, which=QUANTITIES, *, norm_path: str = "auto", mesh=None
) -> tuple[jax.Array, Any, dict[str, Any]]:
    """(loss, grads, {name: tree}) for each name in `which` (a subset of QUANTITIES), all
    from one forward and one backward pass; `grads` is `jax.grad` of the mean loss.

    `norm_path` (batch_l2): "auto" (the cost model, `use_gram`), "gram" or "grads" (forced).
    `mesh`: a `jax.sharding.Mesh` with axis "data" over which x and y are split in equal
    shares: each device computes its own examples' quantities under `jax.shard_map`
    and the sums and means are combined across devices. Use it for a batch-sharded
    convolutional model: on a batch-sharded `jit` without it, XLA's partitioner gets
    the per-example convolution wrong (`ops.conv.conv2d_contributions`).
    """
    which = tuple(which)
    unknown = [w for w in which if w not in QUANTITIES]
    if unknown or not which:
        raise ValueError(f"per-example quantities: `which` must name some of {QUANTITIES}, got {which!r}")
    batch = check_batch(x, y, least=2 if "variance" in which else 1)
    if mesh is not None and mesh.size > 1:
        return _per_device_quantities(model, params, state, x, y, which, norm_path, mesh)
    kinds = tuple(k for k in KINDS if any(_KIND[w][0] == k for w in which))
    loss, grads, taps = _backward(model, params, state, x, y, kinds, norm_path)
    out = {}
    for name in which:
        kind, power = _KIND[name]
        out[name] = jax.tree.map(lambda q, power=power: batch**power * q, taps[kind])
        if name == "variance":
            out[name] = jax.tree.map(lambda s, g: s / batch - g * g, out[name], grads)
    return loss, grads, out


def _per_device_quantities(model, params, state, x, y, which, norm_path, mesh):
    """`quantities` on each device's share under `jax.shard_map`: per-example ones stay
    split along the batch, sums are added, means averaged (equal shares), and the
    variance is formed from the combined sum of squares and mean gradient."""
    P = jax.sharding.PartitionSpec
    local_which = tuple(dict.fromkeys("sum_grad_squared" if w == "variance" else w for w in which))

    def local(params, state, x, y):
        loss, grads, out = quantities(model, params, state, x, y, local_which, norm_path=norm_path)
        mean = lambda t: jax.tree.map(lambda v: lax.pmean(v, "data"), t)
        out = {
            k: jax.tree.map(lambda v: lax.psum(v, "data"), v) if k == "sum_grad_squared" else v for k, v in out.items()
        }
        return mean(loss), mean(grads), out

    specs = {k: P() if k == "sum_grad_squared" else P("data") for k in local_which}
    run = per_device(local, mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), specs))
    loss, grads, out = run(params, state, x, y)
    if "variance" in which:
        out["variance"] = jax.tree.map(lambda s, g: s / x.shape[0] - g * g, out["sum_grad_squared"], grads)
    return loss, grads, {name: out[name] for name in which}


def per_device(fn: Callable, mesh: jax.sharding.Mesh, *, in_specs, out_specs) -> Callable:
    """`fn` run on each device's share of the arguments, `jax.shard_map` over `mesh`: the one
    wrapper for per-example work on a batch split along axis "data" (`quantities(mesh=)`,
    the DP step). check_vma=False: the rules' custom_vjp backward passes return
    cotangents without shard_map's per-axis type annotations."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _one(name: str, model, params, state, x, y, norm_path="auto", mesh=None) -> PerExample:
    loss, grads, out = quantities(model, params, state, x, y, (name,), norm_path=norm_path, mesh=mesh)
    return PerExample(loss, grads, out[name])


def batch_grad(model: models.Model, params, state, x, y, *, mesh=None) -> PerExample:
    """Per-example gradients g_i = ∇ℓ_i, each leaf `[B, *shape]`; `grads` = Σ_i g_i / B = jax.grad of the mean loss.

    Derivation: derivations/per_example.md#batch_grad
    """
    return _one("batch_grad", model, params, state, x, y, mesh=mesh)


def batch_l2(model: models.Model, params, state, x, y, *, norm_path: str = "auto", mesh=None) -> PerExample:
    """Per-example squared gradient norms ‖g_i‖² per leaf, each [B]; `total(value)` sums the leaves.

    `norm_path`: "auto" (the cost model, `use_gram`), "gram" or "grads" (forced).
    `mesh`: for a batch split over devices, as in `quantities` (each of these takes it).

    Derivation: derivations/per_example.md#batch_l2
    """
    return _one("batch_l2", model, params, state, x, y, norm_path, mesh)


def sum_grad_squared(model: models.Model, params, state, x, y, *, mesh=None) -> PerExample:
    """Σ_i g_i², elementwise, each leaf shaped like its parameter.

    Derivation: derivations/per_example.md#sum_grad_squared
    """
    return _one("sum_grad_squared", model, params, state, x, y, mesh=mesh)


def variance(model: models.Model, params, state, x, y, *, mesh=None) -> PerExample:
    """(1/B) Σ_i (g_i − ḡ)² elementwise, ḡ = `grads`; needs B ≥ 2.

    Derivation: derivations/per_example.md#variance
    """
    return _one("variance", model, params, state, x, y, mesh=mesh)


def total(l2) -> jax.Array:
    """Σ over the leaves of per-leaf squared norms [B]: each example's squared gradient norm."""
    return functools.reduce(jnp.add, jax.tree.leaves(l2))


class LayerCost(NamedTuple):
    """One weight's norm path: T positions, d inputs, p outputs, what `use_gram` chose, and its op."""

    name: str
    positions: int
    d: int
    p: int
    gram: bool
    op: str = "conv2d"


def norm_costs(model: models.Model, input_shape: tuple[int, ...] | None = None) -> list[LayerCost]:
    """The norm path "auto" takes for each kernel of `model` (each parameter whose contribution
    is a `contributions.Weight`: conv, dense and projection kernels) on one example of
    `input_shape` (default: the spec's), named as in `spec.weight_paths()`.
    Shapes only (`jax.eval_shape`): nothing runs."""
    shape = tuple(input_shape or model.spec.input_shape())
    seen: list[tuple[int, int, int, str]] = []

    def recording(spec: OpSpec) -> Callable:
        def op(*args, **settings):
            y = spec.fn(*args, **settings)
            if spec.contributions is not None:
                config = None if spec.config is None else spec.config(*args, **settings)
                _, res = spec.forward(config, *args)
                for form in spec.contribute(config, res, jnp.zeros_like(y)):
                    if isinstance(form, contributions.Weight):
                        _, t, d = form.a().shape
                        seen.append((t, d, form.delta.shape[-1], spec.name))
            return y

        return op

    ops = OpSet(**{name: recording(spec) for name, spec in SPECS.items()})
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True, grad=ops), params, state, x)
    names = [name for name, _ in model.spec.weight_paths()]
    if len(names) != len(seen):
        raise AssertionError(f"norm_costs: {len(seen)} kernels ran, but weight_paths names {len(names)}")
    return [LayerCost(n, t, d, p, use_gram(t, d, p), op) for n, (t, d, p, op) in zip(names, seen)]


def gram_kernels(model: models.Model, input_shape: tuple[int, ...], norm_path: str = "auto") -> dict:
    """{path: LayerCost} of the kernels whose norms take the Gram form for examples of
    `input_shape`, paths as `spec.weight_paths()` writes them; shapes only (`norm_costs`)."""
    if norm_path == "grads":
        return {}
    paths = [path for _, path in model.spec.weight_paths()]
    costs = norm_costs(model, input_shape)
    return {p: c for p, c in zip(paths, costs) if use_gram(c.positions, c.d, c.p, norm_path)}


def check_model(model: models.Model) -> None:
    """Raise `PerExampleError` (BatchNorm: why, and what to use) unless `model` has per-example
    quantities; shapes only, nothing runs."""
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    x = jax.ShapeDtypeStruct((2, *model.spec.input_shape()), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    jax.eval_shape(functools.partial(batch_l2, model), params, state, x, y)
