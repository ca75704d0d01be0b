"""What several test files share besides fixtures (those are in conftest.py)."""

import contextlib
import importlib
import io
import os
import platform
import subprocess
import sys

import torch

from checkpoint import load_checkpoint
from configurator import run_main
from prepare_shakespeare import prepare
from train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# where pack_linears packs the weights for several samples: x86 CPUs with oneDNN
CAN_PACK = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()

# A few lines in the dataset's style, repeated with a counter so the text is not perfectly periodic.
VERSE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.

"""
TINY_TEXT = "".join(VERSE.replace("First", ["First", "Second", "Third"][i % 3]) for i in range(60))


def prepare_tiny(root):
    """TINY_TEXT prepared as dataset 'tiny' under root/data; returns root/data."""
    prepare(TINY_TEXT, str(root / "data" / "tiny"))
    return root / "data"


def tiny_config(data_dir, out_dir):
    """A TrainConfig for a tiny model on the 'tiny' dataset that trains in a second or two on CPU."""
    return TrainConfig(out_dir=str(out_dir), data_dir=str(data_dir), dataset="tiny",
                       n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0,
                       max_iters=40, lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=4,
                       log_interval=10, learning_rate=3e-3, device="cpu", dtype="float32", seed=0)


def run_script(*args, cwd=REPO):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def run_in_process(script, *args, cwd=REPO):
    """Run a script's main() in this process, as `python SCRIPT ARGS` runs it (through run_main):
    the same CompletedProcess as run_script, without the seconds a new Python spends importing torch."""
    module = importlib.import_module(os.path.splitext(script)[0])
    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    argv, sys.argv = sys.argv, [script, *args]
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(module.main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_same_weights(a, b, rtol=0.0, atol=0.0):
    """The same parameter names and values in a and b (models, or checkpoint paths): bit for bit by
    default, or within rtol and atol where the two computed in another order."""
    a, b = ({k: v.detach() for k, v in (load_checkpoint(x)["model"] if isinstance(x, str) else x.state_dict()).items()}
            for x in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


class FakeClock:
    """Stands in for time.perf_counter in train.py and metrics.py (use_fake_clock): every reading is
    one tick after the last, so a training step, timed by a reading at its start and one at its end,
    lasts exactly one tick however busy the machine is, and a time budget ends after a known count.
    Its thread_time is the time a thread ran: all of it, unless a test sets a lower cpu_share."""

    def __init__(self, tick):
        self.tick, self.now = tick, 0.0
        self.cpu_share = 1.0  # an idle machine: the process's threads run all the time

    def __call__(self):
        self.now += self.tick
        return self.now

    def thread_time(self):
        """The CPU time of the calling thread so far (without a tick): cpu_share of the time."""
        return self.now * self.cpu_share


def use_fake_clock(monkeypatch, tick=1 / 64):
    """Give train.py and metrics.py a FakeClock (a power of two, so sums of ticks are exact); returns it."""
    import types

    import metrics
    import train
    clock = FakeClock(tick)
    for module in (train, metrics):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock, thread_time=clock.thread_time))
    return clock
