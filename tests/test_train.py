"""The trainer (sam_optax.train): data, bad input, resume, many processes.

Tiny jobs on digits (an MLP of 16 units, a few dozen steps) on 2 of the 8 fake
CPU devices (``config.num_devices``), so the whole file stays fast.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("ml_collections")
pytest.importorskip("tensorboardX")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sam_optax.train import data, optim, trainer  # noqa: E402
from sam_optax.train.configs import default  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "sam_optax", "train", "configs", "digits.py")
TIMING = ("time_epoch_s", "time_step_ms")
PROCESS_TIMEOUT_S = 120


def tiny_config(**overrides):
    config = default.get_config()
    config.mlp.hidden = (16,)
    config.batch_size = 32
    config.num_epochs = 2
    config.num_devices = 2
    config.train_size = 320  # 10 steps per epoch
    config.eval_batch_size = 256
    config.checkpoint_every_steps = 4
    config.progress_bar = False
    config.label_noise = 0.2
    config.sam.rho = 0.1
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """One uninterrupted tiny SAM job, shared by several tests."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    result = trainer.train_and_evaluate(tiny_config(), workdir)
    return workdir, result


# ------------------------------------------------------------------- data


def test_idx_files_round_trip_gzipped_or_not(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5)}
    for i, (name, array) in enumerate(arrays.items()):
        # Half the files gzipped, half plain: the loader takes either.
        data.write_idx(tmp_path / (name + (".gz" if i % 2 else "")),
                       array.astype(np.uint8))
    x_train, y_train, x_test, y_test = data.load_fashion_mnist(str(tmp_path))
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (5, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    expected = arrays["train-images-idx3-ubyte"].astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(x_train[..., 0], expected)
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])
    # The header by hand: magic 0x00000801, one dimension of size 3.
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    with gzip.open(tmp_path / "by_hand.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "by_hand.gz"), [7, 8, 9])


def test_idx_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="short.*truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "text")
    with pytest.raises(FileNotFoundError,
                       match="train-images-idx3-ubyte.*data_dir"):
        data.load_fashion_mnist(str(tmp_path))
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        with pytest.raises(FileNotFoundError,
                           match="apt-get install -y dataset-fashion-mnist"):
            data.load_fashion_mnist()


def test_fashion_mnist_job_reads_a_data_dir(tmp_path):
    """The Fashion-MNIST path end to end, on IDX files the test writes."""
    rng = np.random.default_rng(1)
    for name, n in (("train", 200), ("t10k", 40)):
        data.write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz",
                       rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        data.write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz",
                       rng.integers(0, 10, n).astype(np.uint8))
    config = tiny_config(dataset="fashion_mnist", data_dir=str(tmp_path),
                         train_size=0, num_epochs=1)
    result = trainer.train_and_evaluate(config, str(tmp_path / "job"))
    assert result.step == 180 // 32 and not result.preempted
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0


def test_label_noise_is_seeded_symmetric_and_spares_the_test_set():
    labels = np.arange(5000) % 10
    noisy, flipped = data.symmetric_label_noise(labels, 0.4, 7, 10)
    again, _ = data.symmetric_label_noise(labels, 0.4, 7, 10)
    np.testing.assert_array_equal(noisy, again)
    assert abs(flipped.mean() - 0.4) < 0.03
    assert np.all(noisy[flipped] != labels[flipped])  # always another class
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    # Every wrong class about equally often (symmetric).
    counts = np.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].max()
    splits = data.load("digits", seed=3, label_noise=0.5)
    clean = data.load("digits", seed=3, label_noise=0.0)
    np.testing.assert_array_equal(splits.y_test, clean.y_test)
    np.testing.assert_array_equal(splits.y_train_clean, clean.y_train)
    assert 0.4 < np.mean(splits.y_val != clean.y_val) < 0.6  # held-out: noisy


