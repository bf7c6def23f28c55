"""Flax NNX modules over the rules: the single-op layers equal Flax's own, a
`Network` equals a network built from Flax's layers and equals the pure model
it wraps, the rules really run inside it, weights move both ways, and an
nnx.Optimizer trains it."""

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

# An ImageNet stem (7x7/2 convolution, 3x3/2 max pool), an identity and a
# projection block: compared with a build from Flax's layers.
NARROW_IMAGENET = models.Model(
    models.ResNetSpec(
        stage_sizes=(1, 1), block="basic", widths=(4, 8), stem="imagenet", stem_width=4, shortcut="B", num_classes=3
    ),
    "narrow_imagenet",
)
# Small networks of the other families: (model, input shape).
MODELS = {
    "tiny": (models.tiny(), (2, 8, 8, 1)),
    "one-block": (models.cifar_resnet(8, widths=(4,), in_channels=1, num_classes=4), (8, 6, 6, 1)),
    "preact": (models.cifar_resnet(8, num_classes=3, widths=(4, 4, 8), block="preact_basic"), (2, 8, 8, 3)),
    "residual_mlp": (models.residual_mlp(in_features=16, width=8, depth=2, out_features=3), (2, 4, 4, 1)),
    "plain_mlp": (models.plain_mlp(in_features=16, width=8, depth=2, out_features=3), (2, 16)),
}


def _flat(tree) -> dict:
    """{path: array} of an nnx State or module."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def _flat_pure(tree, prefix) -> dict:
    """{path: array} of a pure pytree, with the paths a `Network`'s variables have under `prefix`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {(prefix, *(getattr(k, "key", getattr(k, "idx", None)) for k in path)): a for path, a in leaves}


def _assert_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))


def _assert_close(actual: dict, expected: dict, tol):
    """Same paths; each leaf's norm-wise relative error within tol (shapes may differ by size-1 axes)."""
    assert set(actual) == set(expected)
    for path in expected:
        err = relative_error(actual[path].reshape(expected[path].shape), expected[path])
        assert err <= tol, (path, err)


def _copy_weights(values: dict, dst):
    """Give `dst` every variable of `values` ({path: array}), reshaped (a 1x1 Conv kernel from a Projection's)."""
    dst_vars = dict(nnx.to_flat_state(nnx.state(dst)))
    assert set(values) == set(dst_vars)
    for path, var in dst_vars.items():
        var.set_value(values[path].reshape(var.get_value().shape))


def _value(name, shape, dtype, rng):
    """A random array for a variable called `name`: BN scales and variances positive, kernels ~ 1/sqrt(fan_in).

    NumPy draws them: every new shape of jax.random.normal costs an XLA
    compilation (`Model.init` of `tiny` compiles for 20 s on this CPU).
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


def _pure_weights(init, seed=0, dtype=jnp.float32):
    """(params, state) of the layout `init(key, dtype)` returns, drawn by `_value`."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init(jax.random.key(0), dtype))
    return jax.tree_util.tree_map_with_path(lambda path, a: _value(path[-1].key, a.shape, a.dtype, rng), abstract)


