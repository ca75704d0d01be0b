import os
import signal
import subprocess
import sys

import pytest

from files import OutDirBusy, lock_out_dir, signals_deferred
from helpers import REPO, run_in_process


def test_a_second_lock_on_an_out_dir_is_refused_until_the_first_is_released(tmp_path):
    first = lock_out_dir(str(tmp_path))
    with pytest.raises(OutDirBusy, match="another run is training into out_dir"):
        lock_out_dir(str(tmp_path))
    first.release()
    lock_out_dir(str(tmp_path)).release()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_wait_for_the_end_of_the_block_then_act(signum):
    acted = []

    def handler(s, frame):
        acted.append(s)
        raise RuntimeError("acted")

    previous = signal.signal(signum, handler)
    try:
        with pytest.raises(RuntimeError, match="acted"):
            with signals_deferred():
                os.kill(os.getpid(), signum)
                done = "the block ran to its end"
        assert done and acted == [signum]
        assert signal.getsignal(signum) is handler
    finally:
        signal.signal(signum, previous)


@pytest.mark.slow
def test_one_run_per_out_dir_between_real_processes_and_a_killed_holder_is_taken_over(tiny_data, tmp_path):
    """A second train.py into the out_dir of a live one refuses in one line and changes nothing there;
    once the first is killed with -9, its lock is free and a new run takes the out_dir."""
    out = tmp_path / "out"
    args = [f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
            "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=2",
            "--warmup_iters=2"]
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args, "--max_iters=100000000",
                              "--lr_decay_iters=100000000", "--eval_interval=100000000"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # the first run has claimed out_dir once it printed its config
            if line.startswith("parameters:"):
                break
        before = {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"}
        second = run_in_process("train.py", *args, "--max_iters=4", "--lr_decay_iters=4")
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: another run is training into out_dir '{out}'")
        assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"} == before
        assert first.poll() is None  # and the first trains on
    finally:
        first.kill()  # SIGKILL: no chance to release anything
        first.wait()
    third = run_in_process("train.py", *args, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2")
    assert third.returncode == 0, third.stderr
    assert "trained 4 iterations" in third.stdout
