"""Second-order quantities of a loss built from the library's rules.

The rules are `jax.custom_vjp`s, so the loss itself has no forward mode:
`jax.jvp(f, ...)` and `jax.jacfwd(f)` raise JAX's `TypeError: can't apply
forward-mode autodiff (jvp) to a custom_vjp function`. Their backward passes
are plain differentiable `jnp`, so second derivatives are still available, by
differentiating the gradient in reverse mode: `hvp` below. (Forward over
reverse, `jax.jvp(jax.grad(f), (params,), (v,))`, works too: it differentiates
the already-built backward pass, never the rule's forward in forward mode;
`tests/test_models.py` checks both against autodiff.)

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import ops
    >>> from jax_resnet.curvature import hvp
    >>> f = lambda w: jnp.sum(ops.tanh(w) ** 2)
    >>> w, v = jnp.array([0.0, 0.5]), jnp.array([1.0, 0.0])
    >>> hvp(f, w, v)  # H = diag(2(1 − tanh²)(1 − 3 tanh²)): 2 at w = 0
    Array([2., 0.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def hvp(f: Callable[[Any], jax.Array], params: Any, v: Any) -> Any:
    """The Hessian-vector product H(params)·v of a scalar function, reverse over reverse.

    H·v = ∇_p ⟨∇f(p), v⟩: one gradient, then the gradient of its inner
    product with v. Both passes are reverse mode, so this works for losses
    built from `custom_vjp` rules (`grad="rules"`), whose backward passes are
    differentiable; it costs about two gradients and never forms H.

    Args:
      f: `params -> scalar`, e.g. `lambda p: loss(model.apply(p, ...))`.
      params: a pytree of floating arrays, the point p.
      v: a pytree of the same structure and leaf shapes as `params`, the direction.

    Returns:
      H·v, a pytree like `params`.

    Raises:
      ValueError: `v` is not shaped like `params` (the message names the first difference).
    """
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    v_leaves, v_def = jax.tree_util.tree_flatten(v)
    if p_def != v_def:
        raise ValueError(f"hvp: argument `v` must have the structure of `params`: got {v_def}, expected {p_def}")
    for path_p, a, b in zip(jax.tree_util.tree_flatten_with_path(params)[0], p_leaves, v_leaves):
        if jnp.shape(a) != jnp.shape(b):
            key = jax.tree_util.keystr(path_p[0]) or "(root)"
            raise ValueError(f"hvp: argument `v` leaf {key} has shape {jnp.shape(b)}, expected {jnp.shape(a)}")

    def directional(p):
        g = jax.grad(f)(p)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))

    return jax.grad(directional)(params)
