"""Flax NNX modules over the rules: equal to Flax's own layers and to the pure
models given the same weights, the rules really run inside them, weights move
both ways, and an nnx.Optimizer trains them."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_resnet import blocks, models
from jax_resnet import nnx as jrnnx
from jax_resnet.gradcheck import relative_error
from jax_resnet.ops import opset

# Flax's layers against ours, in float64: the same maths in another order
# (Flax's BN multiplies by scale·rsqrt(var + eps); ours by rsqrt, then scale)
# and, backwards, JAX's derivatives against the hand-derived ones.
# (In float32 the same comparisons agree to 2e-6.)
TOL = 1e-12


def _flat(tree) -> dict:
    """{path: array} of an nnx State or module."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def _copy_weights(src, dst):
    """Give `dst` every variable of `src` at the same path, reshaped (a 1x1 Conv kernel from a Projection's)."""
    values = _flat(src)
    dst_vars = dict(nnx.to_flat_state(nnx.state(dst)))
    assert set(values) == set(dst_vars)
    for path, var in dst_vars.items():
        var.set_value(values[path].reshape(var.get_value().shape))


def _assert_close(actual: dict, expected: dict, tol):
    """Same paths; each leaf's norm-wise relative error within tol (shapes may differ by size-1 axes)."""
    assert set(actual) == set(expected)
    for path in expected:
        err = relative_error(actual[path].reshape(expected[path].shape), expected[path])
        assert err <= tol, (path, err)


def _value(name, shape, dtype, rng):
    """A random array for a variable called `name`: BN scales and variances positive, kernels ~ 1/sqrt(fan_in).

    NumPy draws them: every new shape of jax.random.normal costs an XLA compilation.
    """
    if name in ("scale", "gamma", "var"):
        a = rng.uniform(0.5, 1.5, shape)
    elif name in ("bias", "beta", "b", "mean"):
        a = 0.3 * rng.standard_normal(shape)
    else:
        a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(a, dtype)


def _filled(build, seed=0):
    """The module `build` makes, its variables drawn by `_value` rather than by its initializers."""
    module = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module)):
        abstract = var.get_value()
        var.set_value(_value(path[-1], abstract.shape, abstract.dtype, rng))
    return module


def _pure_weights(model, seed=0, dtype=jnp.float32):
    """(params, state) of `model.init`'s layout, drawn by `_value`."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), dtype))
    return jax.tree_util.tree_map_with_path(lambda path, a: _value(path[-1].key, a.shape, a.dtype, rng), abstract)


def _normal(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ----------------------------------------------------- one network, two builds
class FlaxBasicBlock(nnx.Module):
    """A v1 basic block with an option-B projection from Flax's own layers."""

    def __init__(self, c_in, c_out, stride, *, dtype, rngs):
        conv = functools.partial(nnx.Conv, use_bias=False, param_dtype=dtype, rngs=rngs)
        bn = functools.partial(
            nnx.BatchNorm, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs
        )
        self.conv0, self.bn0 = conv(c_in, c_out, (3, 3), strides=stride), bn(c_out)
        self.conv1, self.bn1 = conv(c_out, c_out, (3, 3)), bn(c_out)
        self.proj, self.proj_bn = conv(c_in, c_out, (1, 1), strides=stride), bn(c_out)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        return nnx.relu(h + self.proj_bn(self.proj(x)))


