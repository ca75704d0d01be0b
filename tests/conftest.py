import pytest

from helpers import TINY_TEXT
from prepare_shakespeare import prepare
from train import TrainConfig


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
