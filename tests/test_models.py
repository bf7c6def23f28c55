"""Whole models: parameter counts against the published tables, and gradients
with the hand-derived rules equal to JAX autodiff of the reference ops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import blocks, curvature, models, ops
from jax_resnet.gradcheck import max_leaf_error


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


# Pre-activation ResNet-18 (v2, normalised once at the stem as Haiku's ResNetV2),
# from ResNet-18's 11,689,512:
#   no stem BN                                         −   128
#   no BN after the three option-B projections  −2·(128+256+512) = − 1,792
#   first block of stages 2-4: bn0 sees the input  −2·(64+128+256) = −   896
#   final BN before the pool                         +2·512       = + 1,024
#   total                                                          = 11,687,720
def test_preact_resnet18_count_by_hand():
    assert _count(models.preact_resnet18()) == 11_689_512 - 128 - 1_792 - 896 + 1_024 == 11_687_720


# ResNeXt-29, C×64d, by hand (Xie et al. 2017, §5.3): a 3x3 stem of 64 channels and BN; three stages of
# three bottleneck blocks, stage s with a grouped 3x3 of D = C·64·2^s channels in C groups and output
# O = 256·2^s, each conv followed by BN (2 parameters a channel), an option-B projection and BN where
# the shape changes (the first block of each stage); the head 1024·10 + 10.
def _resnext29_by_hand(cardinality):
    total, c = 3 * 3 * 3 * 64 + 2 * 64, 64
    for s in range(3):
        inner, out = cardinality * 64 * 2**s, 256 * 2**s
        for b in range(3):
            total += c * inner + 2 * inner  # 1x1 reduce
            total += 3 * 3 * (inner // cardinality) * inner + 2 * inner  # grouped 3x3
            total += inner * out + 2 * out  # 1x1 expand
            total += (c * out + 2 * out) if b == 0 else 0  # projection
            c = out
    return total + 1024 * 10 + 10


# WRN-d-k by hand (Zagoruyko & Komodakis 2016, Table 1): a bare 3x3 stem of 16 channels; three stages of
# n = (d − 4)/6 pre-activation blocks of width w = 16k·2^s, each BN (2 a channel), 3x3 conv, BN, 3x3 conv,
# with a bare 1x1 projection in the first block of each stage; a final BN and the head 64k·10 + 10.
def _wrn_by_hand(depth, k):
    total, c = 3 * 3 * 3 * 16, 16
    for s in range(3):
        w = 16 * k * 2**s
        for b in range((depth - 4) // 6):
            total += 2 * c + 3 * 3 * c * w + 2 * w + 3 * 3 * w * w + (c * w if b == 0 else 0)
            c = w
    return total + 2 * c + c * 10 + 10


@pytest.mark.parametrize(
    "name, by_hand, published, cut",
    [
        # Xie et al. 2017, Table 7: 34.4M and 68.1M, the counts cut (not rounded) to 0.1M (68.155M).
        ("resnext29_8x64d", _resnext29_by_hand(8), 34.4, math.floor),
        ("resnext29_16x64d", _resnext29_by_hand(16), 68.1, math.floor),
        # Zagoruyko & Komodakis 2016, Tables 1 and 4: 36.5M and 11.0M, rounded to 0.1M.
        ("wrn28_10", _wrn_by_hand(28, 10), 36.5, round),
        ("wrn16_8", _wrn_by_hand(16, 8), 11.0, round),
    ],
)
def test_resnext_and_wide_resnet_counts(name, by_hand, published, cut):
    n = _count(models.get(name))
    assert n == by_hand
    assert cut(n / 1e5) / 10 == published, n


def test_resnext_groups_its_3x3_convolutions():
    params, _ = jax.eval_shape(lambda: models.resnext29_8x64d().init(jax.random.key(0)))
    # HWIO with I = D / C: 512 channels in 8 groups of 64 in the first stage.
    assert params["blocks"][0]["conv1"]["w"].shape == (3, 3, 64, 512)
    assert params["blocks"][0]["conv0"]["w"].shape == (1, 1, 64, 512)


def test_dropout_and_groups_where_they_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="`dropout` must be 0.*no random key"):
        models.wrn28_10(dropout=0.3)
    with pytest.raises(ValueError, match="kind 'basic' has no grouped convolution"):
        blocks.BlockSpec("basic", 8, 8, groups=2)
    with pytest.raises(ValueError, match="≥ 1 channel per group.*give 8 -> 0"):
        blocks.BlockSpec("bottleneck", 8, 2, groups=3, base_width=16)


def test_preact_nets_normalise_once_at_the_stem():
    for name in ("preact_resnet18", "preact_resnet20"):
        params, _ = jax.eval_shape(lambda name=name: models.get(name).init(jax.random.key(0)))
        assert "stem_bn" not in params and "final_bn" in params, name


def test_every_preset_is_named_by_its_registry_key():
    for name in models.PRESETS:
        assert models.get(name).name == name
    assert models.preact_resnet20().name == "preact_resnet20"


# GroupNorm holds gamma and beta per channel exactly where BatchNorm did, and no
# running statistics: the GN twins count what the BN presets count, with empty state.
@pytest.mark.parametrize("name, count", [("resnet20_gn", 269_722), ("resnet18_gn", 11_689_512), ("tiny_gn", None)])
def test_groupnorm_presets_count_like_their_batchnorm_twins(name, count):
    params, state = jax.eval_shape(lambda: models.get(name).init(jax.random.key(0)))
    if count is None:  # tiny_gn: the count of its BatchNorm twin, tiny
        count = models.num_params(jax.eval_shape(lambda: models.tiny(in_channels=3).init(jax.random.key(0)))[0])
    assert models.num_params(params) == count
    assert jax.tree.leaves(state) == []


def test_groupnorm_groups_divide_every_width():
    # gcd(norm_groups, C): resnet20_gn's 16 groups give 16, 16, 16 at widths 16, 32, 64; 8 channels take 8.
    x = jnp.arange(2 * 3 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 3, 8)
    params, _ = blocks.init_norm(8, jnp.float32, "group")
    y, state = blocks.normalize(ops.opset("rules"), "group", 16, params, {}, x, train=True)
    np.testing.assert_allclose(y, ops.group_norm(x, params["gamma"], params["beta"], groups=8), rtol=1e-6)
    assert state == {}
    with pytest.raises(ValueError, match="`norm` must be one of"):
        models.cifar_resnet(8, norm="layer")


def test_plain_twin_has_the_same_parameters_as_the_resnet():
    # Option-A shortcuts have no parameters, so removing them changes no count.
    assert _count(models.plain20()) == _count(models.resnet20())


# ----------------------------------------------------------- whole-model gradients
# Small specs that take every code path of the full presets (stems, block
# kinds, identity/A/B shortcuts, stage changes); the counts above cover the
# full-size builds.
def _imagenet_small(block, width):
    return models.imagenet_resnet((1, 1), block, num_classes=5, width=width)


SMALL = {
    "residual_mlp": (lambda: models.residual_mlp(in_features=12, width=8, depth=3, out_features=5), (4, 12)),
    "plain_mlp": (
        lambda: models.plain_mlp(in_features=12, width=8, depth=3, out_features=5, activation="tanh"),
        (4, 12),
    ),
    "resnet8": (lambda: models.resnet8(num_classes=5, widths=(4, 8, 8)), (3, 8, 8, 3)),
    "plain8": (lambda: models.cifar_resnet(8, num_classes=5, widths=(4, 8, 8), residual=False), (3, 8, 8, 3)),
    "preact_resnet8": (
        lambda: models.cifar_resnet(8, num_classes=5, widths=(4, 4, 8), block="preact_basic"),
        (2, 8, 8, 3),
    ),
    "resnet18-small": (lambda: _imagenet_small("basic", 4), (2, 16, 16, 3)),
    "resnet50-small": (lambda: _imagenet_small("bottleneck", 2), (2, 16, 16, 3)),
    "preact_bottleneck-small": (lambda: _imagenet_small("preact_bottleneck", 2), (2, 16, 16, 3)),
    # ResNeXt's grouped bottleneck (2 groups of 4 channels in the 3x3) and a Wide ResNet's pre-activation
    # blocks with projections at both stages, built as their presets are.
    "resnext-small": (
        lambda: models.resnet((1, 1), "bottleneck", (2, 4), stem_width=4, groups=2, base_width=128, num_classes=5),
        (2, 8, 8, 3),
    ),
    "wrn-small": (lambda: models.resnet((2, 1), "preact_basic", (4, 8), stem_width=2, num_classes=5), (2, 8, 8, 3)),
}
# float32 needs batches where BatchNorm is well conditioned: with 2 examples and
# a 1x1 map, each channel normalises 2 numbers (x_hat = ±1) and backward
# rounding grows by ~1e-3 through the net for rules and autodiff alike.
SMALL_F32 = {
    "residual_mlp": (lambda: models.residual_mlp(in_features=12, width=8, depth=3, out_features=5), (8, 12)),
    "resnet8": (lambda: models.resnet8(num_classes=5, widths=(4, 8, 8)), (8, 8, 8, 3)),
    "resnet18-small": (lambda: _imagenet_small("basic", 4), (8, 16, 16, 3)),
}


def worst_leaf_error(actual, expected):
    """Worst per-leaf error, each leaf against its own scale.

    A leaf whose gradient vanishes (at most 1e-12 of the largest value in the
    tree, so both sides are rounding noise) is measured against the tree's
    scale instead. Such leaves exist: in the bottleneck nets below, the stem
    BatchNorm's shift passes ReLU (all positive where the max pool picks) and
    the max pool as a constant per channel, which the next 1x1 convolutions and
    their BatchNorms remove, so its exact gradient is 0.
    """
    scale = max(float(np.max(np.abs(np.asarray(e)), initial=0.0)) for e in jax.tree.leaves(expected))
    vanishing = jax.tree.map(lambda e: float(np.max(np.abs(np.asarray(e)), initial=0.0)) <= 1e-12 * scale, expected)
    own = max_leaf_error(*(jax.tree.map(lambda t, v: None if v else t, tree, vanishing) for tree in (actual, expected)))
    diffs = jax.tree.map(
        lambda a, e, v: np.abs(np.asarray(a) - np.asarray(e)).max() if v else 0.0, actual, expected, vanishing
    )
    rest = float(np.max(jax.tree.leaves(diffs), initial=0.0)) / (scale or 1.0)
    return float(np.max([own[0], rest]))  # np.max, not max: NaN on either side is the answer


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


# Every family in train mode (batch statistics, the harder backward); eval mode
# for the CIFAR and MLP families and one ImageNet bottleneck net with option-B
# projections, which between them take every eval-mode path.
EVAL_F64 = ("residual_mlp", "plain_mlp", "resnet8", "plain8", "preact_resnet8", "resnet50-small", "resnext-small")
CASES_F64 = [(n, True) for n in SMALL] + [(n, False) for n in EVAL_F64]


@pytest.mark.parametrize("name, train", CASES_F64, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in CASES_F64])
def test_model_gradients_rules_equal_autodiff_float64(name, train):
    model, params, state, x, labels = _setup(name, jnp.float64)
    grads = {}
    for grad in ("rules", "autodiff"):
        fn = jax.jit(jax.grad(functools.partial(_loss, model, grad, train), argnums=(0, 2), has_aux=True))
        grads[grad], _ = fn(params, state, x, labels)
    assert worst_leaf_error(grads["rules"], grads["autodiff"]) <= 1e-10
    assert np.isfinite(np.asarray(jax.tree.leaves(grads["rules"])[0])).all()


CASES_F32 = [(n, True) for n in SMALL_F32] + [("resnet8", False)]


@pytest.mark.parametrize("name, train", CASES_F32, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in CASES_F32])
def test_model_gradients_rules_equal_autodiff_float32(name, train):
    model, params, state, x, labels = _setup(name, jnp.float32, SMALL_F32)
    grads = {}
    for grad in ("rules", "autodiff"):
        fn = jax.jit(jax.grad(functools.partial(_loss, model, grad, train), has_aux=True))
        grads[grad], _ = fn(params, state, x, labels)
    assert worst_leaf_error(grads["rules"], grads["autodiff"]) <= 1e-4


def test_jit_and_nojit_agree():
    model, params, state, x, labels = _setup("resnet8", jnp.float64)
    fn = jax.grad(functools.partial(_loss, model, "rules", True), has_aux=True)
    eager, _ = fn(params, state, x, labels)
    compiled, _ = jax.jit(fn)(params, state, x, labels)
    assert worst_leaf_error(eager, compiled) <= 1e-12


def test_per_example_gradients_under_vmap():
    model, params, state, x, labels = _setup("resnet8", jnp.float64)

    def per_example(grad):
        def one(xi, li):
            return jax.grad(lambda p: _loss(model, grad, False, p, state, xi[None], li[None])[0])(params)

        return jax.jit(jax.vmap(one))(x, labels)

    rules, autodiff = per_example("rules"), per_example("autodiff")
    assert worst_leaf_error(rules, autodiff) <= 1e-10
    # Row i of the vmapped result is the gradient of example i alone.
    single = jax.jit(jax.grad(lambda p: _loss(model, "rules", False, p, state, x[1:2], labels[1:2])[0]))(params)
    assert worst_leaf_error(jax.tree.map(lambda g: g[1], rules), single) <= 1e-12


def test_hessian_vector_product_rules_equal_autodiff():
    """`curvature.hvp` (reverse over reverse) of a whole model's loss: the rules' second derivatives are
    autodiff's. Forward over reverse (jax.jvp of jax.grad) works on the rules too and agrees. A tanh MLP
    (a ReLU net's Hessian has no activation term); conv, BN and pooling are checked second-order rule by
    rule (tests/test_rules.py::test_grad_of_grad)."""
    model = models.residual_mlp(in_features=6, width=5, depth=2, out_features=4, activation="tanh")
    params, state = model.init(jax.random.key(0), jnp.float64)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    x, labels = jnp.asarray(rng.standard_normal((3, 6))), jnp.asarray(rng.integers(0, 4, (3,)))

    def loss(grad, p):
        return _loss(model, grad, True, p, state, x, labels)[0]

    @jax.jit
    def products(p, v):
        reverse = {g: curvature.hvp(functools.partial(loss, g), p, v) for g in ("rules", "autodiff")}
        return reverse, jax.jvp(jax.grad(functools.partial(loss, "rules")), (p,), (v,))[1]

    reverse, forward_over_reverse = products(params, v)
    assert worst_leaf_error(reverse["rules"], reverse["autodiff"]) <= 1e-10
    assert worst_leaf_error(forward_over_reverse, reverse["autodiff"]) <= 1e-10
    assert float(jnp.abs(reverse["rules"]["hidden"][0]["w"]).max()) > 1e-3  # a Hessian that is not zero
    with pytest.raises(ValueError, match=r"hvp: argument `v` leaf \['in'\]\['b'\] has shape \(2,\), expected \(5,\)"):
        curvature.hvp(functools.partial(loss, "rules"), params, {**v, "in": {**v["in"], "b": jnp.ones(2)}})


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


@pytest.mark.parametrize("kind", list(blocks.KINDS))
def test_zero_init_residual_makes_every_block_kind_its_shortcut(kind):
    """v1 zeroes the last BN's scale, v2 (no BN after its last conv) that conv's kernel:
    either way the branch adds 0, so a block whose shape is kept returns its shortcut."""
    spec = blocks.BlockSpec(kind, in_channels=8, width=8 // blocks.KINDS[kind].expansion, zero_init_residual=True)
    params, state = blocks.init_block(jax.random.key(0), spec, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8), jnp.float64)
    y, _ = blocks.apply_block(ops.opset("rules"), spec, params, state, x, train=True)
    expected = x if spec.preact else jnp.maximum(x, 0)  # v1 applies ReLU after the add
    np.testing.assert_array_equal(y, expected)


def _stem_output(model, params, state, x):
    """The activation entering block 0, as the forward hook sees it (one compiled program)."""

    def forward(params, x):
        seen = {}

        def hook(i, h):
            seen.setdefault(i, h)
            return h

        model.apply(params, state, x, train=True, hook=hook)
        return seen[0]

    return jax.jit(forward)(params, x)


@pytest.mark.parametrize(
    "padding, conv_pad, pool_pad", [("torchvision", [(3, 3)] * 2, [(1, 1)] * 2), ("same", "SAME", "SAME")]
)
def test_imagenet_stem_padding_matches_lax_with_that_padding(padding, conv_pad, pool_pad):
    """At an even input size the two conventions differ: torchvision pads (3, 3) and
    (1, 1), XLA's SAME pads (2, 3) and (0, 1). Each stem equals lax with its own padding."""
    model = models.imagenet_resnet((1, 1, 1, 1), "basic", num_classes=3, width=4, stem_padding=padding)
    params, state = model.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), jnp.float64)
    h = jax.lax.conv_general_dilated(
        x, params["stem"]["w"], (2, 2), conv_pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean, var = jnp.mean(h, axis=(0, 1, 2)), jnp.var(h, axis=(0, 1, 2))
    h = jnp.maximum((h - mean) / jnp.sqrt(var + 1e-5), 0)  # gamma 1, beta 0 at init
    pool_pads = [(0, 0), *pool_pad, (0, 0)] if padding == "torchvision" else "SAME"
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pool_pads)
    np.testing.assert_allclose(_stem_output(model, params, state, x), h, rtol=1e-12, atol=1e-12)
    other = models.imagenet_resnet(
        (1, 1, 1, 1),
        "basic",
        num_classes=3,
        width=4,
        stem_padding="same" if padding == "torchvision" else "torchvision",
    )
    assert float(jnp.max(jnp.abs(_stem_output(other, params, state, x) - h))) > 1e-3


