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
`per_example_ops` is an `OpSet` whose dense, conv2d, projection, group_norm,
layer_norm and batch_norm_eval (BatchNorm on running statistics, reached with
`logits_vjp(..., train=False)`) accept `Tapped` parameters and call a core with the tap as an
extra argument; the core's forward is the rule's forward (`_dense_fwd`, ...)
and its backward is the rule's backward plus the quantity, returned as the
tap's cotangent. So `jax.grad` with respect to the tapped parameters gives the
ordinary gradient (the `value` fields) and the quantities (the `tap` fields)
from the model's own `spec.forward`, one forward and one backward, no `vmap`
of the model, under `jit` or not. The ordinary rules are untouched.

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
from jax_resnet.ops import RULES, OpSet, conv, linear, norm, shortcut

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


KINDS = ("grad", "l2", "sum_sq", "io")


class Quantities(NamedTuple):
    """One leaf's tap (zeros) or its cotangent: a field per kind asked for, None for the others.

    grad: `[B, *shape]`, example i's contribution G_i; l2: [B], ‖G_i‖²; sum_sq: shape, Σ_i G_i²;
    io: (a [B, T, d], δ [B, T, p]), a dense or projection kernel's inputs and output
    cotangents at its T positions, G_i = Σ_t a_{i,t}ᵀ δ_{i,t} (DP-SGD's book-keeping).
    """

    grad: jax.Array | None = None
    l2: jax.Array | None = None
    sum_sq: jax.Array | None = None
    io: tuple[jax.Array, jax.Array] | None = None


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


def _weight_quantity(a, delta, config: TapConfig, grads=None) -> Quantities:
    """The per-example quantities of W [d, p] in y_t = a_t·W at T positions.

    a: [B, T, d], or a function giving it, called only where a form needs it (a
    convolution's patches are a new array); δ: [B, T, p]. Example i contributes
    G_i = Σ_t a_{i,t}ᵀ δ_{i,t}, [d, p]; `grads`, if given, is a function giving
    the contributions in the kernel's layout without a (a convolution's:
    `_conv2d_batch_grad`).
    """
    a_of = a if callable(a) else lambda: a
    _, t, d = jax.eval_shape(a_of).shape
    p = delta.shape[-1]
    gram = "l2" in config.kinds and use_gram(t, d, p, config.norm_path)
    rest = tuple(k for k in config.kinds if not (gram and k == "l2") and k != "io")
    out = Quantities(io=(a_of(), delta) if "io" in config.kinds else None)
    if rest:
        g, axis = grads() if grads is not None else (jnp.einsum("btd,btp->bdp", a_of(), delta), 0)
        out = _vector_quantity(g, config._replace(kinds=rest), axis)
    if gram:
        a = a_of()
        gram_a = jnp.einsum("btd,bsd->bts", a, a)
        gram_delta = jnp.einsum("btp,bsp->bts", delta, delta)
        out = out._replace(l2=jnp.sum(gram_a * gram_delta, axis=(1, 2)))
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


def _positions(a):
    """[B, ..., f] -> [B, T, f]: every axis between the batch and the features is a position."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


# ------------------------------------------------------------------- dense
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _dense_tapped(x, w, b, w_tap, b_tap, configs):
    return linear._dense_fwd(x, w, b)[0]


# _dense_tapped_fwd :: (x, w, b, w_tap, b_tap, (TapConfig, TapConfig)) -> (y, DenseResiduals)
def _dense_tapped_fwd(x, w, b, w_tap, b_tap, configs):
    return linear._dense_fwd(x, w, b)


# _dense_tapped_bwd :: ((TapConfig, TapConfig), DenseResiduals, ct_y) -> (ct_x, ct_w, ct_b, q_w, q_b)
def _dense_tapped_bwd(configs, res, ct_y):
    ct_x, ct_w, ct_b = linear._dense_bwd(res, ct_y)
    delta = _positions(ct_y)
    q_w = _weight_quantity(_positions(res.x), delta, configs[0])
    q_b = _vector_quantity(jnp.sum(delta, axis=1), configs[1])
    return ct_x, ct_w, ct_b, q_w, q_b


_dense_tapped.defvjp(_dense_tapped_fwd, _dense_tapped_bwd)


# ------------------------------------------------------------------ conv2d
def _patches(x, kernel_hw, config: conv.ConvConfig):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv2d_tapped(x, w, w_tap, conv_config, config):
    return conv._conv2d_fwd(x, w, conv_config)[0]


# _conv2d_tapped_fwd :: (x, w, w_tap, ConvConfig, TapConfig) -> (y, Conv2dResiduals)
def _conv2d_tapped_fwd(x, w, w_tap, conv_config, config):
    return conv._conv2d_fwd(x, w, conv_config)


def _conv2d_batch_grad(config: conv.ConvConfig, x, ct_y, kernel_hw):
    """Each example's kernel gradient, (g [kh, kw, C, B, O], 3), without patches: the kernel
    cotangent's correlation (`conv._conv2d_bwd`, x's channels as the batch, its
    examples as the features) with the examples kept apart as B feature groups,
    example i's group pairing x_i with δ_i alone. (groups = 1 only.)

    Under a `jit` whose batch is sharded over several devices, XLA's SPMD
    partitioner (jax 0.10, CPU) gets this grouped convolution wrong, as it does
    the one `jax.vmap` of the kernel cotangent writes: values off by up to 24
    for values of order 10, measured on 8 simulated devices. Run per-example
    work on a sharded batch under `jax.shard_map` (`per_device`), as the DP step
    (`dp.update_fn`) and `quantities(..., mesh=)` do. The batch-grouped
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


