"""Strict test settings: float64 on (gradient checks need it), warnings are
errors (pyproject), hypothesis without deadlines (JAX compiles on first call)."""

import hypothesis
import jax

jax.config.update("jax_enable_x64", True)

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


# ------------------------------------------------------------------ slow tests
# `make test` (the README's test command) runs everything but these, and stays
# within 5 minutes on a 2-core machine; `make test-slow` runs these, and CI
# (.ci/run) runs both. Each is an end-to-end run that repeats, at the size a
# user sees, paths the fast tests cover in small: a notebook in a fresh kernel,
# a child process with 8 simulated devices, a training run, a full-depth net.
# A node id prefix per entry, with the reason; keep the list short.
SLOW = {
    "tests/test_notebooks.py::test_notebook_runs_in_a_kernel": "each Colab notebook in a fresh Jupyter kernel",
    "tests/test_flow.py::test_plain_batchnorm_net_gradient_explodes": "two 56-layer nets per seed",
    "tests/test_flow.py::test_quick_run_writes": "the `flow` command end to end",
    "tests/test_flow.py::test_documented_figures_match_the_whole_flow_sweep": "plain110 and resnet110 compiled",
    "tests/test_models.py::test_jit_and_nojit_agree": "a whole model's float64 gradient op by op",
    "tests/test_reversible.py::test_revnet38_passes": "the full RevNet-38, compiled twice",
    "tests/test_per_example.py::test_per_example_quantities_equal_vmap_of_grad[gn_basic_B]": "option B (A is fast)",
    "tests/test_per_example.py::test_per_example_quantities_equal_vmap_of_grad[gn_bottleneck_B]": "bottleneck blocks",
    "tests/test_per_example.py::test_sharded_batch": "8 simulated devices in a child process",
    "tests/test_train.py::test_sharded_step_equals": "8 simulated devices in a child process",
    "tests/test_curvature.py::test_diag_ggn_and_batch_diag_ggn_equal_the_oracle[gn_bottleneck_B]": "bottleneck blocks",
    "tests/test_curvature.py::test_diag_ggn_with_batchnorm_in_training_mode_equals_the_oracle[revnet_train]": (
        "the RevNet's B·C backward passes and 64 Monte Carlo draws"
    ),
    "tests/test_train.py::test_a_second_process_with_the_same_seed": "a training run in a child process",
    "tests/test_rules.py::test_every_rule_sharded": "8 simulated devices in a child process",
    "tests/test_multiprocess.py::test_two_processes_train": "three two-process training runs and a one-process one",
    "tests/test_multiprocess.py::test_dp_step_and_per_example": "two processes compiling the DP step and tiny_gn",
    "tests/test_multiprocess.py::test_a_process_that_dies": "a two-process training run, one process killed",
    "tests/test_docs_site.py::test_every_page_renders": "every page of the built site (make docs) in Chromium",
    # These two need the docs extra, which `make docs` installs after `make test` has run.
    "tests/test_docs_site.py::test_plain_text_tables": "needs the docs extra (make docs)",
    "tests/test_docs_site.py::test_derivation_pointers": "needs the docs extra (make docs)",
    "tests/test_laplace.py::test_linearised_logits_are_the_jacobian_times_the_draw[gn_resnet8]": "the MLP is fast",
    # The rule matrix's further transformations; test_vjp_matches_autodiff_float32/64
    # (jitted VJPs and finite differences) stay fast for every rule.
    "tests/test_rules.py::test_vjp_without_jit": "op by op in float64",
    "tests/test_rules.py::test_vmap_over_leading_axis": "a compilation per rule",
    "tests/test_rules.py::test_grad_of_grad": "a compilation per rule",
    "tests/test_rules.py::test_checkpoint_and_scan": "a compilation per rule",
    "tests/test_rules.py::test_extreme_arguments": "a compilation per rule",
    "tests/test_rules.py::test_bfloat16_and_float16": "a compilation per rule",
}


def pytest_collection_modifyitems(config, items):
    import pytest

    modules = {item.nodeid.split("::")[0]: item.module for item in items if hasattr(item, "module")}
    for prefix in SLOW:  # a renamed test must not silently leave the slow set
        path, name = prefix.split("::")
        function = name.split("[")[0]
        if path not in modules:
            continue
        renamed = not any(attr.startswith(function) for attr in dir(modules[path]))
        collected = [item.nodeid for item in items if item.nodeid.startswith(f"{path}::{function}")]
        if renamed or (collected and not any(nodeid.startswith(prefix) for nodeid in collected)):
            raise pytest.UsageError(f"tests/conftest.py: SLOW lists {prefix!r}, which matches no test")
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
