"""Curvature from the rules' tapped backward (jax_resnet.curvature) against an independent
oracle in float64: the GGN built explicitly as G = Jᵀ (∇²_z L) J, J = `jax.jacrev` of the
reference network (`grad="autodiff"`) flattened over every parameter, ∇²_z L = `jax.hessian`
of the mean loss written with `jax.nn.log_softmax` (not the library's rule), on tiny nets of
a few hundred parameters. Its diagonal against `diag_ggn`, each example's block's diagonal
against `batch_diag_ggn`, G·v against `ggn_vp`, each kernel's block against `kflr` where it is
exact (one example through dense layers); KFLR's factors against a aᵀ and δ δᵀ sums formed
apart from the library (patches by `lax.conv_general_dilated_patches`, δ by `jax.vjp` with
respect to perturbations of each kernel layer's output); BatchNorm in training mode's exact
diagonal; the Monte Carlo estimators (diagonals, KFAC) against the exact values with a
tolerance of 5 standard errors, the standard error measured from the per-sample estimates;
and the refusals and bad inputs.

Each case compiles one program (the oracle and the quantities together) without XLA's
backend optimisations (`_compile.run_once`); a case costs a few seconds on one CPU core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_resnet import curvature, models
from jax_resnet._compile import run_once

TOL = 1e-10  # float64, relative to the largest entry of the oracle's quantity
STANDARD_ERRORS = 5  # MC tolerance: |mean − exact| ≤ 5·σ̂/√M per entry, σ̂ measured
MC_SAMPLES = 256

_net = functools.partial(models.cifar_resnet, 8, num_classes=3, in_channels=1, widths=(2, 4))
_gn = functools.partial(_net, norm="group", norm_groups=2)
_mlp = functools.partial(models.residual_mlp, in_features=6, width=5, depth=2, out_features=3)
_revnet = functools.partial(models.revnet, (2, 1), "basic", (2, 4), stem_width=2, num_classes=3, in_channels=1)
# name: (model, input shape, loss, train). The MLP's 113 parameters under both losses;
# GroupNorm ResNet-8s (v1, basic blocks) with option A (zero-padded identity) and B
# (projection) shortcuts, 300-odd parameters; v2 (pre-activation) with both options;
# bottleneck blocks; BatchNorm on running statistics (train=False), whose examples stay
# apart; a RevNet (a reversible stage of two couplings, a non-reversible one; 269
# parameters) on running statistics, through the stage's rebuilding backward.
CASES = {
    "mlp_ce": (_mlp, (4, 6), "softmax_cross_entropy", True),
    "mlp_mse": (_mlp, (4, 6), "mse_loss", True),
    "gn_A": (_gn, (3, 4, 4, 1), "softmax_cross_entropy", True),
    "gn_B": (functools.partial(_gn, shortcut="B"), (2, 4, 4, 1), "softmax_cross_entropy", True),
    # 2×2 images: the second stage's convolutions have one output position each.
    "gn_v2_A": (functools.partial(_gn, block="preact_basic"), (2, 2, 2, 1), "softmax_cross_entropy", True),
    "bn_eval_v2_B": (
        functools.partial(_net, block="preact_basic", shortcut="B"),
        (2, 4, 4, 1),
        "softmax_cross_entropy",
        False,
    ),
    "gn_bottleneck_B": (
        functools.partial(_gn, block="bottleneck", shortcut="B", widths=(2, 2)),
        (2, 4, 4, 1),
        "softmax_cross_entropy",
        True,
    ),
    "bn_eval_B": (functools.partial(_net, shortcut="B"), (2, 4, 4, 1), "softmax_cross_entropy", False),
    "revnet_eval": (_revnet, (2, 4, 4, 1), "softmax_cross_entropy", False),
}
# BatchNorm in training mode: the examples couple (diag_ggn's B·C backward passes, ggn_vp).
BN_TRAIN = (_net, (3, 4, 4, 1), "softmax_cross_entropy", True)
COUPLED = {"bn_train": BN_TRAIN, "revnet_train": (_revnet, (2, 4, 4, 1), "softmax_cross_entropy", True)}


def _data(case, seed=0):
    make, shape, loss, train = case
    model = make()
    params, state = model.init(jax.random.key(seed), jnp.float64)
    rng = np.random.default_rng(seed)
    # Noise on every parameter (no norm scale at 1 or shift at 0) and on the running statistics.
    params = jax.tree.map(lambda p: p + jnp.asarray(0.3 * rng.standard_normal(p.shape)), params)

    def stat(path, s):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape))
        return s + jnp.asarray(0.3 * rng.standard_normal(s.shape))

    state = jax.tree_util.tree_map_with_path(stat, state)
    x = jnp.asarray(rng.standard_normal(shape))
    if loss == "mse_loss":
        y = jnp.asarray(rng.standard_normal((shape[0], 3)))
    else:
        y = jnp.asarray(rng.integers(0, 3, shape[:1]), jnp.int32)
    return model, params, state, x, y, loss, train


def _oracle(model, params, state, x, y, loss, train):
    """(G [P, P], each example's diag(J_iᵀ ∇²_{z_i} L J_i) [B, P], unravel) from jacrev and hessian."""
    flat, unravel = ravel_pytree(params)
    logits = lambda w: model.apply(unravel(w), state, x, train=train, grad="autodiff")[0]
    if loss == "mse_loss":
        mean_loss = lambda z: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=1))
    else:
        mean_loss = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
    jac = jax.jacrev(logits)(flat)  # [B, C, P]
    hess = jax.hessian(mean_loss)(logits(flat))  # [B, C, B, C]
    ggn = jnp.einsum("icp,icjd,jdq->pq", jac, hess, jac)
    per_example = jnp.einsum("icp,icid,idp->ip", jac, hess, jac)
    return ggn, per_example, unravel


