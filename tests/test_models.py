"""Whole models: parameter counts against the published tables, and gradients
with the hand-derived rules equal to JAX autodiff of the reference ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import models, ops
from jax_resnet.gradcheck import relative_error


def _count(model):
    params, _ = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    return models.num_params(params)


# ResNet-20 by hand (He et al. 2015, §4.2: 3x3 convs, widths 16/32/64, option A):
#   stem 3·3·3·16 + BN 2·16                          =     464
#   stage 1: 6 convs of 3·3·16·16 + BN 32            =  14,016
#   stage 2: 3·3·16·32 + 64, then 5 × (3·3·32·32 + 64) = 51,072
#   stage 3: 3·3·32·64 + 128, then 5 × (3·3·64·64 + 128) = 203,520
#   head 64·10 + 10                                  =     650
#   total                                            = 269,722 ≈ 0.27M
def test_resnet20_count_by_hand():
    assert _count(models.resnet20()) == 464 + 14_016 + 51_072 + 203_520 + 650 == 269_722


@pytest.mark.parametrize(
    "name, millions",
    [
        ("resnet20", 0.27),
        ("resnet32", 0.46),
        ("resnet44", 0.66),
        ("resnet56", 0.85),
        ("resnet110", 1.7),
        ("resnet1202", 19.4),
    ],
)
def test_cifar_counts_match_the_paper_table(name, millions):
    # He et al. 2015, Table 6 rounds to two decimals below 1M and one above.
    n = _count(models.get(name))
    assert round(n / 1e6, 2 if n < 1e6 else 1) == millions, n


@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_imagenet_counts_equal_the_reference_builds(name, count):
    assert _count(models.get(name)) == count


def test_plain_twin_has_the_same_parameters_as_the_resnet():
    # Option-A shortcuts have no parameters, so removing them changes no count.
    assert _count(models.plain20()) == _count(models.resnet20())


# ----------------------------------------------------------- whole-model gradients
SMALL = {
    "residual_mlp": (lambda: models.residual_mlp(in_features=12, width=8, depth=3, out_features=5), (4, 12)),
    "plain_mlp": (
        lambda: models.plain_mlp(in_features=12, width=8, depth=3, out_features=5, activation="tanh"),
        (4, 12),
    ),
    "resnet8": (lambda: models.resnet8(num_classes=5, widths=(4, 8, 8)), (3, 8, 8, 3)),
    "plain8": (lambda: models.cifar_resnet(8, num_classes=5, widths=(4, 8, 8), residual=False), (3, 8, 8, 3)),
    "resnet20-narrow": (lambda: models.resnet20(num_classes=5, widths=(4, 4, 8)), (2, 8, 8, 3)),
    "preact_resnet20-narrow": (
        lambda: models.cifar_resnet(20, num_classes=5, widths=(4, 4, 8), block="preact_basic"),
        (2, 8, 8, 3),
    ),
    "resnet18-narrow": (lambda: models.resnet18(num_classes=5, width=4), (2, 16, 16, 3)),
    "resnet50-narrow": (lambda: models.resnet50(num_classes=5, width=2), (2, 16, 16, 3)),
    "preact_resnet18-narrow": (lambda: models.preact_resnet18(num_classes=5, width=4), (2, 16, 16, 3)),
}
# float32 needs batches where BatchNorm is well conditioned: with 2 examples and
# a 1x1 map, each channel normalises 2 numbers (x_hat = ±1) and backward
# rounding grows by ~1e-3 through the net for rules and autodiff alike.
SMALL_F32 = {
    "residual_mlp": (lambda: models.residual_mlp(in_features=12, width=8, depth=3, out_features=5), (8, 12)),
    "resnet8": (lambda: models.resnet8(num_classes=5, widths=(4, 8, 8)), (8, 8, 8, 3)),
    "resnet18-narrow": (lambda: models.resnet18(num_classes=5, width=4), (8, 32, 32, 3)),
    "resnet50-narrow": (lambda: models.resnet50(num_classes=5, width=4), (8, 32, 32, 3)),
}


def _loss(model, grad, train, params, state, x, labels):
    logits, new_state = model.apply(params, state, x, train=train, grad=grad)
    return ops.opset(grad).softmax_cross_entropy(logits, labels), new_state


def _setup(name, dtype, table=SMALL):
    make, shape = table[name]
    model = make()
    params, state = model.init(jax.random.key(0), dtype)
    # numpy draws: one jax.random call per parameter shape would compile a kernel each.
    rng = np.random.default_rng(0)
    noise = lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), dtype)
    # Random gammas and running statistics, so no BN parameter sits at a special value.
    params = jax.tree.map(lambda p: p + noise(p), params)
    state = jax.tree.map(lambda s: jnp.abs(s + noise(s)), state)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    labels = jnp.asarray(rng.integers(0, 5, shape[:1]), jnp.int32)
    return model, params, state, x, labels


# Eval mode of the ImageNet nets is covered in float32 below; in float64 their
# compile time (about 30 s each here) buys little the train mode does not.
CASES_F64 = [(n, t) for n in SMALL for t in (True, False) if t or "resnet18" not in n and "resnet50" not in n]


@pytest.mark.parametrize("name, train", CASES_F64, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in CASES_F64])
def test_model_gradients_rules_equal_autodiff_float64(name, train):
    model, params, state, x, labels = _setup(name, jnp.float64)
    grads = {}
    for grad in ("rules", "autodiff"):
        fn = jax.jit(jax.grad(functools.partial(_loss, model, grad, train), argnums=(0, 2), has_aux=True))
        grads[grad], _ = fn(params, state, x, labels)
    assert relative_error(grads["rules"], grads["autodiff"]) <= 1e-10
    assert np.isfinite(np.asarray(jax.tree.leaves(grads["rules"])[0])).all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(SMALL_F32))
def test_model_gradients_rules_equal_autodiff_float32(name, train):
    model, params, state, x, labels = _setup(name, jnp.float32, SMALL_F32)
    grads = {}
    for grad in ("rules", "autodiff"):
        fn = jax.jit(jax.grad(functools.partial(_loss, model, grad, train), has_aux=True))
        grads[grad], _ = fn(params, state, x, labels)
    assert relative_error(grads["rules"], grads["autodiff"]) <= 1e-4


def test_jit_and_nojit_agree():
    model, params, state, x, labels = _setup("resnet8", jnp.float64)
    fn = jax.grad(functools.partial(_loss, model, "rules", True), has_aux=True)
    eager, _ = fn(params, state, x, labels)
    compiled, _ = jax.jit(fn)(params, state, x, labels)
    assert relative_error(eager, compiled) <= 1e-12


def test_per_example_gradients_under_vmap():
    model, params, state, x, labels = _setup("resnet8", jnp.float64)

    def per_example(grad):
        def one(xi, li):
            return jax.grad(lambda p: _loss(model, grad, False, p, state, xi[None], li[None])[0])(params)

        return jax.jit(jax.vmap(one))(x, labels)

    rules, autodiff = per_example("rules"), per_example("autodiff")
    assert relative_error(rules, autodiff) <= 1e-10
    # Row i of the vmapped result is the gradient of example i alone.
    single = jax.grad(lambda p: _loss(model, "rules", False, p, state, x[1:2], labels[1:2])[0])(params)
    assert relative_error(jax.tree.map(lambda g: g[1], rules), single) <= 1e-12


def test_batchnorm_state_updates_once_per_training_call():
    model, params, state, x, _ = _setup("resnet8", jnp.float64)
    _, new_state = model.apply(params, state, x, train=True)
    h = ops.conv2d(x, params["stem"]["w"], stride=1, padding="SAME")
    batch_mean = jnp.mean(h, axis=(0, 1, 2))
    batch_var = jnp.var(h, axis=(0, 1, 2))
    np.testing.assert_allclose(
        new_state["stem_bn"]["mean"], 0.9 * state["stem_bn"]["mean"] + 0.1 * batch_mean, rtol=1e-12
    )
    np.testing.assert_allclose(new_state["stem_bn"]["var"], 0.9 * state["stem_bn"]["var"] + 0.1 * batch_var, rtol=1e-12)
    _, eval_state = model.apply(params, state, x, train=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), eval_state, state))


def test_rules_are_what_runs_in_a_model():
    model, params, state, x, _ = _setup("resnet8", jnp.float64)
    rules = str(jax.make_jaxpr(lambda p: model.apply(p, state, x, train=True)[0])(params))
    autodiff = str(jax.make_jaxpr(lambda p: model.apply(p, state, x, train=True, grad="autodiff")[0])(params))
    assert rules.count("custom_vjp_call") > 10
    assert "custom_vjp_call" not in autodiff


def test_zero_init_residual_starts_each_block_as_identity():
    model = models.resnet8(num_classes=5, widths=(4, 8, 8), zero_init_residual=True)
    params, _ = model.init(jax.random.key(0))
    last_bns = [p["bn1"]["gamma"] for p in params["blocks"]]
    assert all(float(jnp.abs(g).max()) == 0.0 for g in last_bns)


def test_bad_inputs_name_the_argument():
    model = models.resnet8(num_classes=5, widths=(4, 8, 8))
    params, state = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="`x`.*NHWC with 3 channels"):
        model.apply(params, state, jnp.zeros((2, 8, 8, 1)), train=True)
    with pytest.raises(ValueError, match="`grad`"):
        model.apply(params, state, jnp.zeros((2, 8, 8, 3)), train=True, grad="numeric")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar_resnet(21)
    with pytest.raises(ValueError, match="unknown model"):
        models.get("resnet19")
