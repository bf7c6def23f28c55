"""Per-example quantities from one backward pass (jax_resnet.per_example), against
`jit(vmap(grad))` of the reference ops, example by example, in float64; the
norm paths (Gram and instantiated) against each other and those gradients; the
sums against `jax.grad`; DP-SGD's clipped sum (also with padding rows) against
optax's per-example clipping; and the bad inputs.

Cost: each model case compiles one program (the reference and every quantity
together) without XLA's backend optimisations (`_compile.compile_once`)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_resnet import dp, models, per_example, rules
from jax_resnet._compile import compile_once
from jax_resnet.gradcheck import max_leaf_error
from jax_resnet.ops import AUTODIFF, RULES, SPECS, contributions, opset

TOL = 1e-10  # float64, relative to each leaf's (or example's) own scale

# TINY models, each a path the presets take: dense layers with skips; GroupNorm
# basic blocks with option A (shortcut_pad) and option B (projection) shortcuts;
# GroupNorm bottleneck blocks (1x1 convolutions, projection). Two stages are
# enough for an identity block and a strided, widening one. The last field: all
# four quantities and both norm paths besides "auto" (where every layer kind
# meets them: the MLP's dense layers, the bottleneck's 1x1 and 3x3 convolutions
# and projection); otherwise per-example gradients and "auto" norms, to keep
# the compilations few.
_gn = functools.partial(models.cifar_resnet, 8, num_classes=3, in_channels=1, norm="group", norm_groups=2)
CASES = {
    "residual_mlp": (lambda: models.residual_mlp(in_features=6, width=5, depth=2, out_features=3), (4, 6), True),
    "gn_basic_A": (lambda: _gn(widths=(2, 4)), (3, 4, 4, 1), False),
    "gn_basic_B": (lambda: _gn(widths=(2, 4), shortcut="B"), (2, 4, 4, 1), False),
    "gn_bottleneck_B": (lambda: _gn(widths=(2, 2), block="bottleneck", shortcut="B"), (2, 4, 4, 1), True),
}


# DP-SGD's clipped sum on one of the cases, against optax's per-example clipping of
# the reference gradients, by the cost model's choices ("auto": the convolutions' and
# norms' from their kept per-example contributions, the dense head's from its kept
# inputs and cotangents, one backward) and with every kernel in the Gram form
# ("gram": the convolutions' from the second backward, the dense head's and the
# projection's from their inputs and cotangents). C = 2 clips one of two examples.
NORM_PATHS, CLIP = ("auto", "gram"), 2.0
CLIPPED_MODEL = CASES["gn_basic_B"][0]()


def _data(model, shape, seed=0):
    params, state = model.init(jax.random.key(seed), jnp.float64)
    rng = np.random.default_rng(seed)
    # Noise on every parameter, so no GroupNorm scale or shift sits at 1 or 0.
    params = jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape)), params)
    x = jnp.asarray(rng.standard_normal(shape))
    y = jnp.asarray(rng.integers(0, 3, shape[:1]), jnp.int32)
    return params, state, x, y


def _reference_grads(model, params, state, x, y):
    """g_i = ∇ℓ_i for each example, by jax.vmap of jax.grad of the reference ops on a batch of one."""

    def one(xi, yi):
        loss = lambda p: AUTODIFF.softmax_cross_entropy(
            model.apply(p, state, xi[None], train=True, grad="autodiff")[0], yi[None]
        )
        return jax.grad(loss)(params)

    return jax.vmap(one)(x, y)


def _everything(model, full, params, state, x, y):
    """Everything one case compares, in one program: each `quantities` call is one forward and one backward."""
    which = per_example.QUANTITIES if full else ("batch_grad", "batch_l2")
    loss, grads, out = per_example.quantities(model, params, state, x, y, which)
    out["reference"] = _reference_grads(model, params, state, x, y)
    out["grads"] = grads
    out["jax_grad"] = jax.grad(lambda p: RULES.softmax_cross_entropy(model.apply(p, state, x, train=True)[0], y))(
        params
    )
    for path in ("gram", "grads") if full else ():
        out[f"l2_{path}"] = per_example.batch_l2(model, params, state, x, y, norm_path=path).value
    for path in NORM_PATHS if model is CLIPPED_MODEL else ():
        out[f"clipped_{path}"] = dp.clipped_grad_sum(model, params, state, x, y, CLIP, norm_path=path)
    if model is CLIPPED_MODEL:
        # Two padding rows of junk (label dp.PAD_LABEL) change nothing.
        junk = jnp.full((2, *x.shape[1:]), 1e3, x.dtype)
        x_pad, y_pad = jnp.concatenate([x, junk]), jnp.concatenate([y, jnp.full((2,), dp.PAD_LABEL, y.dtype)])
        out["clipped_padded"] = dp.clipped_grad_sum(model, params, state, x_pad, y_pad, CLIP)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_quantities_equal_vmap_of_grad(name):
    make, shape, full = CASES[name]
    model = CLIPPED_MODEL if name == "gn_basic_B" else make()
    args = _data(model, shape)
    out = compile_once(jax.jit(functools.partial(_everything, model, full)), *args)(*args)
    ref = out["reference"]
    for i in range(shape[0]):
        example = lambda tree, i=i: jax.tree.map(lambda g: g[i], tree)
        err, where = max_leaf_error(example(out["batch_grad"]), example(ref))
        assert err <= TOL, (name, i, where, err)
    # The mean over examples is the batch's gradient: `grads` (the rules' summed
    # cotangents from the same backward) equals the mean of the references and,
    # for the MLP, jax.grad of the batch's loss too.
    assert max_leaf_error(out["grads"], jax.tree.map(lambda g: g.mean(0), ref))[0] <= TOL
    if "jax_grad" in out:
        assert max_leaf_error(out["grads"], out["jax_grad"])[0] <= TOL
    ref_l2 = jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), ref)
    for path in ("batch_l2", "l2_gram", "l2_grads")[: 3 if full else 1]:
        err, where = max_leaf_error(out[path], ref_l2)
        assert err <= TOL, (name, path, where, err)
    if full:
        assert max_leaf_error(out["sum_grad_squared"], jax.tree.map(lambda g: jnp.sum(g * g, 0), ref))[0] <= TOL
        # (1/B)Σg² − ḡ² cancels: its error is relative to Σg²/B, not to the (smaller) variance.
        assert max_leaf_error(out["variance"], jax.tree.map(lambda g: jnp.var(g, 0), ref))[0] <= 1e-8
    if model is CLIPPED_MODEL:
        clipped = optax.per_example_global_norm_clip(jax.tree.leaves(ref), CLIP)[0]
        norms = jnp.sqrt(sum(jnp.sum(g.reshape(shape[0], -1) ** 2, 1) for g in jax.tree.leaves(ref)))
        assert 0 < int(jnp.sum(norms > CLIP)) < shape[0]  # some examples clipped, some not
        for name in [f"clipped_{path}" for path in NORM_PATHS] + ["clipped_padded"]:
            err, where = max_leaf_error(jax.tree.leaves(out[name].clipped_sum), clipped)
            assert err <= TOL, (name, where, err)


class _LayerNormNet:
    """LayerNorm over the channels of [B, T, C], a dense layer at the T positions, then a dense head:
    the rules no preset uses (layer_norm, dense at T > 1 positions), behind the one `apply` a quantity needs."""

    def apply(self, params, state, x, *, train, grad):
        ops = opset(grad)
        h = ops.layer_norm(x, params["ln"]["gamma"], params["ln"]["beta"])
        h = ops.relu(ops.dense(h, params["mid"]["w"], params["mid"]["b"]))
        return ops.dense(h.reshape(h.shape[0], -1), params["head"]["w"], params["head"]["b"]), state


def test_layer_norm_and_dense_at_several_positions():
    rng = np.random.default_rng(2)
    shapes = {"ln": {"gamma": (4,), "beta": (4,)}, "mid": {"w": (4, 5), "b": (5,)}, "head": {"w": (15, 3), "b": (3,)}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s)), shapes, is_leaf=lambda s: isinstance(s, tuple))
    x, y = jnp.asarray(rng.standard_normal((3, 3, 4))), jnp.asarray([0, 2, 1], jnp.int32)
    net = _LayerNormNet()

    def everything(params, x, y):
        _, _, out = per_example.quantities(net, params, {}, x, y, ("batch_grad", "batch_l2"), norm_path="gram")
        out["l2_grads"] = per_example.batch_l2(net, params, {}, x, y, norm_path="grads").value
        return out, _reference_grads(net, params, {}, x, y)

    out, ref = compile_once(jax.jit(everything), params, x, y)(params, x, y)
    assert max_leaf_error(out["batch_grad"], ref)[0] <= TOL
    ref_l2 = jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), ref)
    assert max_leaf_error(out["batch_l2"], ref_l2)[0] <= TOL
    assert max_leaf_error(out["l2_grads"], ref_l2)[0] <= TOL


def test_gram_and_instantiated_norms_of_one_layer_agree():
    # The Gram identity itself, at T = 5 positions: ‖Σ_t a_tᵀδ_t‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t').
    rng = np.random.default_rng(1)
    a, delta = jnp.asarray(rng.standard_normal((3, 5, 4))), jnp.asarray(rng.standard_normal((3, 5, 2)))
    gram = per_example._weight_quantity(a, delta, per_example.TapConfig(("l2",), "gram"))
    grads = per_example._weight_quantity(a, delta, per_example.TapConfig(("l2",), "grads"))
    direct = np.sum(np.einsum("btd,btp->bdp", a, delta) ** 2, axis=(1, 2))
    np.testing.assert_allclose(gram.l2, direct, rtol=1e-12)
    np.testing.assert_allclose(grads.l2, direct, rtol=1e-12)


# The cost model's choices, as derivations/per_example.md tabulates them: memory per
# example, Gram T·d + 2·T² (the patches and two Gram matrices) against instantiated d·p.
# ResNet-20 (32x32): every convolution instantiates (stage 3, T = 64: 45,056 > 36,864),
# the head takes the Gram form; ResNet-18 (224x224): the late stages take the Gram form.
def test_cost_model_choices_for_resnet20_gn_and_resnet18_gn():
    costs = {c.name: c for c in per_example.norm_costs(models.resnet20_gn())}
    assert [n for n, c in costs.items() if c.gram] == ["head"]
    assert (costs["block6.conv1"].positions, costs["block6.conv1"].d, costs["block6.conv1"].p) == (64, 576, 64)
    gram18 = [c.name for c in per_example.norm_costs(models.resnet18_gn()) if c.gram]
    late = [f"block{b}.{layer}" for b in (6, 7) for layer in ("conv0", "conv1", "proj") if (b, layer) != (7, "proj")]
    assert gram18 == ["block4.conv1", "block5.conv0", "block5.conv1", *late, "head"]
    assert per_example.use_gram(1, 1, 3) and not per_example.use_gram(1, 1, 2)


@pytest.mark.parametrize("settings", [{"dilation": 2}, {"stride": 3, "padding": ((1, 0), (2, 1))}])
def test_conv_per_example_gradients_by_grouped_convolution(settings):
    # Example i's kernel gradient from one convolution with B feature groups, against
    # vmap of jax.grad of the reference convolution on that example alone.
    from jax_resnet.ops import conv

    rng = np.random.default_rng(4)
    x, w = jnp.asarray(rng.standard_normal((3, 9, 9, 2))), jnp.asarray(rng.standard_normal((3, 3, 2, 4)))
    config = conv.conv2d_config(x, w, **settings)
    ct_y = jnp.asarray(rng.standard_normal(conv.conv2d_reference(x, w, **settings).shape))
    g, axis = conv._conv2d_batch_grad(config, x, ct_y, (3, 3))
    one = lambda xi, ci: jax.grad(lambda w: jnp.sum(conv.conv2d_reference(xi[None], w, **settings) * ci[None]))(w)
    np.testing.assert_allclose(jnp.moveaxis(g, axis, 0), jax.vmap(one)(x, ct_y), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- bad input
def test_batchnorm_models_are_refused_with_the_reason():
    with pytest.raises(
        per_example.PerExampleError, match="BatchNorm in training mode.*cannot separate it.*clipping .*resnet20_gn"
    ):
        per_example.check_model(models.resnet8(widths=(2, 2, 2)))


def test_batch_of_one_is_the_gradient_and_variance_needs_two():
    model = CASES["residual_mlp"][0]()
    params, state, x, y = _data(model, (1, 6))
    out = jax.jit(functools.partial(per_example.batch_grad, model))(params, state, x, y)
    assert max_leaf_error(jax.tree.map(lambda g: g[0], out.value), out.grads)[0] <= TOL
    with pytest.raises(per_example.PerExampleError, match="at least 2 examples, got 1"):
        per_example.variance(model, params, state, x, y)


def test_bad_arguments_name_themselves():
    model = CASES["residual_mlp"][0]()
    params, state, x, y = _data(model, (2, 6))
    with pytest.raises(per_example.PerExampleError, match="`x` .* and `y` .* share their leading batch axis"):
        per_example.batch_l2(model, params, state, x, y[:1])
    with pytest.raises(ValueError, match="`norm_path` must be one of"):
        per_example.batch_l2(model, params, state, x, y, norm_path="ghost")


# ------------------------------------------------------------------- sharding
SHARDED = """
import functools, jax, numpy as np, optax
from jax_resnet import dp, models, per_example, step
assert jax.device_count() == 8
model = models.residual_mlp(in_features=6, width=8, depth=2, out_features=3)
params, state = model.init(jax.random.key(0))
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 6)).astype(np.float32)
y = rng.integers(0, 3, 16).astype(np.int32)
mesh = step.make_mesh()
replicated, batch = step.shardings(mesh)
xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
quantities = functools.partial(per_example.quantities, model, which=("batch_grad", "batch_l2"))
_, _, out = jax.jit(quantities, in_shardings=(replicated, replicated, batch, batch))(params, state, xs, ys)
for leaf in jax.tree.leaves(out):
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("data"), leaf.sharding
# A GroupNorm ResNet's quantities and DP step: per device under shard_map (XLA's partitioner
# gets the per-example convolution wrong on a batch-sharded jit: off by up to 24, measured).
model = models.cifar_resnet(8, num_classes=3, in_channels=1, norm="group", norm_groups=2, widths=(2, 4), shortcut="B")
params, state = model.init(jax.random.key(0))
x = rng.standard_normal((16, 4, 4, 1)).astype(np.float32)
xs = jax.device_put(x, batch)
which = ("batch_grad", "variance")  # per-example, and from a sum and a mean across devices
everything = functools.partial(per_example.quantities, model, which=which, mesh=mesh)
q8 = jax.jit(everything, in_shardings=(replicated, replicated, batch, batch))(params, state, xs, ys)
q1 = jax.jit(functools.partial(per_example.quantities, model, which=which))(params, state, x, y)
for a, b in zip(jax.tree.leaves(q8), jax.tree.leaves(q1)):
    assert np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), float(np.max(np.abs(a - b)))
