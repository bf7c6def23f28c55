"""The seed derivation (derivations/residual_mlp.md) and the gradient paths of
residual blocks (derivations/blocks.md), checked in float64.

The worked example's inputs and printed values are parsed from the document,
so the two cannot drift apart. Each result is computed three ways: numpy
formulas written out by hand (independent of the library), `jax.grad` through
the library's hand-derived rules, and `jax.grad` of plain `jnp`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from derivation_docs import worked_example_values

from jax_resnet import blocks, models, ops
from jax_resnet.ops.conv import conv2d_reference

INPUTS = ("X", "Y", "W1", "b1", "W2", "b2")
RULES = ops.opset("rules")
TIGHT = 1e-12


def _document_values() -> dict[str, np.ndarray]:
    return worked_example_values("residual_mlp.md")


def _inputs():
    values = _document_values()
    return tuple(values[name] for name in INPUTS)


# ------------------------------------------------------ numpy, written by hand
# g2 and its derivative expressed through the output a = g2(u), as the document does.
_G2 = {
    "identity": (lambda u: u, lambda a: np.ones_like(a)),
    "tanh": (np.tanh, lambda a: 1 - a * a),
    "sigmoid": (lambda u: 1 / (1 + np.exp(-u)), lambda a: a * (1 - a)),
}


def _numpy_seed(X, Y, W1, b1, W2, b2, *, skip=True, g2="identity"):
    """Forward and backward of the seed network, tanh hidden layer, MSE loss."""
    g, g_prime = _G2[g2]
    m = X.shape[0]
    Z1 = X @ W1 + b1
    A1 = np.tanh(Z1)
    Z2 = A1 @ W2 + b2
    U2 = Z2 + X if skip else Z2
    A2 = g(U2)
    J = np.sum((A2 - Y) ** 2) / (2 * m)
    dA2 = (A2 - Y) / m
    dU2 = dA2 * g_prime(A2)
    dZ2 = dU2
    dW2 = A1.T @ dZ2
    db2 = dZ2.sum(axis=0)
    dA1 = dZ2 @ W2.T
    dZ1 = dA1 * (1 - A1 * A1)
    dW1 = X.T @ dZ1
    db1 = dZ1.sum(axis=0)
    dX_weight = dZ1 @ W1.T
    dX_shortcut = dU2 if skip else np.zeros_like(X)
    dX = dX_shortcut + dX_weight
    return dict(
        Z1=Z1,
        A1=A1,
        Z2=Z2,
        U2=U2,
        A2=A2,
        J=J,
        dU2=dU2,
        dZ2=dZ2,
        dW2=dW2,
        db2=db2,
        dA1=dA1,
        dZ1=dZ1,
        dW1=dW1,
        db1=db1,
        dX_shortcut=dX_shortcut,
        dX_weight=dX_weight,
        dX=dX,
    )


# ------------------------------------------------------ the worked example
def test_worked_example_numbers_match_the_document():
    doc = _document_values()
    ours = _numpy_seed(*_inputs())
    printed = {k for k in doc if k not in INPUTS and not k.startswith("S_")}
    assert printed == set(ours), f"the document prints {sorted(printed)}, the derivation has {sorted(ours)}"
    for name in printed:
        # Printed to 6 decimals: agreement to half a unit in the last place.
        np.testing.assert_allclose(doc[name], ours[name], rtol=0, atol=5e-7 + TIGHT, err_msg=name)

    sig = _numpy_seed(*_inputs(), skip=False, g2="sigmoid")
    m = doc["X"].shape[0]
    np.testing.assert_allclose(doc["S_A2"], sig["A2"], rtol=0, atol=5e-7 + TIGHT)
    np.testing.assert_allclose(doc["S_J"], sig["J"], rtol=0, atol=5e-7 + TIGHT)
    np.testing.assert_allclose(doc["S_dZ2"], sig["dZ2"], rtol=0, atol=5e-7 + TIGHT)
    np.testing.assert_allclose(doc["S_dZ2_seed"], (sig["A2"] - doc["Y"]) / m, rtol=0, atol=5e-7 + TIGHT)


def _library_seed(X, Y, W1, b1, W2, b2, e):
    """The seed network from the library's rules. `e` holds zero arrays added to
    each intermediate, so that jax.grad with respect to them returns the
    intermediate cotangents dZ1, dA1, dZ2, dU2."""
    Z1 = ops.add(ops.dense(X, W1, b1), e["Z1"])
    A1 = ops.add(ops.tanh(Z1), e["A1"])
    Z2 = ops.add(ops.dense(A1, W2, b2), e["Z2"])
    U2 = ops.add(ops.add(Z2, X), e["U2"])
    return ops.mse_loss(U2, Y)


def _jnp_seed(X, Y, W1, b1, W2, b2, e):
    Z1 = X @ W1 + b1 + e["Z1"]
    A1 = jnp.tanh(Z1) + e["A1"]
    Z2 = A1 @ W2 + b2 + e["Z2"]
    U2 = Z2 + X + e["U2"]
    return jnp.sum((U2 - Y) ** 2) / (2 * X.shape[0])


@pytest.mark.parametrize("network", [_library_seed, _jnp_seed], ids=["rules", "jnp"])
def test_worked_example_rules_autodiff_and_numpy_agree(network):
    X, Y, W1, b1, W2, b2 = map(jnp.asarray, _inputs())
    ours = _numpy_seed(X, Y, W1, b1, W2, b2)
    zeros = {k: jnp.zeros_like(jnp.asarray(ours[k])) for k in ("Z1", "A1", "Z2", "U2")}
    J, grads = jax.value_and_grad(network, argnums=(0, 2, 3, 4, 5, 6))(X, Y, W1, b1, W2, b2, zeros)
    dX, dW1, db1, dW2, db2, d = grads
    got = dict(J=J, dX=dX, dW1=dW1, db1=db1, dW2=dW2, db2=db2, dZ1=d["Z1"], dA1=d["A1"], dZ2=d["Z2"], dU2=d["U2"])
    for name, value in got.items():
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(value, ours[name], rtol=0, atol=TIGHT, err_msg=name)


# ------------------------------------------------------ error (b): dz2 = a2 − y
def _output_loss(g2, Z2, Y):
    A2 = {"identity": lambda u: u, "sigmoid": jax.nn.sigmoid}[g2](Z2)
    return jnp.sum((A2 - Y) ** 2) / (2 * Z2.shape[0])


def _seed_layer_two(g2):
    """(true dZ2, true dW2) from jax.grad, the seed's dZ2 = (a2 − y)/m and its dW2."""
    X, Y, W1, b1, W2, b2 = map(jnp.asarray, _inputs())
    A1 = jnp.tanh(X @ W1 + b1)
    Z2 = A1 @ W2 + b2
    m = X.shape[0]
    A2 = jax.nn.sigmoid(Z2) if g2 == "sigmoid" else Z2
    true_dZ2 = jax.grad(_output_loss, argnums=1)(g2, Z2, Y)
    true_dW2 = jax.grad(lambda W: _output_loss(g2, A1 @ W + b2, Y))(W2)
    seed_dZ2 = (A2 - Y) / m
    return A2, Y, true_dZ2, true_dW2, seed_dZ2, A1.T @ seed_dZ2


