import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from configurator import ConfigError, UserError
from conftest import run_script
from train import (CheckpointError, TrainConfig, get_batch, get_lr, load_checkpoint, model_from_checkpoint,
                   save_checkpoint, select_dtype, train)


def test_get_batch_windows(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    data.tofile(path)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = get_batch(str(path), 16, 32, rng, "cpu")
        assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens of the file
        assert x.min() >= 0 and y.max() <= 999  # every window inside the data
    # windows start anywhere, including the very last possible start
    starts = np.concatenate([get_batch(str(path), 64, 32, rng, "cpu")[0][:, 0].numpy() for _ in range(200)])
    assert starts.min() == 0 and starts.max() == 1000 - 33


def test_get_batch_too_short_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError, match="block_size"):
        get_batch(str(path), 2, 10, np.random.default_rng(0), "cpu")


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1000)
    assert 0 < get_lr(0, cfg) < 2e-5  # never zero, even at the first step
    assert get_lr(50, cfg) < get_lr(99, cfg) < 1e-3  # linear warmup
    assert math.isclose(get_lr(100, cfg), 1e-3)  # peak
    assert math.isclose(get_lr(550, cfg), (1e-3 + 1e-4) / 2)  # cosine midpoint
    assert get_lr(999, cfg) > 1e-4 and math.isclose(get_lr(1000, cfg), 1e-4, rel_tol=1e-6)  # end of cosine
    assert get_lr(5000, cfg) == 1e-4  # min_lr after decay
    assert all(get_lr(i, cfg) >= get_lr(i + 1, cfg) for i in range(100, 1100))
    assert get_lr(700, dataclasses.replace(cfg, decay_lr=False)) == 1e-3


def test_dtype_choice():
    assert select_dtype("auto", "mps") == "float32"
    assert select_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="float16 autocast is for GPUs"):
        select_dtype("float16", "cpu")


def test_train_loss_falls_and_checkpoint_holds_nanogpt_keys(tiny_cfg):
    losses = train(tiny_cfg)
    ckpt = load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= ckpt.keys()
    assert ckpt["iter_num"] == 40 and ckpt["config"]["batch_size"] == 8
    assert losses["val"] < 3.0 < math.log(ckpt["model_args"]["vocab_size"])  # well below uniform
    assert math.isclose(ckpt["best_val_loss"], losses["val"])
    model = model_from_checkpoint(ckpt)
    assert model.config.n_embd == 32


def test_resume_continues_from_saved_iteration(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, max_iters=20, always_save_checkpoint=True))
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    assert load_checkpoint(path)["iter_num"] == 20
    resumed = train(dataclasses.replace(tiny_cfg, max_iters=40, init_from="resume", always_save_checkpoint=True))
    assert load_checkpoint(path)["iter_num"] == 40
    straight = train(dataclasses.replace(tiny_cfg, max_iters=40, out_dir=tiny_cfg.out_dir + "2"))
    # the RNG and sampler state travel in the checkpoint, so the resumed run is the same run
    assert resumed == straight


def test_gradient_accumulation_trains(tiny_cfg):
    losses = train(dataclasses.replace(tiny_cfg, gradient_accumulation_steps=2, batch_size=4))
    assert losses["val"] < 3.0


def test_eval_only_needs_a_checkpoint(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(dataclasses.replace(tiny_cfg, eval_only=True))
    train(tiny_cfg)
    losses = train(dataclasses.replace(tiny_cfg, eval_only=True))
    assert losses["val"] < 3.0


@pytest.mark.parametrize("override, message", [
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(max_iters=-1), "max_iters must be positive"),
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(init_from="gpt2"), "no checkpoint at gpt2; init_from takes"),
    (dict(block_size=5000), "not smaller than the val split"),
    (dict(dataset="nope"), "dataset 'nope' is not prepared"),
])
def test_bad_settings_are_refused_before_training(tiny_cfg, override, message):
    with pytest.raises(UserError, match=message):
        train(dataclasses.replace(tiny_cfg, **override))
    assert not os.path.exists(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(str(path))


def test_save_checkpoint_is_atomic(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_train_script_prepares_and_trains(tiny_data, tmp_path):
    r = run_script("train.py", f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}",
                   "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                   "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5",
                   "--eval_iters=2", "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and "device: cpu" in r.stdout and "step 10:" in r.stdout


def test_train_script_missing_dataset_gives_command(tmp_path):
    r = run_script("train.py", "--dataset=mytext", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset mytext" in r.stderr
