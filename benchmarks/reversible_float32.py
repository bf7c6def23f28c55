"""Two float32 questions about the reversible stage of `benchmarks/reversible.py`'s error table.

`kink`: why the float32 stored-activation gradient can sit 1e-2 from float64 (a ReLU kink).
`growth`: the two float64 factors of the reconstruction error's growth in depth.

The stage of `benchmarks/reversible.py`'s error table (basic couplings, 16
channels, batch 8 of 8x8, training mode, its loss), at initialisation. For
each depth this prints

  * the per-array error of the float32 stored-activation gradient against
    float64, per coupling, so that one coupling's arrays stand out;
  * the ReLU inputs (BatchNorm outputs) of the float64 forward that lie on the
    other side of zero in the float32 forward: the kinks float32 rounding
    crosses, with their float64 value;
  * the float64 gradient taken at the float32 forward's output of the first
    coupling: if it reproduces the float32 gradient's error, the error comes
    from the point the gradient is taken at (a ReLU mask flipped by one
    rounding), not from float32 arithmetic in the backward.

`growth`, for each depth n, in float64: max|y| / max|x| of the stage (how the
activations grow along it) and the amplification of the inverse, max|Δx| /
max|Δy| for a small random perturbation Δy of the output rebuilt back to the
input; a rounding of relative size u made near the output reaches the input
multiplied by both.

Command (about a minute and a half on 2 CPU cores): python benchmarks/reversible_float32.py
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import reversible as bench_reversible  # noqa: E402

from jax_resnet import ops, reversible  # noqa: E402
from jax_resnet._x64 import enable_x64  # noqa: E402
from jax_resnet.gradcheck import leaf_errors  # noqa: E402


def _bn(h, p):
    mean = h.mean((0, 1, 2))
    var = ((h - mean) ** 2).mean((0, 1, 2))
    return (h - mean) / jnp.sqrt(var + 1e-5) * p["gamma"] + p["beta"]


def _body(p, h):
    """A pre-activation basic body (BN, ReLU, conv, twice) in plain jnp, returning its ReLU inputs too."""
    pre = []
    for i in range(2):
        h = _bn(h, p[f"bn{i}"])
        pre.append(h)
        h = jax.lax.conv_general_dilated(
            jnp.maximum(h, 0), p[f"conv{i}"]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return h, pre


def _relu_inputs(params, x1, x2, n):
    out = []
    for k in range(n):
        p = jax.tree.map(lambda a, k=k: a[k], params)
        f, pre_f = _body(p["f"], x2)
        x1 = x1 + f
        g, pre_g = _body(p["g"], x1)
        x2 = x2 + g
        out.append(pre_f + pre_g)
    return out


def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _at(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def kink(n: int) -> None:
    autodiff = ops.opset("autodiff")
    spec, params, state, x1, x2, w = bench_reversible._stage(n, 16, 8, 8, jax.random.key(0))
    grad = functools.partial(bench_reversible._gradients, autodiff, spec)
    f64 = functools.partial(_cast, dtype=jnp.float64)
    g32 = jax.jit(functools.partial(grad, state, w))(params, x1, x2)
    g64 = jax.device_get(jax.jit(functools.partial(grad, f64(state), f64(w)))(f64(params), f64(x1), f64(x2)))
    per = leaf_errors(g32, g64)
    print(
        f"{n} couplings: float32 stored-activation gradient vs float64, median per array "
        f"{np.median(list(per.values())):.1e}, largest {max(per.values()):.1e}"
    )
    # The same, per coupling (each parameter array sliced at coupling k, against its own scale).
    worst = [max(leaf_errors(_at(g32[0], k), _at(g64[0], k)).values()) for k in range(n)]
    print("  largest per-array error of each coupling's parameters:", " ".join(f"{e:.0e}" for e in worst))
    pre64 = _relu_inputs(f64(params), f64(x1), f64(x2), n)
    pre32 = jax.jit(_relu_inputs, static_argnums=3)(params, x1, x2, n)
    for k in range(n):
        for j, (a, b) in enumerate(zip(pre32[k], pre64[k])):
            for v in np.asarray(b)[np.asarray((a > 0) != (b > 0))]:
                print(f"  ReLU flipped: coupling {k}, {'fg'[j // 2]}'s ReLU {j % 2}, float64 input {v:.1e}")
    # The gradient of couplings 1.. taken at the first coupling's float32 or float64 output.
    o32 = reversible.coupling(autodiff, spec, _at(params, 0), _at(state, 0), x1, x2, train=True)[:2]
    o64 = reversible.coupling(autodiff, spec, *f64((_at(params, 0), _at(state, 0), x1, x2)), train=True)[:2]

    def tail(o, dtype):
        rest = _cast(_at((params, state), slice(1, None)), dtype)
        loss = functools.partial(bench_reversible._stage_loss, autodiff, spec, rest[1], _cast(w, dtype))
        return jax.grad(loss, argnums=(0, 1, 2))(rest[0], *_cast(o, dtype))

    exact = tail(o64, jnp.float64)
    for name, o, dtype in (
        ("float32 from the float32 point", o32, jnp.float32),
        ("float64 from the float32 point", o32, jnp.float64),
        ("float32 from the float64 point", o64, jnp.float32),
    ):
        e = leaf_errors(tail(o, dtype), exact)
        print(f"  couplings 1..{n - 1}, {name}: largest per-array error {max(e.values()):.1e}")


def growth(n: int) -> None:
    autodiff = ops.opset("autodiff")
    spec, params, state, x1, x2, _ = bench_reversible._stage(n, 16, 8, 8, jax.random.key(0))
    params, state, x1, x2 = _cast((params, state, x1, x2), jnp.float64)
    y1, y2, _ = jax.jit(functools.partial(reversible.stage, autodiff, spec, train=True))(params, state, x1, x2)
    rebuild = jax.jit(functools.partial(reversible.reconstruct, autodiff, spec, train=True))
    r1, r2, _ = rebuild(params, state, y1, y2)
    v = jax.random.normal(jax.random.key(5), (2, *y1.shape), jnp.float64)
    eps = 1e-6
    p1, p2, _ = rebuild(params, state, y1 + eps * v[0], y2 + eps * v[1])
    amplification = max(float(jnp.abs(p1 - r1).max()), float(jnp.abs(p2 - r2).max())) / (eps * float(jnp.abs(v).max()))
    size = max(float(jnp.abs(y1).max()), float(jnp.abs(y2).max())) / max(
        float(jnp.abs(x1).max()), float(jnp.abs(x2).max())
    )
    print(f"{n} couplings: max|y| / max|x| {size:.2f}, inverse amplification {amplification:.2f}")


if __name__ == "__main__":
    with enable_x64():
        for n in (8, 32):
            kink(n)
        for n in (8, 32, 128, 512):
            growth(n)
