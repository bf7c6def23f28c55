"""The training loop: outputs, resume, atomic checkpoints, the gradient gate,
NaN handling, bad settings, and data parallelism on 8 simulated devices.

Runs use the synthetic data set (512 training images, 8 steps of 64 per
epoch) and the `tiny` ResNet, so that BatchNorm state and Adam's state are in
every checkpoint. Train steps are compiled once per settings and reused across
runs (`step.compiled_train_step` is cached), which keeps this file fast.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import checkpoints, cli, data, ops, step, train

# One xdist worker runs this module, so its module fixtures (reference runs) run
# once and `step.compiled_train_step`'s cache serves every test.
pytestmark = pytest.mark.xdist_group("test_train")

STEPS_PER_EPOCH = 8  # 512 synthetic training images / batch 64
BASE = train.TrainConfig(model="tiny", dataset="synthetic", epochs=2, batch_size=64, lr=1e-2)


class Killed(Exception):
    """Stands in for the process dying at a chosen point."""


def _assert_trees_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


class Recorder(train.Observer):
    """Every event the loop emits, in order, with its arguments."""

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name != "events" and callable(getattr(train.Observer, name, None)):
            return lambda *args: self.events.append((name, args))
        return super().__getattribute__(name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs in one go, with the gradient check: the reference run (its events recorded)."""
    out = tmp_path_factory.mktemp("straight")
    recorder = Recorder()
    metrics = train.train(dataclasses.replace(BASE, out=str(out)), [train.Console(), recorder])
    return out, metrics, recorder.events


def test_the_loop_emits_its_events_in_order_and_the_files_are_what_it_emitted(straight):
    out, metrics, events = straight
    names = [name for name, _ in events]
    epoch = ["epoch_start"] + ["step"] * STEPS_PER_EPOCH + ["epoch_end"]
    assert names == ["start", "gradient_check", *epoch, *epoch, "stop", "end"]
    steps = [args[0] for name, args in events if name == "step"]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    rows = [args[0] for name, args in events if name == "epoch_end"]
    assert rows == [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-2] == ("stop", (rows,))
    assert events[-1] == ("end", (metrics,))
    assert metrics == json.loads((out / "metrics.json").read_text())


