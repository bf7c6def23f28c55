"""Training across processes, as JAX's own tests/multiprocess suite runs it: real local processes
that call `jax.distributed.initialize` against a local coordinator, one CPU device each
(JAX_NUM_CPU_DEVICES=1), collectives over gloo (`jax_cpu_collectives_implementation`'s default).

- Two processes train `tiny` (BatchNorm) on digits as one process does on the same global
  batches, to float32 rounding; stopped after a checkpoint and resumed on two processes, they
  end bit for bit where an uninterrupted two-process run ends; process 0 alone writes and logs.
- The DP step and `per_example.quantities(mesh=)` across two processes equal one process's
  (tests/multiprocess_worker.py).
- A process that never joins, or one that dies mid-run, stops the others with a line naming it
  and the time waited, within bounded timeouts.

Every process a test starts is ended by that test (`_processes`), also when it fails. Each start
costs a JAX import and a compilation per process on this 2-core machine, so the tests that train
are slow (tests/conftest.py:SLOW); the never-joining one is fast.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_resnet import checkpoints, launch, train

pytestmark = pytest.mark.xdist_group("test_multiprocess")

PACKAGE = Path(train.__file__).resolve().parents[1]
TIMEOUT = 420  # seconds for one launch of two processes on a busy 2-core machine
# The run of the equality and resume tests: tiny (BatchNorm) on digits, 1347 examples, 5 steps of 256 per epoch;
# a constant learning rate, so that --epochs 1 then --resume --epochs 2 is the same run as --epochs 2.
RUN = train.TrainConfig(
    model="tiny", dataset="digits", batch_size=256, epochs=2, schedule="constant", skip_grad_check=True
)
FLAGS = ["--model", "tiny", "--dataset", "digits", "--batch-size", "256", "--schedule", "constant"]
FLAGS += ["--no-grad-check", "--no-progress"]


def _env() -> dict:
    # x64 as in this process (tests/conftest.py), so that the one-process reference here matches.
    return dict(os.environ, PYTHONPATH=str(PACKAGE), JAX_PLATFORMS="cpu", JAX_ENABLE_X64=str(jax.config.jax_enable_x64))


@contextlib.contextmanager
def _processes(argv, n, tmp_path, name):
    """Start `python *argv` as processes 0..n-1 of one run, their output in files; end every one on exit."""
    logs = [open(tmp_path / f"{name}-{i}.log", "w") for i in range(n)]
    processes = launch.start(argv, n, devices_per_process=1, env=_env(), outputs=logs, cwd=tmp_path)
    try:
        yield processes
    finally:
        launch.stop(processes, grace=5)
        for f in logs:
            f.close()


def _run(argv, tmp_path, name, n=2) -> list[str]:
    """Run `python *argv` as n processes to the end; their outputs (each exit status checked)."""
    with _processes(argv, n, tmp_path, name) as processes:
        codes = [p.wait(timeout=TIMEOUT) for p in processes]
    outputs = [(tmp_path / f"{name}-{i}.log").read_text() for i in range(n)]
    assert codes == [0] * n, "\n".join(outputs)
    return outputs


def _train(tmp_path, name, *flags) -> list[str]:
    return _run(["-m", "jax_resnet", "train", *FLAGS, *flags], tmp_path, name)


def _max_rel_err(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(
        float(np.max(np.abs(np.float64(u) - np.float64(v)))) / max(float(np.max(np.abs(np.float64(v)))), 1e-30)
        for u, v in pairs
    )


def test_two_processes_train_as_one_and_resume_bit_identically(tmp_path):
    one = tmp_path / "one"
    train.train(dataclasses.replace(RUN, out=str(one), devices=1), observers=[])
    outputs = _train(tmp_path, "two", "--epochs", "2", "--out", "two")
    _train(tmp_path, "first", "--epochs", "1", "--out", "resumed")
    resumed_outputs = _train(tmp_path, "resumed", "--epochs", "2", "--out", "resumed", "--resume")

    (two, meta), (reference, _) = checkpoints.load(tmp_path / "two"), checkpoints.load(one)
    assert meta["step"] == 10 and json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2
    # Global-batch BatchNorm statistics and all-reduced gradients: one process's run, to float32 rounding.
    # Measured (10 Adam steps): parameters 8.9e-7, BatchNorm statistics 4.3e-7, Adam's moments 1.1e-6, each
    # relative to its array's largest entry.
    errors = {part: _max_rel_err(two[part], reference[part]) for part in ("params", "state", "opt_state")}
    print("two processes vs one, max relative error:", errors)
    assert max(errors.values()) <= 1e-5, errors

    resumed, meta = checkpoints.load(tmp_path / "resumed")
    assert meta["step"] == 10
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [
        [json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("two", "resumed")
    ]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]

    # Process 0 alone logs and writes; process 1 says nothing of its own (gloo's connection line aside).
    for out in (outputs, resumed_outputs):
        assert out[0].count("done: test accuracy") == 1
        assert [line for line in out[1].splitlines() if not line.startswith("[Gloo]")] == []
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == ["checkpoints", "config.json", "confusion.png", "curves.png", "metrics.json", "metrics.jsonl"]


def test_dp_step_and_per_example_quantities_across_two_processes_equal_one_process(tmp_path):
    _run([str(PACKAGE / "tests" / "multiprocess_worker.py"), str(tmp_path / "results.npz")], tmp_path, "worker")
    results = np.load(tmp_path / "results.npz")
    names = [k.removeprefix("one/") for k in results if k.startswith("one/")]
    assert {n.split("[")[0] for n in names} == {"dp_params", "loss", "batch_l2", "sum_grad_squared", "variance"}
    # Measured: DP parameters 9.3e-8, per-example quantities 6.1e-7, the loss 0, relative to each array's largest
    # entry (float32 sums in another order).
    errors = {n: _max_rel_err(results[f"every/{n}"], results[f"one/{n}"]) for n in names}
    worst = max(errors, key=errors.get)
    for kind in ("dp_params", "loss", "batch_l2", "sum_grad_squared", "variance"):
        print(kind, "max relative error:", max(e for n, e in errors.items() if n.startswith(kind)))
    assert errors[worst] <= 1e-5, (worst, errors[worst])
    assert results["one/batch_l2['head']['w']"].shape == (16,)  # every process's examples, gathered


def test_a_process_that_never_joins_stops_the_other_with_a_clear_error(tmp_path):
    """Process 0 of 2 alone: after --join-timeout 5 s it stops (status 1) with one line naming process 1 and the wait,
    long before JAX's own timeout (5 + 60 s) would abort it."""
    argv = ["-m", "jax_resnet", "train", *FLAGS, "--out", "alone", "--join-timeout", "5"]
    log = tmp_path / "alone.log"
    with open(log, "w") as f:
        env = dict(_env(), JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{launch.free_port()}"
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, *argv], env=env, stdout=f, stderr=f, cwd=tmp_path)
        try:
            status = process.wait(timeout=120)
        finally:
            launch.stop([process], grace=5)
    waited = time.monotonic() - started
    output = log.read_text()
    assert status == 1, output
    assert "process 0 of 2 waited 5 s at coordinator 127.0.0.1:" in output and "process 1 never joined" in output
    assert waited < 60, waited  # the watchdog, not JAX's abort at 65 s
    assert not (tmp_path / "alone" / "checkpoints").exists()


