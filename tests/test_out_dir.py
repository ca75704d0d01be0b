"""out_dir.py: one run per out_dir, and no trained run replaced by accident."""
import dataclasses
import os

import pytest

from checkpoint import load_checkpoint
from configurator import ConfigError, UserError
from helpers import run_in_process
from train import train


def test_out_dir_that_cannot_be_written(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="can't write to out_dir"):
        train(dataclasses.replace(tiny_cfg, out_dir=str(blocker / "out")))
    with pytest.raises(ConfigError, match=f"out_dir '{blocker}' is a file, not a folder; pick another --out_dir"):
        dataclasses.replace(tiny_cfg, out_dir=str(blocker))  # a setting's check: before anything runs
    assert blocker.read_text() == "x"


def test_fine_tuning_never_replaces_a_trained_run_by_accident(tiny_cfg):
    """Fine-tuning into an out_dir that holds a trained run (its own source, or another run) is refused
    with nothing changed there, as a run from scratch is; --overwrite=True replaces it."""
    train(tiny_cfg)
    out = tiny_cfg.out_dir
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"}
    tune = dataclasses.replace(tiny_cfg, init_from=out, max_iters=4, lr_decay_iters=4, warmup_iters=1)
    with pytest.raises(ConfigError, match=r"holds a trained run \(iteration 40, .*\); fine-tune into another "
                                          r"--out_dir, or start over there with --overwrite=True"):
        train(tune)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"} == before
    train(dataclasses.replace(tune, overwrite=True))
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 4


def test_a_run_from_scratch_never_replaces_a_trained_one_by_accident(tiny_cfg):
    """The same command again, without --init_from=resume: refused in one line that says what is there
    and the ways on, with nothing in out_dir changed; --overwrite=True starts over; resume is unaffected."""
    train(tiny_cfg)
    out = tiny_cfg.out_dir
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"}
    args = [f"--data_dir={tiny_cfg.data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=4",
            "--lr_decay_iters=4", "--warmup_iters=1", "--eval_interval=2", "--eval_iters=2"]
    r = run_in_process("train.py", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert r.stderr.startswith(f"error: {os.path.join(out, 'ckpt.pt')} holds a trained run (iteration 40, best val "
                               f"loss {float(saved['best_val_loss']):.4f}); continue it with --init_from=resume, "
                               f"train into another --out_dir, or start over there with --overwrite=True")
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"} == before
    resumed = train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=44))
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] in (40, 44) and resumed["val_full"] > 0
    r = run_in_process("train.py", *args, "--overwrite=True")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 4


def test_starting_over_keeps_the_old_run_until_the_new_one_can_start(tiny_cfg, monkeypatch):
    """--overwrite=True removes the old checkpoints only once nothing can stop the new run before its
    first step: wandb refusing to start a run (not logged in) leaves them."""
    import train as train_module
    train(tiny_cfg)
    out = tiny_cfg.out_dir
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"}

    def wandb_refuses(cfg):
        raise UserError("wandb could not start a run (not logged in)")
    monkeypatch.setattr(train_module, "start_wandb", wandb_refuses)
    with pytest.raises(UserError, match="wandb could not start a run"):
        train(dataclasses.replace(tiny_cfg, overwrite=True, wandb_log=True))
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != ".lock"} == before
