"""A real 2-process SAM run with jax.distributed (gloo, 127.0.0.1 only).

Two subprocesses (tests/distributed_worker.py) with 2 fake CPU devices each
train through ``sam_optax.parallel.data_parallel_step`` over a 4-device
global mesh, with per-chunk ε and with ε grouped across the processes. Both
must end with identical params, equal to a per-chunk float64 NumPy reference
(each chunk's ε from its own, or its group's, gradient; the perturbed
gradients averaged over the chunks).

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
import numpy as np

TIMEOUT_S = 90  # outer bound; the run itself takes ~10-25 s on 2 busy cores
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


def np_grad(params, x, y):
    """Gradient of the mean softmax cross-entropy, by hand in float64."""
    logits = x @ params["w"] + params["b"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    probs /= len(y)
    return {"w": x.T @ probs, "b": probs.sum(axis=0)}


def reference(epsilon_groups):
    """SGD + momentum on SAM gradients over 4 chunks of the global batch.

    ``epsilon_groups`` lists, per ε, the chunks whose mean gradient defines
    it: ``ε = ρ ḡ / ‖ḡ‖``. Each chunk i takes its gradient at ``w + ε`` of
    its group; ``base_tx`` receives the mean over the chunks.
    """
    params, x, y = worker.make_problem()
    w = {k: v.astype(np.float64) for k, v in params.items()}
    x = x.astype(np.float64)
    trace = {k: np.zeros_like(v) for k, v in w.items()}
    chunks = np.split(np.arange(worker.GLOBAL_BATCH), 4)
    for _ in range(worker.STEPS):
        g_sam = {k: np.zeros_like(v) for k, v in w.items()}
        for group in epsilon_groups:
            g = np_grad(w, x[np.concatenate([chunks[c] for c in group])],
                        y[np.concatenate([chunks[c] for c in group])])
            norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
            perturbed = {k: w[k] + worker.RHO * g[k] / norm for k in w}
            for c in group:
                gc = np_grad(perturbed, x[chunks[c]], y[chunks[c]])
                for k in w:
                    g_sam[k] += gc[k] / len(chunks)
        for k in w:
            trace[k] = g_sam[k] + worker.MOMENTUM * trace[k]
            w[k] = w[k] - worker.LR * trace[k]
    return w


EPSILON_GROUPS = {  # worker.CONFIGS -> the chunks sharing each ε
    "per_shard": [[0], [1], [2], [3]],
    "grouped": [[0, 2], [1, 3]],  # across the processes
}


def test_reference_configurations_differ():
    """The references are far enough apart for the test to tell a global,
    per-process or ungrouped ε from the one asked for."""
    refs = {name: reference(groups) for name, groups in {
        **EPSILON_GROUPS, "global": [[0, 1, 2, 3]],
        "per_process": [[0, 1], [2, 3]]}.items()}
    for a in refs:
        for b in refs:
            if a < b:
                assert max(np.max(np.abs(refs[a][k] - refs[b][k]))
                           for k in refs[a]) > 1e-4, (a, b)


def test_two_processes_match_per_chunk_reference(tmp_path):
    error = run_workers(tmp_path)
    assert error is None, error
    results = [dict(np.load(tmp_path / f"params{i}.npz"))
               for i in range(NUM_PROCESSES)]
    assert sorted(results[0]) == sorted(
        f"{name}.{k}" for name in worker.CONFIGS for k in ("b", "w"))
    for k in results[0]:
        np.testing.assert_array_equal(results[1][k], results[0][k])
    initial, _, _ = worker.make_problem()
    for name, groups in EPSILON_GROUPS.items():
        expected = reference(groups)
        for k in expected:
            # The run did move the params, and both processes agree with the
            # float64 reference up to float32 rounding.
            assert np.max(np.abs(expected[k] - initial[k])) > 1e-3
            np.testing.assert_allclose(results[0][f"{name}.{k}"], expected[k],
                                       rtol=2e-5, atol=2e-6,
                                       err_msg=f"{name}, leaf {k}")


def test_failed_peer_is_reported_and_survivor_killed(tmp_path, monkeypatch):
    """Worker 1 dies at once: the harness must not wait for worker 0."""
    monkeypatch.setenv("DISTRIBUTED_WORKER_FAIL", "1")
    started = time.monotonic()
    error = run_workers(tmp_path)
    assert error is not None and "exit 3" in error
    assert time.monotonic() - started < TIMEOUT_S / 2
    assert not (tmp_path / "params0.npz").exists()