def _normal(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _loss(model, x, labels):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


# ------------------------------------------------------- single-op layers
@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (
            lambda d: jrnnx.Conv(4, 6, (3, 3), strides=2, param_dtype=d, rngs=nnx.Rngs(0)),
            lambda d: nnx.Conv(4, 6, (3, 3), strides=2, use_bias=False, param_dtype=d, rngs=nnx.Rngs(0)),
            (2, 7, 8, 4),
        ),
        (
            lambda d: jrnnx.Conv(4, 6, (3, 1), padding=1, kernel_dilation=2, param_dtype=d, rngs=nnx.Rngs(0)),
            lambda d: nnx.Conv(
                4, 6, (3, 1), padding=1, kernel_dilation=2, use_bias=False, param_dtype=d, rngs=nnx.Rngs(0)
            ),
            (2, 7, 8, 4),
        ),
        (
            lambda d: jrnnx.Conv(
                4, 6, 3, padding="VALID", feature_group_count=2, use_bias=True, param_dtype=d, rngs=nnx.Rngs(0)
            ),
            lambda d: nnx.Conv(4, 6, (3, 3), padding="VALID", feature_group_count=2, param_dtype=d, rngs=nnx.Rngs(0)),
            (2, 7, 8, 4),
        ),
        (
            lambda d: jrnnx.Projection(4, 6, strides=2, param_dtype=d, rngs=nnx.Rngs(0)),
            lambda d: nnx.Conv(4, 6, (1, 1), strides=2, use_bias=False, param_dtype=d, rngs=nnx.Rngs(0)),
            (2, 7, 8, 4),
        ),
        (
            lambda d: jrnnx.Linear(4, 6, param_dtype=d, rngs=nnx.Rngs(0)),
            lambda d: nnx.Linear(4, 6, param_dtype=d, rngs=nnx.Rngs(0)),
            (3, 4),
        ),
    ],
    ids=["conv-stride2-same", "conv-dilated-int-padding", "conv-grouped-valid-bias", "projection", "linear"],
)
def test_layer_equals_the_flax_layer_and_its_vjp(ours, theirs, shape):
    dtype = jnp.float64
    ours = _filled(lambda: ours(dtype))
    theirs = nnx.eval_shape(lambda: theirs(dtype))
    _copy_weights(_flat(ours), theirs)
    x = _normal(shape, dtype)
    _assert_close({0: ours(x)}, {0: theirs(x)}, TOL)

    ct_y = _normal(ours(x).shape, dtype, seed=1)
    pullback = nnx.grad(lambda module, x: jnp.sum(module(x) * ct_y), argnums=(0, 1))
    (ct_ours, ct_x), (ct_theirs, ct_x_ref) = pullback(ours, x), pullback(theirs, x)
    _assert_close({0: ct_x}, {0: ct_x_ref}, TOL)
    _assert_close(_flat(ct_ours), _flat(ct_theirs), TOL)


def test_batch_norm_momentum_convention_matches_nnx_and_blocks():
    """running = 0.9·running + 0.1·batch with the biased batch variance, once per train call."""
    dtype = jnp.float64
    x = 2 * _normal((4, 3, 3, 5), dtype) + 1
    ours = jrnnx.BatchNorm(5, param_dtype=dtype, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=nnx.Rngs(0))
    # nnx.BatchNorm keeps mean and var in float32 whatever param_dtype; ours are float64.
    _copy_weights(_flat(ours), theirs)
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


# ------------------------------------------- one network, two builds
class FlaxBasicBlock(nnx.Module):
    """A v1 basic block from Flax's own layers; an option-B projection when the shape changes."""

    def __init__(self, c_in, c_out, stride, *, dtype, rngs):
        def conv(c_in, c_out, k, stride=1):
            return nnx.Conv(c_in, c_out, (k, k), strides=stride, use_bias=False, param_dtype=dtype, rngs=rngs)

        def bn(c):
            return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs)

        self.conv0, self.bn0 = conv(c_in, c_out, 3, stride), bn(c_out)
        self.conv1, self.bn1 = conv(c_out, c_out, 3), bn(c_out)
        projects = stride != 1 or c_in != c_out
        self.proj, self.proj_bn = (conv(c_in, c_out, 1, stride), bn(c_out)) if projects else (None, None)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        return nnx.relu(h + (x if self.proj is None else self.proj_bn(self.proj(x))))


class FlaxNarrowImageNet(nnx.Module):
    """NARROW_IMAGENET from Flax's layers: 7x7/2 stem, BN, relu, 3x3/2 max pool, basic blocks 4 → 4 and
    4 → 8 (stride 2), global average, dense. Attribute names follow the pure layout's."""

    def __init__(self, *, dtype, rngs):
        self.stem = nnx.Conv(3, 4, (7, 7), strides=2, padding=3, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(
            4, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs
        )
        self.blocks = nnx.List(
            [FlaxBasicBlock(4, 4, 1, dtype=dtype, rngs=rngs), FlaxBasicBlock(4, 8, 2, dtype=dtype, rngs=rngs)]
        )
        self.head = nnx.Linear(8, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))