def test_epoch_order_and_host_slices():
    order = data.epoch_order(5, 3, 100)
    np.testing.assert_array_equal(order, data.epoch_order(5, 3, 100))
    assert not np.array_equal(order, data.epoch_order(5, 4, 100))
    assert sorted(order) == list(range(100))
    for step in range(3):
        slices = [data.host_batch_indices(order, step, 32, i, 4) for i in range(4)]
        np.testing.assert_array_equal(np.concatenate(slices),
                                      order[32 * step:32 * (step + 1)])
    batches = list(data.padded_batches(np.arange(10.0), np.arange(10), 4))
    assert sum(w.sum() for _, _, w in batches) == 10


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, match", [
    ({"optimizer": "adam_sam"}, r"unknown `optimizer` 'adam_sam'; valid: sgd, sam"),
    ({"dataset": "cifar10"}, r"unknown `dataset` 'cifar10'; valid: digits, "
                             "fashion_mnist"),
    ({"model": "vit"}, r"unknown `model` 'vit'"),
    ({"base_optimizer": "lion"}, r"unknown `base_optimizer` 'lion'"),
    ({"batch_size": 33}, r"`batch_size` 33 does not divide over the 2 devices"),
    ({"m": 5}, r"`m` 5 does not divide the per-device batch 16"),
    ({"num_devices": 99}, r"`num_devices` 99 exceeds"),
    ({"optimizer": "vasso"}, r"`vasso` keeps a momentum.*sync_perturbation=true"),
    ({"train_size": 10**6}, r"`train_size` 1000000 must be between 1 and"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, override,
                                                         match):
    workdir = tmp_path / "job"
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(tiny_config(**override), str(workdir))
    assert not workdir.exists()


def test_unknown_config_key_is_refused(tmp_path, monkeypatch):
    config = tiny_config()
    with config.unlocked():
        config.sam.rhoo = 0.1  # a typo in a user's config file
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['sam.rhoo'\]"):
        trainer.train_and_evaluate(config, str(tmp_path))
    # On the command line, ml_collections refuses it while parsing.
    with pytest.raises(AttributeError, match='Did you mean "rho"'):
        parse_command_line(monkeypatch, "--config.sam.rhoo=0.1")
    config = parse_command_line(monkeypatch, "--config.gsam.alpha=0.3",
                                "--config.optimizer=gsam",
                                "--config.mlp.hidden=(8,8)")
    assert config.gsam.alpha == 0.3 and config.mlp.hidden == (8, 8)
    assert config.optimizer == "gsam"


def parse_command_line(monkeypatch, *overrides):
    """The trainer's `--config` flag parsed from a command line."""
    argv = ["sam-optax-train", f"--config={DIGITS_CONFIG}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values,
                                    lock_config=True)
    values(argv)
    return values.config


def test_every_constructor_is_selectable_by_name():
    for name in optim.SAM_METHODS:
        config = tiny_config(optimizer=name)
        tx = optim.create(config, total_steps=10, axis_name="data")
        assert callable(tx.update), name
    with pytest.raises(ValueError, match=r"`looksam` takes no hyperparameter"):
        config = tiny_config(optimizer="looksam")
        config.looksam.gamma = 0.9
        optim.create(config, total_steps=10)


def test_workdir_of_another_config_is_refused_untouched(finished_job):
    workdir, _ = finished_job
    before = {name: os.path.getmtime(os.path.join(workdir, name))
              for name in ("metrics.jsonl", "config.json", "report.md")}
    with pytest.raises(ValueError, match=r"different config \(sam.rho: "
                       r"checkpoint 0.1 vs now 0.2"):
        trainer.train_and_evaluate(tiny_config(**{"sam.rho": 0.2}), workdir)
    after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
    assert before == after
    # Run-control keys may change: a finished job returns at once.
    result = trainer.train_and_evaluate(
        tiny_config(checkpoint_every_steps=3), workdir)
    assert result.step == 20 and len(read_rows(workdir)) == 2


# ------------------------------------------------------ the job and resume


def test_job_writes_metrics_tensorboard_and_report(finished_job):
    workdir, result = finished_job
    rows = read_rows(workdir)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 20
    for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy",
                "sharpness", "grad_norm", "perturbed_fraction", "time_step_ms"):
        assert np.isfinite(rows[-1][key]), key
    assert rows[-1]["perturbed_fraction"] == 1.0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| 2 |" in report and "curves.png" in report
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
    assert result.metrics == rows[-1]


