"""The ReLU rule's residual policies, timed side by side in one process (derivations/activations.md#relu).

Each variant is a `custom_vjp` ReLU with the rule's VJP, ct_x = ct_y · [x > 0], and a
different forward expression or saved residual, swapped into the library's training step
(`RULES._replace(relu=...)`); "autodiff relu" puts the reference ReLU among the rules, and
"autodiff" is the all-reference step every ratio is taken against, within each round.

    python benchmarks/relu_policies.py                 # ResNet-20, batch 128, 32x32x3
    python benchmarks/relu_policies.py --model resnet18 --rounds 8
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from jax_resnet import bench
from jax_resnet.ops import AUTODIFF, RULES, activations

FORWARDS = {
    "maximum": lambda x: jnp.maximum(x, 0),
    "where": lambda x: jnp.where(x <= 0, jnp.zeros_like(x), x),
}
# what the forward saves, and how the backward reads the mask back from it
SAVES = {
    "bool mask": (lambda x, y: x > 0, lambda res, shape: res),
    "y": (lambda x, y: y, lambda res, shape: res > 0),
    "bits": (lambda x, y: jnp.packbits(x > 0, axis=-1), lambda res, shape: activations._unpack(res, shape)),
}


def policy(forward: str, saves: str):
    """A ReLU rule computing `FORWARDS[forward]` and saving `SAVES[saves]`."""
    f, (save, read) = FORWARDS[forward], SAVES[saves]

    @jax.custom_vjp
    def relu(x):
        return f(x)

    def fwd(x):
        y = f(x)
        return y, save(x, y)

    def bwd(res, ct):
        return (jnp.where(read(res, ct.shape), ct, jnp.zeros_like(ct)),)

    relu.defvjp(fwd, bwd)
    return relu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "resnet18"), default="resnet20")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=2.0)
    args = parser.parse_args()
    workload = bench.get_workload(args.model)
    variants = {f"{fw}, {sv}": RULES._replace(relu=policy(fw, sv)) for fw in FORWARDS for sv in SAVES}
    variants.update({"the rule": RULES, "autodiff relu": RULES._replace(relu=AUTODIFF.relu), "autodiff": AUTODIFF})
    batch_size, example_shape = workload.sizes(quick=False)
    x = jax.random.normal(jax.random.key(1), (batch_size, *example_shape))
    y = jax.random.randint(jax.random.key(2), (batch_size,), 0, workload.num_classes)
    model, tx = workload.model(), bench.optimizer()
    params, state = bench.init_library(model, jax.random.key(0))
    prepared = []
    for name, ops in variants.items():
        carry = jax.device_put((params, state, tx.init(params)))
        compiled, seconds = bench._compile(bench.library_step(model, ops, tx), carry, (x, y))
        memory = compiled.memory_analysis().temp_size_in_bytes
        prepared.append(bench.Prepared(name, compiled, carry, (x, y), [seconds], memory, 0))
    times, _ = bench.time_interleaved(prepared, args.rounds, args.round_seconds)
    print(f"{args.model}, batch {batch_size}: step time / autodiff's (median, range over {args.rounds} rounds), MiB")
    for p in prepared:
        ratios = [t / base for t, base in zip(times[p.method], times["autodiff"])]
        print(
            f"{p.method:18s} {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            f"  {p.temp_memory_bytes / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
