"""Gradient flow in plain ("BP") networks versus residual networks, measured.

The seed article claims that shortcut connections ease the training of deep
networks by countering vanishing and exploding gradients. This module measures
it instead of repeating it (derivations/bp_vs_resnet.md has the figures):

- `gradient_norms`: ‖∂L/∂W‖ for every conv/dense weight of a model, in depth
  order, at initialisation, from one batch in train mode.
- `layer_gradients`: the same, plus ‖∂L/∂h‖ for the activation h entering
  each block (each hidden layer of an MLP), taken as the gradient with
  respect to a zero perturbation (a *probe*) added there through the model's
  forward hook (`Model.apply(..., hook=)`): the network runs its own forward
  pass.
- `sweep`: plain vs residual CIFAR nets (BatchNorm, He et al. 2015 §4.2) at
  several depths on a batch of random images, and plain vs residual MLPs (no
  normalisation) at several depths on the digits data.
- `train_compare`: loss per step of plain vs residual MLPs of one depth,
  same initial weights, same batches.
- `study`: all of it; `write` puts it in `flow.json` and `flow.png`.

Command (reproduces derivations/bp_vs_resnet.md):

    jax-resnet flow                  # or python -m jax_resnet flow
    jax-resnet flow --quick --out /tmp/flow   # depth 8 only, under a minute

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import flow, models
    >>> model = models.plain_mlp(depth=3)
    >>> params, state = model.init(jax.random.key(0), jnp.float32)
    >>> x, y = jnp.ones((4, 64), jnp.float32), jnp.arange(4, dtype=jnp.int32)
    >>> [name for name, _ in flow.gradient_norms(model, params, state, x, y)]
    ['in', 'hidden0', 'hidden1', 'hidden2', 'out']
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import data, environment, models, step
from jax_resnet.ops import opset

__all__ = [
    "CIFAR_DEPTHS",
    "CIFAR_BATCH",
    "MLP_DEPTHS",
    "MLP_WIDTH",
    "MLP_BATCH",
    "TRAIN_DEPTH",
    "TRAIN_STEPS",
    "TRAIN_BATCH",
    "LEARNING_RATES",
    "default_learning_rate",
    "QUICK",
    "LayerGradients",
    "probed_loss",
    "block_inputs",
    "layer_gradients",
    "gradient_norms",
    "scale_residual_branches",
    "MLPVariant",
    "MLP_VARIANTS",
    "TRAIN_VARIANTS",
    "random_images",
    "digits_batch",
    "sweep",
    "train_compare",
    "final_loss",
    "FLOOR",
    "plot",
    "format_table",
    "study",
    "to_json",
    "write",
]


CIFAR_DEPTHS = (8, 20, 56, 110)
CIFAR_BATCH = 16
MLP_DEPTHS = (2, 8, 32, 64)
MLP_WIDTH = 64
MLP_BATCH = 64
TRAIN_DEPTH = 32
TRAIN_STEPS = 400
TRAIN_BATCH = 64
# One learning rate per optimizer of `step.make_optimizer` the study offers, not tuned per model.
LEARNING_RATES = {"momentum": 0.01, "adam": 1e-3}
QUICK = {"cifar_depths": (8,), "cifar_batch": 4, "mlp_depths": (2, 8), "train_depth": 8, "steps": 20}


# ----------------------------------------------------------- measurements
class LayerGradients(NamedTuple):
    """What one backward pass at initialisation says about gradient flow."""

    loss: float
    weights: list[tuple[str, float]]  # (layer, ‖∂L/∂W‖₂), input side first
    inputs: list[tuple[str, float]]  # (block, ‖∂L/∂h‖₂) for the activation h entering it


def probed_loss(model: models.Model, grad: str = "rules") -> Callable:
    """loss(params, probes, state, x, y): the training loss with `probes[i]` added
    to the activation entering block i (through the model's forward hook).

    The gradient with respect to a zero probe is ∂L/∂h for that block input h,
    before both the branch and the shortcut.
    """
    loss_op = opset(grad).softmax_cross_entropy

    def loss(params, probes, state, x, y):
        logits, _ = model.apply(params, state, x, train=True, grad=grad, hook=lambda i, h: h + probes[i])
        return loss_op(logits, y)

    return loss


@functools.lru_cache(maxsize=16)
def _compiled_gradients(model: models.Model, grad: str):
    # Cached per (model, grad): Model is a frozen dataclass, so twins built
    # again (another seed, a rescaled init) reuse one compilation.
    return jax.jit(jax.value_and_grad(probed_loss(model, grad), argnums=(0, 1)))


def block_inputs(model: models.Model, params, state, x) -> list[jax.ShapeDtypeStruct]:
    """Shapes of the activations the forward hook sees, in order (nothing is computed)."""
    seen = []

    def record(i, h):
        seen.append(jax.ShapeDtypeStruct(h.shape, h.dtype))
        return h

    jax.eval_shape(lambda p: model.apply(p, state, x, train=True, hook=record), params)
    return seen


def layer_gradients(model: models.Model, params, state, x, y, *, grad: str = "rules") -> LayerGradients:
    """Loss, weight-gradient norms and block-input gradient norms, from one batch.

    One compiled backward pass (train mode, so BatchNorm uses the batch's
    statistics) of the mean softmax cross-entropy with integer labels `y`.
    """
    probes = [jnp.zeros(h.shape, h.dtype) for h in block_inputs(model, params, state, x)]
    loss, (ct_params, ct_probes) = _compiled_gradients(model, grad)(params, probes, state, x, y)
    spec = model.spec
    weights = [(name, float(jnp.linalg.norm(models.subtree(ct_params, path)))) for name, path in spec.weight_paths()]
    inputs = [(n, float(jnp.linalg.norm(ct))) for n, ct in zip(spec.hook_points(), ct_probes)]
    return LayerGradients(float(loss), weights, inputs)


def gradient_norms(model: models.Model, params, state, x, y, *, grad: str = "rules") -> list[tuple[str, float]]:
    """‖∂L/∂W‖₂ for each conv/dense weight W, input side first (`weight_paths` order).

    L is the mean softmax cross-entropy of `model.apply(params, state, x,
    train=True, grad=grad)` against integer labels `y`, for one batch.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_resnet import models
      >>> m = models.residual_mlp(depth=2)
      >>> p, s = m.init(jax.random.key(0), jnp.float32)
      >>> norms = gradient_norms(m, p, s, jnp.ones((2, 64), jnp.float32), jnp.array([0, 1], jnp.int32))
      >>> [n for n, _ in norms]
      ['in', 'hidden0', 'hidden1', 'out']
    """
    return layer_gradients(model, params, state, x, y, grad=grad).weights


def scale_residual_branches(params, factor: float):
    """Multiply each hidden layer's W (an MLP's residual branch) by `factor`.

    With factor 1/√depth the residual MLP starts close to the identity, as
    Fixup (Zhang et al. 2019) and SkipInit (De & Smith 2020) arrange; the
    library's default init (He, gain 2) is kept everywhere else.
    """
    hidden = [{**layer, "w": layer["w"] * factor} for layer in params["hidden"]]
    return {**params, "hidden": hidden}


@dataclasses.dataclass(frozen=True)
class MLPVariant:
    """One MLP of the study: preset, activation, and how the branch is initialised."""

    preset: str  # "plain_mlp" or "residual_mlp"
    activation: str = "relu"
    scaled: bool = False  # residual branch weights × 1/√depth

    def name(self, depth: int) -> str:
        suffix = ("_scaled" if self.scaled else "") + ("" if self.activation == "relu" else f"_{self.activation}")
        return f"{self.preset}{depth}{suffix}"

    def build(self, depth: int, width: int, key, dtype):
        model = models.get(self.preset, depth=depth, width=width, activation=self.activation)
        params, state = model.init(key, dtype)
        if self.scaled:
            params = scale_residual_branches(params, 1.0 / math.sqrt(max(depth, 1)))
        return model, params, state


MLP_VARIANTS = (
    MLPVariant("plain_mlp"),
    MLPVariant("residual_mlp"),
    MLPVariant("residual_mlp", scaled=True),
    MLPVariant("plain_mlp", "sigmoid"),
    MLPVariant("residual_mlp", "sigmoid"),
)
TRAIN_VARIANTS = MLP_VARIANTS[:3]


def _summary(g: LayerGradients) -> dict:
    w, h = [n for _, n in g.weights], [n for _, n in g.inputs]
    return {
        "layers": len(w),
        "loss": g.loss,
        "first": w[0],
        "last": w[-2],
        "head": w[-1],
        "first_over_last": _ratio(w[0], w[-2]),
        "input_first_over_last": _ratio(h[0], h[-1]),
    }


def _ratio(a, b):
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


def random_images(batch_size: int = 16, seed: int = 0, shape=(32, 32, 3), num_classes: int = 10, dtype=jnp.float32):
    """A synthetic CIFAR-shaped batch: N(0, 1) pixels and uniform random labels."""
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch_size, *shape), dtype)
    return x, jax.random.randint(ky, (batch_size,), 0, num_classes, jnp.int32)


def digits_batch(batch_size: int = 64, seed: int = 0):
    """The first `batch_size` training images of digits (split fixed by `seed`)."""
    ds = data.load("digits", seed=seed)
    return jnp.asarray(ds.x_train[:batch_size]), jnp.asarray(ds.y_train[:batch_size])


def sweep(
    cifar_depths: Sequence[int] = CIFAR_DEPTHS,
    mlp_depths: Sequence[int] = MLP_DEPTHS,
    *,
    cifar_batch: int = CIFAR_BATCH,
    mlp_batch: int = MLP_BATCH,
    mlp_width: int = MLP_WIDTH,
    mlp_variants: Sequence[MLPVariant] = MLP_VARIANTS,
    seed: int = 0,
    grad: str = "rules",
    dtype=jnp.float32,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Per-layer gradient norms at initialisation for plain and residual nets.

    CIFAR nets (`plain{d}` / `resnet{d}`, BatchNorm, option-A shortcuts) see
    `cifar_batch` random N(0, 1) 32×32×3 images with random labels
    (`random_images`); MLPs (width `mlp_width`, no normalisation) see the
    first `mlp_batch` digits training images. Every model of one depth starts
    from the same PRNG key, so plain and residual twins have equal weights.

    Returns:
      A dict of four tables, by model name:

        {"gradient_norms": {model: [{"layer", "norm"}]},
         "input_gradient_norms": {model: [{"block", "norm"}]},
         "summary": {model: {"family" ("cifar" or "mlp"), "depth", "layers",
                             "loss", "first", "last", "head",
                             "first_over_last", "input_first_over_last"}},
         "wall_s": {model: seconds, compile included}}
    """
    out: dict[str, dict] = {"gradient_norms": {}, "input_gradient_norms": {}, "summary": {}, "wall_s": {}}

    def record(name, family, depth, g, seconds):
        out["gradient_norms"][name] = [{"layer": n, "norm": v} for n, v in g.weights]
        out["input_gradient_norms"][name] = [{"block": n, "norm": v} for n, v in g.inputs]
        out["summary"][name] = {"family": family, "depth": depth, **_summary(g)}
        out["wall_s"][name] = seconds
        s = out["summary"][name]
        log(f"  {name:<26} first/last {s['first_over_last']:.3g}  ({seconds:.1f} s)")

    x, y = random_images(cifar_batch, seed, dtype=dtype)
    for depth in cifar_depths:
        for residual in (False, True):
            t = time.perf_counter()
            model = models.cifar_resnet(depth, residual=residual)
            params, state = model.init(jax.random.key(seed), dtype)
            record(
                model.name,
                "cifar",
                depth,
                layer_gradients(model, params, state, x, y, grad=grad),
                time.perf_counter() - t,
            )

    xd, yd = digits_batch(mlp_batch, seed)
    xd = xd.astype(dtype)
    for depth in mlp_depths:
        for variant in mlp_variants:
            t = time.perf_counter()
            model, params, state = variant.build(depth, mlp_width, jax.random.key(seed), dtype)
            record(
                variant.name(depth),
                "mlp",
                depth,
                layer_gradients(model, params, state, xd, yd, grad=grad),
                time.perf_counter() - t,
            )
    return out


