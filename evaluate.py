"""
How a model is judged: the loss over a fixed set of random batches (the evals along a run), the loss
over every window of the val split (the figure a run reports at its end), --eval_only, and the short
samples a run can print as it learns.
"""

import time
from contextlib import contextmanager

import numpy as np
import torch

from dataset import bits_per_char_scales, read_windows, split_path, token_count
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
        return {split: split_loss(model, cfg, split, i, device, ctx, procs) for i, split in enumerate(("train", "val"))}


def split_loss(model, cfg, split, seed_offset, device, ctx, procs):
    path = split_path(cfg, split)
    rng = np.random.default_rng([cfg.seed, 1000 + seed_offset])
    starts = rng.integers(0, token_count(path) - cfg.block_size, size=(cfg.eval_iters, cfg.batch_size))
    losses = torch.zeros(cfg.eval_iters, device=device)
    for k in range(procs.rank, cfg.eval_iters, procs.world_size):
        x, y = read_windows(path, starts[k], cfg.block_size, device)
        with ctx:
            _, loss, _ = model(x, y)
        losses[k] = loss.float()
    if procs.world_size > 1:
        torch.distributed.all_reduce(losses)  # each batch's loss was filled in by one process
    return losses.mean().item()


@torch.no_grad()
def evaluate_split(model, path, block_size, batch_size, device, ctx, procs=Processes()):
    """Mean loss over the whole token file, read as consecutive non-overlapping windows; under
    torchrun the processes take turns at the batches and add up their sums."""
    n_windows = (token_count(path) - 1) // block_size
    total = torch.zeros((), device=device)
    with evaluating(model):
        for start in range(procs.rank * batch_size, n_windows, procs.world_size * batch_size):
            starts = np.arange(start, min(start + batch_size, n_windows)) * block_size
            x, y = read_windows(path, starts, block_size, device)
            with ctx:
                _, loss, _ = model(x, y)
            total += loss.float() * len(starts)
    if procs.world_size > 1:
        torch.distributed.all_reduce(total)
    return total.item() / n_windows


EVAL_TOKENS = 16384  # per batch of the whole-val pass: few enough for any device that trains the model


def whole_val_loss(model, cfg, device, ctx, procs=Processes()):
    """The figure the README reports: the loss over every window of the val split, in batches sized
    for speed (a small training batch would make many small steps), never smaller than training's.
    Returns (loss, seconds it took)."""
    t0 = time.perf_counter()
    batch_size = max(cfg.batch_size, EVAL_TOKENS // cfg.block_size)
    loss = evaluate_split(model, split_path(cfg, "val"), cfg.block_size, batch_size, device, ctx, procs)
    return loss, time.perf_counter() - t0


def evaluate_only(model, cfg, device, ctx, procs):
    """--eval_only: the checkpoint's loss on eval_iters batches of each split (nanoGPT's estimate) and
    over the whole val split."""
    losses = estimate_loss(model, cfg, device, ctx, procs)
    losses["val_full"], seconds = whole_val_loss(model, cfg, device, ctx, procs)
    bpc = bits_per_char_scales(cfg)
    if procs.master:
        print(f"eval: train loss {losses['train']:.4f} ({losses['train'] * bpc['train']:.4f} bpc), val loss "
              f"{losses['val']:.4f} ({losses['val'] * bpc['val']:.4f} bpc) (over {cfg.eval_iters} batches); "
              f"val loss over the whole val split: {losses['val_full']:.4f} ({losses['val_full'] * bpc['val']:.4f} "
              f"bits per character, in {seconds:.1f} s)")
    return losses


def show_sample(model, tok, ctx, device, seed, max_new_tokens=200):
    """A sample from a fixed seed, so that samples along a run differ only by what the model learnt.
    It has its own generator: the run's random state (and so its resumes) stays untouched."""
    generator = torch.Generator(device).manual_seed(seed)
    with evaluating(model), ctx:
        ids = model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), max_new_tokens,
                             temperature=0.8, top_k=200, generator=generator)
    return tok.decode(ids[0, 1:].tolist())