def test_seed_dz2_is_wrong_for_a_sigmoid_output():
    A2, Y, true_dZ2, true_dW2, seed_dZ2, seed_dW2 = _seed_layer_two("sigmoid")
    m = A2.shape[0]
    corrected = (A2 - Y) * A2 * (1 - A2) / m
    np.testing.assert_allclose(corrected, true_dZ2, rtol=0, atol=TIGHT)
    # The article's formula is off by 1/(a2(1 − a2)) ≥ 4 in every entry.
    assert np.all(np.abs(seed_dZ2) >= 4 * np.abs(true_dZ2) - TIGHT)
    assert np.max(np.abs(seed_dZ2 - true_dZ2)) > 0.1
    assert np.max(np.abs(seed_dW2 - true_dW2)) > 0.01


def test_seed_dz2_is_right_for_an_identity_output():
    _, _, true_dZ2, true_dW2, seed_dZ2, seed_dW2 = _seed_layer_two("identity")
    np.testing.assert_allclose(seed_dZ2, true_dZ2, rtol=0, atol=TIGHT)
    np.testing.assert_allclose(seed_dW2, true_dW2, rtol=0, atol=TIGHT)


# ------------------------------------------------------ the sum of the two paths
_RULE_G2 = {"identity": lambda u: u, "tanh": RULES.tanh, "sigmoid": RULES.sigmoid}