# ----------------------------------------------------------------- training
def _batch_stream(ds, batch_size, seed):
    for epoch in itertools.count():
        yield from data.batches(ds.x_train, ds.y_train, batch_size, key_or_seed=(seed, epoch))


def default_learning_rate(optimizer: str, owner: str = "flow") -> float:
    """`LEARNING_RATES[optimizer]`; a ValueError naming `owner` for an optimizer the study does not offer."""
    if optimizer not in LEARNING_RATES:
        raise ValueError(f"{owner}: argument `optimizer` must be one of {sorted(LEARNING_RATES)}, got {optimizer!r}")
    return LEARNING_RATES[optimizer]


def train_compare(
    depth: int = TRAIN_DEPTH,
    *,
    width: int = MLP_WIDTH,
    steps: int = TRAIN_STEPS,
    batch_size: int = TRAIN_BATCH,
    optimizer: str = "momentum",
    learning_rate: float | None = None,
    variants: Sequence[MLPVariant] = TRAIN_VARIANTS,
    seed: int = 0,
    grad: str = "rules",
    dtype=jnp.float32,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, list[float | None]]:
    """Minibatch loss per step for each MLP variant, trained from the same start.

    Digits training set, mean softmax cross-entropy, `optimizer` "momentum"
    (heavy ball, momentum 0.9, default learning rate 0.01) or "adam" (default
    1e-3), as `step.make_optimizer` builds them. Every variant
    starts from weights drawn with the same key and sees the same batches in
    the same order (`data.batches` with key (seed, epoch)). A step whose loss
    is not finite is recorded as None (JSON null) and training of that variant
    stops there.
    """
    default_lr = default_learning_rate(optimizer, "train_compare")
    lr = default_lr if learning_rate is None else learning_rate
    ds = data.load("digits", seed=seed)
    curves: dict[str, list[float | None]] = {}
    for variant in variants:
        t = time.perf_counter()
        model, params, state = variant.build(depth, width, jax.random.key(seed), dtype)
        opt = step.make_optimizer(optimizer, lr)
        train_step, opt_state = step.make_train_step(model, opt, grad, dtype=jnp.dtype(dtype).name), opt.init(params)
        losses: list[float | None] = []
        key = step.step_key(seed, 0)  # the step takes a key; without augmentation it reads none
        for xb, yb in itertools.islice(_batch_stream(ds, batch_size, seed), steps):
            batch = (jnp.asarray(xb, dtype), jnp.asarray(yb), key)
            params, state, opt_state, m = train_step(params, state, opt_state, *batch)
            loss = m["loss"]
            if not math.isfinite(float(loss)):
                losses.append(None)
                break
            losses.append(float(loss))
        name = variant.name(depth)
        curves[name] = losses
        log(f"  {name:<26} {len(losses)} steps, last loss {losses[-1]}  ({time.perf_counter() - t:.1f} s)")
    return curves


