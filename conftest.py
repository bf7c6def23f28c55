"""Settings for every test and doctest, applied before JAX is imported.

The suite is compile-bound: almost every test compiles a small program and
runs it once. XLA's backend optimisations (fusion, layout and loop passes)
make those programs faster to run but slower to compile, so the tests turn
them off. The programs compute the same functions (the tests compare
gradients formula against formula, to 1e-10 in float64, either way); on this
project's 2-core CPU machine this halves the time of the whole-model gradient
tests. Benchmarks and training never run under this setting.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