@pytest.mark.parametrize("g2", ["identity", "tanh", "sigmoid"])
def test_input_gradient_is_shortcut_path_plus_weight_path(g2):
    """dX of the residual network = dU2 (shortcut) + the plain network's dX for
    the same output cotangent dU2 (weight path)."""
    X, Y, W1, b1, W2, b2 = map(jnp.asarray, _inputs())
    g = _RULE_G2[g2]

    def plain_body(X):  # X -> Z2: the article's network without its output activation
        return RULES.dense(RULES.tanh(RULES.dense(X, W1, b1)), W2, b2)

    def residual(X):
        return RULES.mse_loss(g(RULES.add(plain_body(X), X)), Y)

    dX = jax.grad(residual)(X)
    U2 = plain_body(X) + X
    dU2 = jax.grad(lambda U: jnp.sum((g(U) - Y) ** 2) / (2 * U.shape[0]))(U2)
    _, plain_vjp = jax.vjp(plain_body, X)
    (weight_path,) = plain_vjp(dU2)

    np.testing.assert_allclose(dX, dU2 + weight_path, rtol=0, atol=TIGHT)
    assert np.min(np.abs(dU2)) > 1e-3 and np.min(np.abs(weight_path)) > 1e-4
    # And both terms match the numpy derivation.
    ours = _numpy_seed(*_inputs(), g2=g2)
    np.testing.assert_allclose(dU2, ours["dX_shortcut"], rtol=0, atol=TIGHT)
    np.testing.assert_allclose(weight_path, ours["dX_weight"], rtol=0, atol=TIGHT)


# ------------------------------------------------------ the models
MLP_SIZE = dict(in_features=7, width=5, depth=3, out_features=4)


def _mlp_setup():
    # Data from numpy: every new shape drawn with jax.random costs a compilation.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, MLP_SIZE["in_features"])))
    targets = jnp.asarray(rng.normal(size=(6, MLP_SIZE["out_features"])))
    labels = jnp.asarray(rng.integers(0, MLP_SIZE["out_features"], size=6), jnp.int32)
    return jax.random.key(1), x, targets, labels


def _mlp_loss(model, loss, grad, params, x, targets, labels):
    out, _ = model.apply(params, {}, x, train=True, grad=grad)
    o = ops.opset(grad)
    return o.mse_loss(out, targets) if loss == "mse" else o.softmax_cross_entropy(out, labels)


# Compiled once per configuration: far cheaper on a CPU than op-by-op dispatch.
_mlp_grads = jax.jit(jax.grad(_mlp_loss, argnums=(3, 4)), static_argnums=(0, 1, 2))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("build", [models.residual_mlp, models.plain_mlp], ids=["residual_mlp", "plain_mlp"])
def test_mlp_rules_equal_autodiff(build, loss, activation):
    model = build(**MLP_SIZE, activation=activation)
    kp, x, targets, labels = _mlp_setup()
    params, _ = model.init(kp, jnp.float64)
    grads = {grad: _mlp_grads(model, loss, grad, params, x, targets, labels) for grad in ("rules", "autodiff")}
    flat_rules, flat_auto = jax.tree.leaves(grads["rules"]), jax.tree.leaves(grads["autodiff"])
    assert len(flat_rules) == len(flat_auto) == 2 * (MLP_SIZE["depth"] + 2) + 1
    for r, a in zip(flat_rules, flat_auto):
        assert r.dtype == jnp.float64
        np.testing.assert_allclose(r, a, rtol=0, atol=1e-10)


def test_residual_and_plain_mlp_input_gradients_differ():
    residual, plain = (
        models.residual_mlp(**MLP_SIZE, activation="tanh"),
        models.plain_mlp(**MLP_SIZE, activation="tanh"),
    )
    kp, x, targets, labels = _mlp_setup()
    params, _ = residual.init(kp, jnp.float64)  # the plain twin has the same parameter shapes
    dx = {m.name: _mlp_grads(m, "mse", "rules", params, x, targets, labels)[1] for m in (residual, plain)}
    assert np.max(np.abs(dx["residual_mlp"] - dx["plain_mlp"])) > 1e-2