class Net(nnx.Module):
    """conv → BN → relu → basic block (projection) → global average → linear.

    `flax=True` builds it from nnx.Conv/BatchNorm/Linear, otherwise from
    jax_resnet.nnx with the rules; the attribute names (so the state paths) agree.
    """

    def __init__(self, *, flax: bool, dtype, rngs):
        self.flax = flax
        if flax:
            self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, param_dtype=dtype, rngs=rngs)
            self.stem_bn = nnx.BatchNorm(
                4, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs
            )
            self.block = FlaxBasicBlock(4, 8, 2, dtype=dtype, rngs=rngs)
            self.head = nnx.Linear(8, 5, param_dtype=dtype, rngs=rngs)
        else:
            self.stem = jrnnx.Conv(3, 4, 3, param_dtype=dtype, rngs=rngs)
            self.stem_bn = jrnnx.BatchNorm(4, param_dtype=dtype, rngs=rngs)
            self.block = jrnnx.BasicBlock(4, 8, strides=2, shortcut="B", param_dtype=dtype, rngs=rngs)
            self.head = jrnnx.Linear(8, 5, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        relu, pool = (
            (nnx.relu, lambda h: jnp.mean(h, axis=(1, 2))) if self.flax else (opset().relu, opset().global_avg_pool)
        )
        h = relu(self.stem_bn(self.stem(x)))
        return self.head(pool(self.block(h)))


def _loss(model, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def test_network_equals_flax_layers_outputs_state_and_gradients():
    dtype = jnp.float64
    ours = _filled(lambda: Net(flax=False, dtype=dtype, rngs=nnx.Rngs(0)))
    theirs = nnx.eval_shape(lambda: Net(flax=True, dtype=dtype, rngs=nnx.Rngs(0)))
    _copy_weights(ours, theirs)
    x, labels = _normal((2, 8, 8, 3), dtype), jnp.array([1, 3])
    forward, grad = nnx.jit(lambda m, x: m(x)), nnx.jit(nnx.grad(_loss))

    # Train mode: batch statistics; the running statistics are updated once per call.
    ours.train(), theirs.train()
    _assert_close({0: forward(ours, x)}, {0: forward(theirs, x)}, TOL)
    _assert_close(_flat(nnx.state(ours, nnx.BatchStat)), _flat(nnx.state(theirs, nnx.BatchStat)), TOL)
    grads = [grad(m, x, labels) for m in (ours, theirs)]
    assert len(_flat(grads[0])) == 14  # every Param: stem 1, stem_bn 2, block 9, head 2
    _assert_close(_flat(grads[0]), _flat(grads[1]), TOL)
    _assert_close(_flat(nnx.state(ours, nnx.BatchStat)), _flat(nnx.state(theirs, nnx.BatchStat)), TOL)

    # Eval mode: the running statistics, left unchanged.
    ours.eval(), theirs.eval()
    assert ours.block.bn0.use_running_average is True
    stats = _flat(nnx.state(ours, nnx.BatchStat))
    _assert_close({0: forward(ours, x)}, {0: forward(theirs, x)}, TOL)
    grads = [grad(m, x, labels) for m in (ours, theirs)]
    _assert_close(_flat(grads[0]), _flat(grads[1]), TOL)
    _assert_close(_flat(nnx.state(ours, nnx.BatchStat)), stats, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(3, 3), strides=2),
        dict(kernel_size=(3, 1), padding=1, kernel_dilation=2),
        dict(kernel_size=(3, 3), padding="VALID", feature_group_count=2, use_bias=True),
    ],
    ids=["stride2-same", "dilated-int-padding", "grouped-valid-bias"],
)
def test_conv_equals_nnx_conv_and_its_vjp(kwargs):
    dtype = jnp.float64
    ours = _filled(lambda: jrnnx.Conv(4, 6, param_dtype=dtype, rngs=nnx.Rngs(0), **kwargs))
    theirs = nnx.eval_shape(  # nnx.Conv has a bias by default, ours not
        lambda: nnx.Conv(4, 6, **{"use_bias": False, **kwargs}, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    _copy_weights(ours, theirs)
    x = _normal((2, 7, 8, 4), dtype)
    _assert_close({0: ours(x)}, {0: theirs(x)}, TOL)

    ct_y = _normal(ours(x).shape, dtype, seed=1)
    pullback = nnx.grad(lambda module, x: jnp.sum(module(x) * ct_y), argnums=(0, 1))
    (ct_ours, ct_x), (ct_theirs, ct_x_ref) = pullback(ours, x), pullback(theirs, x)
    _assert_close({0: ct_x}, {0: ct_x_ref}, TOL)
    _assert_close(_flat(ct_ours), _flat(ct_theirs), TOL)


# ------------------------------------------------------------------- BatchNorm
def test_batch_norm_momentum_convention_matches_nnx_and_blocks():
    """running = 0.9·running + 0.1·batch with the biased batch variance, once per train call."""
    dtype = jnp.float64
    x = 2 * _normal((4, 3, 3, 5), dtype) + 1
    ours = jrnnx.BatchNorm(5, param_dtype=dtype, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=nnx.Rngs(0))
    # nnx.BatchNorm keeps mean and var in float32 whatever param_dtype; ours are float64.
    _copy_weights(ours, theirs)
    assert ours.use_running_average is False  # nnx.BatchNorm's default: train mode
    ours(x), theirs(x)

    mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))  # ddof=0: biased
    np.testing.assert_allclose(ours.mean[...], 0.1 * mean, rtol=1e-13)
    np.testing.assert_allclose(ours.var[...], 0.9 + 0.1 * var, rtol=1e-13)
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-13)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-13)
    bn_params, bn_state = blocks.init_bn(5, dtype)
    _, new_state = blocks.batch_norm(opset(), bn_params, bn_state, x, train=True)
    for name, value in jrnnx.to_pure(ours)[1].items():
        np.testing.assert_array_equal(value, new_state[name])

    ours(x)  # a second train call: a second update
    np.testing.assert_allclose(ours.mean[...], 0.9 * 0.1 * mean + 0.1 * mean, rtol=1e-13)

    before = _flat(ours)
    ours.eval()
    assert ours.use_running_average is True
    y = ours(x)
    _assert_close(_flat(ours), before, 0.0)
    np.testing.assert_allclose(y, (x - ours.mean[...]) / jnp.sqrt(ours.var[...] + 1e-5), rtol=1e-12)
    assert nnx.view(ours, use_running_average=False).use_running_average is False  # via set_view
    ours(x, use_running_average=False)  # a call's flag overrides the attribute
    assert not np.array_equal(ours.mean[...], before[("mean",)])


