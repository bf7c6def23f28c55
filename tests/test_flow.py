"""The BP-vs-ResNet study (jax_resnet/flow.py): what it measures, what it
writes, and the measured facts derivations/bp_vs_resnet.md reports."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import cli, flow, models
from jax_resnet.ops import opset

F32 = jnp.float32


# The models and batches below are those of the quick run (`--quick --mlp-depths 4`),
# so the compiled gradient functions are shared (flow caches them per model).
def _mlp_batch(n=64, seed=0):
    return flow.digits_batch(n, seed)


def _batch_for(model):
    return _mlp_batch() if isinstance(model.spec, models.MLPSpec) else flow.random_images(4, 0)


def _small_cifar(depth, residual):
    return models.cifar_resnet(depth, residual=residual, in_channels=1, widths=(4, 8, 16))


CIFAR8_NAMES = [
    "stem",
    "block0.conv0",
    "block0.conv1",
    "block1.conv0",
    "block1.conv1",
    "block2.conv0",
    "block2.conv1",
    "head",
]


@pytest.mark.parametrize(
    "model, expected",
    [
        (models.plain_mlp(depth=4), ["in", "hidden0", "hidden1", "hidden2", "hidden3", "out"]),
        (models.resnet8(), CIFAR8_NAMES),
        (models.plain8(), CIFAR8_NAMES),
    ],
    ids=["plain_mlp4", "resnet8", "plain8"],
)
def test_gradient_norms_one_finite_positive_entry_per_weight_in_depth_order(model, expected):
    params, state = model.init(jax.random.key(0), F32)
    x, y = _batch_for(model)
    norms = flow.gradient_norms(model, params, state, x, y)
    assert [name for name, _ in norms] == expected
    n_weights = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "w")
    assert len(norms) == n_weights
    for name, value in norms:
        assert math.isfinite(value) and value > 0, f"{name}: gradient norm {value}"


def test_weight_paths_put_an_option_b_projection_after_its_blocks_convolutions():
    model = models.imagenet_resnet((1, 1, 1, 1), "basic", num_classes=10, in_channels=1, width=4)
    params, _ = jax.eval_shape(lambda k: model.init(k, F32), jax.random.key(0))
    names = [name for name, _ in model.spec.weight_paths()]
    assert names == ["stem", "block0.conv0", "block0.conv1"] + [
        f"block{i}.{w}" for i in (1, 2, 3) for w in ("conv0", "conv1", "proj")
    ] + ["head"]
    assert all(models.subtree(params, path).ndim in (2, 4) for _, path in model.spec.weight_paths())


@pytest.mark.parametrize("model", [models.residual_mlp(depth=4), models.resnet8()], ids=["residual_mlp4", "resnet8"])
def test_the_hook_sees_every_block_input_and_a_zero_tap_changes_nothing(model):
    """The study probes the model's own forward pass: with zero probes the loss is
    Model.apply's, and the hook is called once per named point, in order."""
    params, state = model.init(jax.random.key(0), F32)
    x, y = _batch_for(model)
    seen = flow.block_inputs(model, params, state, x)
    assert len(seen) == len(model.spec.hook_points())
    probes = [jnp.zeros(h.shape, h.dtype) for h in seen]
    expected = opset("rules").softmax_cross_entropy(model.apply(params, state, x, train=True)[0], y)
    assert flow.probed_loss(model)(params, probes, state, x, y) == expected


def test_weight_gradients_are_those_of_model_apply():
    model = models.residual_mlp(depth=4)
    params, state = model.init(jax.random.key(0), F32)
    x, y = _mlp_batch()

    def loss(p, x, y):
        return opset("rules").softmax_cross_entropy(model.apply(p, state, x, train=True)[0], y)

    ct = jax.jit(jax.grad(loss))(params, x, y)
    expected = [float(jnp.linalg.norm(models.subtree(ct, path))) for _, path in model.spec.weight_paths()]
    np.testing.assert_allclose([v for _, v in flow.gradient_norms(model, params, state, x, y)], expected, rtol=1e-5)


