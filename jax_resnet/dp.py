"""DP-SGD in one home: its settings, the sampler, the clipped sum, secret noise, and the
accounting that matches the sampler.

DP-SGD (Abadi et al. 2016) with the hand-derived rules. One step:

  1. **Sample.** Each of the n training examples joins the step's batch
     independently with probability q = b / n (Poisson sampling, b the expected
     batch size); with `truncated_batch_size` M, a batch of more than M is cut
     to M uniformly chosen members. The batch is padded to a fixed shape with
     rows labelled `PAD_LABEL`, which contribute exactly zero (`poisson_batch`).
  2. **Clip and sum.** Σ_i min(1, C/‖g_i‖)·g_i over the real rows, from one
     forward and one backward pass of the rules (`clipped_grad_sum`).
  3. **Noise.** Add N(0, σ²C²·I), drawn from a key the attacker cannot know,
     and divide by the *expected* batch size b, never the drawn one, whose size
     depends on who is in the data (`noisy_mean`).
  4. **Update** with any optax optimizer (`update_fn`).

The guarantee is example-level (ε, δ)-DP under the **add-or-remove-one**
neighbouring relation: two data sets are neighbours when one is the other plus
one example. ε composes the step's event (`dp_event`: `PoissonSampledDpEvent`
of a `GaussianDpEvent`, or `TruncatedSubsampledGaussianDpEvent`) over the steps
with Google's `dp_accounting` (RDP or PLD), as jax_privacy's
`DpsgdTrainingAccountant` does for the same parameters (tests/test_dp.py).

What is protected: the model's parameters (and the checkpoints), which are all
that passes through the noised sum. What is released **without** noise by
`jax-resnet train`, and so carries no guarantee: the per-epoch training loss and
accuracy, the per-step fraction of clipped examples (averaged per epoch), and
the number of steps; the test-set metrics come from the test set, which is not
the protected data. Fixed-size batches of a shuffled epoch (`sampler="shuffle"`)
are not what the accountant analyses: such a run reports no ε at all.

Randomness: noise keys and sampling decisions derive from 32 bytes of the
operating system's entropy (`DPRandomness.new`), held in memory and written
nowhere; `DPRandomness.insecure(seed)` derives them from a public seed, for
tests and debugging, and a run that uses it records `"private": false`.

Derivation: derivations/per_example.md#dp-sgd

    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import dp, models
    >>> model = models.residual_mlp(in_features=4, width=8, depth=1, out_features=3)
    >>> params, state = model.init(jax.random.key(0))
    >>> x, y = jnp.ones((4, 4), jnp.float32), jnp.array([0, 1, 2, dp.PAD_LABEL])
    >>> out = dp.clipped_grad_sum(model, params, state, x, y, l2_norm_clip=1.0)
    >>> [round(float(n), 3) for n in out.norms * dp.real_rows(y)][-1]
    0.0
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_resnet import models, per_example

__all__ = [
    "SAMPLERS",
    "ACCOUNTANTS",
    "PAD_LABEL",
    "NEIGHBOURING",
    "RDP_ORDERS",
    "PLD_DISCRETIZATION",
    "NOISE_STREAM",
    "DPConfig",
    "check",
    "physical_batch_size",
    "DPRandomness",
    "poisson_indices",
    "pad_indices",
    "gather",
    "poisson_batch",
    "ClippedSum",
    "real_rows",
    "clip_factors",
    "clipped_grad_sum",
    "chunked",
    "noisy_mean",
    "update_fn",
    "sampling_rate",
    "dp_event",
    "accountant",
    "epsilon",
    "summary",
]


SAMPLERS = ("poisson", "shuffle")
ACCOUNTANTS = ("rdp", "pld")
PAD_LABEL = -1  # the label of a padding row: it contributes nothing
NEIGHBOURING = "add or remove one example"
# Integer Rényi orders: the accountant's fractional orders below 2 fail to converge (and
# log warnings) at small σ, and were never the minimising ones in the runs here.
RDP_ORDERS = (*range(2, 65), 128, 256, 512)
PLD_DISCRETIZATION = 1e-4  # dp_accounting's PLD grid (jax_privacy's default too)
NOISE_STREAM = 1  # noise key = fold_in(step key, NOISE_STREAM); augmentation uses the step key itself


# ------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD's settings, with optax's and jax_privacy's names.

    Args:
      l2_norm_clip: C, each example's gradient is clipped to this L2 norm.
      noise_multiplier: σ, the noise on the clipped sum has std σ·C.
      expected_batch_size: b; Poisson sampling takes each example with q = b / n,
        and the noised sum is divided by b. With `sampler="shuffle"`, the batch size.
      delta: δ of the reported ε.
      sampler: "poisson" (the default, what the accounting assumes) or "shuffle"
        (fixed-size batches of a shuffled epoch: no ε is computed for it).
      truncated_batch_size: M, a cap on the Poisson batch (None: no cap); the
        accounting then is dp_accounting's truncated event, which needs PLD.
      accountant: "rdp" or "pld"; None takes "pld" with a cap, "rdp" without.
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: int
    delta: float = 1e-5
    sampler: str = "poisson"
    truncated_batch_size: int | None = None
    accountant: str | None = None

    def __post_init__(self):
        check(self)

    @property
    def accountant_name(self) -> str:
        return self.accountant or ("pld" if self.truncated_batch_size is not None else "rdp")


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 1)


def check(config: DPConfig) -> None:
    """ValueError naming the argument (and its CLI flag) unless every setting is valid."""
    clip, noise, delta = config.l2_norm_clip, config.noise_multiplier, config.delta
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"DP-SGD: l2_norm_clip C (--dp-clip) must be a finite number > 0, got {clip!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"DP-SGD: noise_multiplier σ (--dp-noise) must be a finite number ≥ 0, got {noise!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"DP-SGD: delta δ (--dp-delta) must lie in (0, 1), got {delta!r}")
    if not _positive_int(config.expected_batch_size):
        raise ValueError(
            f"DP-SGD: expected_batch_size (--batch-size) must be a positive integer, got {config.expected_batch_size!r}"
        )
    if config.sampler not in SAMPLERS:
        raise ValueError(f"DP-SGD: sampler (--dp-sampler) must be one of {SAMPLERS}, got {config.sampler!r}")
    if config.accountant not in (None, *ACCOUNTANTS):
        raise ValueError(
            f"DP-SGD: accountant (--dp-accountant) must be one of {ACCOUNTANTS}, got {config.accountant!r}"
        )
    cap = config.truncated_batch_size
    if cap is not None:
        if config.sampler != "poisson":
            raise ValueError(
                "DP-SGD: truncated_batch_size (--dp-max-batch) caps a Poisson batch; the sampler is shuffle"
            )
        if not _positive_int(cap) or cap < config.expected_batch_size:
            raise ValueError(
                "DP-SGD: truncated_batch_size (--dp-max-batch) must be an integer ≥ the expected batch size "
                f"{config.expected_batch_size}, got {cap!r}"
            )
        if config.accountant == "rdp":
            raise ValueError(
                "DP-SGD: dp_accounting's RDP accountant has no truncated Poisson event; use accountant 'pld' "
                "(--dp-accountant pld) with truncated_batch_size (--dp-max-batch)"
            )


def physical_batch_size(config: DPConfig, devices: int = 1) -> int:
    """Rows of one compiled chunk: the cap M, or b + ⌈2√b⌉, rounded up to a multiple of `devices`.

    An uncapped Poisson batch larger than this runs as several chunks of this size
    (`update_fn` adds their clipped sums), so no batch is ever cut. The drawn size is
    Binomial(n, q), mean b and standard deviation √(b(1 − q)) ≤ √b; a margin of two
    of those keeps the rows per step near their least: a second chunk is needed in
    about 2.3% of the steps, and padding costs about 2√b rows per step (b = 256:
    288 rows, 1.13 b, against 1.25 b for a margin of 4√b).
    """
    if config.sampler == "shuffle":
        rows = config.expected_batch_size
    elif config.truncated_batch_size is not None:
        rows = config.truncated_batch_size
    else:
        b = config.expected_batch_size
        rows = b + math.ceil(2 * math.sqrt(b))
    return -(-rows // devices) * devices


# ---------------------------------------------------------------- randomness
class DPRandomness:
    """A run's DP randomness: noise keys and Poisson sampling decisions, all derived from
    one 32-byte root.

    `DPRandomness.new()` reads the root from the operating system (`os.urandom`) and
    keeps it in memory only: no file, log or checkpoint holds it, so nobody can
    regenerate the noise from what a run writes. `DPRandomness.insecure(seed)`
    derives the root from a public seed (reproducible, not private).

    Streams are SHAKE-256 of (root, purpose, step), an extendable-output hash, so
    every process of a multi-process run that holds the same root (process 0's,
    broadcast) draws the same batches and noise.
    """

    def __init__(self, root: bytes, private: bool):
        if len(root) != 32:
            raise ValueError(f"DPRandomness: the root must be 32 bytes, got {len(root)}")
        self._root = root
        self.private = private

    def __repr__(self) -> str:  # never print the root
        return f"DPRandomness(private={self.private})"

    @classmethod
    def new(cls) -> DPRandomness:
        """Secret randomness from the operating system's entropy (shared by process 0 across processes)."""
        root = _entropy()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            root = bytes(np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(root, np.uint8))))
        return cls(root, private=True)

    @classmethod
    def insecure(cls, seed: int) -> DPRandomness:
        """Randomness derived from a public `seed`: for tests and debugging only; no privacy."""
        return cls(hashlib.sha256(b"jax-resnet insecure DP seed %d" % seed).digest(), private=False)

    def _stream(self, purpose: bytes, step: int, nbytes: int) -> bytes:
        return hashlib.shake_256(self._root + purpose + step.to_bytes(8, "little")).digest(nbytes)

    def uniforms(self, step: int, n: int) -> np.ndarray:
        """n independent uniforms in [0, 1) for step `step` (53 random bits each)."""
        words = np.frombuffer(self._stream(b"sample", step, 8 * n), np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def root_key(self) -> jax.Array:
        """The JAX key every step key is folded from (`step.step_key`)."""
        data = np.frombuffer(self._stream(b"noise", 0, 8), np.uint32)
        return jax.random.wrap_key_data(data.copy(), impl="threefry2x32")


def _entropy() -> bytes:
    return os.urandom(32)


# ------------------------------------------------------------------ sampling
def poisson_indices(uniforms: np.ndarray, sampling_rate: float, truncated_batch_size: int | None = None) -> np.ndarray:
    """The examples i with u_i < q, in increasing order; with a cap M, the M of them with the
    smallest u_i when more were drawn (given that i was drawn, u_i is uniform on [0, q) and
    independent of the others, so these M are a uniformly random subset of the drawn ones)."""
    drawn = np.flatnonzero(uniforms < sampling_rate)
    if truncated_batch_size is not None and len(drawn) > truncated_batch_size:
        drawn = np.sort(drawn[np.argsort(uniforms[drawn], kind="stable")[:truncated_batch_size]])
    return drawn


def pad_indices(indices: np.ndarray, rows: int) -> np.ndarray:
    """`indices` followed by −1s up to the next multiple of `rows` (at least one chunk)."""
    chunks = max(1, -(-len(indices) // rows))
    out = np.full(chunks * rows, -1, np.int64)
    out[: len(indices)] = indices
    return out


def gather(x: np.ndarray, y: np.ndarray, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The batch of `padded` indices: padding rows (−1) get zeros and the label `PAD_LABEL`."""
    real = padded >= 0
    safe = np.where(real, padded, 0)
    xb, yb = x[safe], y[safe]  # new arrays (fancy indexing copies)
    xb[~real] = 0
    yb[~real] = PAD_LABEL
    return xb, yb


def poisson_batch(
    x: np.ndarray, y: np.ndarray, config: DPConfig, randomness: DPRandomness, step: int, devices: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Step `step`'s Poisson batch of (x, y), padded to whole chunks of `physical_batch_size` rows."""
    q = config.expected_batch_size / len(x)
    indices = poisson_indices(randomness.uniforms(step, len(x)), q, config.truncated_batch_size)
    return gather(x, y, pad_indices(indices, physical_batch_size(config, devices)))


# ---------------------------------------------------------------- clipped sum
class ClippedSum(NamedTuple):
    """loss: the mean loss of the real rows; logits; clipped_sum: Σ_i min(1, C/‖g_i‖)·g_i over
    the real rows, per leaf; norms: ‖g_i‖ [B] (padding rows' too: mask them with `real_rows`)."""

    loss: jax.Array
    logits: jax.Array
    clipped_sum: Any
    norms: jax.Array


def real_rows(y) -> jax.Array:
    """1.0 for an example, 0.0 for a padding row (label `PAD_LABEL`), in float32."""
    return (y != PAD_LABEL).astype(jnp.float32)


def clip_factors(norms, l2_norm_clip):
    """min(1, C/‖g_i‖), 1 where ‖g_i‖ = 0 (as optax's per-example clipping)."""
    return jnp.where(norms > l2_norm_clip, l2_norm_clip / jnp.where(norms > 0, norms, 1), 1.0).astype(norms.dtype)


def clipped_grad_sum(
    model: models.Model, params, state, x, y, l2_norm_clip: float, *, norm_path: str = "auto"
) -> ClippedSum:
    """Σ_i min(1, C/‖g_i‖)·g_i over the rows whose label is not `PAD_LABEL`, from one forward and
    one backward pass (book-keeping), and for Gram-form convolutions a second backward that
    reaches no further down than they do.

    The forward runs once (`jax.vjp` with taps). The backward, with the loss's
    cotangent at the logits, gives each example's squared norm layer by layer
    (`per_example.batch_l2`) and keeps what each parameter's clipped sum needs once
    the factors c_i = m_i·min(1, C/‖g_i‖) are known, m_i = 0 for a padding row and 1
    otherwise (book-keeping, Bu et al. 2023): where it instantiates the
    contributions G_i for the norm, G_i (the sum is Σ_i c_i·G_i); for a Gram-form
    dense or projection kernel, its inputs a and output cotangents δ (the sum is
    aᵀ(c ⊙ δ)). A Gram-form convolution (`per_example.gram_kernels`) keeps neither;
    its sum comes from the backward again, the cotangent's row i scaled by c_i, of
    which XLA keeps only the part above the lowest such convolution. `norm_path`
    "gram" and "grads" force the form of every kernel's norm, and so of its sum.

    A padding row's inputs are replaced by zeros before the forward pass, so what
    the row held changes nothing (bit for bit), and its factor is 0.

    Derivation: derivations/per_example.md#dp-sgd
    """
    batch = per_example.check_batch(x, y)
    mask = real_rows(y)
    x = jnp.where(mask.reshape(-1, *[1] * (x.ndim - 1)) > 0, x, jnp.zeros((), x.dtype))
    labels = jnp.where(y == PAD_LABEL, 0, y)
    gram = per_example.gram_kernels(model, x.shape[1:], norm_path)
    io = {path: c.positions for path, c in gram.items() if c.op != "conv2d"}

    def kinds(path):
        return ("l2", "io") if path in io else ("l2",) if path in gram else ("grad", "l2")

    logits, vjp = per_example.logits_vjp(model, params, state, x, kinds, norm_path, io)
    _, ct_logits = per_example.loss_cotangent(logits, labels)
    taps = per_example.split(vjp(ct_logits)[0])[1]
    l2 = jax.tree.map(lambda q: q.l2, taps, is_leaf=per_example.is_quantities)
    norms = jnp.sqrt(batch * batch * per_example.total(l2))
    factors = clip_factors(norms, l2_norm_clip) * mask.astype(norms.dtype)

    def book_kept(q):
        if q.io is not None:
            return batch * jnp.einsum("btd,b,btp->dp", q.io[0], factors, q.io[1])
        return None if q.grad is None else batch * jnp.tensordot(factors, q.grad, 1)

    kept = jax.tree.map(book_kept, taps, is_leaf=per_example.is_quantities)
    again = per_example.split(vjp(ct_logits * factors[:, None])[0])[0] if len(gram) > len(io) else None

    def clipped(key_path, _):
        path = models.path_of(key_path)
        return batch * models.subtree(again, path) if path in gram and path not in io else models.subtree(kept, path)

    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    loss = jnp.sum(mask * losses) / jnp.maximum(jnp.sum(mask), 1.0)
    return ClippedSum(loss, logits, jax.tree_util.tree_map_with_path(clipped, params), norms)


def chunked(clipped_sum: Callable, rows: int) -> Callable:
    """`clipped_sum(params, state, x, y)` over a batch of k·`rows` rows as k chunks of `rows`
    (a `lax.scan`), the clipped sums added: the sum over examples does not depend on how
    they are grouped, and each chunk's program is the one-chunk program. A batch of at
    most `rows` rows is one chunk."""

    def run(params, state, x, y):
        if x.shape[0] <= rows:
            return clipped_sum(params, state, x, y)
        k = x.shape[0] // rows
        if k * rows != x.shape[0]:
            raise ValueError(
                f"DP-SGD: a batch of more than {rows} rows runs in chunks of {rows} (`physical_batch_size`); "
                f"got {x.shape[0]} rows, not a multiple (pad it with `dp.pad_indices`)"
            )

        def body(total, chunk):
            out = clipped_sum(params, state, *chunk)
            total = jax.tree.map(jnp.add, total, out.clipped_sum)
            mask = real_rows(chunk[1])
            return total, (out.loss * jnp.sum(mask), jnp.sum(mask), out.logits, out.norms)

        zeros = jax.tree.map(jnp.zeros_like, params)
        split = lambda a: a.reshape(k, rows, *a.shape[1:])
        total, (loss_sums, counts, logits, norms) = jax.lax.scan(body, zeros, (split(x), split(y)))
        merge = lambda a: a.reshape(k * rows, *a.shape[2:])
        loss = jnp.sum(loss_sums) / jnp.maximum(jnp.sum(counts), 1.0)
        return ClippedSum(loss, merge(logits), total, merge(norms))

    return run


def noisy_mean(clipped_sum, key, l2_norm_clip: float, noise_multiplier: float, expected_batch_size: int):
    """(Σ_i clipped g_i + N(0, σ²C²·I)) / b per leaf, b the expected batch size.

    The leaves, flattened in `jax.tree` order, draw their noise from keys
    `jax.random.split(key, n + 1)[1:]`, as `optax.contrib.differentially_private_aggregate`
    does, so the two agree for one key and a full batch (tests/test_dp.py).
    """
    leaves, treedef = jax.tree.flatten(clipped_sum)
    _, *keys = jax.random.split(key, len(leaves) + 1)
    scale = noise_multiplier * l2_norm_clip
    noised = [(g + scale * jax.random.normal(k, g.shape, g.dtype)) / expected_batch_size for g, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noised)


def update_fn(
    model: models.Model,
    optimizer: optax.GradientTransformation,
    config: DPConfig,
    mesh: jax.sharding.Mesh | None = None,
    *,
    chunk: int | None = None,
) -> Callable:
    """The pure DP-SGD update, not compiled:
    update(params, state, opt_state, x, y, key) -> (params, opt_state, ClippedSum).

    Clipped sum over the real rows (`clipped_grad_sum`, in chunks of `chunk` rows,
    default `physical_batch_size`), noise from `fold_in(key, NOISE_STREAM)` and the
    mean over the expected batch size (`noisy_mean`), then `optimizer`. With a
    `mesh` of several devices each device forms the clipped sum of its own rows
    (`per_example.per_device`, `jax.shard_map` over axis "data") and the sums are
    added: per-example work never crosses devices, and XLA's SPMD partitioner never
    sees the per-example convolution (whose batch-grouped form it partitions
    wrongly, `ops.conv.conv2d_contributions`).
    """
    devices = 1 if mesh is None else mesh.size
    rows = (chunk or physical_batch_size(config, devices)) // devices
    clipped_sum = chunked(functools.partial(clipped_grad_sum, model, l2_norm_clip=config.l2_norm_clip), rows)
    if mesh is not None and devices > 1:
        clipped_sum = _per_device(clipped_sum, mesh)

    def update(params, state, opt_state, x, y, key):
        out = clipped_sum(params, state, x, y)
        noise_key = jax.random.fold_in(key, NOISE_STREAM)
        grads = noisy_mean(
            out.clipped_sum, noise_key, config.l2_norm_clip, config.noise_multiplier, config.expected_batch_size
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    return update


def _per_device(clipped_sum: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`clipped_sum` on each device's rows: clipped sums added, losses averaged over the
    devices' real rows, logits and norms left split along the batch."""
    P = jax.sharding.PartitionSpec

    def local(params, state, x, y):
        out = clipped_sum(params, state, x, y)
        count = jnp.sum(real_rows(y))
        total = jax.lax.psum(count, "data")
        loss = jax.lax.psum(out.loss * count, "data") / jnp.maximum(total, 1.0)
        return out._replace(loss=loss, clipped_sum=jax.tree.map(lambda g: jax.lax.psum(g, "data"), out.clipped_sum))

    out_specs = ClippedSum._make((P(), P("data"), P(), P("data")))  # loss, logits, clipped_sum, norms
    return per_example.per_device(local, mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=out_specs)


# ----------------------------------------------------------------- accounting
def sampling_rate(config: DPConfig, num_examples: int) -> float:
    """q = b / n."""
    return config.expected_batch_size / num_examples


def dp_event(config: DPConfig, num_examples: int):
    """One step's `dp_accounting` event, or None for the shuffle sampler (no accounting covers it here)."""
    from dp_accounting import dp_event as events

    if config.sampler == "shuffle":
        return None
    q = sampling_rate(config, num_examples)
    if config.truncated_batch_size is not None:
        return events.TruncatedSubsampledGaussianDpEvent(
            dataset_size=num_examples,
            sampling_probability=q,
            truncated_batch_size=config.truncated_batch_size,
            noise_multiplier=config.noise_multiplier,
        )
    return events.PoissonSampledDpEvent(q, events.GaussianDpEvent(config.noise_multiplier))


def accountant(name: str):
    """A new `dp_accounting` accountant: "rdp" (orders `RDP_ORDERS`) or "pld" (grid
    `PLD_DISCRETIZATION`), both for the add-or-remove-one relation."""
    from dp_accounting import NeighboringRelation, pld, rdp

    relation = NeighboringRelation.ADD_OR_REMOVE_ONE
    if name == "rdp":
        return rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)
    if name == "pld":
        return pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"DP-SGD: accountant must be one of {ACCOUNTANTS}, got {name!r}")


def epsilon(config: DPConfig, num_examples: int, steps: int) -> float | None:
    """ε after `steps` steps at δ = `config.delta`; inf when σ = 0, 0.0 before any step,
    None for the shuffle sampler (no guarantee is computed for it).

    Example (MNIST's 60,000 examples, b = 256, σ = 1.1, 60 epochs):
      >>> config = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.1, expected_batch_size=256)
      >>> round(epsilon(config, 60_000, 60 * 234), 2)
      2.59
    """
    event = dp_event(config, num_examples)
    if event is None:
        return None
    if steps == 0:
        return 0.0
    if config.noise_multiplier == 0:
        return float("inf")
    acc = accountant(config.accountant_name)
    acc.compose(event, steps)
    return float(acc.get_epsilon(config.delta))


def summary(config: DPConfig, num_examples: int, steps: int, randomness: DPRandomness | None = None) -> dict:
    """What metrics.json records of a DP run: the settings, the sampler, the DP event, the
    accountant, the neighbouring relation, δ and ε after `steps` steps, and whether the run
    is private (a finite ε for the sampler that ran, and secret randomness)."""
    event = dp_event(config, num_examples)
    eps = epsilon(config, num_examples, steps)
    private = eps is not None and math.isfinite(eps) and (randomness is None or randomness.private)
    return {
        "clip": config.l2_norm_clip,
        "noise": config.noise_multiplier,
        "delta": config.delta,
        "sampler": config.sampler,
        "expected_batch_size": config.expected_batch_size,
        "truncated_batch_size": config.truncated_batch_size,
        "sampling_rate": sampling_rate(config, num_examples),
        "steps": steps,
        "dp_event": None if event is None else repr(event),
        "accountant": None if event is None else config.accountant_name,
        "neighbouring_relation": NEIGHBOURING,
        "epsilon": eps,
        "private": private,
        "randomness": (
            "operating-system entropy, never written"
            if randomness is None or randomness.private
            else "derived from the public --seed (--dp-insecure-seed): NOT private"
        ),
    }
