"""``--num-processes N``: run an experiment as N local processes joined by ``jax.distributed``.

:func:`spawn` (the launcher) starts ``python -m experiments.<name> <same flags>`` N times with
``JAXCOMPRESS_COORDINATOR=127.0.0.1:<free port>``, ``JAXCOMPRESS_NUM_PROCESSES=N`` and
``JAXCOMPRESS_PROCESS_ID=i``; each child calls :func:`join` before touching a device, which
starts the multi-controller runtime through :func:`jaxcompress.sharding.initialize` (bounded
wait for the coordinator, ``JAXCOMPRESS_INIT_TIMEOUT`` seconds, default 120; gloo collectives
on CPU). Process 0 keeps the terminal; the others write nothing there (their stderr is kept
and shown if they fail). When one process fails the others are stopped; every child is reaped
before the launcher returns.

On a real pod the same experiment runs as one process per host, started by the cluster's own
launcher with those three variables set (or with ``jax.distributed.initialize()``'s automatic
detection on TPU and SLURM): see ``docs/scaling.md``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

COORDINATOR = "JAXCOMPRESS_COORDINATOR"
NUM_PROCESSES = "JAXCOMPRESS_NUM_PROCESSES"
PROCESS_ID = "JAXCOMPRESS_PROCESS_ID"
INIT_TIMEOUT = "JAXCOMPRESS_INIT_TIMEOUT"

#: Seconds the launcher waits for the other processes to stop after one failed.
GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as handle:
            text = handle.read().strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate every running child, kill it after :data:`GRACE_S`, and reap them all."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn(num_processes: int, argv: list[str], *, module: str) -> int:
    """Run ``python -m module *argv`` as ``num_processes`` processes of one distributed job.

    Returns:
      0 when every process succeeded, else the exit status of the first one that failed
      (its last stderr lines are printed, naming the process).
    """
    port = _free_port()
    logs = [
        tempfile.NamedTemporaryFile("w+", prefix=f"jc-process{i}-", suffix=".log", delete=False)
        for i in range(1, num_processes)
    ]
    procs: list[subprocess.Popen] = []

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # so that the children are stopped and reaped below

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for i in range(num_processes):
            env = {
                **os.environ,
                COORDINATOR: f"127.0.0.1:{port}",
                NUM_PROCESSES: str(num_processes),
                PROCESS_ID: str(i),
            }
            io = {} if i == 0 else {"stdout": subprocess.DEVNULL, "stderr": logs[i - 1]}
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env, **io))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                _stop(procs)
                detail = "" if i == 0 else _tail(logs[i - 1].name)
                print(
                    f"{module}: process {i} of {num_processes} failed with exit status {code}"
                    + (f":\n{detail}" if detail else "; the others were stopped"),
                    file=sys.stderr,
                )
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, previous)
        for log in logs:
            log.close()
            os.unlink(log.name)


def join() -> bool:
    """In a process started by :func:`spawn` (or by a cluster launcher that sets the same
    variables): start ``jax.distributed`` before any device is used. Returns whether it did.

    Raises:
      TimeoutError: the coordinator could not be reached within the timeout (naming it).
      ValueError, RuntimeError: bad variables, or the runtime failed to start.
    """
    import jax

    timeout = float(os.environ.get(INIT_TIMEOUT) or 120.0)
    # CPU collectives across processes (a no-op for accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxcompress import sharding

    return sharding.initialize(timeout_s=timeout)