FLAX_NAMES = {"w": "kernel", "b": "bias", "gamma": "scale", "beta": "bias", "mean": "mean", "var": "var"}


def _as_flax(flat: dict) -> dict:
    """A `Network`'s {path: array} at the Flax peer's paths: ("params", *p, "w") → (*p, "kernel"), ..."""
    return {(*path[1:-1], FLAX_NAMES[path[-1]]): a for path, a in flat.items()}


def test_network_equals_flax_layers_outputs_state_and_gradients():
    dtype = jnp.float64
    ours = jrnnx.from_pure(NARROW_IMAGENET, *_pure_weights(NARROW_IMAGENET.init, dtype=dtype))
    theirs = nnx.eval_shape(lambda: FlaxNarrowImageNet(dtype=dtype, rngs=nnx.Rngs(0)))
    _copy_weights(_as_flax(_flat(ours)), theirs)
    x, labels = _normal((2, 16, 16, 3), dtype), jnp.array([1, 2])

    # Train mode: batch statistics; the running statistics are updated once per call.
    ours.train(), theirs.train()
    value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
    ((_, logits), grads), ((_, logits_ref), grads_ref) = (value_and_grad(m, x, labels) for m in (ours, theirs))
    _assert_close({0: logits}, {0: logits_ref}, TOL)
    assert len(_flat(grads)) == 20  # every Param: stem 1, stem_bn 2, blocks 6 + 9, head 2
    _assert_close(_as_flax(_flat(grads)), _flat(grads_ref), TOL)
    _assert_close(_as_flax(_flat(nnx.state(ours, nnx.BatchStat))), _flat(nnx.state(theirs, nnx.BatchStat)), TOL)

    # Eval mode: the running statistics, left unchanged.
    ours.eval(), theirs.eval()
    stats = _flat(nnx.state(ours, nnx.BatchStat))
    forward = nnx.jit(lambda m, x: m(x))
    _assert_close({0: forward(ours, x)}, {0: forward(theirs, x)}, TOL)
    _assert_equal(_flat(nnx.state(ours, nnx.BatchStat)), stats)


# ------------------------------------------------ Network against the pure model
@pytest.mark.parametrize("name", list(MODELS))
def test_network_equals_the_pure_model_after_from_pure(name):
    model, shape = MODELS[name]
    params, state = _pure_weights(model.init)
    x = _normal(shape)
    net = jrnnx.from_pure(model, params, state)
    assert isinstance(net, jrnnx.Network) and net.use_running_average is False

    # Round trip: the same tree holding the very same arrays.
    back = jrnnx.to_pure(net)
    assert jax.tree.structure(back) == jax.tree.structure((params, state))
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves((params, state))))

    out, new_state = model.apply(params, state, x, train=True)
    np.testing.assert_array_equal(net(x), out)
    _assert_equal(_flat(nnx.state(net, nnx.BatchStat)), _flat_pure(new_state, "state"))

    net.eval()
    assert nnx.view(net, use_running_average=False).use_running_average is False  # via set_view
    out, _ = model.apply(params, new_state, x, train=False)
    np.testing.assert_array_equal(net(x), out)
    _assert_equal(_flat(nnx.state(net, nnx.BatchStat)), _flat_pure(new_state, "state"))


# grad="autodiff" on an MLP: the attribute only chooses the opset (test_forward_calls_the_custom_vjp_rules...).
@pytest.mark.parametrize("name, grad", [("one-block", "rules"), ("residual_mlp", "autodiff")])
def test_network_gradients_equal_the_pure_models(name, grad):
    model, shape = MODELS[name]
    params, state = _pure_weights(model.init)
    x, labels = _normal(shape), jnp.arange(shape[0]) % 3
    net = jrnnx.from_pure(model, params, state, grad=grad)

    def pure_loss(params):
        logits, _ = model.apply(params, state, x, train=True, grad=grad)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads, _ = nnx.jit(nnx.grad(_loss, has_aux=True))(net, x, labels)
    _assert_equal(_flat(grads), _flat_pure(jax.jit(jax.grad(pure_loss))(params), "params"))


