"""Reversible stages against stored activations: memory, step time and float32 error versus depth.

Three ways to train the same RevNet (`models.revnet`), one training step each
(`bench.library_step`: forward, backward, SGD-momentum update, jitted with
the carry donated):

  reversible  grad="rules": each reversible stage is one custom_vjp that
              stores its output only and rebuilds the rest in the backward;
  autodiff    grad="autodiff": the reference ops, JAX stores every activation;
  remat       grad="autodiff" with `jax.checkpoint` per coupling
              (`RevNetSpec.remat`): what a JAX user reaches for today.

Measured:

  memory      XLA's compiled temporary memory of the step
              (`memory_analysis().temp_size_in_bytes`) for one stage of
              8, 32, 128, 512 couplings at CIFAR size (batch 128, 32x32x3,
              32 channels), and for RevNet-110 at batch 128; only compiled,
              never run, so the figures do not depend on the machine's load;
  step time   the three steps timed in interleaved rounds (`bench.time_interleaved`)
              at a size a 2-core CPU runs (batch 8, 16x16x3, 16 channels);
  error       float32 reconstruction error (`reversible.reconstruction_error`)
              and gradient error (rules against autodiff, `gradcheck.max_leaf_error`)
              of one stage of 8 ... 1024 couplings, at initialisation and after
              `TRAIN_STEPS` SGD steps on the stage itself.

Writes benchmarks/reversible.md, benchmarks/reversible.json and the plot
benchmarks/reversible_memory.png. Command (about 30 minutes on 2 busy CPU cores, most of it compiling):

    python benchmarks/reversible.py
    python benchmarks/reversible.py --quick     # small sizes, a few minutes (compiling); numbers not meaningful
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import bench, models, ops, reversible
from jax_resnet._x64 import enable_x64
from jax_resnet.gradcheck import leaf_errors

HERE = pathlib.Path(__file__).parent
METHODS = {"reversible": ("rules", False), "autodiff": ("autodiff", False), "remat": ("autodiff", True)}
DEPTHS = (8, 32, 128, 512)
ERROR_DEPTHS = (8, 32, 128, 512, 1024)
SEGMENTS = (8, 32)  # the mitigation: couplings per stored output
TRAIN_STEPS = 20
MIB = 2**20


def stage_model(n: int, width: int, remat: bool = False, segment: int | None = None) -> models.Model:
    """One reversible stage of `n` couplings (basic F and G, `width` channels, the stem's too)."""
    return models.revnet((n,), "basic", (width,), stem_width=width, remat=remat, segment=segment)


def _batch(batch: int, side: int):
    k_x, k_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k_x, (batch, side, side, 3), jnp.float32)
    return x, jax.random.randint(k_y, (batch,), 0, 10, jnp.int32)


def compiled_steps(build, batch: int, side: int, *, abstract: bool) -> dict[str, bench.Prepared]:
    """Each method's compiled step for `build(remat)`'s model; `abstract`: shapes only (memory, no run)."""
    tx = bench.optimizer()
    x, y = _batch(batch, side)
    out = {}
    for method, (grad, remat) in METHODS.items():
        model = build(remat)
        init = lambda key, model=model: (lambda p, s: (p, s, tx.init(p)))(*model.init(key))
        carry = jax.eval_shape(init, jax.random.key(0)) if abstract else jax.jit(init)(jax.random.key(0))
        compiled = jax.jit(bench.library_step(model, grad, tx), donate_argnums=0).lower(carry, x, y).compile()
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
        out[method] = bench.Prepared(method, compiled, carry, (x, y), [], temp, 0)
    return out


def memory_vs_depth(depths, batch, side, width) -> list[dict]:
    rows = []
    for n in depths:
        steps = compiled_steps(lambda remat, n=n: stage_model(n, width, remat), batch, side, abstract=True)
        params, _ = jax.eval_shape(lambda n=n: stage_model(n, width).init(jax.random.key(0)))
        row = {"couplings": n, "param_bytes": 4 * models.num_params(params)}
        rows.append({**row, **{m: p.temp_memory_bytes for m, p in steps.items()}})
        print(
            f"memory, {n} couplings: " + ", ".join(f"{m} {p.temp_memory_bytes / MIB:.1f} MiB" for m, p in steps.items())
        )
    return rows