# _conv2d_tapped_bwd :: (ConvConfig, TapConfig, Conv2dResiduals, ct_y) -> (ct_x, ct_w, q_w)
def _conv2d_tapped_bwd(conv_config, config, res, ct_y):
    ct_x, ct_w = conv._conv2d_bwd(conv_config, res, ct_y)
    kernel_hw = res.w.shape[:2]

    def patches():
        # Behind the barrier the patches depend on ct_y, so XLA cannot form them in
        # the forward pass and hold every layer's until its backward (it did: 1.6 GiB
        # for ResNet-20-GN at batch 256).
        x, _ = lax.optimization_barrier((res.x, ct_y))
        return _positions(_patches(x, kernel_hw, conv_config))

    grads = lambda: _conv2d_batch_grad(conv_config, res.x, ct_y, kernel_hw)
    if "io" in config.kinds:
        raise PerExampleError("per-example quantities: conv2d keeps no inputs and cotangents (kind 'io')")
    return ct_x, ct_w, _weight_quantity(patches, _positions(ct_y), config, grads=grads)


_conv2d_tapped.defvjp(_conv2d_tapped_fwd, _conv2d_tapped_bwd)


# -------------------------------------------------------------- projection
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _projection_tapped(x, w, w_tap, proj_config, config):
    return shortcut._projection_fwd(x, w, proj_config)[0]


# _projection_tapped_fwd :: (x, w, w_tap, ProjectionConfig, TapConfig) -> (y, ProjectionResiduals)
def _projection_tapped_fwd(x, w, w_tap, proj_config, config):
    return shortcut._projection_fwd(x, w, proj_config)


# _projection_tapped_bwd :: (ProjectionConfig, TapConfig, ProjectionResiduals, ct_y) -> (ct_x, ct_w, q_w)
def _projection_tapped_bwd(proj_config, config, res, ct_y):
    ct_x, ct_w = shortcut._projection_bwd(proj_config, res, ct_y)
    return ct_x, ct_w, _weight_quantity(_positions(res.x_s), _positions(ct_y), config)


_projection_tapped.defvjp(_projection_tapped_fwd, _projection_tapped_bwd)


# ------------------------------------------------- group_norm and layer_norm
# Both save x_hat; an example's gamma and beta contributions are Σ over its
# positions of δ·x_hat and δ: [B, C], cheap enough to instantiate always.
def _scale_shift_quantities(x_hat, ct_y, configs: tuple[TapConfig, TapConfig]):
    delta = _positions(ct_y)
    q_gamma = _vector_quantity(jnp.sum(delta * _positions(x_hat), axis=1), configs[0])
    q_beta = _vector_quantity(jnp.sum(delta, axis=1), configs[1])
    return q_gamma, q_beta


