"""DP-SGD (jax_resnet.dp): the step against optax's per-example clipping; padding rows and
chunks change nothing; Poisson sampling tested statistically; ε against jax_privacy's
accountant for the same event; the noise is secret by default and no file a run writes
holds its key; bad settings name their flag."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from jax_resnet import checkpoints, cli, dp, models, step, train
from jax_resnet._compile import compile_once
from jax_resnet.gradcheck import max_leaf_error

TOL = 1e-10  # float64

MLP = functools.partial(models.residual_mlp, in_features=6, width=5, depth=2, out_features=3)


def _data(model, rows, seed=0):
    params, state = model.init(jax.random.key(seed), jnp.float64)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape)), params)
    x = jnp.asarray(rng.standard_normal((rows, 6)))
    y = jnp.asarray(rng.integers(0, 3, rows), jnp.int32)
    return params, state, x, y


def _per_example_grads(model, params, state, x, y):
    """∇ℓ_i of every example: jax.vmap of jax.grad of the reference ops on a batch of one."""

    def loss(p, xi, yi):
        logits = model.apply(p, state, xi[None], train=True, grad="autodiff")[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None]).mean()

    return jax.vmap(lambda xi, yi: jax.grad(loss)(params, xi, yi))(x, y)


# ------------------------------------------------------------------------ the step
def test_dp_step_equals_optax_clipping_of_vmapped_grads():
    model = MLP()
    params, state, x, y = _data(model, 6, seed=3)
    # The six examples' gradient norms here are 15.9, 7.4, 1.1, 2.6, 1.5, 2.3: C = 2.4 clips half of them.
    clip, noise, key = 2.4, 0.7, jax.random.key(5)
    config = dp.DPConfig(l2_norm_clip=clip, noise_multiplier=noise, expected_batch_size=6, sampler="shuffle")
    optimizer = optax.sgd(0.1)
    dp_step = step.make_train_step(model, optimizer, dp=config)
    args = (params, state, optimizer.init(params), x, y, key)
    new_params, _, _, metrics = compile_once(dp_step, *args)(*args)

    def reference(params):
        per_ex = _per_example_grads(model, params, state, x, y)
        aggregate = optax.contrib.differentially_private_aggregate(
            clip, noise, key=jax.random.fold_in(key, dp.NOISE_STREAM)
        )
        private = optax.chain(aggregate, optimizer)
        updates, _ = private.update(per_ex, private.init(params), params)
        return optax.apply_updates(params, updates)

    assert max_leaf_error(new_params, compile_once(jax.jit(reference), params)(params))[0] <= TOL
    assert float(metrics["clipped"]) == 0.5


def _update(model, config, rows=None):
    update = dp.update_fn(model, optax.sgd(0.1), config, chunk=rows)
    return lambda p, s, x, y, k: update(p, s, optax.sgd(0.1).init(p), x, y, k)[0]


def test_padding_rows_and_chunks_change_nothing():
    # A Poisson batch of 5 examples padded to 8 rows, then to 2 chunks of 8, against the 5
    # examples alone (same key, same divisor b = 4): padding contributes exactly nothing
    # (junk in it is bit-for-bit irrelevant), and chunks only regroup one sum.
    model = MLP()
    params, state, x, y = _data(model, 5, seed=1)
    key = jax.random.key(7)
    poisson = dp.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.5, expected_batch_size=4, truncated_batch_size=8)
    plain = dataclasses.replace(poisson, sampler="shuffle", truncated_batch_size=None)
    pad = lambda a, rows, fill: jnp.concatenate([a, jnp.full((rows - len(a), *a.shape[1:]), fill, a.dtype)])
    y8, y16 = pad(y, 8, dp.PAD_LABEL), pad(y, 16, dp.PAD_LABEL)
    run = lambda config, x, y, rows=None: compile_once(jax.jit(_update(model, config, rows)), params, state, x, y, key)(
        params, state, x, y, key
    )
    alone = run(plain, x, y, rows=5)
    zeros, junk = run(poisson, pad(x, 8, 0.0), y8), run(poisson, pad(x, 8, 1e6), y8)
    two_chunks = run(poisson, pad(x, 16, -3.0), y16)
    for a, b in zip(jax.tree.leaves(zeros), jax.tree.leaves(junk)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max_leaf_error(zeros, alone)[0] <= TOL
    assert max_leaf_error(two_chunks, alone)[0] <= TOL
    with pytest.raises(ValueError, match="chunks of 8.*got 12 rows"):
        run(poisson, pad(x, 12, 0.0), pad(y, 12, dp.PAD_LABEL))


# ------------------------------------------------------------------ the sampler
def test_poisson_sampling_includes_every_example_at_rate_q():
    # Over T steps each example's inclusion count is Binomial(T, q); every one of the n counts
    # lies within its two-sided binomial interval at level 1e-3 / n (Bonferroni), and the batch
    # sizes are Binomial(n, q) by their mean and variance (4-sigma bounds on the estimators).
    n, q, steps = 60, 0.15, 3000
    randomness = dp.DPRandomness.insecure(0)
    counts, sizes = np.zeros(n), []
    for t in range(steps):
        indices = dp.poisson_indices(randomness.uniforms(t, n), q)
        assert np.all(np.diff(indices) > 0)
        counts[indices] += 1
        sizes.append(len(indices))
    low, high = stats.binom.interval(1 - 1e-3 / n, steps, q)
    assert np.all((low <= counts) & (counts <= high)), (counts.min(), counts.max(), low, high)
    mean, var = n * q, n * q * (1 - q)
    assert abs(np.mean(sizes) - mean) <= 4 * np.sqrt(var / steps)
    assert abs(np.var(sizes) - var) <= 4 * var * np.sqrt(2 / steps)


def test_truncated_poisson_keeps_a_uniform_subset_of_the_drawn():
    # With a cap M below most batches, every batch has M members and, since the drawn set is
    # symmetric, every example is still kept equally often: about T·M/n times.
    n, q, cap, steps = 40, 0.5, 8, 2000
    randomness = dp.DPRandomness.insecure(1)
    counts = np.zeros(n)
    for t in range(steps):
        indices = dp.poisson_indices(randomness.uniforms(t, n), q, cap)
        assert len(indices) <= cap
        counts[indices] += 1
    p = counts.sum() / (steps * n)  # the per-step keep rate, ≈ M/n
    low, high = stats.binom.interval(1 - 1e-3 / n, steps, p)
    assert np.all((low <= counts) & (counts <= high))


def test_poisson_batch_pads_with_the_pad_label_to_whole_chunks():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100, dtype=np.int32) % 10
    config = dp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=10)
    rows = dp.physical_batch_size(config)
    assert rows == 10 + 7  # b + ⌈2√b⌉
    xb, yb = dp.poisson_batch(x, y, config, dp.DPRandomness.insecure(0), step=3)
    real = yb != dp.PAD_LABEL
    assert len(xb) % rows == 0 and len(xb) >= rows
    assert np.all(xb[~real] == 0) and np.all(xb[real][:, 0] / 2 % 10 == yb[real])
    many = dp.pad_indices(np.arange(20), rows)
    assert len(many) == 2 * rows and np.all(many[20:] == -1)


def test_secret_randomness_differs_and_never_shows_its_root(monkeypatch):
    a, b = dp.DPRandomness.new(), dp.DPRandomness.new()
    assert a.private and not np.array_equal(a.uniforms(0, 8), b.uniforms(0, 8))
    assert "root" not in repr(a) and repr(a) == "DPRandomness(private=True)"
    seeded = dp.DPRandomness.insecure(0)
    assert not seeded.private and np.array_equal(seeded.uniforms(5, 8), dp.DPRandomness.insecure(0).uniforms(5, 8))


# ------------------------------------------------------------------ accounting
# jax_privacy 2.0 calls optax.global_norm, which optax 0.2.8 deprecates.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "settings",
    [
        {"noise_multiplier": 1.1, "expected_batch_size": 256},
        {"noise_multiplier": 0.8, "expected_batch_size": 64, "truncated_batch_size": 80},
    ],
    ids=["poisson_rdp", "truncated_pld"],
)
def test_epsilon_equals_jax_privacys_accounting_for_the_same_event(settings):
    analysis = pytest.importorskip("jax_privacy.accounting")
    n, steps = 60_000, 3 * 234
    config = dp.DPConfig(l2_norm_clip=1.0, delta=1e-5, **settings)
    capped = config.truncated_batch_size is not None
    accountant = (
        analysis.PldAccountantConfig(value_discretization_interval=dp.PLD_DISCRETIZATION)
        if capped
        else analysis.RdpAccountantConfig(orders=dp.RDP_ORDERS)
    )
    params = analysis.DpParams(
        noise_multipliers=config.noise_multiplier,
        num_samples=n,
        delta=config.delta,
        batch_size=config.expected_batch_size,
        truncated_batch_size=config.truncated_batch_size,
    )
    theirs = analysis.DpsgdTrainingAccountant(accountant).compute_epsilon(steps, params)
    ours = dp.epsilon(config, n, steps)
    assert config.accountant_name == ("pld" if capped else "rdp")
    assert ours == pytest.approx(theirs, rel=1e-9) and 0 < ours < 100


def test_epsilon_grows_with_steps_and_falls_with_noise_and_shuffle_has_none():
    config = dp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=100)
    e = functools.partial(dp.epsilon, num_examples=10_000)
    assert e(config, steps=100) < e(config, steps=1000)
    assert e(dataclasses.replace(config, noise_multiplier=2.0), steps=1000) < e(config, steps=1000)
    assert e(dataclasses.replace(config, noise_multiplier=0.0), steps=10) == float("inf")
    assert e(config, steps=0) == 0.0
    assert e(dataclasses.replace(config, sampler="shuffle"), steps=10) is None


# ------------------------------------------------------------------- training
DP_RUN = train.TrainConfig(
    model="residual_mlp", dataset="synthetic", epochs=2, batch_size=32, lr=0.05, optimizer="sgd",
    skip_grad_check=True, dp_clip=1.0, dp_noise=1.0,
)  # fmt: skip
ROOT = bytes(range(101, 133))  # 32 recognisable bytes standing in for the OS's


def _final_params(out):
    return jax.tree.leaves(checkpoints.load(out)[0]["params"])


def _run(tmp_path, name, **changes):
    out = tmp_path / name
    metrics = train.train(dataclasses.replace(DP_RUN, out=str(out), **changes))
    return out, metrics


def test_dp_run_records_its_accounting_and_its_noise_is_secret(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dp, "_entropy", lambda: calls.append(1) or ROOT)
    out, metrics = _run(tmp_path, "secret")
    assert calls == [1]
    record = metrics["dp"]
    assert record["private"] is True and record["sampler"] == "poisson" and record["accountant"] == "rdp"
    assert record["dp_event"].startswith("PoissonSampledDpEvent(sampling_probability=0.0625")
    assert record["neighbouring_relation"] == "add or remove one example"
    config = DP_RUN.dp
    assert record["epsilon"] == dp.epsilon(config, 512, 32)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rows] == [dp.epsilon(config, 512, 16), dp.epsilon(config, 512, 32)]
    # No file of the run holds the root or the key derived from it, in any common spelling.
    key = np.asarray(jax.random.key_data(dp.DPRandomness(ROOT, True).root_key()))
    needles = [ROOT, ROOT.hex().encode(), key.tobytes()]
    needles += [str(int(w)).encode() for w in key] + [format(int(w), "x").encode() for w in key]
    for path in out.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(n in content for n in needles), path


def test_same_seed_draws_different_noise_unless_insecure(tmp_path):
    # Default: secret randomness, so two runs with one --seed end apart. With
    # --dp-insecure-seed they repeat bit for bit, and say they are not private.
    a, b = (_final_params(_run(tmp_path, name)[0]) for name in ("a", "b"))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    (out_c, metrics), (out_d, _) = (_run(tmp_path, name, dp_insecure_seed=True) for name in ("c", "d"))
    for x, y in zip(_final_params(out_c), _final_params(out_d)):
        np.testing.assert_array_equal(x, y)
    assert metrics["dp"]["private"] is False and "NOT private" in metrics["dp"]["randomness"]


def test_shuffled_batches_report_no_guarantee(tmp_path, capsys):
    _, metrics = _run(tmp_path, "shuffle", dp_sampler="shuffle", epochs=1)
    assert metrics["dp"]["epsilon"] is None and metrics["dp"]["private"] is False
    assert "NO DP GUARANTEE" in capsys.readouterr().out


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"l2_norm_clip": 0.0}, r"l2_norm_clip C \(--dp-clip\) must be a finite number > 0, got 0.0"),
        ({"noise_multiplier": -0.5}, r"noise_multiplier σ \(--dp-noise\) must be .* ≥ 0"),
        ({"delta": 1.5}, r"delta δ \(--dp-delta\) must lie in \(0, 1\)"),
        ({"sampler": "random"}, r"sampler \(--dp-sampler\) must be one of"),
        ({"truncated_batch_size": 8}, r"--dp-max-batch\) must be an integer ≥ the expected batch size 16"),
        ({"truncated_batch_size": 32, "accountant": "rdp"}, "RDP accountant has no truncated Poisson event"),
    ],
)
def test_bad_dp_settings_name_their_flag(changes, match):
    with pytest.raises(ValueError, match=match):
        dp.DPConfig(**{"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 16, **changes})


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--dp-clip", "0", "--dp-noise", "1"], "l2_norm_clip C (--dp-clip) must be a finite number > 0"),
        (["--dp-clip", "1", "--dp-noise", "-1"], "noise_multiplier σ (--dp-noise) must be a finite number ≥ 0"),
        (["--dp-clip", "1"], "--dp-clip needs --dp-noise"),
        (["--dp-max-batch", "80"], "--dp-max-batch needs --dp-clip"),
        (["--dp-insecure-seed"], "--dp-insecure-seed needs --dp-clip"),
        (["--dp-clip", "1", "--dp-noise", "1", "--model", "resnet8"], "BatchNorm in training mode"),
    ],
)
def test_train_refuses_bad_dp_settings_with_exit_2(argv, fragment, tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
