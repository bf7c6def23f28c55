"""The training step, once: loss, optimizer factory, jitted step (with the
data set's augmentation, on the device), evaluation, the device mesh, and the
check of hand-derived gradients against `jax.grad`.

`train`, `flow` and `bench` all build their steps here, so a change to the
loss or the update reaches every one of them.

    >>> import jax, optax
    >>> from jax_resnet import data, models, step
    >>> ds = data.load("synthetic")
    >>> model = models.tiny(num_classes=ds.num_classes, in_channels=1)
    >>> params, state = model.init(jax.random.key(0))
    >>> opt = step.make_optimizer("adam", 1e-2)
    >>> train_step = step.make_train_step(model, opt)
    >>> x, y, key = ds.x_train[:32], ds.y_train[:32], step.step_key(0, 0)
    >>> params, state, opt_state, m = train_step(params, state, opt.init(params), x, y, key)
    >>> bool(m["loss"] > 0)
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_resnet import data, models
from jax_resnet import dp as dp_lib
from jax_resnet._compile import run_once
from jax_resnet._x64 import enable_x64
from jax_resnet.gradcheck import max_leaf_error
from jax_resnet.ops import OpSet, opset

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "MOMENTUM",
    "WARMUP_FRACTION",
    "EVAL_BATCH",
    "make_schedule",
    "make_optimizer",
    "cast",
    "loss_fn",
    "update_fn",
    "augment_batch",
    "step_key",
    "make_mesh",
    "shardings",
    "make_train_step",
    "compiled_train_step",
    "evaluate",
    "hits",
    "masked_mean",
    "put_batch",
    "process_rows",
    "host",
    "init_train_state",
    "GradCheck",
    "check_gradients",
]


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
MOMENTUM = 0.9  # of the "momentum" optimizer (heavy ball, optax.sgd(momentum=0.9))
WARMUP_FRACTION = 0.05  # of the total steps, for the warmup-cosine schedule
EVAL_BATCH = 1024  # examples per evaluation batch, at most


# ------------------------------------------------------------------ optimizers
def make_schedule(name: str, lr: float, total_steps: int) -> float | optax.Schedule:
    """The learning rate: a constant, or an optax schedule over `total_steps`."""
    if name == "constant":
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
    if name == "warmup-cosine":
        warmup = max(1, int(WARMUP_FRACTION * total_steps))
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total_steps)
    raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    weight_decay: float = 0.0,
    *,
    mask: Callable | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer by name.

    sgd: θ ← θ − η·g;  momentum: v ← 0.9·v + g, θ ← θ − η·v;  adam / adamw:
    optax.adam / optax.adamw. For sgd, momentum and adam, weight decay λ is
    L2 regularisation (g ← g + λθ before the update); adamw decouples it.

    Args:
      mask: `params -> pytree of bools`, where weight decay applies (a
        model's `kernel_mask`); required when `weight_decay` > 0.
    """
    if weight_decay and mask is None:
        raise ValueError("make_optimizer: `weight_decay` > 0 needs `mask` (e.g. model.kernel_mask)")
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask)
    if name == "adam":
        base = optax.adam(learning_rate)
    elif name == "sgd":
        base = optax.sgd(learning_rate)
    elif name == "momentum":
        base = optax.sgd(learning_rate, momentum=MOMENTUM)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), base)
    return base