def test_run_writes_metrics_curves_and_checkpoints(straight):
    out, metrics, _ = straight
    summary = json.loads((out / "metrics.json").read_text())
    for field in (
        "test_accuracy",
        "train_loss",
        "epochs",
        "examples_per_second",
        "grad_check_max_rel_err",
        "wall_time_s",
        "model",
        "dataset",
        "device",
        "jax_version",
        "num_params",
    ):
        assert field in summary, field
    assert summary["epochs"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["model"] == "tiny" and summary["dataset"] == "synthetic"
    assert summary["jax_version"] == jax.__version__
    assert summary["num_params"] > 0 and summary["examples_per_second"] > 0
    assert 0 <= summary["grad_check_max_rel_err"] <= 1e-4
    assert summary["test_accuracy"] > 0.5  # the blobs are easy; a broken loop stays at 1/10
    assert summary["test_accuracy"] == metrics["test_accuracy"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for r in rows:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"} <= set(r)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = np.array(summary["test_confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 128  # the synthetic test set
    assert np.trace(confusion) / 128 == pytest.approx(summary["test_accuracy"])
    per_class = summary["test_per_class"]
    assert [r["class"] for r in per_class] == list(range(10))
    assert [r["examples"] for r in per_class] == np.bincount(data.load("synthetic").y_test, minlength=10).tolist()
    assert sum(r["errors"] for r in per_class) == 128 - np.trace(confusion)
    assert _steps(out) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    tree, meta = checkpoints.load(out)
    assert meta["epoch"] == 2 and meta["step"] == 2 * STEPS_PER_EPOCH and meta["seed"] == 0
    assert set(tree) == {"params", "state", "opt_state"}
    assert jax.tree.leaves(tree["state"]), "BatchNorm statistics are checkpointed"


def _interrupted_after_first_epoch(out, monkeypatch, base=BASE):
    real_save = checkpoints.save

    def save_then_die(manager, step, tree, meta):
        real_save(manager, step, tree, meta)
        raise Killed

    monkeypatch.setattr(checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        train.train(dataclasses.replace(base, out=str(out), skip_grad_check=True))
    monkeypatch.undo()
    assert _steps(out) == [STEPS_PER_EPOCH]


def test_resume_gives_identical_parameters(straight, tmp_path, monkeypatch):
    """N steps, stop, resume, N steps == 2N steps in one go, bit for bit.
    The resumed run keeps one checkpoint only (max_to_keep may change)."""
    ref_out, ref_metrics, _ = straight
    out = tmp_path / "resumed"
    _interrupted_after_first_epoch(out, monkeypatch)

    metrics = train.train(dataclasses.replace(BASE, out=str(out), resume=True, skip_grad_check=True, max_to_keep=1))
    assert _steps(out) == [2 * STEPS_PER_EPOCH]
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == 2
    assert metrics["test_accuracy"] == ref_metrics["test_accuracy"]
    got, _ = checkpoints.load(out)
    want, _ = checkpoints.load(ref_out)
    _assert_trees_identical(got, want)  # params, BatchNorm state and Adam state
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def _damage(step_dir: Path, kind: str) -> None:
    arrays = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert arrays, f"no array files under {step_dir}"
    for p in arrays:
        if kind == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif kind == "garbage":
            p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
    if kind == "no-metadata":
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "no-metadata"])
def test_resume_skips_a_damaged_newest_checkpoint(straight, tmp_path, capsys, kind):
    """The newest checkpoint damaged: --resume names it, sets it aside (nothing
    deleted), continues from the one before, and ends where the straight run did."""
    ref_out, _, _ = straight
    out = tmp_path / "damaged"
    shutil.copytree(ref_out, out)
    newest = 2 * STEPS_PER_EPOCH
    _damage(out / "checkpoints" / str(newest), kind)
    metrics = train.train(dataclasses.replace(BASE, out=str(out), resume=True, skip_grad_check=True))
    log = capsys.readouterr().out
    assert f"checkpoint step {newest} is damaged" in log
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == 2
    assert (out / "checkpoints-damaged" / str(newest)).is_dir()
    _assert_trees_identical(checkpoints.load(out)[0], checkpoints.load(ref_out)[0])


def test_resume_with_every_checkpoint_damaged_stops_with_a_clear_error(straight, tmp_path):
    ref_out, _, _ = straight
    out = tmp_path / "all-damaged"
    shutil.copytree(ref_out, out)
    for saved in _steps(out):
        _damage(out / "checkpoints" / str(saved), "truncated")
    with pytest.raises(ValueError, match=r"no intact checkpoint .*step 16: .*step 8: "):
        train.train(dataclasses.replace(BASE, out=str(out), resume=True, skip_grad_check=True))


def test_kill_while_saving_keeps_previous_checkpoint(straight, tmp_path, monkeypatch):
    """A save that dies before orbax's final rename leaves only a temporary
    folder: the previous checkpoint stays loadable and --resume picks it."""
    from orbax.checkpoint._src.path import atomicity

    ref_out, _, _ = straight
    out = tmp_path / "killed"
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self, *args, **kwargs):
        if self.get_final().name == str(2 * STEPS_PER_EPOCH):
            raise Killed  # everything written, not yet renamed
        return await real_finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize_or_die)
    with pytest.raises(Killed):
        train.train(dataclasses.replace(BASE, out=str(out), skip_grad_check=True))
    monkeypatch.undo()

    ckpt = out / "checkpoints"
    leftovers = [p.name for p in ckpt.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and all(name.startswith(f"{2 * STEPS_PER_EPOCH}.") for name in leftovers)
    # A kill earlier in the save leaves a temporary folder with partial files.
    partial = ckpt / f"{3 * STEPS_PER_EPOCH}.orbax-checkpoint-tmp-1234567890"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\x00" * 10)
    assert _steps(out) == [STEPS_PER_EPOCH]
    tree, meta = checkpoints.load(out)
    assert meta["epoch"] == 1
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree["params"]))

    summary = tmp_path / "summary.json"
    argv = [
        "--model",
        "tiny",
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--out",
        str(out),
        "--resume",
        "--no-grad-check",
        "--no-progress",
        "--json",
        str(summary),
    ]
    assert cli.main(["train", *argv]) == 0
    metrics = json.loads(summary.read_text())
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1
    assert not [p for p in ckpt.iterdir() if ".orbax-checkpoint-tmp" in p.name], "leftovers are cleaned up"
    _assert_trees_identical(checkpoints.load(out)[0], checkpoints.load(ref_out)[0])


