import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from checkpoint import (CheckpointError, capture_rng, load_checkpoint, restore_rng, restore_training_state,
                        save_checkpoint)
from checkpoint import Progress
from configurator import ConfigError
from helpers import run_in_process
from model import GPT, GPTConfig
from train import train


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


def test_resume_without_checkpoint(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at .*ckpt.pt; train one first, or use --init_from=scratch"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))
    with pytest.raises(CheckpointError, match="ckpt.pt; train one first, or give the --out_dir of a trained run$"):
        train(dataclasses.replace(tiny_cfg, eval_only=True))  # nothing to start from scratch


def test_truncated_checkpoint(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, max_iters=20))
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device; free some space.*; the previous checkpoint is untouched"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_each_process_restores_its_own_random_state():
    data_rng = np.random.default_rng(0)
    states = []
    for seed in (10, 11):  # two processes: different dropout streams, one shared batch sampler
        torch.manual_seed(seed)
        states.append(capture_rng(data_rng, "cpu"))
    expected_rank1 = torch.rand(3)
    expected_batch = np.random.default_rng(0).integers(0, 100, 5)  # the sampler's next draw when captured
    data_rng.integers(0, 100, 5)  # move the sampler on
    torch.manual_seed(99)
    restore_rng(states, data_rng, "cpu", rank=1)
    assert torch.equal(torch.rand(3), expected_rank1)
    assert np.array_equal(data_rng.integers(0, 100, 5), expected_batch)  # on from where it was captured
    # a third process (resumed on more devices) keeps its own seed instead of copying another's
    torch.manual_seed(12)
    own = torch.rand(3)
    torch.manual_seed(12)
    restore_rng(states, data_rng, "cpu", rank=2)
    assert torch.equal(torch.rand(3), own)
    # older checkpoints: one dict, with every visible GPU's state; only rank 0 takes its torch state
    old = dict(states[0], cuda=[torch.zeros(16, dtype=torch.uint8)] * 8)
    torch.manual_seed(13)
    own = torch.rand(3)
    torch.manual_seed(13)
    restore_rng(old, data_rng, "cpu", rank=1)
    assert torch.equal(torch.rand(3), own)  # rank 1 keeps its own stream
    torch.manual_seed(10)
    reference = torch.rand(3)
    restore_rng(old, data_rng, "cpu", rank=0)
    assert torch.equal(torch.rand(3), reference)


def test_float16_resume_of_a_checkpoint_saved_without_scaler(tiny_cfg):
    """A float32 / bf16 / CPU run saves the state of a disabled GradScaler ({}): resuming it with
    --dtype=float16 (CUDA) starts a fresh scaler instead of failing in GradScaler.load_state_dict."""
    train(tiny_cfg)
    checkpoint = load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    assert checkpoint["scaler"] == {}
    model = GPT(GPTConfig(**{k: v for k, v in checkpoint["model_args"].items()}))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what float16 on CUDA builds
    restore_training_state(checkpoint, model, optimizer, scaler, np.random.default_rng(0), "cpu")
    progress = Progress.from_checkpoint(checkpoint)
    assert progress.iter_num == 40 and progress.best_val_loss == checkpoint["best_val_loss"] and scaler.get_scale() == 2.0 ** 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 training needs a CUDA GPU")
def test_a_cpu_run_resumes_on_a_gpu_in_float16(tiny_cfg):
    """The same, as a user does it: a float32 run on the CPU, continued on the GPU with --dtype=float16."""
    train(tiny_cfg)
    losses = train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60, device="cuda", dtype="float16",
                                       compile=False, always_save_checkpoint=True))
    assert load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))["iter_num"] == 60
    assert math.isfinite(losses["val"])  # float16 did not overflow


@pytest.mark.parametrize("override, key", [(dict(batch_size=4), "batch_size"), (dict(block_size=16), "block_size"),
                                           (dict(learning_rate=1e-2), "learning_rate"),
                                           (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps")])
def test_resume_refuses_settings_that_change_the_run(tiny_cfg, override, key):
    train(tiny_cfg)
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    before = os.path.getmtime(path)
    with pytest.raises(ConfigError, match=f"was trained with {key}=.*resume with --{key}=.*--init_from="):
        train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60, **override))
    assert os.path.getmtime(path) == before
    # what may change: the length of the run, evaluation and logging
    train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60, lr_decay_iters=40, eval_interval=10,
                              eval_iters=2, log_interval=5))


def test_resume_of_a_weights_only_checkpoint_is_one_line(tiny_cfg):
    train(tiny_cfg)
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    slim = {k: v for k, v in load_checkpoint(path).items() if k in ("model", "model_args", "config", "iter_num",
                                                                    "best_val_loss")}
    torch.save(slim, path)
    with pytest.raises(CheckpointError, match="holds weights only, no optimizer state.*fine-tune from it"):
        train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60))



def resume_args(cfg, max_iters):
    return [f"--data_dir={cfg.data_dir}", "--dataset=tiny", f"--out_dir={cfg.out_dir}", "--device=cpu",
            "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
            "--dropout=0.0", f"--max_iters={max_iters}", "--lr_decay_iters=40", "--warmup_iters=5",
            "--eval_interval=20", "--eval_iters=4", "--learning_rate=3e-3", "--seed=0", "--always_save_checkpoint=True",
            "--init_from=resume"]


def assert_full_disk_stops_in_one_line(cfg, r, ckpt_before):
    last = r.stderr.splitlines()[-1]  # below the progress bar
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith(f"error: could not write {os.path.join(cfg.out_dir, 'ckpt.pt')}: no space left on "
                               f"device; free some space"), r.stderr
    with open(os.path.join(cfg.out_dir, "ckpt.pt"), "rb") as f:
        assert f.read() == ckpt_before  # the last checkpoint, whole
    assert not [name for name in os.listdir(cfg.out_dir) if ".tmp" in name]  # no half-written one


def test_a_full_disk_at_a_save_stops_in_one_line_and_keeps_the_checkpoint(tiny_cfg, monkeypatch):
    """The save's file is /dev/full, so the operating system answers ENOSPC (which torch.save
    reports as a RuntimeError)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, always_save_checkpoint=True)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "ckpt.pt"), "rb") as f:
        before = f.read()
    import files
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        return real_open("/dev/full" if "ckpt.pt.tmp" in str(path) else path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", full_disk, raising=False)
    assert_full_disk_stops_in_one_line(cfg, run_in_process("train.py", *resume_args(cfg, 40)), before)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MB tmpfs mounted at tmp_path/small, where this process may mount one (root on Linux)."""
    import subprocess
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("can't mount a small filesystem here")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_a_real_full_disk_at_a_save(tiny_data, small_filesystem):
    """On a 1 MB filesystem, filled until half a checkpoint's room is left: the next save does not fit."""
    cfg = dataclasses.replace(tiny_config_on(tiny_data, small_filesystem / "out"), max_iters=20,
                              always_save_checkpoint=True)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "ckpt.pt"), "rb") as f:
        before = f.read()
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    (small_filesystem / "filler").write_bytes(b"x" * (free - len(before) // 2))  # half a checkpoint's room left
    assert_full_disk_stops_in_one_line(cfg, run_in_process("train.py", *resume_args(cfg, 40)), before)


def tiny_config_on(data_dir, out_dir):
    from helpers import tiny_config
    return tiny_config(data_dir, out_dir)