# ------------------------------------------------------------ loss and steps
def cast(tree, dtype):
    """Every floating leaf of `tree` as `dtype`; integer leaves unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def loss_fn(model: models.Model, grad: str | OpSet = "rules", dtype="float32") -> Callable:
    """loss(params, state, x, y) -> (loss, (new_state, logits)): mean softmax
    cross-entropy of the training-mode forward pass, computed in `dtype`.

    Parameters and inputs are cast to `dtype` (bfloat16 for mixed
    precision); BatchNorm statistics keep the dtype they are stored in, and
    the cross-entropy is taken on logits of at least float32.
    """
    ops = opset(grad)
    compute = jnp.dtype(dtype)

    def loss(params, state, x, y):
        logits, new_state = model.apply(cast(params, compute), state, x.astype(compute), train=True, grad=ops)
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        logits = logits.astype(jnp.promote_types(compute, jnp.float32))
        return ops.softmax_cross_entropy(logits, y), (new_state, logits)

    return loss


def update_fn(
    model: models.Model, optimizer: optax.GradientTransformation, grad: str | OpSet = "rules", dtype="float32"
) -> Callable:
    """The pure step, not compiled:
    update(params, state, opt_state, x, y) -> (params, new_state, opt_state, loss, logits)."""
    value_and_grad = jax.value_and_grad(loss_fn(model, grad, dtype), has_aux=True)

    def update(params, state, opt_state, x, y):
        (loss, (new_state, logits)), grads = value_and_grad(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss, logits

    return update


# ---------------------------------------------------------------- augmentation
def augment_batch(key: jax.Array, x: jax.Array, augmentation: data.Augmentation) -> jax.Array:
    """`augmentation` applied to each image of `x` [N, H, W, C], with its own randomness.

    Per image: pad `augmentation.pad` pixels on every side with
    `augmentation.fill`, crop a random H x W window (the draws of
    `dm_pix.random_crop`, every offset in 0..2·pad equally likely: a shift by
    up to ±pad pixels each way), then, if `augmentation.flip`, mirror
    left-right with probability 1/2 (`dm_pix.random_flip_left_right`). The
    draws have fixed dtypes, so the result does not depend on
    `jax_enable_x64`.

    Why dm-pix: it is DeepMind's maintained image library for JAX, and its
    crop and flip are pure functions of a key that `jit` and `vmap` compile,
    so the augmentation runs on the device inside the compiled step. The
    padding is one `.at[].set` here: it needs a value per channel, and
    `dm_pix.pad_to_size` goes through `jnp.pad`, whose constant is per axis.

    Args:
      key: a JAX key; the result is a function of (key, x) alone.
      x: images, NHWC.
      augmentation: what to do (`data.AUGMENTATIONS`, `Dataset.augmentation`).

    Returns:
      An array of x's shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_resnet import data, step
      >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
      >>> y = step.augment_batch(jax.random.key(0), x, data.Augmentation(pad=1))
      >>> y.shape, y.dtype
      ((2, 4, 4, 1), dtype('float32'))
    """
    n, h, w, c = x.shape
    p = augmentation.pad
    fill = jnp.broadcast_to(jnp.asarray(augmentation.fill or 0.0, x.dtype), (c,))

    def one(key, image):
        k_crop, k_flip = jax.random.split(key)
        if p:
            canvas = jnp.broadcast_to(fill, (h + 2 * p, w + 2 * p, c)).at[p : p + h, p : p + w].set(image)
            # dm_pix.random_crop's draws, with the integer dtype fixed: its randint takes the default dtype,
            # int64 under jax_enable_x64, and would crop elsewhere in a process with x64 on.
            starts = [
                jax.random.randint(k, (), 0, size - crop + 1, dtype=jnp.int32)
                for k, size, crop in zip(jax.random.split(k_crop, 3), canvas.shape, (h, w, c))
            ]
            image = jax.lax.dynamic_slice(canvas, starts, (h, w, c))
        if augmentation.flip:
            # A float32 probability: a Python 0.5 would draw float64 uniforms under x64.
            image = pix.random_flip_left_right(k_flip, image, probability=jnp.float32(0.5))
        return image

    return jax.vmap(one)(jax.random.split(key, n), x)


@functools.lru_cache(maxsize=8)
def _fold_in(mesh):
    fold = lambda root, step: jax.random.fold_in(root, step)
    return jax.jit(fold) if mesh is None else jax.jit(fold, out_shardings=shardings(mesh)[0])


def step_key(root: int | jax.Array, step: int, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """The key of global step `step` (0-based): `fold_in(root, step)`, replicated over `mesh`.

    `root` is a seed (`key(seed)`: a run's augmentation) or a key (a DP run's secret
    root, `dp.DPRandomness.root_key`). It depends on these alone, so a resumed run
    augments exactly as an uninterrupted one; a DP step's noise key is
    `fold_in(step key, dp.NOISE_STREAM)`."""
    root = jax.random.key(root) if isinstance(root, int) else root
    return _fold_in(mesh)(root, step)


# ----------------------------------------------------------------------- mesh
def make_mesh(devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh (axis "data") over the first `devices` local devices, or over
    all devices (every process's, under `jax.distributed`) when None."""
    if devices is None:
        return jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    if jax.process_count() > 1:
        raise ValueError("devices: with several processes the mesh spans all devices; leave --devices unset")
    local = jax.local_devices()
    if devices > len(local):
        raise ValueError(
            f"devices: asked for {devices} but only {len(local)} local device(s) exist ({local[0].platform})"
        )
    return jax.sharding.Mesh(np.array(local[:devices]), ("data",))