def _flat(tree):
    return ravel_pytree(tree)[0]


def _per_example_flat(tree):
    """A tree of [B, *shape] leaves -> [B, P], each row in `ravel_pytree`'s order."""
    return jax.vmap(_flat)(tree)


def _relative(actual, expected):
    return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("name", list(CASES))
def test_diag_ggn_and_batch_diag_ggn_equal_the_oracle(name):
    model, params, state, x, y, loss, train = _data(CASES[name])
    kw = dict(loss=loss, train=train)

    def everything(params, state, x, y):
        ggn, per_example, _ = _oracle(model, params, state, x, y, loss, train)
        diag = curvature.diag_ggn(model, params, state, x, y, **kw)
        batch = curvature.batch_diag_ggn(model, params, state, x, y, **kw)
        return ggn, per_example, diag, batch

    ggn, per_example, diag, batch = run_once(jax.jit(everything), params, state, x, y)
    assert _relative(_flat(diag), jnp.diag(ggn)) < TOL
    assert _relative(_per_example_flat(batch), per_example) < TOL
    # The examples' shares sum to the diagonal, and the diagonal is not trivially small.
    assert _relative(per_example.sum(0), jnp.diag(ggn)) < TOL
    assert float(jnp.max(jnp.diag(ggn))) > 1e-3


@pytest.mark.parametrize("name", [*CASES, *COUPLED])
def test_ggn_vp_equals_the_oracle(name):
    model, params, state, x, y, loss, train = _data({**CASES, **COUPLED}[name])
    flat, unravel = ravel_pytree(params)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(flat.shape))

    def everything(params, state, x, y, v):
        ggn = _oracle(model, params, state, x, y, loss, train)[0]
        return ggn @ v, _flat(curvature.ggn_vp(model, params, state, x, y, unravel(v), loss=loss, train=train))

    expected, actual = run_once(jax.jit(everything), params, state, x, y, v)
    assert _relative(actual, expected) < TOL


