"""Programs that run once (initialisation, a gradient check), compiled cheaply.

On the CPU, XLA's backend optimisations of such programs cost seconds (the
threefry random bits most of all: about 24 s of CPU time to compile `tiny`'s
initialisation here, jax 0.10.2) and buy nothing, since the program runs once.
Elsewhere the default options are kept.
"""

from __future__ import annotations

import jax


def compile_once(jitted, *args):
    """`jitted.lower(*args).compile(...)` without XLA's backend optimisations on the CPU."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jitted.lower(*args).compile(compiler_options=options)


def run_once(jitted, *args):
    """Compile `jitted` for `args` with `compile_once` and run it."""
    return compile_once(jitted, *args)(*args)