def test_computation_dtype_casts_the_weights_and_keeps_the_variables():
    model = models.tiny()
    params, state = _pure_weights(model.init, dtype=jnp.float64)
    x = _normal((2, 8, 8, 1), jnp.float64)
    net = jrnnx.from_pure(model, params, state, dtype=jnp.float32)
    to32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    out, new_state = model.apply(to32(params), to32(state), x.astype(jnp.float32), train=True)
    y = net(x)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, out)
    assert {a.dtype for a in jax.tree.leaves(nnx.state(net))} == {jnp.dtype(jnp.float64)}
    _assert_equal(_flat(nnx.state(net, nnx.BatchStat)), _flat_pure(jax.tree.map(jnp.float64, new_state), "state"))


def test_init_is_the_pure_init_with_the_params_stream_key():
    mlp = MODELS["residual_mlp"][0]
    net = jrnnx.Network(mlp, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    _assert_equal(_flat(net), _flat_pure(mlp.init(nnx.Rngs(0).params(), jnp.float64)[0], "params"))
    assert _flat(nnx.state(net, nnx.BatchStat)) == {}  # an MLP has no batch statistics

    spec = blocks.BlockSpec("basic", 2, 2, zero_init_residual=True)
    block = jrnnx.Block(spec, rngs=nnx.Rngs(0))
    params, state = blocks.init_block(nnx.Rngs(0).params(), spec)
    _assert_equal(_flat(block), {**_flat_pure(params, "params"), **_flat_pure(state, "state")})


def test_block_equals_apply_block_after_from_pure():
    spec = blocks.BlockSpec("bottleneck", 8, 4, stride=2)
    params, state = _pure_weights(lambda key, dtype: blocks.init_block(key, spec, dtype))
    block = jrnnx.from_pure(spec, params, state)
    assert isinstance(block, jrnnx.Block)
    x = _normal((2, 4, 4, 8))
    out, new_state = blocks.apply_block(opset(), spec, params, state, x, train=True)
    np.testing.assert_array_equal(block(x), out)
    _assert_equal(_flat(nnx.state(block, nnx.BatchStat)), _flat_pure(new_state, "state"))
    block.eval()
    out, _ = blocks.apply_block(opset(), spec, params, new_state, x, train=False)
    np.testing.assert_array_equal(block(x), out)


# ------------------------------------------------------ the rules run inside
def _custom_vjp_backwards(module, x):
    """The backward functions of the custom_vjp calls in module(x)'s jaxpr, and its top-level primitives."""
    graphdef, state = nnx.split(module)
    closed = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    return re.findall(r"bwd=(\w+)", str(closed)), {e.primitive.name for e in closed.jaxpr.eqns}


def test_forward_calls_the_custom_vjp_rules_and_autodiff_does_not():
    net = nnx.eval_shape(lambda: jrnnx.Network("tiny", rngs=nnx.Rngs(0)))
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


# --------------------------------------------------------------------- training
def test_three_sgd_steps_with_nnx_optimizer_decrease_the_loss():
    model, shape = MODELS["one-block"]
    net = jrnnx.from_pure(model, *_pure_weights(model.init))
    optimizer = nnx.Optimizer(net, optax.sgd(0.1), wrt=nnx.Param)
    x, labels = _normal(shape), jnp.arange(shape[0]) % 4

    @nnx.jit
    def step(net, optimizer, x, labels):
        (loss, _), grads = nnx.value_and_grad(_loss, has_aux=True)(net, x, labels)
        optimizer.update(net, grads)
        return loss

    losses = [float(step(net, optimizer, x, labels)) for _ in range(3)]
    losses.append(float(nnx.jit(_loss)(net, x, labels)[0]))
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
        (lambda r: jrnnx.Network(blocks.BlockSpec("basic", 4, 4), rngs=r), TypeError, r"Network: argument `model`"),
        (lambda r: jrnnx.Network("resnet9", rngs=r), ValueError, r"Network: argument `model`: unknown model"),
        (lambda r: jrnnx.Network("tiny", grad="numeric", rngs=r), ValueError, r"Network: argument `grad`"),
        (lambda r: jrnnx.Network("tiny", dtype="int8", rngs=r), TypeError, r"Network: argument `dtype`"),
        (
            lambda r: jrnnx.Network("tiny", use_running_average=None, rngs=r),
            TypeError,
            r"Network: argument `use_running_average`",
        ),
        (lambda r: jrnnx.Block(models.tiny(), rngs=r), TypeError, r"Block: argument `spec` must be"),
        (
            lambda r: jrnnx.Block(blocks.BlockSpec("basic", 4, 0), rngs=r),
            ValueError,
            r"BlockSpec: `width` must be a positive",
        ),
    ],
)
def test_constructors_name_the_bad_argument(build, error, match):
    with pytest.raises(error, match=match):
        build(nnx.Rngs(0))