def revnet110_memory(batch: int) -> dict:
    build = lambda remat: models.get("revnet110", remat=remat)
    steps = compiled_steps(build, batch, 32, abstract=True)
    print("RevNet-110: " + ", ".join(f"{m} {p.temp_memory_bytes / MIB:.1f} MiB" for m, p in steps.items()))
    return {m: p.temp_memory_bytes for m, p in steps.items()}


def time_vs_depth(depths, batch, side, width, rounds, round_s) -> list[dict]:
    rows = []
    for n in depths:
        steps = compiled_steps(lambda remat, n=n: stage_model(n, width, remat), batch, side, abstract=False)
        times, per_round = bench.time_interleaved(list(steps.values()), rounds, round_s)
        ratios = {m: [t / a for t, a in zip(times[m], times["autodiff"])] for m in METHODS}
        row = {"couplings": n, "steps_per_round": per_round["autodiff"], "rounds": len(times["autodiff"])}
        for m in METHODS:
            row[m] = {"step_ms": bench.spread([1e3 * t for t in times[m]]), "ratio": bench.spread(ratios[m])}
        rows.append(row)
        print(
            f"time, {n} couplings: "
            + ", ".join(f"{m} {row[m]['step_ms'][1]:.1f} ms ×{row[m]['ratio'][1]:.2f}" for m in METHODS)
        )
    return rows


