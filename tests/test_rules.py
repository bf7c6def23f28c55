"""Every registered rule against JAX autodiff and finite differences.

Parametrized over `jax_resnet.rules.REGISTRY`: a new rule is checked by
registering it, never by copying a test. The checks are the public kit,
`jax_resnet.testing.check_rule` (one implementation of the property matrix,
the one users run on their own rules); each rule is checked once and each
test below asserts its share of the report.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from derivation_docs import residuals_documented

from jax_resnet import rules, testing

RULES = list(rules.REGISTRY.values())
# One rule's tests run on one pytest-xdist worker (`--dist loadgroup`), where
# they share the compiled draws of its arguments.
BY_RULE = [pytest.param(r, id=r.name, marks=pytest.mark.xdist_group(r.name)) for r in RULES]

# The edge properties (composition, sharding, extremes, low precision) exercise an op's formulas and its
# custom_vjp. Configurations that differ only in geometry (stride, padding, dilation, groups, layout) share
# both, so these families give one entry per op; every entry whose settings change a formula (gelu's tanh
# form, label smoothing) stays. 23 of the 39 entries: the full registry would cost ~65 s more CPU.
GEOMETRY_ONLY = ("linear", "conv", "pool", "shortcut", "norm")
EDGE_RULES = [
    r
    for i, r in enumerate(RULES)
    if r.family not in GEOMETRY_ONLY or all(o.name.split("[")[0] != r.name.split("[")[0] for o in RULES[:i])
]
EDGE_IDS = [r.name for r in EDGE_RULES]
EDGE_BY_RULE = [p for p in BY_RULE if p.values[0] in EDGE_RULES]

# The library's own forwards equal their references more tightly than the
# kit's default (the VJP tolerance): they are the same formulas.
FORWARD_RTOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}

# Which test asserts which properties; together they are the kit's whole matrix.
CHECKS = {
    "test_vjp_matches_autodiff_float64": ("forward", "vjp_float64", "finite_differences"),
    "test_vjp_without_jit": ("vjp_float64_nojit",),
    "test_vjp_matches_autodiff_float32": ("vjp_float32",),
    "test_vmap_over_leading_axis": ("vmap",),
    "test_grad_of_grad": ("grad_of_grad",),
    "test_checkpoint_and_scan_change_nothing": ("composition",),
    "test_every_rule_sharded_over_eight_devices": ("sharded",),
    "test_extreme_arguments": ("extremes",),
    "test_bfloat16_and_float16": ("low_precision",),
    "test_custom_rule_is_what_runs": ("custom_vjp_runs",),
    "test_saved_residuals_are_the_documented_ones": ("residuals",),
    "test_forward_mode_is_refused_with_a_clear_error": ("forward_mode",),
}


@functools.cache
def _report(name: str, properties: tuple[str, ...]) -> testing.RuleReport:
    rule = rules.get(name)
    return testing.check(rule, residuals=residuals_documented(rule), forward_rtol=FORWARD_RTOL, properties=properties)


def _assert(rule, test_name):
    """Compute this test's share of the matrix only, so a deselected test (`-m "not slow"`) costs nothing."""
    _report(rule.name, CHECKS[test_name]).assert_ok()


def test_the_tests_cover_the_whole_matrix():
    checked = [p for props in CHECKS.values() for p in props]
    assert sorted(checked) == sorted(testing.PROPERTIES)


@pytest.mark.parametrize("rule", BY_RULE)
def test_vjp_matches_autodiff_float64(rule):
    """Forward values, the VJP jitted (≤ rtol, 1e-10), the dot-product test (≤ 1e-6)."""
    _assert(rule, "test_vjp_matches_autodiff_float64")


@pytest.mark.parametrize("rule", BY_RULE)
def test_vjp_without_jit(rule):
    """The VJP op by op, without jit (≤ rtol, 1e-10): a backward that depends on tracing shows here."""
    _assert(rule, "test_vjp_without_jit")