# ------------------------------------------------------ the rules run inside
def _custom_vjp_backwards(module, x):
    """The backward functions of the custom_vjp calls in module(x)'s jaxpr, and its top-level primitives."""
    graphdef, state = nnx.split(module)
    closed = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    return re.findall(r"bwd=(\w+)", str(closed)), {e.primitive.name for e in closed.jaxpr.eqns}


def test_forward_calls_the_custom_vjp_rules_and_autodiff_does_not():
    net = nnx.eval_shape(lambda: jrnnx.ResNet("tiny", rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)

    bwds, primitives = _custom_vjp_backwards(net, x)
    # tiny: a stem conv and 3 blocks of 2 convs, a BN after each; option A between stages.
    assert bwds.count("_conv2d_bwd") == 7
    assert bwds.count("_batch_norm_train_bwd") == 7
    assert bwds.count("_relu_bwd") == 7 and bwds.count("_add_bwd") == 3 and bwds.count("_shortcut_pad_bwd") == 2
    assert bwds.count("_global_avg_pool_bwd") == 1 and bwds.count("_dense_bwd") == 1
    assert "conv_general_dilated" not in primitives  # every convolution is inside a rule

    net.eval()
    bwds, _ = _custom_vjp_backwards(net, x)
    assert bwds.count("_batch_norm_eval_bwd") == 7 and "_batch_norm_train_bwd" not in bwds

    net.set_attributes(grad="autodiff")
    bwds, primitives = _custom_vjp_backwards(net, x)
    assert bwds == [] and "conv_general_dilated" in primitives


# --------------------------------------------------- ResNet against the pure model
SPECS = {
    "tiny": (models.tiny(), (2, 8, 8, 1)),
    "imagenet-bottleneck-B": (
        models.Model(models.ResNetSpec((1, 1), "bottleneck", (2, 4), "imagenet", 4, "B", num_classes=3)),
        (2, 16, 16, 3),
    ),
    "preact-B": (models.cifar_resnet(8, num_classes=3, widths=(4, 4, 8), block="preact_basic").spec, (2, 8, 8, 3)),
}


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("name", list(SPECS))
def test_resnet_equals_pure_model_after_from_pure(name):
    spec, shape = SPECS[name]
    model = spec if isinstance(spec, models.Model) else models.Model(spec)
    params, state = _pure_weights(model)
    x = _normal(shape)
    net = jrnnx.from_pure(spec, params, state)
    assert isinstance(net, jrnnx.ResNet)

    # Round trip: the same tree holding the very same arrays.
    back = jrnnx.to_pure(net)
    assert jax.tree.structure(back) == jax.tree.structure((params, state))
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves((params, state))))

    out, new_state = model.apply(params, state, x, train=True)
    np.testing.assert_array_equal(net(x), out)
    _assert_trees_equal(jrnnx.to_pure(net)[1], new_state)

    net.eval()
    out, _ = model.apply(params, new_state, x, train=False)
    np.testing.assert_array_equal(net(x), out)