def shardings(mesh: jax.sharding.Mesh) -> tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding]:
    """(replicated, split along the batch axis) over `mesh`."""
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))


def hits(logits: jax.Array, y: jax.Array) -> jax.Array:
    """1.0 where the largest logit is the label's, else 0.0 (float32), per example."""
    return (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ mask·values / max(Σ mask, 1): a metric over the rows `mask` marks (`dp.real_rows`: not padding)."""
    return jnp.sum(mask * values) / jnp.maximum(jnp.sum(mask), 1.0)


def _finite(params) -> jax.Array:
    # A NaN need not show in the loss (a ReLU mask can hide it), so the parameters are checked too.
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


def make_train_step(
    model: models.Model,
    optimizer: optax.GradientTransformation,
    grad: str | OpSet = "rules",
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    augment: data.Augmentation | None = None,
    dp: dp_lib.DPConfig | None = None,
) -> Callable:
    """One jitted optimizer step, whatever the options:
    step(params, state, opt_state, x, y, key) -> (params, state, opt_state, metrics).

    metrics = {"loss", "accuracy"} of the batch (before the update) and
    "params_finite" (no NaN/inf in the updated parameters). With a mesh, x
    and y are split over its "data" axis and everything else is replicated;
    the result equals the single-device step (global-batch BatchNorm
    statistics, all-reduced gradients). `key` is the step's randomness
    (`step_key`); a step with neither option ignores it.

    Options:
      augment: train on `augment_batch(key, x, augment)`, augmented on the
        device; the metrics are those of the augmented batch.
      dp: DP-SGD (`dp.update_fn`, float32, hand-derived rules): rows labelled
        `dp.PAD_LABEL` are padding and contribute nothing; the noise key is
        `fold_in(key, dp.NOISE_STREAM)`. Metrics over the real rows, plus
        "clipped" (the fraction of them whose gradient norm exceeded C). A
        model with BatchNorm raises `per_example.PerExampleError` when the
        step is traced.
    """
    if dp is None:
        update = update_fn(model, optimizer, grad, dtype)

        def private_or_not(params, state, opt_state, x, y, key):
            params, state, opt_state, loss, logits = update(params, state, opt_state, x, y)
            return params, state, opt_state, loss, logits, {}

    else:
        dp_update = dp_lib.update_fn(model, optimizer, dp, mesh)

        def private_or_not(params, state, opt_state, x, y, key):
            params, opt_state, out = dp_update(params, state, opt_state, x, y, key)
            clipped = masked_mean(out.norms > dp.l2_norm_clip, dp_lib.real_rows(y))
            return params, state, opt_state, out.loss, out.logits, {"clipped": clipped}

    def step(params, state, opt_state, x, y, key):
        if augment is not None:
            x = augment_batch(key, x, augment)
        params, state, opt_state, loss, logits, extra = private_or_not(params, state, opt_state, x, y, key)
        accuracy = masked_mean(hits(logits, y), dp_lib.real_rows(y))
        metrics = {"loss": loss, "accuracy": accuracy, "params_finite": _finite(params), **extra}
        return params, state, opt_state, metrics

    if mesh is None:
        return jax.jit(step)
    replicated, batch = shardings(mesh)
    return jax.jit(step, in_shardings=(replicated,) * 3 + (batch,) * 2 + (replicated,), out_shardings=replicated)


@functools.lru_cache(maxsize=8)
def compiled_train_step(model, optimizer, grad, dtype, mesh, x_shape, augment=None, dp=None):
    """`make_train_step` compiled ahead for float32 inputs of `x_shape`, cached per
    settings (a notebook that trains twice compiles once)."""
    replicated, batch = shardings(mesh)
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.float32))
    opt_state = jax.eval_shape(optimizer.init, params)
    place = lambda t, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
    args = [place(params, replicated), place(state, replicated), place(opt_state, replicated)]
    args.append(jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=batch))
    args.append(jax.ShapeDtypeStruct(x_shape[:1], jnp.int32, sharding=batch))
    args.append(place(jax.eval_shape(lambda: jax.random.key(0)), replicated))
    step = make_train_step(model, optimizer, grad, dtype=dtype, mesh=mesh, augment=augment, dp=dp)
    return step.lower(*args).compile()


# ------------------------------------------------------------------ evaluation
@functools.lru_cache(maxsize=8)
def _eval_step(model: models.Model, dtype: str, mesh):
    compute = jnp.dtype(dtype)

    def step(params, state, x, y, weight):
        logits, _ = model.apply(cast(params, compute), cast(state, compute), x.astype(compute), train=False)
        logits = logits.astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        predicted = jnp.argmax(logits, axis=-1)
        correct = hits(logits, y)
        k = logits.shape[-1]
        # Counts are whole numbers far below 2**24, so float32 holds them exactly.
        confusion = jnp.zeros((k, k), jnp.float32).at[y, predicted].add(weight)
        return jnp.sum(weight * nll), jnp.sum(weight * correct), confusion

    if mesh is None:
        return jax.jit(step)
    replicated, batch = shardings(mesh)
    return jax.jit(step, in_shardings=(replicated,) * 2 + (batch,) * 3, out_shardings=replicated)


def evaluate(
    model: models.Model,
    params,
    state,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = EVAL_BATCH,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every example of (x, y), in
    inference mode (BatchNorm with its running statistics).

    The last batch is zero-padded to full size and the padding masked out, so
    one compiled program serves every batch; with a mesh, the batch size is
    rounded up to a multiple of the device count.

    Returns:
      {"loss": float, "accuracy": float, "confusion": int64 numpy array
      [classes, classes]}; confusion[i, j] counts the examples of class i
      predicted as j.
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate: no examples")
    ndev = 1 if mesh is None else mesh.size
    size = -(-min(batch_size, n) // ndev) * ndev
    fn = _eval_step(model, dtype, mesh)
    total_loss = total_correct = 0.0
    confusion: Any = 0
    for xb, yb in data.batches(x, y, size, key_or_seed=None, shuffle=False, drop_last=False):
        m = len(xb)
        weight = np.zeros(size, np.float32)
        weight[:m] = 1.0
        if m < size:
            xb = np.concatenate([xb, np.zeros((size - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(size - m, yb.dtype)])
        batch = (xb, yb, weight) if mesh is None else tuple(put_batch(a, shardings(mesh)[1]) for a in (xb, yb, weight))
        loss_sum, correct, counts = fn(params, state, *batch)
        total_loss += host(loss_sum)
        total_correct += host(correct)
        confusion = confusion + np.asarray(counts.addressable_data(0)).astype(np.int64)
    return {"loss": total_loss / n, "accuracy": total_correct / n, "confusion": confusion}


def put_batch(a: np.ndarray, sharding):
    """A host batch, the same in every process, as a global array split by `sharding`: each
    process puts only its own rows (`process_rows`) on its devices."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_process_local_data(sharding, a[process_rows(sharding, a.shape)], a.shape)


def process_rows(sharding, shape: tuple[int, ...]) -> slice:
    """The rows of a global array of `shape` split by `sharding` that this process's devices hold:
    one block, since `make_mesh` lists each process's devices together."""
    n = shape[0]
    blocks = sorted(
        {
            (i[0].start or 0, n if i[0].stop is None else i[0].stop)
            for i in sharding.addressable_devices_indices_map(shape).values()
        }
    )
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"put_batch: this process's rows {blocks} are not one block; build the mesh with make_mesh")
    return slice(blocks[0][0], blocks[-1][1])