def test_a_process_that_dies_mid_run_stops_the_other_naming_it(tmp_path):
    """Process 1 killed a second into epoch 2 (21 steps of 64): process 0 stops, naming process 1, within
    JAX's heartbeat timeout (here 20 s) and a margin. Caught in a collective, which is where a process spends
    most of an epoch, it is our one line, at once (exit status 1); caught outside one (orbax's barrier at
    a checkpoint), it is JAX's own abort at the heartbeat timeout, whose message names the task too."""
    argv = ["-m", "jax_resnet", "train", *FLAGS, "--batch-size", "64", "--epochs", "100", "--out", "dies"]
    argv += ["--heartbeat-timeout", "20"]
    with _processes(argv, 2, tmp_path, "dies") as (first, second):
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "dies" / "checkpoints" / "21").is_dir():
            assert time.monotonic() < deadline and first.poll() is None and second.poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
        second.kill()
        killed = time.monotonic()
        status = first.wait(timeout=120)
        stopped = time.monotonic() - killed
    output = (tmp_path / "dies-0.log").read_text()
    ours = "jax-resnet train: error: process 0 of 2: process 1 stopped answering (in epoch 2"
    jax_abort = "The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    assert (status == 1 and ours in output) or (status != 0 and jax_abort in output), output
    assert stopped < 20 + 30, stopped
    print(f"process 0 stopped {stopped:.1f} s after process 1 was killed, status {status}")