@pytest.mark.parametrize("rule", BY_RULE)
def test_vjp_matches_autodiff_float32(rule):
    _assert(rule, "test_vjp_matches_autodiff_float32")


@pytest.mark.parametrize("rule", BY_RULE)
def test_vmap_over_leading_axis(rule):
    _assert(rule, "test_vmap_over_leading_axis")


@pytest.mark.parametrize("rule", BY_RULE)
def test_grad_of_grad(rule):
    """Reverse-over-reverse: differentiate the hand-written backward pass itself."""
    _assert(rule, "test_grad_of_grad")


@pytest.mark.parametrize("rule", EDGE_BY_RULE)
def test_checkpoint_and_scan_change_nothing(rule):
    """jax.checkpoint (default policy, nothing_saveable) and lax.scan: the plain VJP; remat reruns the forward
    once, never twice (derivations/README.md#rules-under-jax-transformations)."""
    _assert(rule, "test_checkpoint_and_scan_change_nothing")


SHARDED = """
import json, sys
import numpy as np
import jax
from jax_resnet import rules, testing

assert jax.device_count() == 8, jax.devices()
stored = np.load(sys.argv[1])
failed = {}
for i, name in enumerate(json.loads(sys.argv[2])):
    rule = rules.get(name)
    args = [stored[f"{i}_{k}"] for k in range(int(stored[f"{i}_n"]))]
    report = testing.check_rule(rule.fn, rule.reference, lambda key, dtype: args, name=rule.name, properties=["sharded"])
    if not report.ok:
        failed[rule.name] = str(report)
print(json.dumps({"checked": i + 1, "failed": failed}))
"""


def test_every_rule_sharded_over_eight_devices(tmp_path):
    """Each rule of EDGE_RULES with one slice of its float64 arguments per device, 8 simulated CPU devices: jit
    of vmap with sharded arguments gives what shard_map of the plain VJP gives. One child process (the device
    count is fixed when JAX starts); the arguments are drawn here, where their random kernels are compiled."""
    stored = {}
    for i, rule in enumerate(EDGE_RULES):
        args = rule.make_args(jax.random.key(0, impl="rbg"), jnp.float64)
        stored[f"{i}_n"] = np.asarray(len(args))
        stored.update({f"{i}_{k}": np.asarray(a) for k, a in enumerate(args)})
    np.savez(tmp_path / "args.npz", **stored)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path / "args.npz"), json.dumps(EDGE_IDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["checked"] == len(EDGE_RULES)
    assert not out["failed"], "\n".join(out["failed"].values())


@pytest.mark.parametrize("rule", EDGE_BY_RULE)
def test_extreme_arguments(rule):
    """±1e4 and ±50 inputs, 1 + 1e-4·x and constant channels, zeros, denormals, a batch of one (float32):
    finite wherever the reference is, as accurate as float32 allows (jax_resnet.testing.EXTREMES)."""
    _assert(rule, "test_extreme_arguments")


@pytest.mark.parametrize("rule", EDGE_BY_RULE)
def test_bfloat16_and_float16(rule):
    """Within testing.LOW_PRECISION_RTOL of float32; float32 stays float32 with x64 on."""
    _assert(rule, "test_bfloat16_and_float16")


def test_softplus_derivative_at_zero_is_one_half():
    """σ(0) = ½ from the rule and from its reference twin (the twin used to give 0; derivations/activations.md)."""
    from jax_resnet.ops import activations

    for f in (activations.softplus, activations.softplus_reference):
        assert float(jax.grad(f)(0.0)) == 0.5


def test_sigmoid_is_finite_where_its_naive_reference_is_not():
    """At x = −1e4 the reference 1/(1 + e^{−x}) overflows and its derivative is NaN; the rule's
    y(1 − y) is 0, as the float64 truth e^{−1e4} rounds."""
    from jax_resnet.ops import activations

    x = jnp.array([-1e4, -100.0, 100.0, 1e4], jnp.float32)
    reference = jax.vmap(jax.grad(activations.sigmoid_reference))(x)
    rule = jax.vmap(jax.grad(activations.sigmoid))(x)
    assert not np.isfinite(np.asarray(reference)).all()
    np.testing.assert_array_equal(rule, np.zeros(4, np.float32))


@pytest.mark.parametrize("rule", BY_RULE)
def test_custom_rule_is_what_runs(rule):
    _assert(rule, "test_custom_rule_is_what_runs")


@pytest.mark.parametrize("rule", BY_RULE)
def test_saved_residuals_are_the_documented_ones(rule):
    _assert(rule, "test_saved_residuals_are_the_documented_ones")


@pytest.mark.parametrize("rule", BY_RULE)
def test_forward_mode_is_refused_with_a_clear_error(rule):
    _assert(rule, "test_forward_mode_is_refused_with_a_clear_error")


def test_relu_derivative_at_zero_is_zero():
    from jax_resnet.ops import relu

    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jax.grad(lambda x: relu(x).sum())(x), [0.0, 0.0, 1.0])