def test_residual_mlp_matches_the_hand_derived_recurrence():
    """derivations/residual_mlp.md#the-librarys-generalisation-mlpspec, written in numpy."""
    model = models.residual_mlp(**MLP_SIZE, activation="tanh")
    kp, x, targets, _ = _mlp_setup()
    params, _ = model.init(kp, jnp.float64)
    p = jax.tree.map(np.asarray, params)
    X, Y = np.asarray(x), np.asarray(targets)
    m = X.shape[0]

    A = [np.tanh(X @ p["in"]["w"] + p["in"]["b"])]
    for layer in p["hidden"]:
        A.append(np.tanh(A[-1] @ layer["w"] + layer["b"] + A[-1]))
    out = A[-1] @ p["out"]["w"] + p["out"]["b"]

    dO = (out - Y) / m
    d_out = {"w": A[-1].T @ dO, "b": dO.sum(0)}
    dA = dO @ p["out"]["w"].T
    d_hidden = []
    for layer, a, a_prev in reversed(list(zip(p["hidden"], A[1:], A[:-1]))):
        dU = dA * (1 - a * a)
        d_hidden.insert(0, {"w": a_prev.T @ dU, "b": dU.sum(0)})
        dA = dU + dU @ layer["w"].T
    dZ_in = dA * (1 - A[0] * A[0])
    d_in = {"w": X.T @ dZ_in, "b": dZ_in.sum(0)}
    dX = dZ_in @ p["in"]["w"].T

    got_params, got_x = _mlp_grads(model, "mse", "rules", params, x, targets, None)
    expected = {"in": d_in, "hidden": d_hidden, "out": d_out}
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=0, atol=TIGHT), got_params, expected)
    np.testing.assert_allclose(got_x, dX, rtol=0, atol=TIGHT)


# ------------------------------------------------------ residual blocks (derivations/blocks.md)
BLOCKS = {
    "v1-identity": blocks.BlockSpec("basic", 4, 4),
    "v2-identity": blocks.BlockSpec("preact_basic", 4, 4),
    "v1-option-A": blocks.BlockSpec("basic", 4, 8, stride=2, shortcut="A"),
    "v1-option-B": blocks.BlockSpec("basic", 4, 8, stride=2, shortcut="B"),
}


def _block_setup(spec, seed=0):
    """Parameters of `init_block`'s shapes drawn with numpy (jax.random would
    compile once per shape), BN gammas and betas away from 1 and 0, and the
    initial running statistics (mean 0, var 1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: blocks.init_block(jax.random.key(0), spec, jnp.float64))

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape)
        value = {
            "w": np.sqrt(2 / np.prod(leaf.shape[:-1])) * noise,
            "gamma": 1 + 0.1 * noise,
            "beta": 0.1 * noise,
            "mean": np.zeros(leaf.shape),
            "var": np.ones(leaf.shape),
        }[name]
        return jnp.asarray(value, jnp.float64)

    params, state = jax.tree_util.tree_map_with_path(draw, shapes)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, spec.in_channels)))
    return params, state, x


def _cut(which):
    """The rule ops with the add's `which` input ("branch" or "shortcut") cut from the gradient."""
    if which == "branch":
        return RULES._replace(add=lambda a, b: jax.lax.stop_gradient(a) + b)
    return RULES._replace(add=lambda a, b: a + jax.lax.stop_gradient(b))


def _block_input_cotangent(op_set, spec, params, state, x, ct_y):
    _, vjp = jax.vjp(lambda x: blocks.apply_block(op_set, spec, params, state, x, train=True)[0], x)
    return np.asarray(vjp(ct_y)[0])


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_cotangent_is_shortcut_path_plus_branch_path(name):
    spec = BLOCKS[name]
    params, state, x = _block_setup(spec)
    y = np.asarray(blocks.apply_block(RULES, spec, params, state, x, train=True)[0])
    ct_y = np.random.default_rng(7).normal(size=y.shape)
    full, shortcut_only, branch_only = (
        _block_input_cotangent(op_set, spec, params, state, x, ct_y)
        for op_set in (RULES, _cut("branch"), _cut("shortcut"))
    )
    np.testing.assert_allclose(full, shortcut_only + branch_only, rtol=0, atol=TIGHT)
    assert np.max(np.abs(branch_only)) > 1e-3 and np.max(np.abs(shortcut_only)) > 1e-3

    # The shortcut path on its own, derived independently: v1's final ReLU masks
    # ct_y before the add; v2 has no ReLU after the add.
    ct_u = ct_y if spec.preact else np.where(y > 0, ct_y, 0.0)
    if name.endswith("identity"):
        np.testing.assert_array_equal(shortcut_only, ct_u)
    elif name == "v1-option-A":
        before = (spec.out_channels - spec.in_channels) // 2
        expected = np.zeros(x.shape)
        expected[:, ::2, ::2, :] = ct_u[..., before : before + spec.in_channels]
        np.testing.assert_array_equal(shortcut_only, expected)