def test_rules_and_autodiff_measure_the_same_norms():
    model = models.plain_mlp(depth=4, activation="tanh")
    params, state = model.init(jax.random.key(2), F32)
    x, y = _mlp_batch()
    rules = flow.layer_gradients(model, params, state, x, y, grad="rules")
    autodiff = flow.layer_gradients(model, params, state, x, y, grad="autodiff")
    np.testing.assert_allclose([v for _, v in rules.weights], [v for _, v in autodiff.weights], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in rules.inputs], [v for _, v in autodiff.inputs], rtol=1e-5)


def test_input_gradient_of_a_zero_tap_is_the_backpropagated_cotangent():
    """For the MLP's output layer the probe's gradient is W_outᵀ-backpropagated ct_logits, computed by hand."""
    model = models.plain_mlp(depth=4)
    params, state = model.init(jax.random.key(3), F32)
    x, y = _mlp_batch()
    logits, _ = model.apply(params, state, x, train=True)
    p = jax.nn.softmax(logits)
    ct_logits = (p - jax.nn.one_hot(y, 10, dtype=F32)) / x.shape[0]
    expected = float(jnp.linalg.norm(ct_logits @ params["out"]["w"].T))
    assert flow.layer_gradients(model, params, state, x, y).inputs[-1][1] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- measured facts
# Each bound sits well inside the range measured over seeds 0..9 (quoted per
# test; derivations/bp_vs_resnet.md has the study's own figures).
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_unscaled_residual_mlp_gradient_explodes_towards_the_input(seed):
    """depth 32, ReLU, He init (gain 2) on every branch: the shortcut's I + W product
    grows the gradient towards the input; the plain twin's stays within a small factor.

    Seeds 0..9, ‖∂L/∂h_first‖/‖∂L/∂h_last‖: plain 0.28–1.5, residual 2.0e5–1.1e6,
    residual with branches × 1/√32 0.96–1.4."""
    x, y = _mlp_batch(64, seed)
    ratios = {}
    for variant in (
        flow.MLPVariant("plain_mlp"),
        flow.MLPVariant("residual_mlp"),
        flow.MLPVariant("residual_mlp", scaled=True),
    ):
        model, params, state = variant.build(32, 64, jax.random.key(seed), F32)
        g = flow.layer_gradients(model, params, state, x, y)
        ratios[variant.name(32)] = g.inputs[0][1] / g.inputs[-1][1]
    assert ratios["residual_mlp32"] > 100 * ratios["plain_mlp32"], ratios
    assert ratios["residual_mlp32"] > 100 * ratios["residual_mlp32_scaled"], ratios
    assert 0.1 < ratios["residual_mlp32_scaled"] < 10, ratios


@pytest.mark.parametrize("seed", SEEDS)
def test_a_skip_inside_the_sigmoid_does_not_stop_the_gradient_vanishing(seed):
    """a ← σ(W·a + b + a): the shortcut passes through σ' ≤ 1/4, so at depth 32 the
    first layer's gradient is as vanished as in the plain net.

    Seeds 0..9, ‖∂L/∂W_in‖/‖∂L/∂W_hidden31‖: plain 1.2e-16–2.8e-16, residual 2.5e-15–1.2e-14."""
    x, y = _mlp_batch(64, seed)
    for preset in ("plain_mlp", "residual_mlp"):
        model, params, state = flow.MLPVariant(preset, "sigmoid").build(32, 64, jax.random.key(seed), F32)
        norms = flow.gradient_norms(model, params, state, x, y)
        assert norms[0][1] / norms[-2][1] < 1e-8, (preset, norms[0], norms[-2])


@pytest.mark.parametrize("seed", SEEDS)
def test_plain_batchnorm_net_gradient_explodes_and_the_resnet_does_not(seed):
    """CIFAR-style nets with BatchNorm at depth 56 (narrow: widths 4, 8, 16; 8×8 random
    images): the plain net's stem gradient is far larger than its last conv's; the
    ResNet's stays within a small factor.

    Seeds 0..9, ‖∂L/∂W_stem‖/‖∂L/∂W_last conv‖: plain 810–3300, ResNet 2.1–7.9,
    plain/ResNet per seed 157–1160."""
    x, y = flow.random_images(8, seed, shape=(8, 8, 1))
    ratio = {}
    for residual in (False, True):
        model = _small_cifar(56, residual)
        params, state = model.init(jax.random.key(seed), F32)
        norms = flow.gradient_norms(model, params, state, x, y)
        ratio[residual] = norms[0][1] / norms[-2][1]
    assert ratio[False] > 100 and ratio[True] < 20 and ratio[False] > 10 * ratio[True], ratio


