"""Settings for every test and doctest, applied before JAX is imported.

The suite is compile-bound: almost every test compiles a small program and
runs it once. Two XLA settings make those compilations several times cheaper
on the CPU: no LLVM backend optimisations, and XLA's older loop emitters
instead of its MLIR fusion emitters (a whole-model gradient of a small
ResNet-50 compiles in 1.2 s instead of 5.8 s here). The programs compute the
same functions (the tests compare gradients formula against formula, to 1e-10
in float64, either way); they only run slower, which tiny test shapes do not
notice. Benchmarks and training never run under these settings.

An XLA flag a jaxlib does not know aborts the process, so the flags are first
tried in a child process, once per run (xdist workers and the tests' child
processes inherit the environment).
"""

import os
import subprocess
import sys

_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_PROBE = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"


def _known(flags: list[str]) -> bool:
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True).returncode == 0


_missing = [flag for flag in _FLAGS if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
if _missing:
    _add = _missing if _known(_missing) else [flag for flag in _missing if _known([flag])]
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_add]).strip()
