"""Start N local processes of one `jax-resnet` command, as one multi-process run (for testing on one machine).

    python -m jax_resnet.launch -n 2 -- train --model tiny --out runs/two
    python -m jax_resnet.launch -n 2 --devices-per-process 2 -- train --out runs/four   # 4 CPU devices in all

It only starts processes: process i gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free
port), JAX_NUM_PROCESSES = N and JAX_PROCESS_ID = i in its environment (`jax_resnet.distributed`
reads them) and, with --devices-per-process, JAX_NUM_CPU_DEVICES. Their output goes where
the launcher's goes. It waits for all; when one exits with an error it says which, gives
the others --grace seconds to stop by themselves (JAX's heartbeat or a failed collective
stops them), then ends those still running. Its exit status is the first error's, else 0.
On a cluster, start one process per host with the scheduler instead (`--cluster`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from jax_resnet.distributed import ENV

__all__ = ["free_port", "start", "stop", "wait", "main"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], n: int, devices_per_process: int | None = None, *, env=None, outputs=None, **popen) -> list:
    """Start `python *argv` (e.g. ["-m", "jax_resnet", "train", ...]) as processes 0..n-1 of one run, in
    `env` (default this process's environment) with the run's variables added; return the
    `subprocess.Popen`s in order. `outputs`: a file per process for its stdout and stderr (default:
    this process's); `popen`: further `subprocess.Popen` options, the same for all."""
    base = dict(os.environ if env is None else env, **{ENV["coordinator"]: f"127.0.0.1:{free_port()}"})
    base[ENV["num_processes"]] = str(n)
    if devices_per_process is not None:
        base["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    processes = []
    for i in range(n):
        out = None if outputs is None else outputs[i]
        io = {} if out is None else {"stdout": out, "stderr": subprocess.STDOUT}
        env_i = {**base, ENV["process_id"]: str(i)}
        processes.append(subprocess.Popen([sys.executable, *argv], env=env_i, **io, **popen))
    return processes


def stop(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """End every process still running: SIGTERM, then SIGKILL after `grace` seconds."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait(processes: list[subprocess.Popen], grace: float, log=lambda s: print(s, file=sys.stderr)) -> int:
    """Wait for every process; after the first failure, `grace` seconds for the rest. The first error's status."""
    status, deadline = 0, None
    running = dict(enumerate(processes))
    while running:
        for i, p in list(running.items()):
            code = p.poll()
            if code is None:
                continue
            del running[i]
            if code != 0 and status == 0:
                status, deadline = code, time.monotonic() + grace
                log(
                    f"jax_resnet.launch: process {i} exited with status {code}; waiting up to {grace:g} s for the others"
                )
        if deadline is not None and running and time.monotonic() > deadline:
            log(
                f"jax_resnet.launch: ending process(es) {', '.join(map(str, running))}, still running {grace:g} s later"
            )
            stop(list(running.values()))
            break
        time.sleep(0.1)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_resnet.launch", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="how many processes to start")
    parser.add_argument("--devices-per-process", type=int, default=None, help="CPU devices per process")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds the others get after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the jax-resnet command and its flags")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.num_processes < 1 or not command:
        parser.error("expected -n N (N ≥ 1) and, after --, a jax-resnet command such as `train --out runs/x`")
    processes = start(["-m", "jax_resnet", *command], args.num_processes, args.devices_per_process)
    try:
        return wait(processes, args.grace)
    except KeyboardInterrupt:
        stop(processes)
        return 128 + signal.SIGINT
    finally:
        stop(processes)


if __name__ == "__main__":
    sys.exit(main())