def test_quick_run_writes_the_documented_json_and_a_png(tmp_path):
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--mlp-depths",
        "4",
        "--steps",
        "5",
        "--json",
        str(tmp_path / "copy.json"),
    ]
    assert cli.main(["flow", *argv]) == 0

    result = json.loads((tmp_path / "flow.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == result
    for field in (
        "gradient_norms",
        "input_gradient_norms",
        "summary",
        "training",
        "final_loss",
        "config",
        "device",
        "jax_version",
    ):
        assert field in result, field
    assert result["jax_version"] == jax.__version__
    names = {"plain8", "resnet8"} | {v.name(4) for v in flow.MLP_VARIANTS}
    assert set(result["gradient_norms"]) == names
    for rows in result["gradient_norms"].values():
        assert all(set(r) == {"layer", "norm"} and r["norm"] > 0 for r in rows)
    for name, s in result["summary"].items():
        assert s["first_over_last"] == pytest.approx(s["first"] / s["last"]), name
    for curve in result["training"].values():
        assert len(curve) == 5 and all(v is None or v > 0 for v in curve)

    png = (tmp_path / "flow.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


# ------------------------------------------------- the document's figures
DOC = __import__("pathlib").Path(__file__).parent.parent / "derivations" / "bp_vs_resnet.md"


# Deep plain nets amplify rounding ×1.4 per block: plain56's first_over_last was 2.71e3, 2.69e3 and
# 2.67e3 in three runs of the same code (bp_vs_resnet.md says so).
DRIFTING = ("plain56", "plain110")


def _documented_rows() -> dict[str, tuple[int, dict[str, float]]]:
    """bp_vs_resnet.md's two tables of figures, as {model: (depth, {summary key: value})}."""
    number = lambda cell: float(cell.split()[0])
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit() and "/" in cells[5]:  # the CIFAR table
            d = cells[0]
            for i, name in enumerate((f"plain{d}", f"resnet{d}")):
                first, last = cells[5 + i].split("/")
                rows[name] = (
                    int(d),
                    {
                        "first_over_last": number(cells[1 + i]),
                        "input_first_over_last": number(cells[3 + i]),
                        "first": number(first),
                        "last": number(last),
                    },
                )
        elif len(cells) == 7 and cells[0].isdigit() and cells[1].startswith(("plain_mlp", "residual_mlp")):
            keys = ("loss", "first", "last", "first_over_last", "input_first_over_last")  # the MLP table
            rows[cells[1]] = int(cells[0]), dict(zip(keys, map(number, cells[2:])))
    return rows


def _check_documented(depths):
    documented = {m: v for m, (d, v) in _documented_rows().items() if d in depths}
    cifar = [d for d in depths if d in flow.CIFAR_DEPTHS]
    mlp = [d for d in depths if d in flow.MLP_DEPTHS]
    assert len(documented) == 2 * len(cifar) + 5 * len(mlp), sorted(documented)  # plain, resnet; five MLPs
    summary = flow.sweep(cifar_depths=cifar, mlp_depths=mlp)["summary"]
    for model, figures in documented.items():
        for key, value in figures.items():
            if model in DRIFTING:  # the document says these move with rounding: within 10%
                assert abs(summary[model][key] - value) <= 0.1 * abs(value), (model, key, summary[model][key], value)
                continue
            # The document prints three significant digits, as `jax-resnet flow` does.
            assert float(f"{summary[model][key]:.3g}") == value, (model, key, summary[model][key], value)


def test_documented_depth_8_figures_match_what_flow_prints():
    _check_documented((8,))


def test_documented_figures_match_the_whole_flow_sweep():
    _check_documented((8, 20, 32, 56, 64, 110))
