"""jax-resnet: residual networks as pure JAX functions with hand-derived VJPs.

The modules, by layer (DESIGN.md): `ops` (the rules), `rules` (their
registry), `gradcheck` and `testing` (checking a rule), `blocks`,
`reversible` and `models` (networks as `init`/`apply`), `per_example`,
`curvature`, `laplace` and `dp` (what a backward pass gives besides the gradient),
`nnx` (Flax NNX modules over the same networks), `data`, `step` and `train`
(training), `distributed` and `launch` (training across processes), `flow`
and `bench` (studies), `environment` (where they ran), `checkpoints`.

    >>> import jax_resnet
    >>> model = jax_resnet.models.resnet20()
    >>> model.spec.block
    'basic'

The modules that pull in flax, optax, orbax or matplotlib (`nnx`, `step`,
`dp`, `train`, `flow`, `bench`, `checkpoints`, ...) are imported on first use
(`jax_resnet.nnx`), so `import jax_resnet` and `jax-resnet verify` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jax_resnet import blocks, curvature, gradcheck, models, ops, per_example, reversible, rules
from jax_resnet.curvature import hvp

if TYPE_CHECKING:
    from jax_resnet import (
        bench,
        checkpoints,
        data,
        distributed,
        dp,
        environment,
        flow,
        laplace,
        launch,
        nnx,
        step,
        testing,
        train,
        verify,
    )

# Imported on first attribute access (PEP 562): each brings a heavy dependency or is a leaf few callers need.
_LAZY = (
    "bench",
    "checkpoints",
    "data",
    "distributed",
    "dp",
    "environment",
    "flow",
    "laplace",
    "launch",
    "nnx",
    "step",
    "testing",
    "train",
    "verify",
)

__all__ = [
    "bench",
    "blocks",
    "checkpoints",
    "curvature",
    "data",
    "distributed",
    "dp",
    "environment",
    "flow",
    "gradcheck",
    "hvp",
    "laplace",
    "launch",
    "models",
    "nnx",
    "ops",
    "per_example",
    "reversible",
    "rules",
    "step",
    "testing",
    "train",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"jax_resnet.{name}")
    raise AttributeError(f"module 'jax_resnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
