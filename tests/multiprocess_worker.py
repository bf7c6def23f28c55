"""One process of tests/test_multiprocess.py's DP and per-example comparison.

    python tests/multiprocess_worker.py OUT.npz   # started by `jax_resnet.launch.start`

Each process joins the run (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and
computes over a mesh of every process's devices, feeding only its rows of each global batch
(`step.put_batch`); then each computes the same on one device of its own, with no
collective, and process 0 writes both ("every/...", "one/..."):

  dp_params: the parameters of `residual_mlp` after 3 DP-SGD steps (Poisson batches and noise
    from `DPRandomness.insecure(0)`, padded to the devices, clip 1, σ 1) from `init(key(0))`;
  batch_l2, sum_grad_squared, variance, loss: `per_example.quantities(mesh=)` of `tiny_gn` at
    init on the first 16 digits training images, the per-example ones gathered from every process.
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


def compute(mesh, put) -> dict:
    """The DP parameters and per-example quantities over `mesh`, batches placed by `put`."""
    from jax_resnet import data, dp, models, per_example, step

    ds = data.load("digits")
    batch = step.shardings(mesh)[1]
    flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    local = lambda a: np.asarray(a.addressable_data(0))
    results = {}

    model = models.get("residual_mlp").for_data(ds.image_shape, ds.num_classes)
    config = dp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=32)
    optimizer = step.make_optimizer("sgd", 0.1)
    tree = step.init_train_state(model, optimizer, seed=0, mesh=mesh)
    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
    train_step = step.make_train_step(model, optimizer, dp=config, mesh=mesh)
    randomness = dp.DPRandomness.insecure(0)
    for t in range(3):
        x, y = dp.poisson_batch(ds.x_train, ds.y_train, config, randomness, t, mesh.size)
        key = step.step_key(randomness.root_key(), t, mesh)
        params, state, opt_state, _ = train_step(params, state, opt_state, put(x, batch), put(y, batch), key)
    results.update({f"dp_params{k}": local(v) for k, v in flat(params).items()})

    model = models.get("tiny_gn").for_data(ds.image_shape, ds.num_classes)
    tree = step.init_train_state(model, optimizer, seed=0, mesh=mesh)
    x, y = ds.x_train[:16], ds.y_train[:16]
    which = ("batch_l2", "sum_grad_squared", "variance")
    run = jax.jit(lambda p, s, x, y: per_example.quantities(model, p, s, x, y, which, mesh=mesh))
    loss, _, out = run(tree["params"], tree["state"], put(x, batch), put(y, batch))
    results["loss"] = local(loss)
    whole = lambda a: np.asarray(a if a.is_fully_addressable else multihost_utils.process_allgather(a, tiled=True))
    results.update({f"batch_l2{k}": whole(v) for k, v in flat(out["batch_l2"]).items()})
    for name in ("sum_grad_squared", "variance"):
        results.update({f"{name}{k}": local(v) for k, v in flat(out[name]).items()})
    return results


def main(path: str) -> None:
    from jax_resnet import distributed, step

    distributed.initialize(join_timeout=120, heartbeat_timeout=30)
    assert jax.process_count() > 1, "start it with jax_resnet.launch.start"
    every = compute(step.make_mesh(), step.put_batch)
    # One device, no collective: the reference, in every process alike, so that none waits long for
    # another at JAX's shutdown barrier.
    one = compute(jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",)), jax.device_put)
    if jax.process_index() == 0:
        np.savez(path, **{f"one/{k}": v for k, v in one.items()}, **{f"every/{k}": v for k, v in every.items()})


if __name__ == "__main__":
    main(sys.argv[1])
