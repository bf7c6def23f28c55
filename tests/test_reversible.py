"""Reversible networks: gradients of the stage that stores no activations equal
JAX autodiff of the same network storing them; reconstruction exact in float64
and bounded in float32; BatchNorm statistics recomputed equal and updated once;
the presets against Gomez et al. 2017, Table 1."""

import functools

import jax
import jax.numpy as jnp
import pytest

from jax_resnet import models, ops, reversible, step
from jax_resnet._compile import compile_once
from jax_resnet.gradcheck import max_leaf_error

RULES, AUTODIFF = ops.opset("rules"), ops.opset("autodiff")

# A reversible stage of 2 couplings per block type of the presets (RevNet-38/110:
# basic; RevNet-164: bottleneck), on 4x4 images; the non-reversible couplings
# and the head are checked in the whole model by the revnet38 test below.
SPECS = {"basic": reversible.CouplingSpec("basic", 8, 8), "bottleneck": reversible.CouplingSpec("bottleneck", 16, 4)}


def _stage_inputs(spec, dtype, n=2):
    params, state = reversible.init_stage(jax.random.key(0), spec, n, dtype)
    x1, x2 = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, spec.in_channels // 2), dtype)
    return params, state, x1, x2


@functools.cache
def _stage_gradients(block):
    """Float64 gradients (params, x1, x2) and new states, rules and autodiff, train and eval: one program."""
    spec = SPECS[block]
    params, state, x1, x2 = _stage_inputs(spec, jnp.float64)
    w1, w2 = jax.random.normal(jax.random.key(2), (2, *x1.shape), jnp.float64)

    def both(params, state, x1, x2):
        out = {}
        for train in (True, False):
            # segment=1: each coupling its own custom_vjp, its output stored (the float32 mitigation).
            runs = (("rules", RULES, None), ("autodiff", AUTODIFF, None), ("segment", RULES, 1))
            for name, o, segment in runs[: 3 if train and block == "basic" else 2]:

                def loss(p, x1, x2, o=o, train=train, segment=segment):
                    y1, y2, new_state = reversible.stage(o, spec, p, state, x1, x2, train=train, segment=segment)
                    # Nonlinear in y2, so the cotangent entering the backward is not constant.
                    return jnp.sum(w1 * y1) + jnp.sum(w2 * jnp.sin(y2)), new_state

                out[train, name] = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x1, x2)
        return out

    return compile_once(jax.jit(both), params, state, x1, x2)(params, state, x1, x2)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", list(SPECS))
def test_gradients_equal_autodiff_of_the_stored_stage(block, train):
    result = _stage_gradients(block)
    (g_rules, state_rules), (g_autodiff, state_autodiff) = result[train, "rules"], result[train, "autodiff"]
    err, where = max_leaf_error(g_rules, g_autodiff)
    assert err <= 1e-9, f"{block}, train={train}: gradient error {err:.2e} at {where}"
    # Running statistics: the rules' backward recomputes them and must not leak a second update.
    err, where = max_leaf_error(state_rules, state_autodiff)
    assert err <= 1e-12, f"{block}, train={train}: new state differs by {err:.2e} at {where}"


def test_segmented_stage_gradients_equal_autodiff():
    result = _stage_gradients("basic")
    (g_segment, state_segment), (g_autodiff, state_autodiff) = result[True, "segment"], result[True, "autodiff"]
    err, where = max_leaf_error(g_segment, g_autodiff)
    assert err <= 1e-9, f"segment=1: gradient error {err:.2e} at {where}"
    assert max_leaf_error(state_segment, state_autodiff)[0] <= 1e-12