def test_resnet_gradients_equal_the_pure_models():
    model = models.tiny()
    params, state = _pure_weights(model)
    x, labels = _normal((2, 8, 8, 1)), jnp.array([0, 7])
    net = jrnnx.from_pure(model, params, state)

    def pure_loss(params):
        logits, _ = model.apply(params, state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.jit(nnx.grad(_loss))(net, x, labels)
    # The gradient State has the module's layout: merged into a module, to_pure reads it as pure params.
    graphdef, _, batch_stats = nnx.split(net, nnx.Param, ...)
    grads_pure, _ = jrnnx.to_pure(nnx.merge(graphdef, grads, batch_stats))
    _assert_trees_equal(grads_pure, jax.jit(jax.grad(pure_loss))(params))


def test_block_from_pure_and_back_for_a_bottleneck():
    # The shapes of the second block of SPECS["imagenet-bottleneck-B"]: its compiled ops are reused.
    spec = blocks.BlockSpec("bottleneck", 8, 4, stride=2)
    params, state = jax.eval_shape(lambda: blocks.init_block(jax.random.key(0), spec))
    rng = np.random.default_rng(0)
    params, state = jax.tree_util.tree_map_with_path(
        lambda p, a: _value(p[-1].key, a.shape, a.dtype, rng), (params, state)
    )
    block = jrnnx.from_pure(spec, params, state)
    assert isinstance(block, jrnnx.Block)
    x = _normal((2, 4, 4, 8))
    out, new_state = blocks.apply_block(opset(), spec, params, state, x, train=True)
    np.testing.assert_array_equal(block(x), out)
    _assert_trees_equal(jrnnx.to_pure(block)[1], new_state)
    fresh = nnx.eval_shape(lambda: jrnnx.Bottleneck(8, 4, strides=2, rngs=nnx.Rngs(0)))
    assert fresh.spec == spec
    assert jax.tree.structure(jrnnx.to_pure(fresh)) == jax.tree.structure((params, state))


def test_initializers_follow_the_pure_models():
    """He-normal kernels drawn from the Rngs, BN scale 1 (0 for the last with zero_init_residual), bias 0."""
    block = jrnnx.BasicBlock(2, 2, zero_init_residual=True, rngs=nnx.Rngs(0))
    again = jrnnx.BasicBlock(2, 2, zero_init_residual=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(block.conv0.kernel[...], again.conv0.kernel[...])
    assert not np.array_equal(block.conv0.kernel[...], block.conv1.kernel[...])
    np.testing.assert_array_equal(block.bn0.scale[...], jnp.ones(2))
    np.testing.assert_array_equal(block.bn1.scale[...], jnp.zeros(2))
    np.testing.assert_array_equal(block.bn1.bias[...], jnp.zeros(2))
    assert block.conv0.kernel[...].dtype == jnp.float32 and block.bn0.mean[...].dtype == jnp.float32


# --------------------------------------------------------------------- training
def test_three_sgd_steps_with_nnx_optimizer_decrease_the_loss():
    model = _filled(lambda: jrnnx.ResNet(models.tiny(num_classes=4), rngs=nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, labels = _normal((8, 8, 8, 1)), jnp.arange(8) % 4

    @nnx.jit
    def step(model, optimizer, x, labels):
        loss, grads = nnx.value_and_grad(_loss)(model, x, labels)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, labels)) for _ in range(3)]
    losses.append(float(nnx.jit(_loss)(model, x, labels)))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert int(optimizer.step[...]) == 3


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda r: jrnnx.Linear(0, 3, rngs=r), ValueError, r"Linear: argument `in_features`"),
        (lambda r: jrnnx.Linear(3, 4, rngs=r, grad="numeric"), ValueError, r"Linear: argument `grad`"),
        (lambda r: jrnnx.Conv(3, 4, (3, 0), rngs=r), ValueError, r"Conv: argument `kernel_size`"),
        (lambda r: jrnnx.Conv(3, 4, 3, padding="FULL", rngs=r), ValueError, r"Conv: argument `padding`"),
        (
            lambda r: jrnnx.Conv(4, 6, 3, feature_group_count=4, rngs=r),
            ValueError,
            r"`feature_group_count` must divide",
        ),
        (lambda r: jrnnx.Conv(3, 4, 3, param_dtype=jnp.int32, rngs=r), TypeError, r"Conv: argument `param_dtype`"),
        (lambda r: jrnnx.BatchNorm(4, momentum=1.5, rngs=r), ValueError, r"BatchNorm: argument `momentum`"),
        (lambda r: jrnnx.BasicBlock(4, 0, rngs=r), ValueError, r"BasicBlock: argument `features`"),
        (lambda r: jrnnx.Bottleneck(4, 2, shortcut="C", rngs=r), ValueError, r"Bottleneck: argument `shortcut`"),
        (lambda r: jrnnx.ResNet("residual_mlp", rngs=r), TypeError, r"ResNet: argument `spec` must be"),
    ],
)
def test_constructors_name_the_bad_argument(build, error, match):
    with pytest.raises(error, match=match):
        build(nnx.Rngs(0))


