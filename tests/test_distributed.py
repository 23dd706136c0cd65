"""A real 2-process SAM run with jax.distributed (gloo, 127.0.0.1 only).

Two subprocesses (tests/distributed_worker.py) with 2 fake CPU devices each
train with per-shard ε through ``sam_optax.parallel.data_parallel_step`` over a
4-device global mesh. Both must end with identical params, equal to the same
training on a 1-process 4-device mesh (this process's first 4 devices).

The children run under an outer timeout; on any failure (a crash, a hang, a
peer aborted by the coordination service) both are killed by their own PIDs
and the test fails with their output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import distributed_worker as worker
import jax
import numpy as np
import pytest

TIMEOUT_S = 90  # outer bound; the run itself takes ~10-20 s on 2 busy cores
NUM_PROCESSES = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def run_workers(tmp_path):
    """Start the workers; None on success, else their exit codes and logs."""
    port = free_port()
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs, logs = [], []
    codes = [None] * NUM_PROCESSES
    try:
        for i in range(NUM_PROCESSES):
            log = open(tmp_path / f"worker{i}.log", "w")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, worker.__file__, str(i), str(NUM_PROCESSES),
                 str(port), str(tmp_path / f"params{i}.npz")],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if any(code not in (None, 0) for code in codes):
                break  # a failed peer: do not wait for the survivor
            if all(code == 0 for code in codes):
                return None
            time.sleep(0.2)
        codes = [proc.poll() for proc in procs]
    finally:
        kill(procs)
        for log in logs:
            log.close()
    output = "\n".join(
        f"--- worker {i} (exit {codes[i]}):\n"
        + (tmp_path / f"worker{i}.log").read_text()[-3000:]
        for i in range(NUM_PROCESSES))
    return f"workers failed or timed out after {TIMEOUT_S} s:\n{output}"


def test_two_processes_match_one_process_reference(tmp_path):
    if jax.device_count() < 4:
        pytest.skip("the 1-process reference needs 4 (fake) devices")
    error = run_workers(tmp_path)
    assert error is None, error
    results = [dict(np.load(tmp_path / f"params{i}.npz"))
               for i in range(NUM_PROCESSES)]
    for k in results[0]:
        np.testing.assert_array_equal(results[1][k], results[0][k])
    expected = worker.train(jax.devices()[:4])
    initial, _, _ = worker.make_problem()
    for k in expected:
        # The run did move the params, and both processes agree with the
        # single-process run up to the summation order of the all-reduce.
        assert np.max(np.abs(expected[k] - initial[k])) > 1e-3
        np.testing.assert_allclose(results[0][k], expected[k],
                                   rtol=1e-5, atol=1e-6)


def test_failed_peer_is_reported_and_survivor_killed(tmp_path, monkeypatch):
    """Worker 1 dies at once: the harness must not wait for worker 0."""
    monkeypatch.setenv("DISTRIBUTED_WORKER_FAIL", "1")
    started = time.monotonic()
    error = run_workers(tmp_path)
    assert error is not None and "exit 3" in error
    assert time.monotonic() - started < TIMEOUT_S / 2
    assert not (tmp_path / "params0.npz").exists()