@pytest.mark.parametrize(
    "build, x, error, match",
    [
        (lambda: jrnnx.Conv(3, 4, 3, rngs=nnx.Rngs(0)), (2, 8, 8, 2), ValueError, r"Conv: argument `x` must have 3"),
        (lambda: jrnnx.Conv(3, 4, 3, rngs=nnx.Rngs(0)), (8, 8, 3), ValueError, r"Conv: argument `x` must be NHWC"),
        (lambda: jrnnx.Linear(3, 4, rngs=nnx.Rngs(0)), (2, 5), ValueError, r"Linear: argument `x` must have 3"),
        (
            lambda: jrnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0)),
            (2, 3),
            ValueError,
            r"use_running_average",
        ),
        (
            lambda: jrnnx.Block(blocks.BlockSpec("basic", 4, 4), rngs=nnx.Rngs(0)),
            (1, 4, 4, 3),
            ValueError,
            r"Block: argument `x` must have 4 features",
        ),
        (
            lambda: jrnnx.Network("tiny", rngs=nnx.Rngs(0)),
            (1, 8, 8, 3),
            ValueError,
            r"argument `x` must be NHWC with 1 channels",
        ),
        (
            lambda: jrnnx.Network(MODELS["plain_mlp"][0], rngs=nnx.Rngs(0)),
            (2, 15),
            ValueError,
            r"argument `x` must have 16 features",
        ),
        (lambda: jrnnx.Network("tiny", rngs=nnx.Rngs(0)), None, TypeError, r"Network: argument `x` must be an array"),
    ],
)
def test_calls_name_the_bad_input(build, x, error, match):
    with pytest.raises(error, match=match):  # shapes only: nothing is initialised or run
        nnx.eval_shape(lambda: build()(x if x is None else jnp.ones(x, jnp.float32)))


def test_conversion_errors_name_the_mismatch():
    model = models.tiny()
    params, state = _pure_weights(model.init)
    with pytest.raises(
        ValueError, match=r"argument `params` does not have the model's layout; missing .*\['blocks'\]\[3\]"
    ):
        jrnnx.from_pure(models.cifar_resnet(14, widths=(8, 16, 32), in_channels=1), params, state)
    with pytest.raises(ValueError, match=r"argument `params` does not have the model's layout; missing .*\['in'\]"):
        jrnnx.from_pure(models.residual_mlp(), params, state)
    with pytest.raises(ValueError, match=r"argument `state` does not have the model's layout; missing .*stem_bn"):
        jrnnx.from_pure(model, params, {})
    wrong = {**params, "head": {"w": jnp.zeros((32, 3), jnp.float32), "b": params["head"]["b"]}}
    with pytest.raises(ValueError, match=r"`params\['head'\]\['w'\]` must have shape \(32, 10\)"):
        jrnnx.from_pure(model, wrong, state)
    with pytest.raises(TypeError, match=r"from_pure: argument `model` must be"):
        jrnnx.from_pure(42, params, state)
    with pytest.raises(TypeError, match=r"to_pure: argument `module`"):
        jrnnx.to_pure(nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