def test_relu_propagates_nan():
    from jax_resnet.ops import relu

    assert bool(jnp.isnan(relu(jnp.array([jnp.nan]))).all())


def test_relu_packs_large_masks_into_bits_with_the_same_vjp():
    # The registry's small arguments keep a bool mask; from PACK_MIN_ELEMENTS on the mask is
    # bits (jax_resnet.ops.activations._pack). Same VJP as autodiff of the reference, at a
    # shape whose last axis is no multiple of 8, with zeros and a NaN among the inputs.
    from jax_resnet.ops import activations

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 181, 127)).astype(np.float32)  # 68,961 elements
    x[0, 0, :5] = [0.0, -0.0, np.nan, 1e-30, -1e-30]
    x, ct = jnp.asarray(x), jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    _, res = activations._relu_fwd(x)
    assert x.size >= activations.PACK_MIN_ELEMENTS and res.mask.dtype == jnp.uint8
    assert res.mask.shape == (3, 181, 16)  # ⌈127/8⌉ bytes per row
    _, vjp = jax.vjp(activations.relu, x)
    _, ref_vjp = jax.vjp(activations.relu_reference, x)
    np.testing.assert_array_equal(vjp(ct)[0], ref_vjp(ct)[0])
    batched = jax.vmap(lambda xi, ci: jax.vjp(activations.relu, xi)[1](ci)[0])(x, ct)
    np.testing.assert_array_equal(batched, ref_vjp(ct)[0])
    assert bool(jnp.isnan(activations.relu(x)[0, 0, 2]))


def test_leaky_relu_derivative_at_zero_is_the_slope():
    from jax_resnet.ops import leaky_relu

    x = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(jax.grad(lambda x: leaky_relu(x, 0.2).sum())(x), [0.2, 0.2, 1.0])


def test_tanh_derivative_is_accurate_where_the_output_saturates():
    """derivations/activations.md#tanh: sech² x from x, not 1 − y² from the output."""
    from jax_resnet.ops import tanh

    x = np.linspace(-12.0, 12.0, 4801).astype(np.float32)
    exact = 1.0 / np.cosh(x.astype(np.float64)) ** 2  # float64, from the float32 points themselves
    rule = np.asarray(jax.jit(jax.grad(lambda x: tanh(x).sum()))(x), np.float64)
    y = np.asarray(jax.jit(jnp.tanh)(x), np.float64)
    from_output = (1.0 - y) * (1.0 + y)  # JAX's own derivative of jnp.tanh, float32 output
    assert np.max(np.abs(rule - exact) / exact) <= 1e-6  # a few float32 roundings, everywhere
    assert np.max(np.abs(from_output - exact) / exact) > 1e-2  # the cancellation the rule avoids


def test_registry_names_are_unique_and_lookup_explains_misses():
    assert len(rules.REGISTRY) == len(RULES)
    with pytest.raises(KeyError, match="registered"):
        rules.get("no-such-rule")
