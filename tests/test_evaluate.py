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
    real = evaluate.evaluate_split

    def recording(model, path, block_size, batch_size, *args):
        calls.append(batch_size)
        return real(model, path, block_size, batch_size, *args)

    monkeypatch.setattr(evaluate, "evaluate_split", recording)
    losses = train(cfg)
    assert calls == [evaluate.EVAL_TOKENS // 8]
    model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")))
    small_batches = real(model.eval(), os.path.join(cfg.data_dir, "tiny", "val.bin"), 8, 2, "cpu", nullcontext())
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
