import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prepare_shakespeare import prepare  # noqa: E402
from train import TrainConfig  # noqa: E402

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


@pytest.fixture
def tiny_data(tmp_path):
    """Tiny Shakespeare-like text prepared as dataset 'tiny' under tmp_path/data."""
    prepare(TINY_TEXT, str(tmp_path / "data" / "tiny"))
    return tmp_path / "data"


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """A TrainConfig for a tiny model that trains in a second or two on CPU."""
    return TrainConfig(out_dir=str(tmp_path / "out"), data_dir=str(tiny_data), dataset="tiny",
                       n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0,
                       max_iters=40, lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=4,
                       log_interval=10, learning_rate=3e-3, device="cpu", dtype="float32", seed=0)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, cwd=REPO):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