def _tapped_norm(fwd, bwd):
    """A normalisation rule with zero taps for its scale and shift:
    `(x, gamma, beta, gamma_tap, beta_tap, norm_config, configs) -> y`, the norm's
    own forward and backward, with the per-example quantities of gamma and beta
    as the taps' cotangents."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def tapped(x, gamma, beta, gamma_tap, beta_tap, norm_config, configs):
        return fwd(x, gamma, beta, norm_config)[0]

    def tapped_fwd(x, gamma, beta, gamma_tap, beta_tap, norm_config, configs):
        return fwd(x, gamma, beta, norm_config)

    # (norm_config, (TapConfig, TapConfig), residuals, ct_y) -> (ct_x, ct_gamma, ct_beta, q_gamma, q_beta)
    def tapped_bwd(norm_config, configs, res, ct_y):
        return (*bwd(norm_config, res, ct_y), *_scale_shift_quantities(res.x_hat, ct_y, configs))

    tapped.defvjp(tapped_fwd, tapped_bwd)
    return tapped


_group_norm_tapped = _tapped_norm(norm._group_norm_fwd, norm._group_norm_bwd)
_layer_norm_tapped = _tapped_norm(norm._layer_norm_fwd, norm._layer_norm_bwd)


# BatchNorm with running statistics (train=False) acts on each example alone, so its
# gamma and beta have per-example contributions like GroupNorm's; mean and var are
# state, never tapped.
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _batch_norm_eval_tapped(x, gamma, beta, mean, var, gamma_tap, beta_tap, norm_config, configs):
    return norm._batch_norm_eval_fwd(x, gamma, beta, mean, var, norm_config)[0]


# _batch_norm_eval_tapped_fwd :: (x, gamma, beta, mean, var, gamma_tap, beta_tap, NormConfig, configs)
#                                -> (y, BatchNormEvalResiduals)
def _batch_norm_eval_tapped_fwd(x, gamma, beta, mean, var, gamma_tap, beta_tap, norm_config, configs):
    return norm._batch_norm_eval_fwd(x, gamma, beta, mean, var, norm_config)


# _batch_norm_eval_tapped_bwd :: (NormConfig, configs, BatchNormEvalResiduals, ct_y)
#                                -> (ct_x, ct_gamma, ct_beta, ct_mean, ct_var, q_gamma, q_beta)
def _batch_norm_eval_tapped_bwd(norm_config, configs, res, ct_y):
    return (*norm._batch_norm_eval_bwd(norm_config, res, ct_y), *_scale_shift_quantities(res.x_hat, ct_y, configs))


_batch_norm_eval_tapped.defvjp(_batch_norm_eval_tapped_fwd, _batch_norm_eval_tapped_bwd)


# ------------------------------------------------------------------ the OpSet
def _values(*args):
    return tuple(a.value if isinstance(a, Tapped) else a for a in args)


def _is_tapped(*args) -> bool:
    return any(isinstance(a, Tapped) for a in args)


def _untapped(name: str, rule: Callable) -> Callable:
    """`rule` for plain arrays; a clear error where a tapped parameter would lose its quantity."""

    def op(*args, **kwargs):
        if _is_tapped(*args, *kwargs.values()):
            if name.startswith("batch_norm"):
                raise PerExampleError(BATCHNORM_MESSAGE)
            raise PerExampleError(f"per-example quantities: op {name!r} has no per-example rule for its parameters")
        return rule(*args, **kwargs)

    op.__name__ = name
    return op


def _config(*tapped: Tapped, norm_path: str):
    """Each parameter's TapConfig: the kinds its tap asks for (its fields that are not None)."""
    configs = tuple(TapConfig(tuple(k for k in KINDS if getattr(t.tap, k) is not None), norm_path) for t in tapped)
    return configs if len(configs) > 1 else configs[0]


@functools.lru_cache(maxsize=8)
def per_example_ops(norm_path: str = "auto") -> OpSet:
    """The rules, with dense, conv2d, projection, group_norm, layer_norm and batch_norm_eval
    accepting `Tapped` parameters (plain arrays run the ordinary rule); every other op
    raises `PerExampleError` when handed a `Tapped` one (BatchNorm in training: why). Each
    parameter's tap says which kinds it carries; `norm_path` as in `use_gram`."""
    config = functools.partial(_config, norm_path=norm_path)

    def dense(x, w, b):
        if not _is_tapped(w, b):
            return RULES.dense(x, w, b)
        jax.eval_shape(RULES.dense, *_values(x, w, b))  # the rule's checks, at no runtime cost
        w, b = _tapped_pair(w, b)
        return _dense_tapped(x, w.value, b.value, w.tap, b.tap, config(w, b))

    def conv2d(x, w, **settings):
        if not isinstance(w, Tapped):
            return RULES.conv2d(x, w, **settings)
        conv_config = conv.conv2d_config(x, w.value, **settings)
        if conv_config.groups != 1:
            raise PerExampleError(f"per-example quantities: conv2d supports groups=1 only, got {conv_config.groups}")
        return _conv2d_tapped(x, w.value, w.tap, conv_config, config(w))

    def projection(x, w, **settings):
        if not isinstance(w, Tapped):
            return RULES.projection(x, w, **settings)
        proj_config = shortcut.projection_config(x, w.value, **settings)
        return _projection_tapped(x, w.value, w.tap, proj_config, config(w))

    def norm_op(name, make_config, tapped_rule):
        """group_norm or layer_norm: the same wrapper around its own config and tapped rule."""

        def op(x, gamma, beta, **settings):
            if not _is_tapped(gamma, beta):
                return getattr(RULES, name)(x, gamma, beta, **settings)
            gamma, beta = _tapped_pair(gamma, beta)
            norm_config = make_config(x, gamma.value, beta.value, **settings)
            return tapped_rule(x, gamma.value, beta.value, gamma.tap, beta.tap, norm_config, config(gamma, beta))

        return op

    group_norm = norm_op("group_norm", norm.group_norm_config, _group_norm_tapped)
    layer_norm = norm_op("layer_norm", norm.layer_norm_config, _layer_norm_tapped)

    def batch_norm_eval(x, gamma, beta, mean, var, **settings):
        if not _is_tapped(gamma, beta):
            return RULES.batch_norm_eval(x, gamma, beta, mean, var, **settings)
        gamma, beta = _tapped_pair(gamma, beta)
        norm_config = norm.batch_norm_eval_config(x, gamma.value, beta.value, mean, var, **settings)
        configs = config(gamma, beta)
        return _batch_norm_eval_tapped(x, gamma.value, beta.value, mean, var, gamma.tap, beta.tap, norm_config, configs)

    aware = {"dense": dense, "conv2d": conv2d, "projection": projection, "group_norm": group_norm}
    aware.update(layer_norm=layer_norm, batch_norm_eval=batch_norm_eval)
    return OpSet(**{name: aware.get(name) or _untapped(name, rule) for name, rule in RULES._asdict().items()})