def _stage(n: int, width: int, batch: int, side: int, key):
    spec = reversible.CouplingSpec("basic", width, width)
    params, state = reversible.init_stage(key, spec, n)
    x1, x2 = jax.random.normal(jax.random.fold_in(key, 1), (2, batch, side, side, width // 2), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 2), (2, batch, side, side, width // 2), jnp.float32)
    return spec, params, state, x1, x2, w


def _stage_loss(o, spec, state, w, params, x1, x2, segment=None):
    y1, y2, _ = reversible.stage(o, spec, params, state, x1, x2, train=True, segment=segment)
    # Linear in y1, saturating in y2: the cotangents entering the stage are well-conditioned in float32
    # (a loss like (Σ w·y)², whose Σ cancels, would put float32's error into its scale, the same for all methods).
    return jnp.mean(w[0] * y1) + jnp.mean(w[1] * jnp.tanh(y2))


def _gradients(o, spec, state, w, params, x1, x2, segment=None):
    loss = functools.partial(_stage_loss, o, spec, state, w, segment=segment)
    return jax.grad(loss, argnums=(0, 1, 2))(params, x1, x2)


def error_vs_depth(depths, width, batch, side, train_steps, segments=(), lr=0.05) -> list[dict]:
    """Float32 errors of one stage per depth, at init and after `train_steps` SGD steps (each
    parameter array moved by `lr` along its normalised rules gradient of `_stage_loss`):
    reconstruction error, and the gradient error of reversible (whole stage, and with each of
    `segments`) and of autodiff, both against autodiff's gradient in float64."""
    rules, autodiff = ops.opset("rules"), ops.opset("autodiff")
    rows = []
    for n in depths:
        spec, params, state, x1, x2, w = _stage(n, width, batch, side, jax.random.key(0))
        error = jax.jit(functools.partial(reversible.reconstruction_error, rules, spec, train=True))
        grads = {"reversible": jax.jit(functools.partial(_gradients, rules, spec, state, w))}
        grads["autodiff"] = jax.jit(functools.partial(_gradients, autodiff, spec, state, w))
        for k in (k for k in segments if k < n and n % k == 0):
            grads[f"segment {k}"] = jax.jit(functools.partial(_gradients, rules, spec, state, w, segment=k))
        sgd = jax.jit(lambda p, g: jax.tree.map(lambda p, g: p - lr * g / (jnp.linalg.norm(g) + 1e-12), p, g[0]))
        row = {"couplings": n}
        for phase in ("init", "trained"):
            if phase == "trained":
                for _ in range(train_steps):
                    params = sgd(params, grads["reversible"](params, x1, x2))
            with enable_x64():
                to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
                exact = jax.jit(functools.partial(_gradients, autodiff, spec, to64(state), to64(w)))(
                    to64(params), to64(x1), to64(x2)
                )
                exact = jax.device_get(exact)
            row[phase] = {"reconstruction": float(error(params, state, x1, x2))}
            computed = {name: fn(params, x1, x2) for name, fn in grads.items()}
            for name, g in computed.items():
                # Per array, against its own scale: the median is the typical array, the max the worst.
                versus = {"vs_autodiff": computed["autodiff"], "vs_float64": exact}
                for against, ref in versus.items():
                    if name == "autodiff" and against == "vs_autodiff":
                        continue
                    errors = list(leaf_errors(g, ref).values())
                    row[phase][f"{name} {against}"] = {"median": float(np.median(errors)), "max": float(np.max(errors))}
        rows.append(row)
        print(f"error, {n} couplings: {row}")
    return rows


def segment_memory(n, segments, batch, side, width) -> list[dict]:
    """Compiled step memory of one stage of `n` couplings, reversible with each `segment`."""
    tx = bench.optimizer()
    x, y = _batch(batch, side)
    rows = []
    for k in segments:
        model = stage_model(n, width, segment=k)
        carry = jax.eval_shape(lambda m=model: (lambda p, s: (p, s, tx.init(p)))(*m.init(jax.random.key(0))))
        step = jax.jit(bench.library_step(model, "rules", tx), donate_argnums=0)
        temp = int(step.lower(carry, x, y).compile().memory_analysis().temp_size_in_bytes)
        rows.append({"couplings": n, "segment": k, "reversible": temp})
        print(f"memory, {n} couplings, segment {k}: {temp / MIB:.1f} MiB")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    depth = [r["couplings"] for r in rows]
    for method in METHODS:
        ax.plot(depth, [r[method] / MIB for r in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("reversible couplings in the stage (4 convolutions each)")
    ax.set_ylabel("compiled temporary memory of one step (MiB)")
    ax.set_title("Training-step memory vs depth (batch 128, 32x32, 32 channels)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [
        "### Reversible stages: memory, step time and float32 error vs depth",
        "",
        f"Measured on {env['platform']} ({env['device']}), {env['cpu_count']} CPU cores, jax {env['jax']}, "
        f"{env['date']}; the machine was shared with other jobs, so step times are noisy (memory is not: it "
        "is XLA's compiled figure). Command: `python benchmarks/reversible.py`.",
        "",
        f"Memory: one training step's compiled temporary memory (`memory_analysis().temp_size_in_bytes`), one "
        f"stage of basic couplings, batch {cfg['memory_batch']}, {cfg['memory_side']}x{cfg['memory_side']}x3, "
        f"{cfg['memory_width']} channels. ![memory vs depth](reversible_memory.png)",
        "",
        "| couplings | layers | reversible (MiB) | reversible − parameter bytes (MiB) | autodiff (MiB) | remat (MiB) "
        "| autodiff / reversible |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["memory"]:
        n = r["couplings"]
        lines.append(
            f"| {n} | {4 * n + 2} | {r['reversible'] / MIB:.1f} | {(r['reversible'] - r['param_bytes']) / MIB:.1f} "
            f"| {r['autodiff'] / MIB:.1f} | {r['remat'] / MIB:.1f} | {r['autodiff'] / r['reversible']:.1f}× |"
        )
    mem = result["memory"]
    first, last = mem[0], mem[-1]
    flat = last["reversible"] / first["reversible"] - 1
    flat_act = (last["reversible"] - last["param_bytes"]) / (first["reversible"] - first["param_bytes"]) - 1
    lines += [
        "",
        f"Reversible memory from {first['couplings']} to {last['couplings']} couplings: {flat:+.1%}; without "
        f"one parameter-sized buffer (the gradient, which every method holds and which grows with depth): "
        f"{flat_act:+.1%}.",
    ]
    seg = ", ".join(f"segment {r['segment']}: {r['reversible'] / MIB:.1f} MiB" for r in result["segment"])
    lines += [
        "",
        f"With stored outputs every k couplings (the float32 mitigation), {last['couplings']} couplings: {seg}.",
    ]
    r110 = result["revnet110"]
    lines += [
        "",
        f"RevNet-110, batch {cfg['revnet110_batch']}, 32x32x3: reversible {r110['reversible'] / MIB:.1f} MiB, "
        f"autodiff {r110['autodiff'] / MIB:.1f} MiB ({r110['autodiff'] / r110['reversible']:.1f}× the reversible), "
        f"remat {r110['remat'] / MIB:.1f} MiB.",
        "",
        f"Step time: batch {cfg['time_batch']}, {cfg['time_side']}x{cfg['time_side']}x3, {cfg['time_width']} channels; "
        "median over interleaved rounds (min–max), ratio to autodiff taken within each round.",
        "",
        "| couplings | rounds × steps | reversible (ms) | × autodiff | autodiff (ms) | remat (ms) | × autodiff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda s, f: f"{f(s[1])} ({f(s[0])}–{f(s[2])})"
    ms, x = (lambda v: f"{v:.1f}"), (lambda v: f"{v:.2f}")
    for r in result["time"]:
        lines.append(
            f"| {r['couplings']} | {r['rounds']} × {r['steps_per_round']} | {fmt(r['reversible']['step_ms'], ms)} "
            f"| {fmt(r['reversible']['ratio'], x)} | {fmt(r['autodiff']['step_ms'], ms)} "
            f"| {fmt(r['remat']['step_ms'], ms)} | {fmt(r['remat']['ratio'], x)} |"
        )
    lines += [
        "",
        f"Float32 error: one stage, batch {cfg['error_batch']}, {cfg['error_side']}x{cfg['error_side']}, "
        f"{cfg['error_width']} channels, training mode; reconstruction error max|x̂ − x| / max|x| of the stage's "
        "inputs rebuilt from its output; gradient errors: per-array relative error (`gradcheck.leaf_errors`) "
        "of float32 gradients (parameters and the stage's inputs), median over the arrays (largest in "
        "brackets), of the reversible stage (whole, and storing every k-th output: segment k) against "
        "autodiff's float32 gradients (stored activations), and of each against autodiff in float64; "
        f"trained: after {cfg['train_steps']} normalised SGD steps on the stage.",
        "",
    ]
    grads = [k for k in result["error"][-1]["init"] if k != "reconstruction"]
    grads = sorted(grads, key=lambda k: (k.endswith("vs_float64"), k))
    for phase in ("init", "trained"):
        lines += [
            "",
            f"| couplings ({phase}) | reconstruction | " + " | ".join(g.replace("_", " ") for g in grads) + " |",
            "|---:|---:|" + "---:|" * len(grads),
        ]
        for r in result["error"]:
            e = r[phase]
            cells = [f"{e[g]['median']:.1e} ({e[g]['max']:.1e})" if g in e else "–" for g in grads]
            lines.append(f"| {r['couplings']} | {e['reconstruction']:.1e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PARTS = ("memory", "revnet110", "segment", "error", "time")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "reversible")
    args = parser.parse_args(argv)
    q = args.quick
    cfg = {
        "memory_batch": 4 if q else 128,
        "memory_side": 8 if q else 32,
        "memory_width": 8 if q else 32,
        "revnet110_batch": 4 if q else 128,
        "time_batch": 2 if q else 8,
        "time_side": 8 if q else 16,
        "time_width": 8 if q else 16,
        "error_batch": 2 if q else 8,
        "error_side": 4 if q else 8,
        "error_width": 8 if q else 16,
        "train_steps": 2 if q else TRAIN_STEPS,
        "segments": (2,) if q else SEGMENTS,
    }
    depths = (2, 4) if q else DEPTHS
    path = args.out.with_suffix(".json")
    # Parts run separately merge into the JSON already there (same sizes only).
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("config", cfg) != json.loads(json.dumps(cfg)):
        result = {}
    result.update({"environment": bench.environment(q), "config": cfg})
    for part in args.parts.split(","):
        if part == "memory":
            result[part] = memory_vs_depth(depths, cfg["memory_batch"], cfg["memory_side"], cfg["memory_width"])
        elif part == "revnet110":
            result[part] = revnet110_memory(cfg["revnet110_batch"])
        elif part == "segment":
            result[part] = segment_memory(
                depths[-1], cfg["segments"], cfg["memory_batch"], cfg["memory_side"], cfg["memory_width"]
            )
        elif part == "error":
            result[part] = error_vs_depth(
                (2, 4) if q else ERROR_DEPTHS,
                cfg["error_width"],
                cfg["error_batch"],
                cfg["error_side"],
                cfg["train_steps"],
                cfg["segments"],
            )
        elif part == "time":
            result[part] = time_vs_depth(
                depths,
                cfg["time_batch"],
                cfg["time_side"],
                cfg["time_width"],
                2 if q else args.rounds,
                args.round_seconds,
            )
        else:
            parser.error(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
        path.write_text(json.dumps(result, indent=1) + "\n")
    if all(part in result for part in PARTS):
        args.out.with_suffix(".md").write_text(markdown(result))
        plot(result["memory"], args.out.with_name(args.out.name + "_memory.png"))
        print(f"wrote {args.out}.md, .json and {args.out.name}_memory.png")


if __name__ == "__main__":
    main()