def host(x) -> float:
    """A replicated scalar as a Python float (reads the local copy, so it also works across processes)."""
    return float(np.asarray(x.addressable_data(0)))


def init_train_state(model: models.Model, optimizer: optax.GradientTransformation, seed: int = 0, mesh=None) -> dict:
    """{"params", "state", "opt_state"} from `model.init(jax.random.key(seed))`,
    float32, replicated over `mesh` when given (one program, compiled cheaply: `_compile.run_once`)."""

    def init(key):
        params, state = model.init(key, jnp.float32)
        return {"params": params, "state": state, "opt_state": optimizer.init(params)}

    jitted = jax.jit(init) if mesh is None else jax.jit(init, out_shardings=shardings(mesh)[0])
    return run_once(jitted, jax.random.key(seed))


# -------------------------------------------------------------- grad check
@dataclasses.dataclass(frozen=True)
class GradCheck:
    """Result of `check_gradients`: the largest error, where, and in which dtype it was decided."""

    max_rel_err: float
    where: str  # path of the parameter array with the largest error
    dtype: str  # "float32", or "float64" when float32 disagreed and float64 was asked
    float32_rel_err: float

    def ok(self, tol: float) -> bool:
        return self.max_rel_err <= tol


def _grad_error(model: models.Model, params, state, x, y, dtype: str) -> tuple[float, str]:
    """(largest per-array error, its path) of rules vs autodiff gradients computed in `dtype`."""
    rules, autodiff = loss_fn(model, "rules", dtype), loss_fn(model, "autodiff", dtype)

    def both(params, state, x, y):
        params, state, x = cast(params, dtype), cast(state, dtype), x.astype(dtype)
        g_rules = jax.grad(lambda p: rules(p, state, x, y)[0])(params)
        g_autodiff = jax.grad(lambda p: autodiff(p, state, x, y)[0])(params)
        return g_rules, g_autodiff

    return max_leaf_error(*run_once(jax.jit(both), params, state, x, y))