l2 = [jax.jit(functools.partial(per_example.batch_l2, model, mesh=m))(params, state, a, b)[2] for m, a, b in ((mesh, xs, ys), (None, x, y))]
for a, b in zip(*map(jax.tree.leaves, l2)):  # the convenience functions take the mesh too
    assert np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), float(np.max(np.abs(a - b)))
for leaf in jax.tree.leaves(q8[2]["batch_grad"]):
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("data"), leaf.sharding
# The DP step on a padded Poisson-style batch of 2 chunks (32 rows, 3 of them padding), per device.
config = dp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=12, sampler="poisson", truncated_batch_size=16)
assert dp.physical_batch_size(config, 8) == 16
x = np.concatenate([x, rng.standard_normal((16, 4, 4, 1)).astype(np.float32)])
y = np.concatenate([y, rng.integers(0, 3, 13), np.full(3, dp.PAD_LABEL)]).astype(np.int32)
xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
opt, key = optax.sgd(0.1), jax.random.key(3)
p1 = step.make_train_step(model, opt, dp=config)(params, state, opt.init(params), x, y, key)[0]
p8 = step.make_train_step(model, opt, dp=config, mesh=mesh)(params, state, opt.init(params), xs, ys, key)[0]
err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
assert err <= 1e-6, err
print("OK")
"""


def test_sharded_batch_keeps_per_example_quantities_sharded_and_dp_step_equal(tmp_path):
    # 8 simulated CPU devices need a fresh process (XLA reads the flag once).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    # The package under test, wherever the child runs.
    root = os.path.dirname(os.path.dirname(os.path.abspath(per_example.__file__)))
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


# ------------------------------------------------------------- contributions
_CONTRIBUTING = [rule for rule in rules.REGISTRY.values() if SPECS[rule.name.split("[")[0]].contributions]


@pytest.mark.parametrize("rule", _CONTRIBUTING, ids=[rule.name for rule in _CONTRIBUTING])
def test_contributions_sum_to_the_rules_parameter_cotangents(rule):
    """Each registered op's contribution forms, summed over examples and positions, are its own
    backward's parameter cotangents (which tests/test_rules.py checks against autodiff): a Weight's
    Σ_{i,t} a_{i,t}ᵀ δ_{i,t} in the kernel's shape, and its patch-free G_i summed; a Vector's Σ u."""
    spec = SPECS[rule.name.split("[")[0]]
    settings = rule.fwd.keywords if isinstance(rule.fwd, functools.partial) else {}
    args = rule.make_args(jax.random.key(0), jnp.float64)
    config = None if spec.config is None else spec.config(*args, **settings)
    y, res = spec.forward(config, *args)
    ct_y = jnp.asarray(np.random.default_rng(0).standard_normal(y.shape))
    cts = spec.backward(config, res, ct_y)
    if spec.name == "conv2d" and config.groups != 1:  # a grouped kernel is block diagonal, not a·W
        with pytest.raises(ValueError, match="conv2d: per-example contributions need groups=1"):
            spec.contribute(config, res, ct_y)
        return
    forms = spec.contribute(config, res, ct_y)
    assert len(forms) == len(spec.params) > 0
    for position, form in zip(spec.params, forms):
        param, want = args[position], cts[position]
        if isinstance(form, contributions.Weight):
            total = jnp.einsum("btd,btp->dp", form.a(), form.delta).reshape(param.shape)
            if form.grads is not None:
                g, axis = form.grads()
                np.testing.assert_allclose(jnp.sum(g, axis=axis), want, rtol=1e-12, atol=1e-12)
        else:
            total = jnp.sum(form.per_example(), axis=0)
        np.testing.assert_allclose(total, want, rtol=1e-12, atol=1e-12)
