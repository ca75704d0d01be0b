"""
A run's out_dir: one run at a time trains into it, and a new run (from scratch, or fine-tuning) never
replaces the checkpoints of a trained one by accident. (files.py holds the locks and atomic writes this
builds on; this reads checkpoints, which import files.py, so it has a file of its own.)
"""

import os
from contextlib import contextmanager

from checkpoint import CKPT_NAME, RESUME_NAME, CheckpointError, load_checkpoint
from configurator import ConfigError, UserError
from device import on_rank0
from files import lock_out_dir, remove_leftovers
from metrics import record_config


def refuse_a_file_as_out_dir(out_dir):
    """Checked before anything runs: a file where the folder should be is a mistyped --out_dir."""
    if os.path.isfile(out_dir):
        raise ConfigError(f"out_dir '{out_dir}' is a file, not a folder; pick another --out_dir")


def ensure_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"can't write to out_dir '{out_dir}': {e.strerror}; pick another --out_dir") from None


def refuse_to_replace_a_trained_run(cfg):
    """A new run, from scratch or fine-tuning, must not replace the checkpoints of a trained one by
    accident (with --overwrite=True they are removed: the run starts over there)."""
    for name in (CKPT_NAME, RESUME_NAME):
        path = os.path.join(cfg.out_dir, name)
        if not os.path.isfile(path):
            continue
        if cfg.overwrite:
            try:
                os.remove(path)
            except OSError as e:
                raise UserError(f"can't remove {path} to start over: {e.strerror}") from None
            continue
        try:
            saved = load_checkpoint(path)
            what = f"iteration {saved['iter_num']}, best val loss {float(saved['best_val_loss']):.4f}"
        except (CheckpointError, KeyError, TypeError, ValueError):
            what = "a checkpoint"
        ways = ("continue it with --init_from=resume, train into another --out_dir" if cfg.init_from == "scratch"
                else "fine-tune into another --out_dir")
        raise ConfigError(f"{path} holds a trained run ({what}); {ways}, or start over there with --overwrite=True")


def claim_out_dir(cfg):
    """Make out_dir this run's: it exists and can be written, no other run trains into it (its lock
    is taken and returned), a trained run there is not replaced by a new one unless asked, and
    half-written checkpoints of runs killed with -9 are removed."""
    ensure_writable(cfg.out_dir)
    lock = lock_out_dir(cfg.out_dir)
    try:
        if cfg.init_from != "resume":
            refuse_to_replace_a_trained_run(cfg)
        for name in (CKPT_NAME, RESUME_NAME):
            remove_leftovers(cfg.out_dir, name + ".")
        record_config(cfg, cfg.out_dir)
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def out_dir_claimed(cfg, procs, device):
    """Within this context out_dir is this run's (claim_out_dir, on rank 0: a torchrun's processes are one run)."""
    lock = on_rank0(lambda: claim_out_dir(cfg), procs, device)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
