"""Training survives faults: real ``jbackprop train`` processes are killed with SIGKILL — once
inside a checkpoint write (deterministically: the process is started with ``os.replace``
wrapped so that the rename of epoch 2's complete temporary checkpoint waits to be killed), and
twice at random moments of an epoch (found by watching the checkpoint file) — and each time
``--resume`` continues from the last completed epoch, with a checkpoint that loads. The final
parameters, optimiser state and per-epoch metrics equal, bit for bit, those of an uninterrupted
run of the same configuration."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jbackprop.train import trainer

EPOCHS = 30
ARGS = ["--dataset", "digits", "--model", "mlp", "--width", "64", "--batch-size", "2",
        "--epochs", str(EPOCHS), "--seed", "5", "--no-progress"]
TIMEOUT = 240                                   # seconds for any one wait: a hung run fails
PAUSED = "paused before renaming"

# ``jbackprop train`` in a process whose ``os.replace`` waits, printing PAUSED, before the
# rename of the checkpoint numbered ``sys.argv[1]`` (1 = the first this process writes): its
# temporary file is then complete, and the checkpoint on disk is still the one before.
PAUSE_BEFORE_RENAME = f"""
import os, sys, time
import jbackprop.cli
pause_at, renames, real_replace = int(sys.argv[1]), [], os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == {trainer.CHECKPOINT!r}:
        renames.append(src)
        if len(renames) == pause_at:
            print({PAUSED!r}, src, flush=True)
            time.sleep({TIMEOUT})
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(jbackprop.cli.main(["train", *sys.argv[2:]]))
"""


@pytest.fixture
def processes():
    """The test's training processes; any still running at the end (a failed test) is killed."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _train(processes, out, *extra, pause_at=None):
    """Start ``python -m jbackprop train`` writing to ``out`` (with ``pause_at``: paused inside
    that checkpoint write, see PAUSE_BEFORE_RENAME); its output goes to a log."""
    log = open(f"{out}.log", "ab")
    if pause_at is None:
        cmd = [sys.executable, "-m", "jbackprop", "train", *extra]
    else:
        cmd = [sys.executable, "-c", PAUSE_BEFORE_RENAME, str(pause_at), *extra]
    processes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return processes[-1], log


def _wait(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class Checkpoint:
    """Watches ``out/checkpoint.npz``: a rename gives a new inode, read only when it changes."""

    def __init__(self, out):
        self.path, self.key, self.epoch = os.path.join(out, trainer.CHECKPOINT), None, 0

    def poll(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.epoch
        if (st.st_ino, st.st_mtime_ns) != self.key:
            self.epoch = trainer.checkpoint_metadata(self.path)["epoch"]   # JSON, no arrays
            self.key = (st.st_ino, st.st_mtime_ns)
        return self.epoch


def _kill(proc, log):
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT)
    log.close()
    assert proc.returncode == -signal.SIGKILL


def _check_after_kill(out, seen, previous_history):
    """The checkpoint loads; it holds every epoch that had completed when the process was seen
    last (``seen``), consecutively, and continues the history written before the restart."""
    state, history, _ = trainer.load_checkpoint(os.path.join(out, trainer.CHECKPOINT))
    epoch = int(state.epoch)
    assert seen <= epoch < EPOCHS
    assert [h["epoch"] for h in history] == list(range(1, epoch + 1))
    assert history[:len(previous_history)] == previous_history[:epoch]
    return epoch, history


def _kill_at_random(processes, out, rng, history):
    """Resume, let at least one more epoch complete, then SIGKILL at a uniformly random moment
    within one epoch's wall-clock time (measured between two checkpoints)."""
    proc, log = _train(processes, out, "--resume", out, "--no-progress")
    ckpt = Checkpoint(out)
    start = ckpt.poll()
    _wait(lambda: ckpt.poll() > start, "an epoch after resuming")
    first, t0 = ckpt.epoch, time.monotonic()
    _wait(lambda: ckpt.poll() > first, "a second epoch after resuming")
    time.sleep(rng.uniform(0, time.monotonic() - t0))
    seen = ckpt.poll()
    _kill(proc, log)
    return _check_after_kill(out, seen, history)


def _final_state(out):
    state, history, _ = trainer.load_checkpoint(os.path.join(out, trainer.CHECKPOINT))
    return state, [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_kill_and_resume(tmp_path, processes):
    ref_out, out = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    reference, ref_log = _train(processes, ref_out, *ARGS, "--out", ref_out)   # runs alongside

    # 1. killed inside the checkpoint write of epoch 2: after its temporary file is complete,
    #    before the rename. The checkpoint on disk is still epoch 1's, intact.
    proc, log = _train(processes, out, *ARGS, "--out", out, pause_at=2)
    _wait(lambda: PAUSED.encode() in open(f"{out}.log", "rb").read(), "the pause")
    _kill(proc, log)
    tmp_files = [f for f in os.listdir(out) if ".tmp-" in f]
    assert len(tmp_files) == 1                       # the unrenamed temporary checkpoint
    epoch, history = _check_after_kill(out, 1, [])
    assert epoch == 1

    # 2–3. killed at random moments of an epoch, each after resuming
    rng = np.random.default_rng(0)
    for _ in range(2):
        epoch, history = _kill_at_random(processes, out, rng, history)

    # 4. resumed to the end
    proc, log = _train(processes, out, "--resume", out, "--no-progress")
    assert proc.wait(TIMEOUT) == 0, open(f"{out}.log").read()
    log.close()
    assert reference.wait(TIMEOUT) == 0, open(f"{ref_out}.log").read()
    ref_log.close()
    assert not [f for f in os.listdir(out) if ".tmp" in f]   # the stale temporary file is gone

    state, history = _final_state(out)
    ref_state, ref_history = _final_state(ref_out)
    assert int(state.epoch) == EPOCHS and history == ref_history
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.exists(os.path.join(out, "metrics.json"))
