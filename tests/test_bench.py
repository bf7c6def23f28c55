"""`jax-resnet bench`: the quick run's files, and the Flax peers are the library's
architectures (equal parameter counts; equal outputs and BatchNorm updates from
equal weights). No timing is asserted: the numbers depend on the machine."""

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_resnet import bench, cli, curvature, models, ops
from jax_resnet._compile import run_once

ROW_FIELDS = {
    "workload",
    "method",
    "step_time_ms",
    "ratio_to_autodiff",
    "compile_time_s",
    "temp_memory_bytes",
    "examples_per_second",
    "environment",
    # the spread over rounds (issue 9)
    "step_time_ms_min",
    "step_time_ms_max",
    "ratio_to_autodiff_min",
    "ratio_to_autodiff_max",
    "compile_time_s_min",
    "compile_time_s_max",
    "rounds",
    "steps_per_round",
    "round_step_times_ms",
    "compile_times_s",
}
ENV_FIELDS = {"device", "platform", "jax", "flax", "cpu_count", "date"}


def test_quick_run_writes_json_rows_for_every_method_and_markdown(tmp_path, capsys):
    # One workload keeps this test short (a ResNet step compiles for seconds per method);
    # CI runs them all with `jax-resnet bench --quick`.
    names = ("residual_mlp",)
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--quick", "--json", str(json_path), "--markdown", str(md_path)]
    for name in names:
        argv += ["--workload", name]
    assert cli.main(["bench", *argv]) == 0

    rows = json.loads(json_path.read_text())
    assert [(r["workload"], r["method"]) for r in rows] == [(n, m) for n in names for m in bench.METHODS]
    for r in rows:
        assert ROW_FIELDS <= r.keys(), ROW_FIELDS - r.keys()
        assert ENV_FIELDS <= r["environment"].keys(), ENV_FIELDS - r["environment"].keys()
        assert r["environment"]["quick"] is True
        assert r["step_time_ms"] > 0 and r["examples_per_second"] > 0 and r["compile_time_s"] > 0
        assert isinstance(r["temp_memory_bytes"], int) and r["temp_memory_bytes"] >= 0
        assert r["rounds"] == 3 == len(r["round_step_times_ms"]) and r["steps_per_round"] >= 1
        assert r["step_time_ms_min"] <= r["step_time_ms"] <= r["step_time_ms_max"]
        assert r["ratio_to_autodiff_min"] <= r["ratio_to_autodiff"] <= r["ratio_to_autodiff_max"]
        assert r["compile_time_s_min"] <= r["compile_time_s"] <= r["compile_time_s_max"]
        if r["method"] == "autodiff":
            assert r["ratio_to_autodiff"] == r["ratio_to_autodiff_min"] == r["ratio_to_autodiff_max"] == 1.0

    markdown = md_path.read_text()
    assert "#### Goals" in markdown
    for name in names:
        assert f"| {name} |" in markdown
    verdicts = sum(markdown.count(f"| {v} (") + markdown.count(f"| {v} |") for v in ("met", "missed", "within noise"))
    assert verdicts == len(names) * len(bench.GOALS)
    assert "Spread of the per-round rules/autodiff ratio" in markdown
    out = capsys.readouterr().out
    assert "residual_mlp" in out and "rules/autodiff" in out


