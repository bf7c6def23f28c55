"""`jax-resnet bench`: the quick run's files, and the Flax peers are the library's
architectures (equal parameter counts; equal outputs and BatchNorm updates from
equal weights). No timing is asserted: the numbers depend on the machine."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_resnet import bench, cli, models

ROW_FIELDS = {
    "workload",
    "method",
    "step_time_ms",
    "ratio_to_autodiff",
    "compile_time_s",
    "temp_memory_bytes",
    "examples_per_second",
    "environment",
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
        if r["method"] == "autodiff":
            assert r["ratio_to_autodiff"] == 1.0

    markdown = md_path.read_text()
    assert "#### Goals" in markdown
    for name in names:
        assert f"| {name} |" in markdown
    assert markdown.count("met (") + markdown.count("missed (") == len(names) * len(bench.GOALS)
    assert "residual_mlp" in capsys.readouterr().out


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
