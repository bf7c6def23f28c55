"""Curvature from the rules' tapped backward (jax_resnet.curvature) against an independent
oracle in float64: the GGN built explicitly as G = Jᵀ (∇²_z L) J, J = `jax.jacrev` of the
reference network (`grad="autodiff"`) flattened over every parameter, ∇²_z L = `jax.hessian`
of the mean loss written with `jax.nn.log_softmax` (not the library's rule), on tiny nets of
a few hundred parameters. Its diagonal against `diag_ggn`, each example's block's diagonal
against `batch_diag_ggn`, G·v against `ggn_vp`; the Monte Carlo estimators against the exact
diagonal with a tolerance of 5 standard errors, the standard error measured from the
per-sample estimates; and the refusals and bad inputs.

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
# name: (model, input shape, loss, train). The MLP's 113 parameters under both losses;
# GroupNorm ResNet-8s with option A (zero-padded identity) and B (projection) shortcuts,
# 300-odd parameters; BatchNorm on running statistics (train=False), whose examples stay
# apart; BatchNorm in training mode for ggn_vp only (the diagonals refuse it).
CASES = {
    "mlp_ce": (_mlp, (4, 6), "softmax_cross_entropy", True),
    "mlp_mse": (_mlp, (4, 6), "mse_loss", True),
    "gn_A": (_gn, (3, 4, 4, 1), "softmax_cross_entropy", True),
    "gn_B": (functools.partial(_gn, shortcut="B"), (2, 4, 4, 1), "softmax_cross_entropy", True),
    "bn_eval_B": (functools.partial(_net, shortcut="B"), (2, 4, 4, 1), "softmax_cross_entropy", False),
}
BN_TRAIN = (_net, (3, 4, 4, 1), "softmax_cross_entropy", True)


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


@pytest.mark.parametrize("name", [*CASES, "bn_train"])
def test_ggn_vp_equals_the_oracle(name):
    model, params, state, x, y, loss, train = _data(BN_TRAIN if name == "bn_train" else CASES[name])
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
    model, params, state, x, y, loss, train = _data(BN_TRAIN)
    for fn in (curvature.diag_ggn, curvature.batch_diag_ggn):
        with pytest.raises(curvature.CurvatureError, match=r"BatchNorm in training mode.*train=False"):
            fn(model, params, state, x, y)
    with pytest.raises(curvature.CurvatureError, match=r"diag_ggn_mc: the model uses BatchNorm"):
        curvature.diag_ggn_mc(model, params, state, x, y, jax.random.key(0))


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