def test_stage_saves_only_its_output_params_and_state():
    # The VJP closure's leaves are what the forward saved for the backward (shapes only: nothing runs).
    spec = SPECS["basic"]

    def saved(n):
        params, state, x1, x2 = _stage_inputs(spec, jnp.float32, n)
        leaves = {}
        for name, o in (("rules", RULES), ("autodiff", AUTODIFF)):
            f = lambda p, x1, x2, o=o, state=state: reversible.stage(o, spec, p, state, x1, x2, train=True)[:2]
            leaves[name] = jax.tree.leaves(jax.vjp(f, params, x1, x2)[1])
        return leaves, (params, state), x1

    for n in (2, 6):
        leaves, inputs, x1 = jax.eval_shape(functools.partial(saved, n))
        size = {name: sum(a.size for a in arrays) for name, arrays in leaves.items()}
        inputs = sum(a.size for a in jax.tree.leaves(inputs))
        assert size["rules"] == inputs + 2 * x1.size, (n, size)  # + y1 and y2
        assert size["autodiff"] > inputs + 2 * n * x1.size, (n, size)  # every coupling's activations


@pytest.fixture(scope="module")
def stage64():
    """A float64 reversible stage of 4 couplings with its forward run in training mode."""
    spec = reversible.CouplingSpec("basic", 8, 8)
    params, state = reversible.init_stage(jax.random.key(0), spec, 4, jnp.float64)
    x1, x2 = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, 4), jnp.float64)
    forward = jax.jit(functools.partial(reversible.stage, RULES, spec, train=True))
    return spec, params, state, x1, x2, forward(params, state, x1, x2)


def test_reconstruction_is_exact_to_float64_rounding(stage64):
    spec, params, state, x1, x2, (y1, y2, _) = stage64
    r1, r2, _ = jax.jit(functools.partial(reversible.reconstruct, RULES, spec, train=True))(params, state, y1, y2)
    scale = max(float(jnp.max(jnp.abs(x1))), float(jnp.max(jnp.abs(x2))))
    assert float(jnp.max(jnp.abs(r1 - x1))) <= 1e-13 * scale
    assert float(jnp.max(jnp.abs(r2 - x2))) <= 1e-13 * scale


def test_batch_statistics_recomputed_in_reconstruction_equal_the_forwards(stage64):
    # Both are momentum·old + (1 − momentum)·batch statistic, so equal states mean equal batch statistics;
    # the backward discards its recomputed ones, so the forward's update is the step's only one.
    spec, params, state, x1, x2, (y1, y2, new_state) = stage64
    _, _, recomputed = jax.jit(functools.partial(reversible.reconstruct, RULES, spec, train=True))(
        params, state, y1, y2
    )
    err, where = max_leaf_error(recomputed, new_state)
    assert err <= 1e-12, (err, where)
    assert max_leaf_error(new_state, state)[0] > 1e-3  # the statistics did move: the test can fail


def test_running_statistics_updated_once_per_training_step(stage64):
    # The gradient of the rules' stage (reconstructing every coupling in the backward) comes with the
    # same running statistics as the forward alone: momentum·old + (1 − momentum)·batch, applied once.
    spec, params, state, x1, x2, (_, _, forward_state) = stage64

    def loss(p):
        y1, y2, new_state = reversible.stage(RULES, spec, p, state, x1, x2, train=True)
        return jnp.sum(y1 * y2), new_state

    _, grad_state = jax.jit(jax.grad(loss, has_aux=True))(params)
    err, where = max_leaf_error(grad_state, forward_state)
    assert err <= 1e-12, (err, where)


# Measured with this test's stage (27 couplings of 8+8 channels, the couplings of
# RevNet-110, batch 4 of 8x8, training mode, at initialisation): 3.1e-5 of the
# input's largest entry (jax 0.10.2, CPU). derivations/reversible.md#error-analysis
# has the curve over depth; the bound leaves room for other seeds and backends.
FLOAT32_ERROR_AT_DEPTH_110 = 2e-4


def test_float32_reconstruction_error_at_depth_110_is_bounded():
    spec = reversible.CouplingSpec("basic", 16, 16)
    params, state = reversible.init_stage(jax.random.key(0), spec, 27)
    x1, x2 = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 8), jnp.float32)
    error = jax.jit(functools.partial(reversible.reconstruction_error, RULES, spec, train=True))
    err = float(compile_once(error, params, state, x1, x2)(params, state, x1, x2))
    print(f"float32 reconstruction error, 27 couplings (depth 110): {err:.2e}")
    assert 0 < err <= FLOAT32_ERROR_AT_DEPTH_110