def _row(method, round_ms, compile_s=(1.0,), memory=100):
    """A row as `bench_workload` writes it, from given per-round step times."""
    times = sorted(round_ms)
    return {
        "workload": "w",
        "method": method,
        "step_time_ms": times[len(times) // 2],
        "round_step_times_ms": list(round_ms),
        "compile_time_s": sorted(compile_s)[len(compile_s) // 2],
        "compile_times_s": list(compile_s),
        "temp_memory_bytes": memory,
    }


@pytest.mark.parametrize(
    "rules_ms, verdict, met",
    [
        ([8.0, 8.5, 8.8], "met", True),  # every round within 0.9x autodiff's 10 ms
        ([9.5, 11.0, 12.0], "missed", False),  # every round slower than that
        ([8.5, 9.0, 9.4], "within noise", None),  # the range straddles 0.9
    ],
)
def test_goal_is_met_or_missed_only_when_the_whole_range_is_on_one_side(rules_ms, verdict, met):
    rows = [_row("rules", rules_ms), _row("autodiff", [10.0, 10.0, 10.0]), _row("flax", [20.0, 20.0, 20.0])]
    by_goal = {g["goal"]: g for g in bench.goals(rows)}
    g = by_goal["step time ≤ 0.9× autodiff"]
    assert (g["verdict"], g["met"]) == (verdict, met)
    assert g["ratio_min"] == min(rules_ms) / 10 and g["ratio_max"] == max(rules_ms) / 10
    assert g["ratio"] == sorted(rules_ms)[1] / 10
    assert bench._verdict(g).startswith(f"{verdict} (")
    assert by_goal["step time ≤ 1.0× Flax peer"]["verdict"] == "met"
    assert by_goal["compiled memory ≤ 0.75× autodiff"]["verdict"] == "missed"  # exact: 100 B = 100 B


def test_ratio_is_taken_per_round():
    """A slow round slows every method alike: ratios within a round cancel it (unpaired, 11 ms against
    20 ms would look like a win), and their median need not be the ratio of the medians (12 / 10)."""
    rows = [_row("rules", [11.0, 22.0, 12.0]), _row("autodiff", [10.0, 20.0, 10.0]), _row("flax", [10.0, 20.0, 10.0])]
    g = {g["goal"]: g for g in bench.goals(rows)}["step time ≤ 0.9× autodiff"]
    assert g["ratio_min"] == pytest.approx(1.1) and g["ratio_max"] == pytest.approx(1.2)
    assert g["ratio"] == pytest.approx(1.1) and g["verdict"] == "missed"


# Published counts: ResNet-20 269,722 (He et al. 2015, Table 6: 0.27M; by hand in
# test_models.py); ResNet-18 11,689,512 (torchvision); the seed MLP
# 64·64+64 + 2·(64·64+64) + 64·10+10 = 13,130.
@pytest.mark.parametrize("name, count", [("residual_mlp", 13_130), ("resnet20", 269_722), ("resnet18", 11_689_512)])
def test_peer_and_library_have_equal_parameter_counts(name, count):
    workload = bench.get_workload(name)
    params, _ = jax.eval_shape(workload.model().init, jax.random.key(0))
    peer = nnx.eval_shape(lambda: workload.peer(jnp.float32, nnx.Rngs(0)))
    assert models.num_params(params) == bench.peer_num_params(peer) == count


def _peer_forward(net, x):
    """Train-mode forward of the peer: logits and the updated BatchNorm statistics."""
    graphdef, state = nnx.split(net)

    @jax.jit
    def forward(state, x):
        net = nnx.merge(graphdef, state)
        return net(x), nnx.state(net, nnx.BatchStat)

    return forward(state, x)


@pytest.mark.parametrize(
    "name, example_shape", [("residual_mlp", (64,)), ("resnet20", (8, 8, 3)), ("resnet18", (32, 32, 3))]
)
def test_peer_with_the_library_weights_computes_the_library_forward(name, example_shape):
    # Float64 (tests/conftest.py), so any difference beyond rounding is a different architecture.
    workload = bench.get_workload(name)
    model = workload.model()
    params, state = bench.init_library(model, jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, *example_shape), jnp.float64)
    logits, new_state = jax.jit(lambda p, s, x: model.apply(p, s, x, train=True, grad="autodiff"))(params, state, x)

    peer_logits, peer_stats = _peer_forward(bench.build_peer(workload, params, state, jnp.float64), x)
    np.testing.assert_allclose(peer_logits, logits, rtol=1e-9, atol=1e-12)
    # The peer's BatchNorm updates its statistics as the library's state update does.
    expected_stats = nnx.state(bench.build_peer(workload, params, new_state, jnp.float64), nnx.BatchStat)
    assert jax.tree.structure(peer_stats) == jax.tree.structure(expected_stats)
    for got, want in zip(jax.tree.leaves(peer_stats), jax.tree.leaves(expected_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ bench --dp
def test_dp_methods_skip_jax_privacy_with_the_reason_when_it_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_privacy", None)  # `import jax_privacy` raises ImportError
    logged = []
    assert bench.dp_methods(logged.append) == ("non_private", "dp", "vmap_clip")
    assert "skipping jax_privacy" in logged[0] and "jax-resnet[peers]" in logged[0]


@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_dp_quick_run_takes_the_workload_round_and_markdown_flags(tmp_path, capsys):
    json_path, md_path = tmp_path / "dp.json", tmp_path / "dp.md"
    argv = ["bench", "--dp", "--quick", "--workload", "dp_residual_mlp", "--rounds", "2", "--round-seconds", "0.02"]
    assert cli.main([*argv, "--json", str(json_path), "--markdown", str(md_path)]) == 0
    rows = json.loads(json_path.read_text())
    assert {r["workload"] for r in rows} == {"dp_residual_mlp"} and rows[0]["method"] == "non_private"
    assert [r["method"] for r in rows] == list(bench.dp_methods())
    for r in rows:
        assert r["rounds"] == 2 and r["ratio_to_non_private_min"] <= r["ratio_to_non_private_max"]
        assert r["padded_rows"] == (16 + 8 - 16 if r["method"] == "dp" else 0)  # b + ⌈2√b⌉ = 24 rows for b = 16
    markdown = md_path.read_text()
    assert "time ≤ 1.3× non-private" in markdown and "| dp_residual_mlp | dp |" in markdown
    # A workload of the other kind is refused, with the flag to change.
    assert cli.main(["bench", "--dp", "--quick", "--workload", "resnet20"]) == 2
    assert "drop --dp" in capsys.readouterr().err


def test_dp_methods_skip_a_jax_privacy_outside_the_peers_range_naming_the_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_privacy", types.SimpleNamespace(__version__="1.0.0"))
    logged = []
    assert bench.dp_methods(logged.append) == ("non_private", "dp", "vmap_clip")
    assert "jax-privacy 1.0.0 is installed; the peer needs jax-privacy>=2.0,<3" in logged[0]


def test_ablation_swaps_one_family_at_a_time_and_writes_its_table(tmp_path):
    variants = bench.ablation_opsets()
    families = list(dict.fromkeys(spec.family for spec in ops.SPECS.values()))
    assert list(variants) == ["rules", *(f"autodiff {f}" for f in families), "autodiff"]
    conv = variants["autodiff conv"]
    assert (
        conv.conv2d is ops.AUTODIFF.conv2d
        and conv.relu is ops.RULES.relu
        and conv.batch_norm_train is ops.RULES.batch_norm_train
    )
    md = tmp_path / "ablate.md"
    argv = ["bench", "--ablate", "--quick", "--workload", "residual_mlp", "--rounds", "2", "--markdown", str(md)]
    assert cli.main([*argv, "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert [r["method"] for r in rows] == list(variants)
    assert "| autodiff activations |" in md.read_text() and "× autodiff" in md.read_text()
    assert cli.main(["bench", "--ablate", "--dp", "--quick"]) == 2


# jax_privacy 2.0 calls optax.global_norm, which optax 0.2.8 deprecates.
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_jax_privacy_peer_takes_the_dp_steps_update():
    # The peer's clipped sum (jax_privacy.clipping.clipped_grad) with the DP step's
    # noise and optimizer gives the DP step's parameters: the benchmark compares
    # two ways of computing one update.
    pytest.importorskip("jax_privacy")
    import optax

    model = models.residual_mlp(in_features=6, width=8, depth=2, out_features=3)
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 6), jnp.float32)
    y, key, tx = jnp.arange(5) % 3, jax.random.key(2), optax.sgd(0.1)
    carry = (params, state, tx.init(params))
    config = bench.dp_config(5)
    new = {
        m: run_once(jax.jit(bench.dp_method_step(m, model, tx, config)), carry, x, y, key)[0][0]
        for m in ("dp", "jax_privacy")
    }
    for a, b in zip(jax.tree.leaves(new["dp"]), jax.tree.leaves(new["jax_privacy"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------- bench --curvature
def _curvature_case(name, batch=3):
    """A tiny float64 network of each curvature workload's family, its weights and a batch."""
    model, shape, train = {
        "mlp": (models.residual_mlp(in_features=5, width=6, depth=2, out_features=3), (5,), True),
        "gn": (models.cifar_resnet(8, widths=(2, 4, 4), num_classes=3, norm="group", norm_groups=2), (8, 8, 3), True),
        "bn_eval": (models.cifar_resnet(8, widths=(2, 4, 4), num_classes=3), (8, 8, 3), False),
    }[name]
    params, state = bench.init_library(model, jax.random.key(0), jnp.float64)
    if not train:  # running statistics away from their initial 0 and 1, so the test sees them used
        state = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.key(3), s.shape, s.dtype), state)
    x = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float64)
    y = jnp.arange(batch) % 3
    return model, params, state, x, y, train


@pytest.mark.parametrize("name", ["mlp", "gn", "bn_eval"])
def test_jacrev_peer_agrees_with_diag_ggn(name):
    # Two independent routes to diag G: per-example Jacobians of the autodiff network with
    # jax.hessian of optax's loss, and the library's factor pushed through the rules' backward.
    model, params, state, x, y, train = _curvature_case(name)
    got = jax.jit(lambda p, s: bench.jacrev_diag_ggn(model, p, s, x, y, train=train))(params, state)
    want = jax.jit(lambda p, s: curvature.diag_ggn(model, p, s, x, y, train=train))(params, state)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


def test_curvature_workload_steps_compute_what_they_name():
    model, params, state, x, y, train = _curvature_case("mlp", batch=4)
    key, carry = jax.random.key(5), (params, state)
    step = lambda m, *batch: jax.jit(bench.curvature_method_step(m, model, train))(carry, *batch)
    carry_out, diag = step("diag_ggn", x, y)
    assert carry_out is not None
    explicit = bench.jacrev_diag_ggn(model, params, state, x, y, train=train)
    for g, w in zip(jax.tree.leaves(diag), jax.tree.leaves(explicit)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
    # diag_ggn_mc with one sample, as curvature.diag_ggn_mc computes it from the same key.
    _, mc = step("diag_ggn_mc", x, y, key)
    one_sample = curvature.diag_ggn_mc(model, params, state, x, y, key, 1, train=train)
    for g, w in zip(jax.tree.leaves(mc), jax.tree.leaves(one_sample)):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    # The backward pass is the gradient of the mean cross-entropy (autodiff of the reference network).
    pullback, ct = bench.backward_pass(model, params, state, x, y, train=train)
    _, grads = jax.jit(bench._backward_step)(pullback, ct)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, state, x, train=train, grad="autodiff")[0], y
    ).mean()
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(loss)(params))):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(not hasattr(curvature, "kfac"), reason="jax_resnet.curvature has no kfac in this version")
def test_kfac_workload_is_one_sample_of_the_kronecker_factors():
    # One example through dense layers: each kernel's gradient is a ⊗ δ, so its KFAC block
    # (a aᵀ) ⊗ (δ δᵀ) is exact and its diagonal, diag(A) ⊗ diag(G), is the one-sample MC
    # diagonal of the same labels (both drawn by the key from the model's prediction).
    model, params, state, x, y, train = _curvature_case("mlp", batch=1)
    key = jax.random.key(7)
    _, factors = jax.jit(bench.curvature_method_step("kfac", model, train))((params, state), x, y, key)
    mc = curvature.diag_ggn_mc(model, params, state, x, y, key, 1, train=train)
    kernels = [(factors[k]["w"], mc[k]["w"]) for k in ("in", "out")] + [
        (f["w"], m["w"]) for f, m in zip(factors["hidden"], mc["hidden"])
    ]
    for kron, diagonal in kernels:
        assert isinstance(kron, curvature.Kronecker)
        np.testing.assert_allclose(jnp.outer(jnp.diag(kron.a), jnp.diag(kron.g)), diagonal, rtol=1e-10, atol=1e-14)