@pytest.mark.parametrize("name", ["mlp_ce", "mlp_mse", "gn_A"])
def test_monte_carlo_estimates_converge_within_their_standard_error(name):
    """M per-sample estimates (samples=1, one key each): their mean is within 5 standard errors
    σ̂/√M of the exact value, entry by entry, σ̂ their measured standard deviation; and so is one
    call with samples=M (an average of M independent columns: the same variance)."""
    model, params, state, x, y, loss, train = _data(CASES[name])
    kw = dict(loss=loss, train=train)

    def everything(params, state, x, y, key):
        exact = _flat(curvature.diag_ggn(model, params, state, x, y, **kw))
        exact_batch = _per_example_flat(curvature.batch_diag_ggn(model, params, state, x, y, **kw))

        def per_sample(key):
            mc = curvature.diag_ggn_mc(model, params, state, x, y, key, **kw)
            batch = curvature.batch_diag_ggn_mc(model, params, state, x, y, key, **kw)
            return _flat(mc), _per_example_flat(batch)

        mc, batch = jax.lax.map(per_sample, jax.random.split(key, MC_SAMPLES))
        averaged = curvature.diag_ggn_mc(model, params, state, x, y, jax.random.fold_in(key, 1), MC_SAMPLES, **kw)
        return exact, exact_batch, mc, batch, _flat(averaged)

    exact, exact_batch, mc, batch, averaged = run_once(jax.jit(everything), params, state, x, y, jax.random.key(7))
    for estimates, value in ((mc, exact), (batch, exact_batch)):
        std_error = jnp.std(estimates, axis=0, ddof=1) / np.sqrt(MC_SAMPLES)
        assert float(jnp.max(std_error)) > 0  # the estimator is random: the test can fail
        floor = 1e-12 * jnp.max(jnp.abs(value))
        excess = jnp.abs(estimates.mean(0) - value) - (STANDARD_ERRORS * std_error + floor)
        assert float(jnp.max(excess)) <= 0, f"worst entry off by {float(jnp.max(excess))} beyond 5 SE"
    # The per-example shares of one draw sum to that draw's diagonal.
    np.testing.assert_allclose(batch.sum(1), mc, rtol=1e-12, atol=1e-14)
    std_error = jnp.std(mc, axis=0, ddof=1) / np.sqrt(MC_SAMPLES)
    assert float(jnp.max(jnp.abs(averaged - exact) - STANDARD_ERRORS * std_error - 1e-12 * jnp.max(exact))) <= 0


def test_factors_multiply_to_the_loss_hessian():
    """S Sᵀ = ∇²ℓ per example for both losses, against `jax.hessian` of the written-out loss."""
    z = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5)))
    for loss, one in (
        ("softmax_cross_entropy", lambda zi: -jax.nn.log_softmax(zi)[2]),
        ("mse_loss", lambda zi: 0.5 * jnp.sum((zi - 1.0) ** 2)),
    ):
        s = curvature.loss_hessian_factor(z, loss)
        np.testing.assert_allclose(jnp.einsum("bck,bdk->bcd", s, s), jax.vmap(jax.hessian(one))(z), atol=1e-14)


def test_batchnorm_in_training_mode_is_refused_with_the_reason():
    """The per-example diagonals and the Kronecker factors: no example has a share of its own."""
    model, params, state, x, y, loss, train = _data(BN_TRAIN)
    for fn in (curvature.batch_diag_ggn, curvature.kflr):
        with pytest.raises(curvature.CurvatureError, match=r"BatchNorm in training mode.*B·C.*train=False"):
            fn(model, params, state, x, y)
    for fn in (curvature.batch_diag_ggn_mc, curvature.kfac):
        with pytest.raises(curvature.CurvatureError, match=rf"{fn.__name__}: the model uses BatchNorm"):
            fn(model, params, state, x, y, jax.random.key(0))