def test_v2_identity_term_reaches_every_block_and_v1_masks_it():
    """He et al. 2016, eq. 5: through a stack of pre-activation blocks the
    shortcut paths alone carry ct_{x_L} to x_l unchanged; post-activation
    blocks multiply it by the ReLU masks of every block in between."""
    depth = 3
    for kind in ("preact_basic", "basic"):
        spec = blocks.BlockSpec(kind, 4, 4)
        setups = [_block_setup(spec, seed) for seed in range(depth)]
        x = setups[0][2]

        def stack(op_set, x, setups=setups, spec=spec):
            outputs = []
            for params, state, _ in setups:
                x = blocks.apply_block(op_set, spec, params, state, x, train=True)[0]
                outputs.append(x)
            return x, outputs

        (x_L, outputs), vjp_identity = jax.vjp(lambda x: stack(_cut("branch"), x), x)
        ct_x_L = np.random.default_rng(3).normal(size=x_L.shape)
        (identity_term,) = vjp_identity((ct_x_L, [jnp.zeros_like(o) for o in outputs]))
        _, vjp_full = jax.vjp(lambda x: stack(RULES, x)[0], x)
        (full,) = vjp_full(ct_x_L)
        if spec.preact:
            np.testing.assert_array_equal(identity_term, ct_x_L)
        else:
            masks = np.prod([np.asarray(o) > 0 for o in outputs], axis=0)
            np.testing.assert_array_equal(identity_term, ct_x_L * masks)
            assert 0 < masks.mean() < 1
        assert np.max(np.abs(full - identity_term)) > 1e-3  # the Σ of residual-branch terms


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_rules_equal_autodiff(name):
    spec = BLOCKS[name]
    params, state, x = _block_setup(spec)

    def loss(grad, params, x):
        y = blocks.apply_block(ops.opset(grad), spec, params, state, x, train=True)[0]
        return jnp.sum(y * jnp.cos(y))  # its cotangent ct_y varies from entry to entry

    rules, autodiff = (jax.grad(loss, argnums=(1, 2))(grad, params, x) for grad in ("rules", "autodiff"))
    jax.tree.map(lambda r, a: np.testing.assert_allclose(r, a, rtol=0, atol=1e-10), rules, autodiff)


def test_batch_norm_running_statistics_are_state_not_gradients():
    spec = BLOCKS["v1-option-B"]
    params, state, x = _block_setup(spec)

    def running_stats(params, x):
        _, new_state = blocks.apply_block(RULES, spec, params, state, x, train=True)
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(new_state))

    d_params, d_x = jax.grad(running_stats, argnums=(0, 1))(params, x)
    for leaf in jax.tree.leaves((d_params, d_x)):
        np.testing.assert_array_equal(leaf, 0.0)

    # One momentum step from the initial state (mean 0, var 1), with the batch
    # statistics of the first convolution's output (biased variance).
    _, new_state = blocks.apply_block(RULES, spec, params, state, x, train=True)
    h = np.asarray(conv2d_reference(x, params["conv0"]["w"], stride=spec.stride, padding="SAME"))
    momentum = blocks.BN_MOMENTUM
    np.testing.assert_allclose(new_state["bn0"]["mean"], (1 - momentum) * h.mean(axis=(0, 1, 2)), rtol=0, atol=TIGHT)
    np.testing.assert_allclose(
        new_state["bn0"]["var"], momentum + (1 - momentum) * h.var(axis=(0, 1, 2)), rtol=0, atol=TIGHT
    )

    _, eval_state = blocks.apply_block(RULES, spec, params, state, x, train=False)
    for got, before in zip(jax.tree.leaves(eval_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, before)