def test_curvature_methods_list_kfac_only_where_curvature_has_it(monkeypatch):
    monkeypatch.delattr(curvature, "kfac", raising=False)
    logged = []
    assert bench.curvature_methods(logged.append) == tuple(m for m in bench.CURVATURE_METHODS if m != "kfac")
    assert "skipping kfac" in logged[0]
    monkeypatch.setattr(curvature, "kfac", lambda *args, **kwargs: None, raising=False)
    assert bench.curvature_methods() == bench.CURVATURE_METHODS


def test_kfac_jax_registers_every_kernel_of_the_network_as_kronecker_factors():
    # What the kfac_jax row would time: Kronecker factors for each dense kernel (its own
    # pattern matching of the autodiff network's jaxpr), not a fallback diagonal.
    reason = bench.kfac_jax_unavailable()
    if reason:
        pytest.skip(reason)
    model, params, state, x, y, train = _curvature_case("mlp")
    estimator = bench.kfac_jax_estimator(model, train=train)
    estimator.init(jax.random.key(0), (params, state, x, y), None, None)
    assert [type(b).__name__ for b in estimator.blocks] == ["DenseTwoKroneckerFactored"] * 4


def test_kfac_jax_row_gives_the_reason_it_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "kfac_jax", None)  # `import kfac_jax` raises ImportError
    assert "pip install 'jax-resnet[peers]'" in bench.kfac_jax_unavailable()
    rows = bench.benchmark(["curvature_residual_mlp"], curvature=True, quick=True, rounds=1, round_seconds=0.001)
    (row,) = [r for r in rows if r["method"] == "kfac_jax"]
    assert row["unavailable"] == bench.kfac_jax_unavailable() and "step_time_ms" not in row
    markdown = bench.format_curvature_markdown(rows)
    assert "| curvature_residual_mlp | kfac_jax | cannot run here: kfac-jax is not installed" in markdown