def test_bad_arguments_name_the_argument():
    model, params, state, x, y, loss, train = _data(CASES["mlp_ce"])
    with pytest.raises(ValueError, match=r"diag_ggn: argument `loss` must be one of"):
        curvature.diag_ggn(model, params, state, x, y, loss="hinge")
    with pytest.raises(ValueError, match=r"diag_ggn_mc: argument `samples` must be a Python int ≥ 1, got 0"):
        curvature.diag_ggn_mc(model, params, state, x, y, jax.random.key(0), samples=0)
    with pytest.raises(ValueError, match=r"batch_diag_ggn: arguments `x` \[B, \.\.\.\] and `y` \[B\]"):
        curvature.batch_diag_ggn(model, params, state, x, y[:2])
    with pytest.raises(ValueError, match=r"argument `y` must hold integer labels"):
        curvature.diag_ggn(model, params, state, x, y.astype(jnp.float64))
    with pytest.raises(ValueError, match=r"argument `y` must be shaped like the outputs \(4, 3\)"):
        curvature.diag_ggn(model, params, state, x, jnp.zeros((4, 2)), loss="mse_loss")
    v = jax.tree.map(jnp.zeros_like, params)
    v["out"]["w"] = jnp.zeros((3, 5))
    with pytest.raises(ValueError, match=r"ggn_vp: argument `v` leaf \['out'\]\['w'\] has shape \(3, 5\)"):
        curvature.ggn_vp(model, params, state, x, y, v)