def check_gradients(model: models.Model, params, state, x, y, *, tol: float = 1e-4) -> GradCheck:
    """Compare the hand-derived full-model gradient with `jax.grad` on one batch.

    Both are gradients of the training loss (BatchNorm with batch statistics)
    on (x, y), computed in float32. Each parameter array's error is relative
    to that array's own scale, max|g_rules − g_jax| / max|g_jax|
    (`gradcheck.max_leaf_error`: a small array cannot hide behind a large one,
    and NaN counts as the worst); the check reports the largest.

    Above `tol` in float32 the batch is checked again in float64 (except on
    TPUs), which then decides. Why: the rules' forward pass and the
    reference's round differently, so a ReLU input within float32 rounding
    of 0 can fall on different sides of the kink in the two passes, and that
    one unit moves whole gradient arrays (seen here on about 1 batch in 60
    for ResNet-8 on digits, at errors near 1e-2). In float64 such a flip is
    practically impossible, while a wrong rule stays wrong.
    """
    err32, where = _grad_error(model, params, state, x, y, "float32")
    if err32 <= tol or jax.default_backend() == "tpu":
        return GradCheck(err32, where, "float32", err32)
    with enable_x64():
        err64, where = _grad_error(model, params, state, x, y, "float64")
    return GradCheck(err64, where, "float64", err32)