def test_kernel_mask_marks_conv_and_dense_kernels_only():
    for model in (models.resnet8(), models.residual_mlp(), _imagenet_small("bottleneck", 2)):
        params, _ = jax.eval_shape(lambda m=model: m.init(jax.random.key(0)))
        flags = jax.tree_util.tree_leaves_with_path(model.kernel_mask(params))
        assert all(flag == (path[-1].key == "w") for path, flag in flags), model.name
        assert sum(flag for _, flag in flags) == len(model.spec.weight_paths())


def test_for_data_sizes_input_and_head():
    mlp = models.residual_mlp().for_data((28, 28, 1), 7)
    assert (mlp.spec.in_features, mlp.spec.out_features, mlp.name) == (784, 7, "residual_mlp")
    net = models.resnet18().for_data((32, 32, 1), 10)
    assert (net.spec.in_channels, net.spec.num_classes) == (1, 10)
    with pytest.raises(ValueError, match="image_shape"):
        models.resnet18().for_data((784,), 10)


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
    with pytest.raises(ValueError, match="`stem_padding`"):
        models.imagenet_resnet((1, 1, 1, 1), "basic", stem_padding="valid")
    with pytest.raises(ValueError, match="`block`"):
        models.cifar_resnet(8, block="wide")


def test_a_new_block_kind_is_one_row(monkeypatch):
    """A kind the library lacks (three 3x3 convolutions, arranged as v1) is one row of `blocks.KINDS`:
    specs, init, forward, the parameter count and the hand-derived gradients follow from it."""

    def three(spec):
        c, w, o, s = spec.in_channels, spec.width, spec.out_channels, spec.stride
        return [blocks.Conv(3, c, w, s), blocks.Conv(3, w, w, 1), blocks.Conv(3, w, o, 1)]

    row = blocks.BlockKind(expansion=1, convs=three, apply=blocks.KINDS["basic"].apply, preact=False)
    monkeypatch.setitem(blocks.KINDS, "triple", row)
    model = models.resnet((1, 1), "triple", (2, 4), stem_width=2, num_classes=3)
    params, state = model.init(jax.random.key(0), jnp.float64)
    # stem 3·3·3·2 + 4; stage 1: 3 convs of 3·3·2·2 + 3 BNs of 4; stage 2: 3·3·2·4 + 2 × 3·3·4·4 + 3 × 8,
    # projection 2·4 + 8; head 4·3 + 3.
    assert models.num_params(params) == 58 + 120 + (72 + 288 + 24) + 16 + 15 == 593
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)))
    labels = jnp.asarray([0, 2], jnp.int32)
    grads = {
        g: jax.jit(jax.grad(functools.partial(_loss, model, g, True), has_aux=True))(params, state, x, labels)[0]
        for g in ("rules", "autodiff")
    }
    assert max_leaf_error(grads["rules"], grads["autodiff"])[0] <= 1e-10