# --------------------------------------------------------------- BatchNorm in training mode
@pytest.mark.parametrize("name", list(COUPLED))
def test_diag_ggn_with_batchnorm_in_training_mode_equals_the_oracle(name):
    """The coupled batch's exact diagonal (B·C backward passes) against the oracle's, whose J is the
    Jacobian of the whole batch's logits through the batch statistics (for the RevNet, through its
    reversible stage's rebuilding backward); and diag_ggn_mc (B·M backward passes) within 5
    standard errors of it."""
    model, params, state, x, y, loss, train = _data(COUPLED[name])

    def everything(params, state, x, y, key):
        ggn = _oracle(model, params, state, x, y, loss, train)[0]
        diag = _flat(curvature.diag_ggn(model, params, state, x, y))
        per_sample = lambda key: _flat(curvature.diag_ggn_mc(model, params, state, x, y, key))
        return ggn, diag, jax.lax.map(per_sample, jax.random.split(key, MC_SAMPLES // 4))

    ggn, diag, mc = run_once(jax.jit(everything), params, state, x, y, jax.random.key(3))
    assert _relative(diag, jnp.diag(ggn)) < TOL
    # Not the examples-apart diagonal: the coupling changes the value.
    apart = curvature.diag_ggn(model, params, state, x, y, train=False)
    assert _relative(_flat(apart), jnp.diag(ggn)) > 1e-3
    std_error = jnp.std(mc, axis=0, ddof=1) / np.sqrt(mc.shape[0])
    assert float(jnp.max(std_error)) > 0
    excess = jnp.abs(mc.mean(0) - diag) - (STANDARD_ERRORS * std_error + 1e-12 * jnp.max(diag))
    assert float(jnp.max(excess)) <= 0, f"worst entry off by {float(jnp.max(excess))} beyond 5 SE"


# --------------------------------------------------------------------- Kronecker factors
def _block(ggn, unravel, path):
    """The GGN's block of the parameter at `path`, rows and columns in its row-major flattening."""
    index = unravel(jnp.arange(ggn.shape[0], dtype=ggn.dtype))
    for key in path:
        index = index[key]
    rows = np.asarray(index).reshape(-1).astype(int)
    return ggn[np.ix_(rows, rows)]


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse_loss"])
def test_kflr_is_the_exact_block_for_one_example_through_dense_layers(loss):
    """One example (B = T = 1): a dense kernel's block is a aᵀ ⊗ Σ_k δ_k δ_kᵀ, so KFLR is exact for
    every kernel of the MLP; every other leaf is the exact diagonal."""
    name = "mlp_mse" if loss == "mse_loss" else "mlp_ce"
    model, params, state, x, y, loss, train = _data(CASES[name])
    x, y = x[:1], y[:1]

    def everything(params, state, x, y):
        ggn, _, unravel = _oracle(model, params, state, x, y, loss, train)
        return ggn, curvature.kflr(model, params, state, x, y, loss=loss)

    ggn, factors = run_once(jax.jit(everything), params, state, x, y)
    unravel = ravel_pytree(params)[1]
    kernels = [path for _, path in model.spec.weight_paths()]
    for path in kernels:
        leaf = functools.reduce(lambda t, k: t[k], path, factors)
        assert isinstance(leaf, curvature.Kronecker)
        block = _block(ggn, unravel, path)
        assert _relative(jnp.kron(leaf.a, leaf.g), block) < TOL, path
    diagonal = unravel(jnp.diag(ggn))
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        factors, is_leaf=lambda n: isinstance(n, curvature.Kronecker)
    )[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if keys not in kernels:
            assert _relative(leaf, functools.reduce(lambda t, k: t[k], keys, diagonal)) < TOL, keys


def _explicit_factors(model, params, state, x, columns, train):
    """Each kernel layer's (A, G) in call order (that of `spec.weight_paths()`), computed apart from
    the library's taps: the autodiff network with a perturbation added to every conv2d, projection
    and dense output, δ = `jax.vjp` of the logits with respect to the perturbations for each column
    [K, B, C], and the layer's inputs a [B·T, d]: a convolution's patches by
    `lax.conv_general_dilated_patches` (features reordered from its (C, kh, kw) to the kernel's
    (kh, kw, C)), a projection's strided subsample, a dense layer's input.
    A = aᵀa / (B·T), G = Σ over columns, examples and positions of δ δᵀ."""
    from jax_resnet.ops import AUTODIFF, conv

    def ops(perturbations, inputs, outputs):
        def layer(y, a):
            inputs.append(a.reshape(-1, a.shape[-1]))
            outputs.append(y)
            return y if perturbations is None else y + perturbations[len(outputs) - 1]

        def conv2d(h, w, **settings):
            config = conv.conv2d_config(h, w, **settings)
            kh, kw, c, _ = w.shape
            patches = jax.lax.conv_general_dilated_patches(
                h,
                (kh, kw),
                config.stride,
                config.padding,
                rhs_dilation=config.dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            patches = patches.reshape(*patches.shape[:3], c, kh, kw).transpose(0, 1, 2, 4, 5, 3)
            patches = patches.reshape(*patches.shape[:3], kh * kw * c)
            return layer(AUTODIFF.conv2d(h, w, **settings), patches)

        def projection(h, w, *, stride):
            return layer(AUTODIFF.projection(h, w, stride=stride), h[:, ::stride, ::stride, :])

        def dense(h, w, b):
            return layer(AUTODIFF.dense(h, w, b), h)

        return AUTODIFF._replace(conv2d=conv2d, projection=projection, dense=dense)

    inputs, outputs = [], []
    model.apply(params, state, x, train=train, grad=ops(None, inputs, outputs))
    logits = lambda e: model.apply(params, state, x, train=train, grad=ops(e, [], []))[0]
    _, pullback = jax.vjp(logits, [jnp.zeros_like(y) for y in outputs])
    deltas = jax.vmap(lambda ct: pullback(ct)[0])(columns)
    flat = lambda d: d.reshape(-1, d.shape[-1])
    return [(a.T @ a / a.shape[0], flat(d).T @ flat(d)) for a, d in zip(inputs, deltas)]


def test_kflr_factors_equal_the_explicit_sums_for_a_conv_net():
    """A GroupNorm ResNet-8 with projection shortcuts (3x3 convolutions at stride 1 and 2, a 1x1
    projection, the dense head), B = 2: each kernel's A and G against `_explicit_factors`, and
    the other leaves against diag_ggn."""
    model, params, state, x, y, loss, train = _data(CASES["gn_B"])

    def everything(params, state, x, y):
        logits = model.apply(params, state, x, train=train)[0]
        columns = jnp.moveaxis(curvature.loss_hessian_factor(logits), -1, 0) / np.sqrt(x.shape[0])
        explicit = _explicit_factors(model, params, state, x, columns, train)
        return explicit, curvature.kflr(model, params, state, x, y), curvature.diag_ggn(model, params, state, x, y)

    explicit, factors, diagonal = run_once(jax.jit(everything), params, state, x, y)
    paths = [path for _, path in model.spec.weight_paths()]
    assert len(paths) == len(explicit) == 7  # stem, 2 + 2 block convolutions, the projection, the head
    for path, (a, g) in zip(paths, explicit):
        leaf = functools.reduce(lambda t, k: t[k], path, factors)
        assert _relative(leaf.a, a) < TOL and _relative(leaf.g, g) < TOL, path
    is_kron = lambda n: isinstance(n, curvature.Kronecker)
    for (path, leaf), want in zip(
        jax.tree_util.tree_flatten_with_path(factors, is_leaf=is_kron)[0], jax.tree.leaves(diagonal)
    ):
        if not is_kron(leaf):
            assert _relative(leaf, want) < TOL, path


@pytest.mark.parametrize("name", ["mlp_mse", "gn_B"])
def test_kfac_converges_to_kflr_within_its_standard_error(name):
    """M one-sample KFAC estimates: A is KFLR's A exactly (no randomness enters it); the mean of the
    G estimates and of the other leaves' diagonals lies within 5 standard errors σ̂/√M of KFLR's,
    entry by entry, σ̂ measured; and so does one call with samples=M."""
    model, params, state, x, y, loss, train = _data(CASES[name])
    kw = dict(loss=loss, train=train)
    flat = lambda tree: ravel_pytree(jax.tree.map(lambda leaf: leaf, tree))[0]
    a_of = lambda tree: [
        leaf.a
        for leaf in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, curvature.Kronecker))
        if isinstance(leaf, curvature.Kronecker)
    ]
    g_and_rest = lambda tree: flat(
        jax.tree.map(
            lambda n: n.g if isinstance(n, curvature.Kronecker) else n,
            tree,
            is_leaf=lambda n: isinstance(n, curvature.Kronecker),
        )
    )

    def everything(params, state, x, y, key):
        exact = curvature.kflr(model, params, state, x, y, **kw)
        draws = jax.lax.map(
            lambda k: g_and_rest(curvature.kfac(model, params, state, x, y, k, **kw)), jax.random.split(key, MC_SAMPLES)
        )
        one = curvature.kfac(model, params, state, x, y, jax.random.fold_in(key, 1), **kw)
        averaged = curvature.kfac(model, params, state, x, y, jax.random.fold_in(key, 2), MC_SAMPLES, **kw)
        return a_of(exact), g_and_rest(exact), draws, a_of(one), g_and_rest(averaged)

    a_exact, exact, draws, a_one, averaged = run_once(jax.jit(everything), params, state, x, y, jax.random.key(5))
    for a, b in zip(a_exact, a_one):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)
    std_error = jnp.std(draws, axis=0, ddof=1) / np.sqrt(MC_SAMPLES)
    assert float(jnp.max(std_error)) > 0  # the estimator is random: the test can fail
    floor = 1e-12 * jnp.max(jnp.abs(exact))
    for estimate in (draws.mean(0), averaged):
        excess = jnp.abs(estimate - exact) - (STANDARD_ERRORS * std_error + floor)
        assert float(jnp.max(excess)) <= 0, f"worst entry off by {float(jnp.max(excess))} beyond 5 SE"