def _tapped_pair(a, b):
    if not (isinstance(a, Tapped) and isinstance(b, Tapped)):
        raise PerExampleError("per-example quantities: both parameters of a layer must be tapped, or neither")
    return a, b


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
    return Quantities(**taps)


def tap(params, batch: int, kinds, positions: dict | None = None):
    """Every leaf p of `params` as `Tapped(p, Quantities of zeros)`, one field per kind, for `batch`
    examples; `kinds` is a tuple of KINDS for every leaf, or a function of a leaf's path
    (a tuple of dict keys and list indices, as `spec.weight_paths()` writes them) giving its
    tuple; `positions` maps the path of each leaf tapped for "io" to its layer's T."""
    kinds_of = kinds if callable(kinds) else lambda path: kinds
    positions = positions or {}

    def one(key_path, p):
        path = path_of(key_path)
        return Tapped(p, _taps(p, batch, kinds_of(path), positions.get(path)))

    return jax.tree_util.tree_map_with_path(one, params)


def path_of(key_path) -> tuple:
    """A `jax.tree_util` key path as a tuple of dict keys and list indices (`spec.weight_paths()`'s form)."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


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

    The quantities are those of the loss whose cotangent at the logits is
    ct_logits (per example: its row of ct_logits), before any rescaling by B.
    """
    if norm_path not in NORM_PATHS:
        raise ValueError(f"per-example quantities: `norm_path` must be one of {NORM_PATHS}, got {norm_path!r}")
    ops = per_example_ops(norm_path)
    forward = lambda tapped: model.apply(tapped, state, x, train=train, grad=ops)[0]
    return jax.vjp(forward, tap(params, x.shape[0], kinds, positions))


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
    the per-example convolution wrong (`_conv2d_batch_grad`).
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


def subtree(tree, path: tuple):
    """`tree[path[0]][path[1]]...`: the node at a path as `path_of` writes it."""
    for key in path:
        tree = tree[key]
    return tree


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
    return sum(jax.tree.leaves(l2))


class LayerCost(NamedTuple):
    """One weight's norm path: T positions, d inputs, p outputs, what `use_gram` chose, and its op."""

    name: str
    positions: int
    d: int
    p: int
    gram: bool
    op: str = "conv2d"


def norm_costs(model: models.Model, input_shape: tuple[int, ...] | None = None) -> list[LayerCost]:
    """The norm path "auto" takes for each conv/dense/projection kernel of `model` on one
    example of `input_shape` (default: the spec's), named as in `spec.weight_paths()`.
    Shapes only (`jax.eval_shape`): nothing runs."""
    shape = tuple(input_shape or model.spec.input_shape())
    seen: list[tuple[int, int, int]] = []

    def conv2d(x, w, **settings):
        y = RULES.conv2d(x, w, **settings)
        kh, kw, c_in, c_out = w.shape
        seen.append((y.shape[1] * y.shape[2], kh * kw * c_in, c_out, "conv2d"))
        return y

    def dense(x, w, b):
        seen.append((x.size // (x.shape[0] * x.shape[-1]), *w.shape, "dense"))
        return RULES.dense(x, w, b)

    def projection(x, w, **settings):
        y = RULES.projection(x, w, **settings)
        seen.append((y.shape[1] * y.shape[2], *w.shape, "projection"))
        return y

    ops = RULES._replace(conv2d=conv2d, dense=dense, projection=projection)
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