def test_revnet38_passes_the_train_commands_gradient_check():
    model = models.get("revnet38").for_data((8, 8, 1), 3)
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1), jnp.float32)
    result = step.check_gradients(model, params, state, x, jnp.array([0, 1, 2, 0]))
    assert result.ok(1e-4), result


# Gomez et al. 2017, Table 1 (millions, two decimals). RevNet-38 by hand
# (F, G: BN-ReLU-conv3x3-BN-ReLU-conv3x3 on half the channels):
#   stem 3·3·3·32                                                   =     864
#   stage 0: 3 couplings × 2 × (2·16 + 3·3·16·16 + 2·16 + 3·3·16·16) =  28,032
#   stage 1: first (32 -> 64, option A): F 32 + 4,608 + 64 + 9,216,
#            G 2 × (64 + 9,216)                                       =  32,480
#            2 couplings × 2 × (64 + 9,216) × 2                       =  74,240
#   stage 2: first (64 -> 112): F 64 + 16,128 + 112 + 28,224,
#            G 2 × (112 + 28,224)                                     = 101,200
#            2 couplings × 2 × (112 + 28,224) × 2                     = 226,688
#   final BN 2·112 + head 112·10 + 10                                 =   1,354
#   total                                                             = 464,858 ≈ 0.46M
# RevNet-164 takes option-B projections (a 1x1 convolution per half) where the
# shape changes: 2·(16·64 + 64·128 + 128·256) = 83,968 of its 1,748,746; with
# option A it would count 1,664,778 ≈ 1.66M.
@pytest.mark.parametrize(
    "name, millions, count",
    [("revnet38", 0.46, 464_858), ("revnet110", 1.73, 1_729_162), ("revnet164", 1.75, 1_748_746)],
)
def test_preset_counts_match_the_paper_table(name, millions, count):
    params, _ = jax.eval_shape(lambda: models.get(name).init(jax.random.key(0)))
    n = models.num_params(params)
    assert n == count and round(n / 1e6, 2) == millions


def test_revnet38_count_by_hand():
    assert 864 + 28_032 + 32_480 + 74_240 + 101_200 + 226_688 + 1_354 == 464_858


def test_option_a_revnet164_count():
    params, _ = jax.eval_shape(lambda: models.get("revnet164", shortcut="A").init(jax.random.key(0)))
    assert models.num_params(params) == 1_748_746 - 83_968 == 1_664_778


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="CouplingSpec: `in_channels` must be even"):
        reversible.CouplingSpec("basic", 7, 8)
    with pytest.raises(ValueError, match="CouplingSpec: `block` must be one of"):
        reversible.CouplingSpec("preact_basic", 8, 8)
    spec = reversible.CouplingSpec("basic", 8, 8)
    params, state = jax.eval_shape(lambda: reversible.init_stage(jax.random.key(0), spec, 2))
    x = jnp.zeros((1, 4, 4, 4))
    with pytest.raises(ValueError, match="argument `segment` must divide the 2 couplings, got 3"):
        reversible.stage(RULES, spec, params, state, x, x, train=True, segment=3)
    with pytest.raises(ValueError, match="must be NHWC halves with 4 channels each"):
        reversible.stage(RULES, spec, params, state, x[..., :3], x[..., :3], train=True)
    with pytest.raises(ValueError, match="must be a reversible coupling"):
        reversible.init_stage(jax.random.key(0), reversible.CouplingSpec("basic", 8, 8, stride=2), 2)


def test_info_counts_the_flops_of_every_coupling_in_a_scan():
    # XLA's cost analysis sees a loop's body once; `models.summary` unrolls the stages to count them all.
    def flops(n):
        model = models.revnet((n,), "basic", (8,), stem_width=8, in_channels=1)
        return models.summary(model, (8, 8, 1))["flops"]

    # One 3x3 SAME convolution of 4 -> 4 channels on 8x8, multiply-add = 2: the taps inside the
    # image are 3·8 − 2 = 22 per axis (XLA does not count the zero padding).
    conv = 2 * 22 * 22 * 4 * 4
    assert flops(4) - flops(2) >= 2 * 4 * conv  # two more couplings, four such convolutions each