def test_unavailable_reason_names_the_exception_and_the_peers_own_frame():
    namespace = {}
    exec(compile("def f():\n    raise ValueError('too many\\n values')\n", "/x/kfac_jax/_src/m.py", "exec"), namespace)
    try:
        namespace["f"]()
    except ValueError as e:
        reason = bench._unavailable_reason("kfac_jax", e)
    assert reason.startswith("ValueError: too many values at kfac_jax/_src/m.py:2")


def _curvature_row(method, round_ms, memory=100):
    return {**_row(method, round_ms, memory=memory), "num_classes": 10}


def test_curvature_goals_take_ratios_per_round_and_scale_the_backward_by_the_classes():
    rows = [
        _curvature_row("train_step", [10.0, 20.0]),
        _curvature_row("backward", [5.0, 10.0]),
        _curvature_row("diag_ggn_mc", [14.0, 31.0], memory=131),
        _curvature_row("diag_ggn", [59.0, 121.0]),  # per round 59/(10·5), 121/(10·10): within 1.2
        _curvature_row("jacrev_diag_ggn", [50.0, 200.0], memory=50),
        {"workload": "w", "method": "kfac_jax", "unavailable": "ImportError: no"},
    ]
    g = {g["goal"]: g for g in bench.curvature_goals(rows)}
    mc_time = g["diag_ggn_mc(1) time ≤ 1.5× training step"]
    assert (mc_time["ratio_min"], mc_time["ratio_max"], mc_time["verdict"]) == (1.4, 1.55, "within noise")
    assert g["diag_ggn_mc(1) memory ≤ 1.3× training step"]["verdict"] == "missed"  # 131 B / 100 B
    per_class = g["diag_ggn time ≤ 1.2 × C × backward"]
    assert per_class["ratio_min"] == pytest.approx(1.18) and per_class["ratio_max"] == pytest.approx(1.21)
    assert per_class["verdict"] == "within noise"
    assert g["diag_ggn time ≤ jacrev_diag_ggn"]["verdict"] == "within noise"  # 1.18 and 0.605
    assert g["diag_ggn memory ≤ jacrev_diag_ggn"]["verdict"] == "missed"
    assert (g["kfac(1) time ≤ 1.5× training step"]["verdict"], g["kfac(1) time ≤ 1.5× training step"]["reason"]) == (
        "n/a",
        "no kfac in this version",
    )