def _disk_full(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("where", ["checkpoint", "metrics line"])
def test_full_disk_mid_run_stops_with_a_clear_error_and_nothing_half_written(tmp_path, monkeypatch, where):
    """The disk fills while orbax writes epoch 2's checkpoint (its files written, the rename not yet done), or
    half-way through epoch 1's line of metrics.jsonl. One line names --out, the error and the checkpoint
    --resume would continue from (exit status 1); no temporary folder or file, no half line is left."""
    from orbax.checkpoint._src.path import atomicity

    out = tmp_path / "full"
    if where == "checkpoint":
        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_full(self, *args, **kwargs):
            if self.get_final().name == str(2 * STEPS_PER_EPOCH):
                raise _disk_full()
            return await real_finalize(self, *args, **kwargs)

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize_or_full)
    else:
        real_open = open

        class HalfWritten:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise _disk_full(self.f.name)

        def open_or_full(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if Path(path).name == "metrics.jsonl" and mode == "a":
                return HalfWritten(f)
            return f

        monkeypatch.setattr(train, "open", open_or_full, raising=False)
    config = dataclasses.replace(BASE, out=str(out), skip_grad_check=True)
    with pytest.raises(train.OutputError) as caught:
        train.train(config)
    message = str(caught.value)
    assert f"--out {out}: writing" in message and "failed (No space left on device); the run stopped" in message
    if where == "checkpoint":
        assert f"checkpoint step {STEPS_PER_EPOCH} is intact: free some space and pass --resume" in message
    else:
        assert f"writing {out / 'metrics.jsonl'} failed" in message and "no checkpoint was written" in message
    assert issubclass(train.OutputError, train.TrainingError)  # the CLI: exit status 1, this one line
    assert "\n" not in message

    leftovers = [p.relative_to(out) for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    assert _steps(out) == ([STEPS_PER_EPOCH] if where == "checkpoint" else [])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == ([1, 2] if where == "checkpoint" else [])
    assert json.loads((out / "config.json").read_text())["out"] == str(out)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_parameters():
    from jax_resnet import models

    ds = data.load("synthetic")
    x, y = ds.x_train[:32], ds.y_train[:32]
    model = models.tiny(num_classes=ds.num_classes, in_channels=1)
    opt = step.make_optimizer("adam", 1e-2)
    tree = step.init_train_state(model, opt)
    params, state = tree["params"], tree["state"]
    loss = {"float32": float(jax.jit(step.loss_fn(model, "rules", "float32"))(params, state, x, y)[0])}
    key = step.step_key(0, 0)
    p, s, o, m = step.make_train_step(model, opt, dtype="bfloat16")(params, state, tree["opt_state"], x, y, key)
    assert {a.dtype for a in jax.tree.leaves((p, s, o)) if jnp.issubdtype(a.dtype, jnp.floating)} == {
        jnp.dtype("float32")
    }
    loss["bfloat16"] = float(m["loss"])
    assert loss["bfloat16"] != loss["float32"]  # it did compute in bfloat16
    assert abs(loss["bfloat16"] - loss["float32"]) <= 0.05 * loss["float32"]
    bf16 = step.evaluate(model, p, s, ds.x_test, ds.y_test, dtype="bfloat16")
    assert 0 <= bf16["accuracy"] <= 1 and np.isfinite(bf16["loss"])


def test_wrong_gradient_refuses_to_train(tmp_path, monkeypatch, capsys):
    """A rule with a wrong backward (the loss's gradient doubled) fails the
    step-0 check: exit status 1, a message naming the error, no checkpoint."""

    @jax.custom_vjp
    def bad_loss(logits, labels):
        return ops.softmax_cross_entropy(logits, labels)

    def bad_fwd(logits, labels):
        return jax.vjp(ops.softmax_cross_entropy, logits, labels)[0], (logits, labels)

    def bad_bwd(res, ct):
        logits, labels = res
        ct_logits = jax.grad(ops.softmax_cross_entropy)(logits, labels) * ct
        return 2 * ct_logits, np.zeros(labels.shape, jax.dtypes.float0)

    bad_loss.defvjp(bad_fwd, bad_bwd)
    # As if the library shipped this rule: "rules" now means the faulty set everywhere.
    monkeypatch.setitem(ops.GRAD_MODES, "rules", ops.RULES._replace(softmax_cross_entropy=bad_loss))
    out = tmp_path / "refused"
    status = cli.main(
        ["train", "--model", "residual_mlp", "--dataset", "synthetic", "--out", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert (
        "gradient check failed" in err
        and "in float64" in err
        and "Refusing to train" in err
        and "--no-grad-check" in err
    )
    assert not (out / "checkpoints").exists() or _steps(out) == []
    assert not (out / "metrics.json").exists()


def test_float32_disagreement_is_rechecked_in_float64(monkeypatch):
    """A float32 miss alone (a ReLU kink flipped by rounding) does not refuse:
    float64 decides. Here float32 is made to report a miss; float64 runs for real."""
    from jax_resnet import models

    real = step._grad_error
    asked = []

    def float32_misses(model, params, state, x, y, dtype):
        asked.append(dtype)
        return (3e-2, "['stem']['w']") if dtype == "float32" else real(model, params, state, x, y, dtype)

    monkeypatch.setattr(step, "_grad_error", float32_misses)
    ds = data.load("synthetic")
    model = models.residual_mlp(in_features=64, width=16, depth=1, out_features=ds.num_classes)
    tree = step.init_train_state(model, step.make_optimizer("sgd", 0.1))
    check = step.check_gradients(model, tree["params"], tree["state"], ds.x_train[:16], ds.y_train[:16], tol=1e-4)
    assert asked == ["float32", "float64"]
    assert check.dtype == "float64" and check.float32_rel_err == 3e-2 and check.ok(1e-4)
    assert check.max_rel_err <= 1e-10


def test_nan_loss_stops_naming_the_step_without_checkpoint(tmp_path, monkeypatch):
    real_load = data.load
    bad_step = 3  # 1-based step of epoch 0 whose batch holds the NaN image

    def load_with_nan(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        order = np.random.default_rng([BASE.seed, 0]).permutation(len(ds.x_train))  # data.batches' order
        x = np.array(ds.x_train)
        x[order[(bad_step - 1) * BASE.batch_size + 5]] = np.nan
        return dataclasses.replace(ds, x_train=x)

    monkeypatch.setattr(data, "load", load_with_nan)
    out = tmp_path / "nan"
    with pytest.raises(
        train.TrainingError,
        match=rf"became (nan|NaN).* at step {bad_step} \(epoch 1, batch {bad_step} of 8\); stopped without saving",
    ):
        train.train(dataclasses.replace(BASE, out=str(out), skip_grad_check=True))
    assert _steps(out) == []


@pytest.mark.parametrize(
    "field, value, listed",
    [
        ("model", "resnet7", "resnet20"),
        ("dataset", "imagenet", "digits"),
        ("optimizer", "lion", "adamw"),
        ("schedule", "step", "warmup-cosine"),
        ("grad", "numeric", "autodiff"),
        ("dtype", "float16", "bfloat16"),
    ],
)
def test_unknown_names_list_the_valid_choices(field, value, listed):
    with pytest.raises(ValueError, match=rf"unknown {field} '{value}'.*{listed}"):
        train.TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 1000}, "batch_size 1000 exceeds the 512 training examples"),
        ({"devices": 64}, "asked for 64 but only"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train(dataclasses.replace(BASE, out=str(tmp_path / "bad"), **overrides))


def test_existing_run_needs_resume_and_the_same_settings(straight):
    out, _, _ = straight
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train.train(dataclasses.replace(BASE, out=str(out)))
    with pytest.raises(ValueError, match=r"trained with lr=0.01 \(now 0.1\)"):
        train.train(dataclasses.replace(BASE, out=str(out), resume=True, lr=0.1))
    with pytest.raises(ValueError, match=r"trained with optimizer='adam' \(now 'sgd'\)"):
        train.train(dataclasses.replace(BASE, out=str(out), resume=True, optimizer="sgd"))


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from jax_resnet import data, models, step, train

    assert jax.device_count() == 8, jax.devices()
    ds = data.load("synthetic")
    x, y = ds.x_train[:64], ds.y_train[:64]
    model = models.tiny(num_classes=ds.num_classes, in_channels=1)
    opt = step.make_optimizer("adam", 1e-2)
    tree = step.init_train_state(model, opt, seed=0)
    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]

    one, key = step.make_train_step(model, opt, "rules"), step.step_key(0, 0)
    p1, s1, o1, m1 = one(params, state, opt_state, x, y, key)

    mesh = step.make_mesh()
    assert mesh.size == 8
    eight = step.make_train_step(model, opt, "rules", mesh=mesh)
    replicated, batch = step.shardings(mesh)
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape == (8, 8, 8, 1)
    hlo = eight.lower(params, state, opt_state, xs, ys, key).compile().as_text()
    assert "all-reduce" in hlo
    p8, s8, o8, m8 = eight(params, state, opt_state, xs, ys, key)

    def err(a, b):
        pairs = [(np.asarray(u, np.float64), np.asarray(v, np.float64)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
        return max(float(np.max(np.abs(u - v))) / max(1.0, float(np.max(np.abs(v)))) for u, v in pairs)

    # BatchNorm statistics of the global batch: the new running statistics agree.
    print("params", err(p8, p1), "bn_state", err(s8, s1), "opt_state", err(o8, o1), "loss", err(m8, m1))
    assert err(p8, p1) <= 1e-5 and err(s8, s1) <= 1e-5 and err(o8, o1) <= 1e-5 and err(m8, m1) <= 1e-5
    # Statistics per shard of 8 would differ at the percent level:
    _, s_shard = jax.jit(lambda p, s, x: model.apply(p, s, x, train=True))(params, state, x[:8])
    assert err(s_shard, s1) > 1e-3

    try:
        train.train(train.TrainConfig(dataset="synthetic", batch_size=60, out="unused"))
    except ValueError as e:
        assert "not divisible by the 8 devices" in str(e), e
    else:
        raise AssertionError("batch 60 over 8 devices was accepted")
    print("OK")
    """
)


def test_sharded_step_equals_single_device_step(tmp_path):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK"), result.stdout


# --- augmentation --------------------------------------------------------------
# The seed's MLP (on flattened images) compiles in a fraction of the ResNet's time.
AUG_BASE = dataclasses.replace(BASE, model="residual_mlp", augment=True, skip_grad_check=True)


def _placements(image, original, augmentation):
    """The (dy, dx, mirrored) under which `image` is `original` moved by (dy, dx), maybe mirrored first, with
    `augmentation.fill` where it moved in from outside."""
    h, w, c = original.shape
    p = augmentation.pad
    fill = np.broadcast_to(np.asarray(augmentation.fill or 0.0, original.dtype), (c,))
    found = []
    for mirrored in (False, True):
        source = original[:, ::-1] if mirrored else original
        canvas = np.empty((h + 2 * p, w + 2 * p, c), original.dtype)
        canvas[...] = fill
        canvas[p : p + h, p : p + w] = source
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                if np.array_equal(canvas[dy : dy + h, dx : dx + w], image):
                    found.append((dy - p, dx - p, mirrored))
    return found


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_augmentation_shifts_and_flips_only_where_allowed(name):
    """Every augmented image is its original shifted by at most ±pad, padded with the fill; mirrored ones
    appear only for a data set whose augmentation flips (CIFAR-10), never for MNIST."""
    augmentation = dataclasses.replace(data.AUGMENTATIONS[name], fill=(-0.5, 0.25, 2.0))
    assert augmentation.flip == (name == "cifar10")
    x = np.random.default_rng(0).standard_normal((48, 6, 5, 3)).astype(np.float32)
    out = jax.jit(step.augment_batch, static_argnums=2)(jax.random.key(1), x, augmentation)
    assert out.shape == x.shape and out.dtype == x.dtype
    placements = [_placements(np.asarray(o), xi, augmentation) for o, xi in zip(out, x)]
    assert all(placements), "an output that is no shift (or mirrored shift) of its input"
    shifts = {pl[0][:2] for pl in placements}
    assert len(shifts) > 5 and (0, 0) in shifts or len(shifts) > 10  # many offsets drawn, per image
    mirrored = sum(all(m for *_, m in pl) for pl in placements)
    if augmentation.flip:
        assert 10 <= mirrored <= 38  # about half of 48
    else:
        assert mirrored == 0
    assert not np.array_equal(np.asarray(out), x)


def test_augmentation_is_a_function_of_the_key():
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 1)).astype(np.float32)
    augmentation = data.load("synthetic").augmentation
    augment = jax.jit(step.augment_batch, static_argnums=2)
    a, b = (augment(step.step_key(0, 5), x, augmentation) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment(step.step_key(0, 6), x, augmentation))
    assert not np.array_equal(a, augment(step.step_key(1, 5), x, augmentation))


def test_augmented_steps_are_deterministic_in_the_seed():
    """The same seed gives bitwise-equal parameters after N augmented steps; another augmentation seed, others."""
    from jax_resnet import models

    ds = data.load("synthetic")
    model = models.get(AUG_BASE.model).for_data(ds.image_shape, ds.num_classes)
    opt = step.make_optimizer("adam", 1e-2)
    train_step = step.make_train_step(model, opt, augment=ds.augmentation)

    def run(seed):
        tree = step.init_train_state(model, opt)
        params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
        for t, (x, y) in zip(range(3), data.batches(ds.x_train, ds.y_train, 64, key_or_seed=(0, 0))):
            params, state, opt_state, _ = train_step(params, state, opt_state, x, y, step.step_key(seed, t))
        return params

    first, again, other = run(0), run(0), run(1)
    _assert_trees_identical(first, again)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)))


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Two augmented epochs of the seed's MLP in one go: the reference of the next two tests."""
    out = tmp_path_factory.mktemp("augmented")
    return out, train.train(dataclasses.replace(AUG_BASE, out=str(out)))


def test_resume_with_augmentation_is_bit_identical(augmented, tmp_path, monkeypatch):
    (straight_out, want), resumed_out = augmented, tmp_path / "resumed"

    _interrupted_after_first_epoch(resumed_out, monkeypatch, AUG_BASE)
    with pytest.raises(ValueError, match=r"trained with augment=True \(now False\)"):
        train.train(dataclasses.replace(AUG_BASE, out=str(resumed_out), resume=True, augment=False))
    got = train.train(dataclasses.replace(AUG_BASE, out=str(resumed_out), resume=True))
    assert got["resumed_from_epoch"] == 1
    assert got["test_accuracy"] == want["test_accuracy"] and got["test_confusion"] == want["test_confusion"]
    _assert_trees_identical(checkpoints.load(resumed_out)[0], checkpoints.load(straight_out)[0])


def test_a_second_process_with_the_same_seed_trains_bitwise_equal_parameters(augmented, tmp_path):
    """`python -m jax_resnet train` in a child process and `train.train` here, same seed and settings (the
    seed's MLP with augmentation: initialisation, shuffling and the per-step augmentation keys all come from
    the seed; 16 steps): the checkpoints' arrays and the losses are bit for bit the same on the CPU (README,
    "Reproducibility"). The run here is the `augmented` fixture's. The child has
    float64 enabled as this process has (tests/conftest.py): with x64 off, optax's update differs in the last
    bit (the gradients do not)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
    env = dict(os.environ, PYTHONPATH=package, JAX_PLATFORMS="cpu", JAX_ENABLE_X64=str(jax.config.jax_enable_x64))
    flags = ["--model", "residual_mlp", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "64"]
    flags += ["--lr", "0.01", "--augment", "--no-grad-check", "--no-progress", "--out", str(tmp_path / "child")]
    child = subprocess.Popen(
        [sys.executable, "-m", "jax_resnet", "train", *flags],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = child.communicate(timeout=600)
    assert child.returncode == 0, output
    runs = (tmp_path / "child", augmented[0])
    (tree_a, meta_a), (tree_b, meta_b) = (checkpoints.load(out) for out in runs)
    assert meta_a["config"] == {**meta_b["config"], "out": meta_a["config"]["out"]}
    assert meta_a["step"] == meta_b["step"] == 2 * STEPS_PER_EPOCH
    _assert_trees_identical(tree_a, tree_b)
    losses = [json.loads((out / "metrics.json").read_text())["train_loss"] for out in runs]
    assert losses[0] == losses[1]