def test_sigterm_then_rerun_is_bit_identical(finished_job, tmp_path):
    workdir, uninterrupted = finished_job
    interrupted = str(tmp_path / "job")

    def preempt(step):
        if step == 13:  # mid-epoch, one step after a checkpoint
            os.kill(os.getpid(), signal.SIGTERM)

    first = trainer.train_and_evaluate(tiny_config(), interrupted,
                                       step_callback=preempt)
    assert first.preempted and first.step == 13
    assert len(read_rows(interrupted)) == 1
    # The SIGTERM handler is gone again.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = trainer.train_and_evaluate(tiny_config(), interrupted)
    assert resumed.step == 20 and not resumed.preempted
    for a, b in zip(leaves(resumed.state.params),
                    leaves(uninterrupted.state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(resumed.state.opt_state),
                    leaves(uninterrupted.state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_timing(read_rows(interrupted)) == without_timing(
        read_rows(workdir))


def test_devices_equal_chunks_with_batchnorm(tmp_path):
    """ε per device on 2 devices == ε per chunk of the same m on one device,
    for a ResNet with BatchNorm (statistics averaged over devices/chunks)."""
    common = dict(model="resnet", **{"resnet.width": 4, "resnet.stages": 1},
                  num_epochs=1, train_size=96, label_noise=0.0)
    on_devices = trainer.train_and_evaluate(
        tiny_config(num_devices=2, **common), str(tmp_path / "devices"))
    chunked = trainer.train_and_evaluate(
        tiny_config(num_devices=1, m=16, **common), str(tmp_path / "chunks"))
    for a, b in zip(leaves((on_devices.state.params, on_devices.state.batch_stats)),
                    leaves((chunked.state.params, chunked.state.batch_stats)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


# ----------------------------------------------- two processes, one machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(commands, env, logs, timeout):
    """Start the commands; None on success, else their codes and logs.
    On failure or timeout every child is killed by its own PID."""
    procs, files = [], []
    codes = [None] * len(commands)
    try:
        for command, log in zip(commands, logs, strict=True):
            handle = open(log, "w")  # noqa: SIM115
            files.append(handle)
            procs.append(subprocess.Popen(command, stdout=handle,
                                          stderr=subprocess.STDOUT, env=env,
                                          cwd=ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                break
            if all(c == 0 for c in codes):
                return None
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        for handle in files:
            handle.close()
    return "\n".join(f"--- process {i} (exit {codes[i]}):\n"
                     + open(log).read()[-3000:] for i, log in enumerate(logs))


def test_two_processes_equal_one_process(tmp_path):
    """`python -m sam_optax.train` on 2 processes x 1 CPU device (gloo on
    127.0.0.1) equals one process on 2 devices with the same global batch."""
    flags_ = ["--config.mlp.hidden=(16,)", "--config.batch_size=32",
              "--config.num_epochs=1", "--config.train_size=320",
              "--config.eval_batch_size=256", "--config.progress_bar=false",
              "--config.label_noise=0.2", "--config.sam.rho=0.1",
              "--config.checkpoint_every_steps=0", "--config.num_devices=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port = _free_port()
    multi = str(tmp_path / "multi")
    commands = [[sys.executable, "-m", "sam_optax.train", f"--workdir={multi}",
                 f"--config={DIGITS_CONFIG}", *flags_,
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"] for i in range(2)]
    error = _run_processes(commands, env, [tmp_path / f"p{i}.log" for i in range(2)],
                           PROCESS_TIMEOUT_S)
    assert error is None, error
    config = tiny_config(num_epochs=1, checkpoint_every_steps=0, num_devices=2)
    single = trainer.train_and_evaluate(config, str(tmp_path / "single"))
    rows_multi, rows_single = read_rows(multi), read_rows(str(tmp_path / "single"))
    assert len(rows_multi) == len(rows_single) == 1
    for a, b in zip(without_timing(rows_multi), without_timing(rows_single)):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-6)
    step, state = trainer.load_checkpoint(multi)
    assert step == single.step == 10
    for a, b in zip(leaves(state["params"]), leaves(single.state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_command_line_job_stops_cleanly_on_sigterm(tmp_path):
    """`python -m sam_optax.train` killed by SIGTERM (by its PID) writes a
    checkpoint, says how to resume and exits with status 0."""
    workdir = tmp_path / "job"
    command = [sys.executable, "-m", "sam_optax.train", f"--workdir={workdir}",
               f"--config={DIGITS_CONFIG}", "--config.mlp.hidden=(16,)",
               "--config.batch_size=32", "--config.train_size=320",
               "--config.num_epochs=5000", "--config.num_devices=1",
               "--config.progress_bar=false", "--config.checkpoint_every_steps=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + PROCESS_TIMEOUT_S
            metrics = workdir / "metrics.jsonl"
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.exists() and metrics.read_text().strip():
                    break  # the job is training: preempt it
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-3000:]
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "rerun the same command to resume" in output
    step, state = trainer.load_checkpoint(str(workdir))
    assert 10 <= step < 50000 and int(state["step"]) == step
