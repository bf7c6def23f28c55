"""The Laplace approximation (jax_resnet.laplace) against independent computations in float64:
the posterior precision's diagonal against the GGN built explicitly as Jᵀ (∇²_z Σℓ) J (J from
`jax.jacrev` of the autodiff network, ∇²_z from `jax.hessian` of the loss written with
`jax.nn.log_softmax`); the log marginal likelihood against a dense precision matrix and
`slogdet`, for both structures, and the fitted prior precision against that dense function's
maximum; the linearised logits against the explicit J·ε; the predictive's logit mean and
covariance against J Σ Jᵀ within a Monte Carlo tolerance derived from the Gaussian's own
variance; the calibration error against a loop written out by hand; the rotation against
`numpy.rot90`; and the refusals.

The "kfac" structure uses `curvature.kflr`; `kflr_reference` below (dense layers of a residual
MLP, written from the definition with jax.jacrev and jax.hessian) checks it on a batch, and
`test_kflr_of_one_example_is_the_exact_ggn_block` where KFLR is exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_resnet import curvature, laplace, models

TOL = 1e-10  # float64, relative
STANDARD_ERRORS = 5  # Monte Carlo tolerance, in standard errors of the estimator
MC_DRAWS = 4000

_mlp = functools.partial(models.residual_mlp, in_features=5, width=4, depth=1, out_features=3)
_gn = functools.partial(
    models.cifar_resnet, 8, num_classes=3, in_channels=1, widths=(2, 4), norm="group", norm_groups=2
)
# name: (model, one example's shape). 55 and about 300 parameters.
CASES = {"mlp": (_mlp, (5,)), "gn_resnet8": (_gn, (4, 4, 1))}
# The tests take the whole network's posterior unless they say otherwise (fit's default is the last layer).
_fit = functools.partial(laplace.fit, subset="all")
SPLIT = (3, 3, 1)  # batch sizes of the seven examples `_data` draws, the last batch shorter


def _data(case, n=7, seed=0):
    make, shape = case
    model = make()
    params, state = model.init(jax.random.key(seed), jnp.float64)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p + jnp.asarray(0.3 * rng.standard_normal(p.shape)), params)
    x = jnp.asarray(rng.standard_normal((n, *shape)))
    y = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
    return model, params, state, x, y


def _batches(x, y, split=SPLIT):
    starts = np.cumsum((0, *split))
    return [(x[a:b], y[a:b]) for a, b in zip(starts, starts[1:])]


def _summed_loss(z, y):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _oracle_ggn(model, params, state, x, y):
    """The summed-loss GGN [P, P] and the Jacobian [B, C, P] from jacrev and hessian of the autodiff network."""
    flat, unravel = ravel_pytree(params)
    logits = lambda w: model.apply(unravel(w), state, x, train=False, grad="autodiff")[0]
    jac = jax.jacrev(logits)(flat)
    hess = jax.hessian(lambda z: _summed_loss(z, y))(logits(flat))
    return jnp.einsum("icp,icjd,jdq->pq", jac, hess, jac), jac


def _relative(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))) / np.max(np.abs(np.asarray(expected))))


# ------------------------------------------------ KFLR from its definition (dense layers)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("loss", "train"))
def kflr_reference(model, params, state, x, y, *, loss="softmax_cross_entropy", train=True):
    """KFLR of a residual MLP from its definition: per dense layer z = a W + b, A = (1/B) Σ_i a_i a_iᵀ
    and G = (1/B) Σ_i δ_iᵀ H_i δ_i, δ_i = ∂(logits_i)/∂z_i [C, p] (the bias's Jacobian: ∂z/∂b = I),
    H_i = ∇²ℓ_i; the biases' mean-loss GGN diagonal from the explicit GGN."""
    assert loss == "softmax_cross_entropy" and isinstance(model.spec, models.MLPSpec)
    batch = x.shape[0]
    inputs = {}

    def hook(i, a):
        inputs[i] = a
        return a

    model.apply(params, state, x, train=train, grad="autodiff", hook=hook)
    depth = model.spec.depth
    layer_inputs = {("in",): x.reshape(batch, -1), ("out",): inputs[depth]}
    layer_inputs.update({("hidden", i): inputs[i] for i in range(depth)})
    jac = jax.jacrev(lambda p: model.apply(p, state, x, train=train, grad="autodiff")[0])(params)
    hess = jax.vmap(jax.hessian(lambda z, t: _summed_loss(z[None], t[None])))(
        model.apply(params, state, x, train=train)[0], y
    )
    ggn, _ = _oracle_ggn(model, params, state, x, y)
    diag = jax.tree.map(lambda leaf: leaf / batch, ravel_pytree(params)[1](jnp.diag(ggn)))

    def leaf_at(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    out = jax.tree.map(lambda d: d, diag)
    for path, a in layer_inputs.items():
        delta = leaf_at(jac, path)["b"]  # [B, C, p]: ∂(logits_ic)/∂b = ∂(logits_ic)/∂z_i, the layer's output
        g = jnp.einsum("icp,icd,idq->pq", delta, hess, delta) / batch
        kron = curvature.Kronecker(a.T @ a / batch, g)
        leaf_at(out, path)["w"] = kron
    return out


@pytest.fixture
def kflr():
    return curvature.kflr


def test_kflr_equals_its_definition_on_a_batch(kflr):
    """`curvature.kflr` of a residual MLP on a batch of 5 against `kflr_reference`, built from jacrev and hessian."""
    model, params, state, x, y = _data(CASES["mlp"])
    actual, expected = kflr(model, params, state, x, y, train=False), kflr_reference(model, params, state, x, y)
    pairs = zip(jax.tree.leaves(actual, is_leaf=_is_kron), jax.tree.leaves(expected, is_leaf=_is_kron))
    kernels = 0
    for a, e in pairs:
        if _is_kron(e):
            assert _relative(a.a, e.a) < TOL and _relative(a.g, e.g) < TOL
            kernels += 1
        else:
            assert _relative(a, e) < TOL
    assert kernels == 3


def _is_kron(leaf):
    return isinstance(leaf, curvature.Kronecker)


def _dense_kfac_ggn(model, params, state, batches):
    """The summed-loss KFAC GGN as a dense matrix, from the per-batch factors: per kernel
    N·kron(Σ_b (B_b/N) a_b, Σ_b (B_b/N) g_b), per other leaf diag(Σ_b B_b d_b)."""
    per_batch = [(len(y), curvature.kflr(model, params, state, x, y, train=False)) for x, y in batches]
    n = sum(b for b, _ in per_batch)
    trees = [t for _, t in per_batch]
    leaves = [jax.tree.leaves(t, is_leaf=_is_kron) for t in trees]
    blocks = []
    for j, leaf in enumerate(leaves[0]):
        if _is_kron(leaf):
            a = sum(b * lv[j].a for (b, _), lv in zip(per_batch, leaves)) / n
            g = sum(b * lv[j].g for (b, _), lv in zip(per_batch, leaves)) / n
            blocks.append(n * jnp.kron(a, g))
        else:
            blocks.append(jnp.diag(sum(b * lv[j] for (b, _), lv in zip(per_batch, leaves)).ravel()))
    return jax.scipy.linalg.block_diag(*blocks)


def _dense_log_marginal_likelihood(ggn, params, log_lik, lam):
    """log p(D|θ*) − ½ λ‖θ*‖² + ½ P log λ − ½ log det(GGN + λI), with numpy's slogdet of the dense matrix."""
    flat = np.asarray(ravel_pytree(params)[0])
    sign, logdet = np.linalg.slogdet(np.asarray(ggn) + lam * np.eye(flat.size))
    assert sign > 0
    return log_lik - 0.5 * lam * flat @ flat + 0.5 * flat.size * np.log(lam) - 0.5 * logdet


@functools.partial(jax.jit, static_argnums=0)
def _log_lik(model, params, state, x, y):
    return -_summed_loss(model.apply(params, state, x, train=False, grad="autodiff")[0], y)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name", list(CASES))
def test_diag_posterior_precision_equals_the_oracle(name):
    model, params, state, x, y = _data(CASES[name])
    la = _fit(model, params, state, _batches(x, y), prior_precision=0.7)
    ggn, _ = _oracle_ggn(model, params, state, x, y)
    assert la.n_data == len(y)
    precision = ravel_pytree(laplace.posterior_precision_diagonal(la))[0]
    assert _relative(precision, jnp.diag(ggn) + 0.7) < TOL
    assert _relative(ravel_pytree(la.ggn)[0], jnp.diag(ggn)) < TOL
    assert float(jnp.max(jnp.diag(ggn))) > 1e-2  # not trivially small


def test_log_marginal_likelihood_equals_a_dense_computation_diag():
    model, params, state, x, y = _data(CASES["mlp"])
    la = _fit(model, params, state, _batches(x, y), prior_precision=0.7)
    ggn, _ = _oracle_ggn(model, params, state, x, y)
    dense_diag = jnp.diag(jnp.diag(ggn))
    log_lik = float(_log_lik(model, params, state, x, y))
    assert abs(la.log_likelihood - log_lik) < TOL * abs(log_lik)
    for lam in (0.01, 0.7, 30.0):
        expected = _dense_log_marginal_likelihood(dense_diag, params, log_lik, lam)
        assert abs(laplace.log_marginal_likelihood(la, lam) - expected) < TOL * abs(expected)
    # The last layer alone: the head's block of the dense matrix, its parameters' norm and count.
    last = _fit(model, params, state, _batches(x, y), subset="last_layer", prior_precision=0.7)
    flat = ravel_pytree(params)[0]
    in_head = lambda path, p: jnp.full(p.shape, float(path[0].key == "out"))
    head = np.asarray(ravel_pytree(jax.tree_util.tree_map_with_path(in_head, params))[0]).astype(bool)
    assert last.num_params == model.spec.width * 3 + 3 == head.sum()
    for lam in (0.01, 0.7, 30.0):
        block = np.asarray(dense_diag)[np.ix_(head, head)] + lam * np.eye(head.sum())
        w = np.asarray(flat)[head]
        expected = log_lik - 0.5 * lam * w @ w + 0.5 * head.sum() * np.log(lam) - 0.5 * np.linalg.slogdet(block)[1]
        assert abs(laplace.log_marginal_likelihood(last, lam) - expected) < TOL * abs(expected)
    precision = np.asarray(ravel_pytree(laplace.posterior_precision_diagonal(last))[0])
    assert np.all(np.isinf(precision[~head]))
    deviations = np.asarray(
        jax.vmap(lambda t: ravel_pytree(t)[0])(laplace.sample_deviations(last, jax.random.key(0), 2))
    )
    assert np.all(deviations[:, ~head] == 0) and np.all(deviations[:, head] != 0)


def test_log_marginal_likelihood_equals_a_dense_computation_kfac(kflr):
    model, params, state, x, y = _data(CASES["mlp"])
    batches = _batches(x, y)
    la = _fit(model, params, state, batches, structure="kfac", prior_precision=0.7)
    dense = _dense_kfac_ggn(model, params, state, batches)
    log_lik = float(_log_lik(model, params, state, x, y))
    for lam in (0.01, 0.7, 30.0):
        expected = _dense_log_marginal_likelihood(dense, params, log_lik, lam)
        assert abs(laplace.log_marginal_likelihood(la, lam) - expected) < TOL * abs(expected)
    # The eigenvalues are those of the dense matrix.
    assert _relative(np.sort(laplace.ggn_eigenvalues(la)), np.linalg.eigvalsh(np.asarray(dense))) < 1e-9


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
def test_fitted_prior_precision_maximises_the_dense_marginal_likelihood(structure, kflr):
    model, params, state, x, y = _data(CASES["mlp"])
    batches = _batches(x, y)
    la = _fit(model, params, state, batches, structure=structure)
    if structure == "diag":
        dense = jnp.diag(jnp.diag(_oracle_ggn(model, params, state, x, y)[0]))
    else:
        dense = _dense_kfac_ggn(model, params, state, batches)
    f = lambda t: _dense_log_marginal_likelihood(dense, params, la.log_likelihood, np.exp(t))
    t = np.log(la.prior_precision)
    h = 1e-3
    best = f(t)
    assert best > f(t - 0.1) and best > f(t + 0.1)
    slope, curve = (f(t + h) - f(t - h)) / (2 * h), (f(t + h) - 2 * best + f(t - h)) / h**2
    assert curve < 0 and abs(slope) < 1e-5 * abs(curve)  # the derivative's root, to the difference's accuracy


def test_kflr_of_one_example_is_the_exact_ggn_block(kflr):
    """With one example each dense kernel's KFLR block N·kron(A, G) is the exact GGN block, and the
    fitted precision's diagonal there is that block's diagonal + λ."""
    model, params, state, x, y = _data(CASES["mlp"], n=1)
    la = _fit(model, params, state, [(x, y)], structure="kfac", prior_precision=0.7)
    ggn, _ = _oracle_ggn(model, params, state, x, y)
    flat, unravel = ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    factors = kflr(model, params, state, x, y, train=False)
    kernels = 0
    for leaf, idx in zip(jax.tree.leaves(factors, is_leaf=_is_kron), jax.tree.leaves(index)):
        if _is_kron(leaf):
            rows = np.asarray(idx, int).ravel()  # row-major, as kron(a, g) indexes the [d, p] kernel
            assert _relative(jnp.kron(leaf.a, leaf.g), ggn[np.ix_(rows, rows)]) < TOL
            kernels += 1
    assert kernels == 3
    precision = ravel_pytree(laplace.posterior_precision_diagonal(la))[0]
    assert _relative(precision, jnp.diag(ggn) + 0.7) < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_linearised_logits_are_the_jacobian_times_the_draw(name):
    model, params, state, x, y = _data(CASES[name])
    la = _fit(model, params, state, _batches(x, y), prior_precision=0.7)
    deviations = laplace.sample_deviations(la, jax.random.key(1), 3)
    logits = laplace.linearised_logits(la, x, deviations)
    _, jac = _oracle_ggn(model, params, state, x, y)
    z = model.apply(params, state, x, train=False, grad="autodiff")[0]
    eps = jax.vmap(lambda t: ravel_pytree(t)[0])(deviations)  # [S, P]
    expected = z[None] + jnp.einsum("icp,sp->sic", jac, eps)
    assert _relative(logits, expected) < TOL


def _posterior_covariance(structure, model, params, state, x, y, batches, lam):
    if structure == "diag":
        ggn = jnp.diag(jnp.diag(_oracle_ggn(model, params, state, x, y)[0]))
    else:
        ggn = _dense_kfac_ggn(model, params, state, batches)
    return np.linalg.inv(np.asarray(ggn) + lam * np.eye(ggn.shape[0]))


@pytest.mark.parametrize("structure", laplace.STRUCTURES)
def test_linearised_logits_have_the_mean_and_covariance_J_sigma_Jt(structure, kflr):
    """The S logit draws of each example are Gaussian with mean f(x, θ*) and covariance J_i Σ J_iᵀ,
    Σ = P⁻¹ from the dense precision. Tolerances: the sample mean's standard error √(Σ_cc/S), and
    the sample covariance's, √((Σ_cc Σ_dd + Σ_cd²)/S) (Gaussian fourth moments)."""
    model, params, state, x, y = _data(CASES["mlp"])
    batches = _batches(x, y)
    lam = 0.7
    la = _fit(model, params, state, batches, structure=structure, prior_precision=lam)
    sigma = _posterior_covariance(structure, model, params, state, x, y, batches, lam)
    _, jac = _oracle_ggn(model, params, state, x, y)
    jac = np.asarray(jac)
    cov = np.einsum("icp,pq,idq->icd", jac, sigma, jac)  # [B, C, C]
    draws = np.asarray(laplace.linearised_logits(la, x, laplace.sample_deviations(la, jax.random.key(2), MC_DRAWS)))
    z = np.asarray(model.apply(params, state, x, train=False, grad="autodiff")[0])
    var = np.einsum("icc->ic", cov)
    mean_error = np.abs(draws.mean(0) - z)
    assert np.all(mean_error <= STANDARD_ERRORS * np.sqrt(var / MC_DRAWS))
    centred = draws - z[None]  # the mean is known: the covariance estimator without its bias correction
    sample_cov = np.einsum("sic,sid->icd", centred, centred) / MC_DRAWS
    se = np.sqrt((var[:, :, None] * var[:, None, :] + cov**2) / MC_DRAWS)
    assert np.all(np.abs(sample_cov - cov) <= STANDARD_ERRORS * se)
    assert np.max(var) > 1e-2  # the posterior is not trivially narrow


def _reliability_by_hand(probs, labels, bins):
    counts, gaps = np.zeros(bins), np.zeros(bins)
    members = [[] for _ in range(bins)]
    for p, label in zip(probs, labels):
        conf = max(p)
        m = bins - 1 if conf == 1.0 else int(conf * bins)
        members[m].append((conf, float(np.argmax(p) == label)))
    for m, rows in enumerate(members):
        if rows:
            counts[m] = len(rows)
            gaps[m] = abs(np.mean([c for _, c in rows]) - np.mean([c for c, _ in rows]))
    return float(np.sum(counts * gaps) / len(labels)), counts


def test_expected_calibration_error_equals_a_loop_by_hand():
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.45, 0.55], [1.0, 0.0]])
    labels = np.array([0, 0, 1, 0])
    # Bins of 0.1: the 0.95s share the last with the 1.0 (accuracy 2/3, confidence 0.9667), 0.55 is alone.
    r = laplace.reliability(probs, labels, bins=10)
    assert r.counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert abs(r.ece - (3 * abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3) + abs(1 - 0.55)) / 4) < 1e-12
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((500, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 500)
    ece, counts = _reliability_by_hand(probs, labels, laplace.ECE_BINS)
    r = laplace.reliability(probs, labels)
    assert abs(r.ece - ece) < 1e-12 and r.counts.tolist() == counts.tolist()
    m = laplace.metrics(probs, labels)
    assert abs(m["nll"] - np.mean(-np.log(probs[np.arange(500), labels]))) < 1e-12
    assert m["accuracy"] == np.mean(probs.argmax(1) == labels)


def test_rotation_by_90_degrees_is_rot90_and_fills_the_corners():
    rng = np.random.default_rng(0)
    image = np.zeros((1, 8, 8, 1))
    image[0, 2:6, 2:6, 0] = rng.standard_normal((4, 4))  # a blank border, as MNIST's digits have
    turned = np.asarray(laplace.rotate(image, 90.0))
    assert np.max(np.abs(turned - np.rot90(image, 1, axes=(1, 2)))) < 1e-6  # counter-clockwise
    assert np.max(np.abs(np.asarray(laplace.rotate(image, 0.0)) - image)) < 1e-12
    full = np.ones((1, 8, 8, 1))
    corners = np.asarray(laplace.rotate(full, 45.0, fill=-2.0))
    assert corners[0, 0, 0, 0] == -2.0 and abs(corners[0, 4, 4, 0] - 1.0) < 1e-12


def test_predictive_is_a_probability_and_the_methods_differ():
    model, params, state, x, y = _data(CASES["mlp"])
    la = _fit(model, params, state, _batches(x, y))
    for method in laplace.PREDICTIVES:
        p = laplace.predictive(la, x, jax.random.key(0), samples=16, method=method)
        assert p.shape == (len(y), 3) and np.allclose(np.sum(np.asarray(p), 1), 1.0)
    glm = laplace.predictive(la, x, jax.random.key(0), samples=16)
    nn = laplace.predictive(la, x, jax.random.key(0), samples=16, method="nn")
    assert not np.allclose(glm, nn)


BAD = [
    (dict(structure="full"), "fit: argument `structure` must be one of ('diag', 'kfac'), got 'full'"),
    (dict(samples=0), "fit: argument `samples` must be a Python int ≥ 1, got 0"),
    (dict(samples=2), "fit: argument `key` is required with `samples`"),
    (dict(prior_precision=-1.0), "fit: argument `prior_precision` must be a finite number > 0, got -1.0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_arguments_are_named(kwargs, message):
    model, params, state, x, y = _data(CASES["mlp"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _fit(model, params, state, _batches(x, y), **kwargs)


def test_bad_batches_and_metric_inputs_are_named():
    model, params, state, x, y = _data(CASES["mlp"])
    with pytest.raises(ValueError, match=r"fit: argument `batches`: batch 0 must be \(x \[B, ...\], y \[B\]"):
        _fit(model, params, state, [(x, y[:3])])
    with pytest.raises(ValueError, match="fit: argument `batches` holds no examples"):
        _fit(model, params, state, [])
    la = _fit(model, params, state, _batches(x, y))
    with pytest.raises(ValueError, match="predictive: argument `method` must be one of"):
        laplace.predictive(la, x, jax.random.key(0), method="probit")
    with pytest.raises(ValueError, match="sample_deviations: argument `samples` must be a Python int ≥ 1"):
        laplace.predictive(la, x, jax.random.key(0), samples=0)
    with pytest.raises(ValueError, match="reliability: arguments `probs` \\[n, C\\] and `labels` \\[n\\]"):
        laplace.reliability(np.ones((3, 2)) / 2, np.zeros(4, int))
    with pytest.raises(ValueError, match="rotate: argument `x` must be images"):
        laplace.rotate(np.zeros((8, 8)), 30.0)


def test_the_command_on_a_digits_run(tmp_path, capsys):
    """`jax-resnet laplace RUN_DIR` on a short digits run: its MAP row equals `step.evaluate` of the
    run's checkpoint (an independent forward), its Laplace row differs, and the result is written."""
    import json

    from jax_resnet import checkpoints, cli, data, step, train

    run = tmp_path / "run"
    config = train.TrainConfig(model="residual_mlp", epochs=1, out=str(run), skip_grad_check=True)
    jax.config.update("jax_enable_x64", False)  # a run as a user makes it: float32
    try:
        train.train(config)
        capsys.readouterr()
        flags = "--rotations 0,90 --samples 8 --test-examples 100 --batch-size 449"
        argv = ["laplace", str(run), *flags.split()]
        assert cli.main([*argv, "--json", str(tmp_path / "out.json")]) == 0
    finally:
        jax.config.update("jax_enable_x64", True)
    out = capsys.readouterr().out
    result = json.loads((run / "laplace_diag_last_layer.json").read_text())
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert [r["degrees"] for r in result["rotations"]] == [0.0, 90.0] and result["n_train"] == 1347
    assert result["prior_precision_source"] == "marginal likelihood" and result["prior_precision"] > 0
    tree, _ = checkpoints.load(run)
    ds = data.load("digits")
    model = models.get("residual_mlp").for_data(ds.image_shape, ds.num_classes)
    expected = step.evaluate(model, tree["params"], tree["state"], ds.x_test[:100], ds.y_test[:100])
    map_row, laplace_row = result["rotations"][0]["map"], result["rotations"][0]["laplace"]
    assert abs(map_row["accuracy"] - expected["accuracy"]) < 1e-12
    assert abs(map_row["nll"] - expected["loss"]) < 1e-5
    assert laplace_row["nll"] != map_row["nll"]
    assert laplace.TABLE_HEADER in out and "wrote" in out