@pytest.mark.parametrize(
    "build, shape, match",
    [
        (lambda: jrnnx.Conv(3, 4, 3, rngs=nnx.Rngs(0)), (2, 8, 8, 2), r"Conv: argument `x` must have 3 features"),
        (lambda: jrnnx.Conv(3, 4, 3, rngs=nnx.Rngs(0)), (8, 8, 3), r"Conv: argument `x` must be NHWC"),
        (lambda: jrnnx.Linear(3, 4, rngs=nnx.Rngs(0)), (2, 5), r"Linear: argument `x` must have 3 features"),
        (lambda: jrnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0)), (2, 3), r"use_running_average"),
        (lambda: jrnnx.BasicBlock(4, 4, rngs=nnx.Rngs(0)), (1, 4, 4, 3), r"BasicBlock: argument `x`"),
        (lambda: jrnnx.ResNet("tiny", rngs=nnx.Rngs(0)), (1, 8, 8, 3), r"ResNet: argument `x` must have 1 features"),
    ],
)
def test_calls_name_the_bad_input(build, shape, match):
    module = nnx.eval_shape(build)
    with pytest.raises(ValueError, match=match):
        module(jnp.ones(shape, jnp.float32))


def test_conversion_errors_name_the_mismatch():
    model = models.tiny()
    params, state = _pure_weights(model)
    with pytest.raises(
        ValueError, match=r"argument `params` does not have the model's layout; missing .*\['blocks'\]\[3\]"
    ):
        jrnnx.from_pure(models.cifar_resnet(14, widths=(8, 16, 32), in_channels=1), params, state)
    wrong = {**params, "head": {"w": jnp.zeros((32, 3), jnp.float32), "b": params["head"]["b"]}}
    with pytest.raises(ValueError, match=r"`params\['head'\]\['w'\]` must have shape \(32, 10\)"):
        jrnnx.from_pure(model, wrong, state)
    with pytest.raises(TypeError, match=r"from_pure: argument `model` must be"):
        jrnnx.from_pure(models.residual_mlp(), params, state)
    with pytest.raises(TypeError, match=r"to_pure: argument `module`"):
        jrnnx.to_pure(nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