def final_loss(curve: Sequence[float | None], window: int = 20) -> float | None:
    """Mean of the last `window` losses; None when training diverged."""
    if not curve or curve[-1] is None:
        return None
    return float(np.mean([v for v in curve[-window:] if v is not None]))  # only the last can be None


# ---------------------------------------------------------------- reporting
FLOOR = 1e-30  # where an exact zero (float32 underflow) is drawn on a log axis


def plot(result: dict, path: str | os.PathLike) -> None:
    """flow.png, four panels on log scales, plain dashed and residual solid:
    ‖∂L/∂W‖ per layer of the CIFAR nets; ‖∂L/∂h‖ at each CIFAR block input;
    ‖∂L/∂W‖ per layer of the deepest MLPs; the training curves."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in notebooks

    summary, cfg = result["summary"], result["config"]
    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    def lines(ax, keys, field, rows):
        for i, key in enumerate(keys):
            values = [max(r["norm"], FLOOR) for r in result[field][key]]
            style = "--" if key.startswith("plain") else "-"
            ax.plot(range(len(values)), values, style, color=colors[rows(i) % len(colors)], label=key)
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)

    cifar = [f"{prefix}{d}" for d in cfg["cifar_depths"] for prefix in ("plain", "resnet")]
    images = f"{cfg['cifar_batch']} random 32×32×3 images"
    lines(axes[0, 0], cifar, "gradient_norms", lambda i: i // 2)
    axes[0, 0].set(
        xlabel="layer (0 = stem, last = head)",
        ylabel="‖∂L/∂W‖₂ at init",
        title=f"CIFAR nets with BatchNorm: weights ({images})",
    )
    lines(axes[0, 1], cifar, "input_gradient_norms", lambda i: i // 2)
    axes[0, 1].set(
        xlabel="block (last = input of the head)",
        ylabel="‖∂L/∂h‖₂ at init",
        title="CIFAR nets with BatchNorm: block inputs h",
    )

    ax = axes[1, 0]
    if cfg["mlp_depths"]:
        depth = max(cfg["mlp_depths"])
        mlps = [k for k, s in summary.items() if s["family"] == "mlp" and s["depth"] == depth]
        lines(ax, mlps, "gradient_norms", lambda i: i)
        floored = any(r["norm"] < FLOOR for k in mlps for r in result["gradient_norms"][k])
        ax.set(
            title=f"MLPs, width {cfg['mlp_width']}, no normalisation, {cfg['mlp_batch']} digits"
            + (f"\n(exact zeros drawn at {FLOOR:g})" if floored else "")
        )
    ax.set(xlabel="layer (0 = input layer, last = output layer)", ylabel="‖∂L/∂W‖₂ at init")

    ax = axes[1, 1]
    for i, (key, curve) in enumerate(result["training"].items()):
        steps = [s for s, v in enumerate(curve) if v is not None]
        diverged = bool(curve) and curve[-1] is None
        label = key + (f" (diverged at step {len(curve) - 1})" if diverged else "")
        ax.plot(
            steps,
            [curve[s] for s in steps],
            "--" if key.startswith("plain") else "-",
            color=colors[i % len(colors)],
            lw=0.8,
            marker="x" if diverged else None,
            label=label,
        )
    tc = cfg["train"]
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (minibatch)",
        title=f"training on digits: {tc['optimizer']} lr {tc['learning_rate']}, batch {tc['batch_size']}, same init and batches",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_table(result: dict) -> str:
    """One line per model: layers, init loss, first/last-layer gradient norms and their ratio."""
    rows = [
        f"{'model':<26} {'layers':>6} {'loss@init':>10} {'|dW| first':>11} {'|dW| last':>10} {'first/last':>11} {'|dh| first/last':>16}"
    ]
    for name, s in result["summary"].items():
        rows.append(
            f"{name:<26} {s['layers']:>6} {_g(s['loss']):>10} {_g(s['first']):>11} {_g(s['last']):>10} "
            f"{_g(s['first_over_last']):>11} {_g(s['input_first_over_last']):>16}"
        )
    if result.get("training"):
        rows.append("")
        rows.append(f"{'training (mean of last 20 steps)':<34} final loss")
        for name, curve in result["training"].items():
            value = final_loss(curve)
            rows.append(f"{name:<34} {'diverged' if value is None else f'{value:.4f}'}")
    return "\n".join(rows)


def _g(v):
    return "n/a" if v is None else f"{v:.3g}"


# ---------------------------------------------------------------- the study
def study(
    cifar_depths: Sequence[int] | None = None,
    mlp_depths: Sequence[int] | None = None,
    train_depth: int | None = None,
    steps: int | None = None,
    *,
    optimizer: str = "momentum",
    seed: int = 0,
    grad: str = "rules",
    quick: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """The whole study (`jax-resnet flow`): `sweep`, then `train_compare`, with settings and environment.

    A setting left None takes the full study's value (`CIFAR_DEPTHS`,
    `MLP_DEPTHS`, `TRAIN_DEPTH`, `TRAIN_STEPS`), or `QUICK`'s when `quick`.
    The learning rate is `LEARNING_RATES[optimizer]`.

    Returns:
      `sweep`'s dict plus "training" (`train_compare`'s curves), "final_loss",
      "config", "device", "jax_version", "platform", "measured_at", "environment"
      (`environment.record`) and
      "timing_s" ({"sweep", "training", "total"}): what flow.json holds
      (`write`); the field names are a contract.
    """

    def pick(given: Any, name: str, default: Any) -> Any:
        return given if given is not None else (QUICK[name] if quick else default)

    cifar_depths = tuple(pick(cifar_depths, "cifar_depths", CIFAR_DEPTHS))
    mlp_depths = tuple(pick(mlp_depths, "mlp_depths", MLP_DEPTHS))
    depth: int = pick(train_depth, "train_depth", TRAIN_DEPTH)
    n_steps: int = pick(steps, "steps", TRAIN_STEPS)
    cifar_batch = pick(None, "cifar_batch", CIFAR_BATCH)
    learning_rate = default_learning_rate(optimizer, "study")

    started = time.perf_counter()
    log(f"gradient norms at init: CIFAR depths {cifar_depths}, MLP depths {mlp_depths} ({jax.default_backend()})")
    measured = sweep(cifar_depths, mlp_depths, cifar_batch=cifar_batch, seed=seed, grad=grad, log=log)
    sweep_s = time.perf_counter() - started
    log(f"training: MLP depth {depth}, {n_steps} steps, {optimizer}")
    t = time.perf_counter()
    training = train_compare(
        depth, steps=n_steps, optimizer=optimizer, learning_rate=learning_rate, seed=seed, grad=grad, log=log
    )
    train_s = time.perf_counter() - t
    env = environment.record()
    return {
        **measured,
        "training": training,
        "final_loss": {k: final_loss(v) for k, v in training.items()},
        "config": {
            "cifar_depths": list(cifar_depths),
            "cifar_batch": cifar_batch,
            "cifar_input": "N(0, 1) random 32x32x3 images, uniform random labels (random_images)",
            "mlp_depths": list(mlp_depths),
            "mlp_width": MLP_WIDTH,
            "mlp_batch": MLP_BATCH,
            "mlp_input": f"first {MLP_BATCH} digits training images (data.load('digits'))",
            "mlp_variants": [dataclasses.asdict(v) for v in MLP_VARIANTS],
            "train": {
                "depth": depth,
                "width": MLP_WIDTH,
                "steps": n_steps,
                "batch_size": TRAIN_BATCH,
                "optimizer": optimizer,
                "learning_rate": learning_rate,
                "momentum": step.MOMENTUM if optimizer == "momentum" else None,
            },
            "loss": "mean softmax cross-entropy (ops.softmax_cross_entropy), train mode",
            "grad": grad,
            "seed": seed,
            "dtype": "float32",
            "quick": quick,
        },
        "device": f"{env['platform']}: {env['device']}, {env['cpu_count']} CPU cores",
        "jax_version": env["jax"],
        "platform": platform.platform(),
        "measured_at": env["date"],
        "environment": env,
        "timing_s": {"sweep": sweep_s, "training": train_s, "total": time.perf_counter() - started},
    }


def to_json(result: dict) -> str:
    """`study`'s result as JSON text; inf and NaN (an overflow, a diverged run) become null."""
    return json.dumps(_finite(result), indent=1, allow_nan=False)


def write(result: dict, out: str | os.PathLike) -> tuple[str, str]:
    """Write `out`/flow.json (`to_json`) and `out`/flow.png (`plot`), creating `out`; return both paths."""
    os.makedirs(out, exist_ok=True)
    json_path, png_path = os.path.join(out, "flow.json"), os.path.join(out, "flow.png")
    plot(result, png_path)
    with open(json_path, "w") as f:
        f.write(to_json(result) + "\n")
    return json_path, png_path
