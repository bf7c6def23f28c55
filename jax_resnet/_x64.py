"""float64 for a block of code, without changing JAX's setting for the process.

`jax.config.update("jax_enable_x64", True)` flips the setting for every later
caller in the process (a notebook, a test that expects float32); the context
manager restores it on exit, also when the block raises.

Example:
    >>> import jax.numpy as jnp
    >>> from jax_resnet._x64 import enable_x64
    >>> with enable_x64():
    ...     print(jnp.ones(2, jnp.float64).dtype)
    float64
"""

from __future__ import annotations

import contextlib
import importlib

import jax


def enable_x64() -> contextlib.AbstractContextManager:
    """A context in which float64 is on (`jax.enable_x64`; `jax.experimental.enable_x64` before it existed)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    # Looked up by name: the installed jax, whose types mypy reads, no longer has it.
    return importlib.import_module("jax.experimental").enable_x64()