def test_curvature_quick_run_takes_the_workload_round_and_markdown_flags(tmp_path):
    json_path, md_path = tmp_path / "c.json", tmp_path / "c.md"
    argv = ["bench", "--curvature", "--quick", "--workload", "curvature_residual_mlp", "--rounds", "2"]
    assert cli.main([*argv, "--round-seconds", "0.01", "--json", str(json_path), "--markdown", str(md_path)]) == 0
    rows = json.loads(json_path.read_text())
    assert [r["method"] for r in rows] == list(bench.curvature_methods())
    for r in rows:
        assert r["workload"] == "curvature_residual_mlp" and r["batch_size"] == 8
        if "unavailable" in r:  # kfac_jax, where it cannot run
            assert r["method"] == "kfac_jax" and r["unavailable"]
            continue
        assert r["rounds"] == 2 and r["ratio_to_train_step_min"] <= r["ratio_to_train_step_max"]
        assert r["num_classes"] == 10 and r["curvature_train"] is True and r["memory_ratio_to_train_step"] > 0
    markdown = md_path.read_text()
    assert markdown.count("| curvature_residual_mlp | ") == len(rows) + len(bench.CURVATURE_GOALS)
    assert "diag_ggn time ≤ 1.2 × C × backward" in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--curvature", "--dp"], "--dp and --curvature select different workloads; choose one"),
        (["--curvature", "--ablate"], "does not combine with --curvature"),
        (["--curvature", "--workload", "resnet20"], "--workload resnet20: a training-step workload; drop --curvature"),
        (["--workload", "curvature_resnet20"], "a curvature workload; add --curvature, or choose another"),
        (["--dp", "--workload", "curvature_resnet20"], "a curvature workload; drop --dp and add --curvature"),
        (["--curvature", "--workload", "dp_residual_mlp"], "a DP workload; drop --curvature and add --dp"),
    ],
)
def test_curvature_flag_combinations_are_refused_with_the_flag_to_change(argv, message, capsys):
    assert cli.main(["bench", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


class _FixedCost:
    """A stand-in for `bench.Prepared` whose every step 'takes' a fixed time: records the steps asked for."""

    def __init__(self, method, seconds):
        self.method, self.seconds, self.calls = method, seconds, []

    def run(self, steps):
        self.calls.append(steps)
        return self.seconds


def test_time_interleaved_gives_each_method_a_rounds_time_with_equal_time():
    fast, slow = _FixedCost("fast", 0.001), _FixedCost("slow", 0.1)
    times, steps = bench.time_interleaved([fast, slow], rounds=2, min_round_s=0.5, warmup=1, equal_time=True)
    # The fast method is counted again over a round's worth of steps (500) before the rounds.
    assert steps == {"fast": 500, "slow": 5} and fast.calls == [1, 500, 500, 500] and slow.calls == [1, 5, 5, 5]
    assert times == {"fast": [0.001, 0.001], "slow": [0.1, 0.1]}
    _, steps = bench.time_interleaved([fast, slow], rounds=2, min_round_s=0.5, warmup=1)
    assert steps == {"fast": 5, "slow": 5}  # the default: the slowest method's count for all
