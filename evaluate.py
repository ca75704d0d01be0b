"""
How a model is judged: the loss over a fixed set of random batches (the evals along a run), the loss
over the windows of the val split (the figure a run reports at its end: all of them, or for a large
split an evenly spread, stated share), --eval_only over a whole split (val or test, as papers
report), and the short samples a run can print as it learns.
"""

import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from configurator import UserError
from dataset import bits_per_char_scales, split_file
from device import Processes


@contextmanager
def evaluating(model):
    """Dropout off within this context; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def estimate_loss(model, cfg, device, ctx, procs=Processes()):
    """Mean loss over eval_iters batches per split. The batches are the same at every call (a
    fixed seed), so evals along a run are comparable; under torchrun the processes share them out."""
    with evaluating(model):
        return {split: sampled_loss(model, cfg, split, i, device, ctx, procs)
                for i, split in enumerate(("train", "val"))}


def sampled_loss(model, cfg, split, seed_offset, device, ctx, procs):
    """Mean loss over eval_iters random training-sized batches of one split (nanoGPT's estimate)."""
    tokens = split_file(cfg, split)
    rng = np.random.default_rng([cfg.seed, 1000 + seed_offset])
    starts = rng.integers(0, len(tokens) - cfg.block_size, size=(cfg.eval_iters, cfg.batch_size))
    losses = torch.zeros(cfg.eval_iters, device=device)
    for k in range(procs.rank, cfg.eval_iters, procs.world_size):
        x, y = tokens.windows(starts[k], cfg.block_size, device)
        with ctx:
            _, loss, _ = model(x, y)
        losses[k] = loss.float()
    if procs.world_size > 1:
        torch.distributed.all_reduce(losses)  # each batch's loss was filled in by one process
    return losses.mean().item()


def spread_windows(n_windows, max_windows=None):
    """Which of a split's n_windows consecutive windows to evaluate: all, or max_windows of them
    spread evenly from the first to the last (the same ones every time)."""
    if max_windows is None or n_windows <= max_windows:
        return np.arange(n_windows)
    return np.unique(np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64))


@torch.no_grad()
def windows_loss(model, tokens, block_size, batch_size, device, ctx, procs=Processes(), max_windows=None):
    """Mean loss over the token file read as consecutive non-overlapping windows: all of them, or
    max_windows spread evenly over it (spread_windows); under torchrun the processes take turns at
    the batches and add up their sums."""
    windows = spread_windows((len(tokens) - 1) // block_size, max_windows)
    total = torch.zeros((), device=device)
    with evaluating(model):
        for first in range(procs.rank * batch_size, len(windows), procs.world_size * batch_size):
            starts = windows[first:first + batch_size] * block_size
            x, y = tokens.windows(starts, block_size, device)
            with ctx:
                _, loss, _ = model(x, y)
            total += loss.float() * len(starts)
    if procs.world_size > 1:
        torch.distributed.all_reduce(total)
    return total.item() / len(windows)


EVAL_TOKENS = 16384  # per batch of the final pass: few enough for any device that trains the model,
EVAL_LOGITS = 1 << 24  # and fewer for a large vocabulary: at most this many logits (64 MB) a batch
FINAL_PASS_TOKENS = 1 << 17  # the end-of-run pass reads the val split whole up to this size, else a sample


def whole_split_loss(model, cfg, split, device, ctx, procs=Processes(), max_tokens=None):
    """The loss over the windows of a split (all, or at most max_tokens' worth, spread evenly), in
    batches sized for speed (a small training batch would make many small steps), never smaller than
    training's. Returns (loss, what was covered in words, seconds it took)."""
    t0 = time.perf_counter()
    tokens = split_file(cfg, split)
    if not os.path.exists(tokens.path):
        raise UserError(f"dataset '{cfg.dataset}' has no {split} split ({tokens.path}); prepare it with "
                        f"python prepare_shakespeare.py ... --test_fraction=0.05")
    n_windows = (len(tokens) - 1) // cfg.block_size
    max_windows = None if max_tokens is None else max(1, max_tokens // cfg.block_size)
    batch_size = max(cfg.batch_size, min(EVAL_TOKENS, EVAL_LOGITS // cfg.vocab_size) // cfg.block_size)
    loss = windows_loss(model, tokens, cfg.block_size, batch_size, device, ctx, procs, max_windows)
    used = len(spread_windows(n_windows, max_windows))
    covered = (f"the whole {split} split" if used == n_windows else
               f"{used:,} of the {split} split's {n_windows:,} windows, spread evenly")
    return loss, covered, time.perf_counter() - t0


def final_val_loss(model, cfg, device, ctx, procs=Processes()):
    """The figure a run reports at its end (the README's): the val split's loss, over the whole
    split where it is small (Tiny Shakespeare's is), over an even sample of it where it is large,
    so that the pass takes seconds. Returns (loss, what was covered, seconds)."""
    return whole_split_loss(model, cfg, "val", device, ctx, procs, FINAL_PASS_TOKENS)


def evaluate_only(model, cfg, device, ctx, procs):
    """--eval_only: the checkpoint's loss on eval_iters batches of train and val (nanoGPT's estimate)
    and over the whole of eval_split (val, or test as papers report), in bits per character too."""
    losses = estimate_loss(model, cfg, device, ctx, procs)
    split = cfg.eval_split
    losses[f"{split}_full"], covered, seconds = whole_split_loss(model, cfg, split, device, ctx, procs)
    bpc = bits_per_char_scales(cfg)
    if procs.master:
        print(f"eval: train loss {losses['train']:.4f} ({losses['train'] * bpc['train']:.4f} bpc), val loss "
              f"{losses['val']:.4f} ({losses['val'] * bpc['val']:.4f} bpc) (over {cfg.eval_iters} batches); "
              f"{split} loss over {covered}: {losses[f'{split}_full']:.4f} "
              f"({losses[f'{split}_full'] * bpc[split]:.4f} bits per character, in {seconds:.1f} s)")
    return losses


def show_sample(model, tok, ctx, device, seed, max_new_tokens=200):
    """A sample from a fixed seed, so that samples along a run differ only by what the model learnt.
    It has its own generator: the run's random state (and so its resumes) stays untouched."""
    generator = torch.Generator(device).manual_seed(seed)
    with evaluating(model), ctx:
        ids = model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), max_new_tokens,
                             temperature=0.8, top_k=200, generator=generator)
    return tok.decode(ids[0, 1:].tolist())
