"""evaluate.py: the evals along a run, the whole-val pass, --eval_only and samples during training."""
import dataclasses
import math
import os
import re
from contextlib import nullcontext

import numpy as np
import torch
import pytest

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from dataset import TokenFile
from helpers import TINY_TEXT
from train import train


def test_eval_only_needs_a_checkpoint(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(dataclasses.replace(tiny_cfg, eval_only=True))
    train(tiny_cfg)
    losses = train(dataclasses.replace(tiny_cfg, eval_only=True))
    assert losses["val"] < 3.0


def test_eval_only_reports_the_whole_val_split(tiny_cfg, capsys):
    train(tiny_cfg)
    model = model_from_checkpoint(load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))).eval()
    x = torch.from_numpy(np.fromfile(os.path.join(tiny_cfg.data_dir, "tiny", "val.bin"), dtype=np.uint16).astype(np.int64))
    n = (len(x) - 1) // tiny_cfg.block_size  # every non-overlapping window, the last one's target included
    windows = x[:n * tiny_cfg.block_size + 1]
    with torch.no_grad():
        _, expected, _ = model(windows[:-1].view(n, -1), windows[1:].view(n, -1))
    capsys.readouterr()
    losses = train(dataclasses.replace(tiny_cfg, eval_only=True))
    assert math.isclose(losses["val_full"], expected.item(), rel_tol=1e-5)
    assert f"val loss over the whole val split: {losses['val_full']:.4f}" in capsys.readouterr().out


def test_the_whole_val_pass_runs_in_large_batches_whatever_the_training_batch(tiny_cfg, monkeypatch):
    """A training batch of 2 would take hundreds of tiny steps: the pass takes EVAL_TOKENS per batch."""
    import evaluate
    cfg = dataclasses.replace(tiny_cfg, batch_size=2, block_size=8, always_save_checkpoint=True)
    calls = []
    real = evaluate.windows_loss

    def recording(model, path, block_size, batch_size, *args):
        calls.append(batch_size)
        return real(model, path, block_size, batch_size, *args)

    monkeypatch.setattr(evaluate, "windows_loss", recording)
    losses = train(cfg)
    assert calls == [evaluate.EVAL_TOKENS // 8]
    model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")))
    small_batches = real(model.eval(), TokenFile(os.path.join(cfg.data_dir, "tiny", "val.bin")), 8, 2, "cpu",
                         nullcontext())
    assert abs(losses["val_full"] - small_batches) < 1e-5  # the batch changes the speed, not the figure


def test_samples_while_training_leave_the_run_unchanged(tiny_cfg, capsys):
    """sample_interval prints a sample now and then, from its own random generator: the run's
    losses and checkpoint are those of a run without samples."""
    quiet = train(dataclasses.replace(tiny_cfg, out_dir=tiny_cfg.out_dir + "-quiet", dropout=0.1))
    capsys.readouterr()
    chatty = train(dataclasses.replace(tiny_cfg, dropout=0.1, sample_interval=20))
    out = capsys.readouterr().out
    assert chatty == quiet
    samples = re.findall(r"sample at step (\d+):\n(.*?)\n(?:step|trained)", out, re.S)
    assert [int(step) for step, _ in samples] == [0, 20, 40]
    assert all(len(text) >= 100 and set(text) <= set(TINY_TEXT) for _, text in samples)
    assert samples[0][1] != samples[2][1]  # the model learnt in between


def test_eval_only_reports_the_whole_test_split_in_bits_per_character(tmp_path, capsys):
    from helpers import tiny_config
    from prepare_shakespeare import prepare
    prepare(TINY_TEXT, str(tmp_path / "data" / "tiny"), test_fraction=0.05)
    cfg = tiny_config(tmp_path / "data", tmp_path / "out")
    train(cfg)
    model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))).eval()
    x = torch.from_numpy(np.fromfile(tmp_path / "data" / "tiny" / "test.bin", dtype=np.uint16).astype(np.int64))
    n = (len(x) - 1) // cfg.block_size
    with torch.no_grad():
        _, expected, _ = model(x[:n * cfg.block_size].view(n, -1), x[1:n * cfg.block_size + 1].view(n, -1))
    capsys.readouterr()
    losses = train(dataclasses.replace(cfg, eval_only=True, eval_split="test"))
    assert math.isclose(losses["test_full"], expected.item(), rel_tol=1e-5)
    bpc = losses["test_full"] / math.log(2)  # a token per character
    assert (f"test loss over the whole test split: {losses['test_full']:.4f} ({bpc:.4f} bits per character"
            in capsys.readouterr().out)


def test_the_final_pass_over_a_large_val_split_reads_an_even_sample_and_says_so(tiny_cfg, monkeypatch, capsys):
    """Where the val split holds more than FINAL_PASS_TOKENS, the end of a run reads that many tokens'
    worth of windows, spread from its first to its last, and its line says how many of how many."""
    import evaluate
    monkeypatch.setattr(evaluate, "FINAL_PASS_TOKENS", 10 * tiny_cfg.block_size)
    read = []
    real_windows = TokenFile.windows

    def recording(self, starts, block_size, device):
        if self.path.endswith("val.bin"):
            read.append(starts.copy())
        return real_windows(self, starts, block_size, device)

    monkeypatch.setattr(TokenFile, "windows", recording)
    cfg = dataclasses.replace(tiny_cfg, eval_interval=1000)  # evals at the ends only
    train(cfg)
    n_windows = (len(TokenFile(os.path.join(cfg.data_dir, "tiny", "val.bin"))) - 1) // cfg.block_size
    assert n_windows > 10
    final = np.concatenate(read[-1:])  # the final pass: one batch of the ten windows
    assert len(final) == 10 and final[0] == 0 and final[-1] == (n_windows - 1) * cfg.block_size
    assert f"val loss over 10 of the val split's {n_windows} windows, spread evenly: " in capsys.readouterr().out


def test_the_last_line_names_the_kept_model_where_it_is_not_the_last(tiny_cfg, monkeypatch, capsys):
    """A run whose last eval is worse than an earlier one keeps the earlier model in ckpt.pt, which
    sample.py uses: the end reports the whole-val loss of both, each named."""
    import train as train_module
    val_losses = iter([3.0, 2.0, 2.5])  # the evals at 0, 20 and 40: the best at 20
    real_estimate = train_module.estimate_loss

    def estimate(*args, **kwargs):
        losses = real_estimate(*args, **kwargs)
        return dict(losses, val=next(val_losses))

    monkeypatch.setattr(train_module, "estimate_loss", estimate)
    last = train(tiny_cfg)
    out = capsys.readouterr().out
    kept = train(dataclasses.replace(tiny_cfg, eval_only=True))  # ckpt.pt's model, over the whole val split
    assert load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))["iter_num"] == 20
    assert (f"val loss over the whole val split: {last['val_full']:.4f} (" in out and " for the last model; "
            f"{kept['val_full']:.4f} (" in out and ") for ckpt.pt, the model of iteration 20 that sample.py uses" in out)
    assert last["val_full"] != kept["val_full"]
