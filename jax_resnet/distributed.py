"""Several processes, one run: JAX's multi-controller runtime (`jax.distributed`), with
bounded waits and failures that say which process and how long.

One process per host (or, for testing, several on one machine): each calls `initialize`
before anything touches a device, then runs the same program. `jax.devices()` then lists
every process's devices, the training mesh spans them (`step.make_mesh`), and each process
puts only its slice of a global batch on its own devices (`step.put_batch`). On the CPU
the processes' collectives go over gloo (`jax_cpu_collectives_implementation`, JAX's
default); on GPUs over NCCL.

    jax-resnet train --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 --out /shared/run  # host 0
    jax-resnet train --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1 --out /shared/run  # host 1
    jax-resnet train --cluster --out /shared/run      # under SLURM, Open MPI, on TPU pods: JAX detects the rest
    python -m jax_resnet.launch -n 2 -- train --out runs/two   # two local processes (testing)

Failures JAX leaves silent or fatal become one line each:

- A process that never joins: `jax.distributed.initialize` blocks until its own timeout and
  then aborts the process from C++ with a message that names neither the missing process
  nor the wait. Here a watchdog ends the waiting process first, after `join_timeout`
  seconds, with one line (`join_timeout_message`) naming this process, the missing ones when it can tell
  (of two processes, the other), the coordinator and the time waited.
- A process that dies mid-run: the others' next collective fails at once (gloo: "Connection
  closed by peer"); `lost` turns that into a `ProcessLost` error naming the process(es) that
  may have gone, the step and the time since the run started. Processes not in a collective
  learn it from JAX's heartbeat after `heartbeat_timeout` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

__all__ = [
    "ENV",
    "JOIN_TIMEOUT",
    "HEARTBEAT_TIMEOUT",
    "ProcessLost",
    "settings",
    "initialize",
    "join_timeout_message",
    "lost",
    "leave",
]

# Read by `initialize` where the flags are not given; the launcher (`jax_resnet.launch`) sets them.
# JAX itself reads JAX_COORDINATOR_ADDRESS only.
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
JOIN_TIMEOUT = 300  # seconds a process waits for all to join (JAX's initialization_timeout default)
HEARTBEAT_TIMEOUT = 100  # seconds without a heartbeat before JAX declares a process dead (JAX's default)
_JAX_GRACE = 60  # JAX's own join timeout is longer, so that the watchdog speaks first


class ProcessLost(RuntimeError):
    """A process of the run stopped answering mid-run."""


def settings(coordinator=None, num_processes=None, process_id=None) -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id): each given value, else its environment variable (`ENV`), else None."""
    env = {k: os.environ.get(v) for k, v in ENV.items()}
    coordinator = coordinator or env["coordinator"]
    num_processes = num_processes if num_processes is not None else _int(env["num_processes"], ENV["num_processes"])
    process_id = process_id if process_id is not None else _int(env["process_id"], ENV["process_id"])
    return coordinator, num_processes, process_id


def _int(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: bool = False,
    join_timeout: float = JOIN_TIMEOUT,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
) -> bool:
    """Join the run's other processes (`jax.distributed.initialize`); True if this is a multi-process run.

    With `cluster`, JAX detects everything from the environment (SLURM, Open MPI, TPU pods).
    Otherwise `coordinator` ("host:port" of process 0), `num_processes` and `process_id`
    come from the arguments or `ENV`; with none of them set this is a one-process run and
    nothing happens. A process still waiting for the others after `join_timeout` seconds
    writes one line naming itself, the missing process(es) where it can tell, the
    coordinator and the wait (`join_timeout_message`), and exits with status 1.

    Raises:
      ValueError: an incomplete or inconsistent set (the message names the missing flag).
    """
    if cluster:
        jax.distributed.initialize(
            initialization_timeout=int(join_timeout) + _JAX_GRACE, heartbeat_timeout_seconds=heartbeat_timeout
        )
        return jax.process_count() > 1
    coordinator, num_processes, process_id = settings(coordinator, num_processes, process_id)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [flag for flag, v in given.items() if v is None]
    if missing or coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            f"{', '.join(missing)}: a multi-process run needs --coordinator HOST:PORT, --num-processes N and "
            f"--process-id I together (or {', '.join(ENV.values())}), or --cluster"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}, got {process_id}"
        )
    if not (join_timeout > 0 and heartbeat_timeout > 0):
        raise ValueError(f"timeouts must be positive, got join {join_timeout}, heartbeat {heartbeat_timeout}")
    watchdog = threading.Timer(join_timeout, _gave_up, (coordinator, num_processes, process_id, join_timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=int(join_timeout) + _JAX_GRACE,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    finally:
        watchdog.cancel()
    return num_processes > 1


def _others(process_id: int, num_processes: int) -> str:
    others = [i for i in range(num_processes) if i != process_id]
    if len(others) == 1:
        return f"process {others[0]}"
    return "one or more of processes " + ", ".join(map(str, others))


def join_timeout_message(coordinator: str, num_processes: int, process_id: int, waited: float) -> str:
    return (
        f"process {process_id} of {num_processes} waited {waited:.0f} s at coordinator {coordinator} and "
        f"{_others(process_id, num_processes)} never joined; stopping. Start processes 0..{num_processes - 1}, "
        "each with the same --coordinator and --num-processes and its own --process-id"
    )


def _gave_up(coordinator: str, num_processes: int, process_id: int, waited: float) -> None:
    # The main thread is inside JAX's C++ connect, which no Python exception reaches: end the process here.
    sys.stdout.flush()
    print(f"jax-resnet: error: {join_timeout_message(coordinator, num_processes, process_id, waited)}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


# A failed collective between processes, as the CPU (gloo) and the coordination service report it.
_PEER_FAILURES = ("gloo", "connection closed by peer", "connection reset", "heartbeat", "coordination")


def lost(error: BaseException, where: str, since: float) -> ProcessLost | None:
    """The `ProcessLost` error `error` means in a multi-process run (a collective with a process that has gone),
    or None when it is something else. `where`: what this process was doing; `since`: `time.perf_counter()`
    at the start of the run."""
    if jax.process_count() == 1 or not any(s in str(error).lower() for s in _PEER_FAILURES):
        return None
    me, n = jax.process_index(), jax.process_count()
    first = " ".join(str(error).split())[:200]
    return ProcessLost(
        f"process {me} of {n}: {_others(me, n)} stopped answering ({where}, {time.perf_counter() - since:.0f} s "
        f"into the run): {first}. See that process's own output for why; resume from the last checkpoint "
        "with --resume once every process runs again"
    )


def leave(status: int) -> None:
    """End this process now with `status`, skipping JAX's shutdown barrier, which would wait
    `shutdown_timeout` for a process that is gone and then abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
