"""
The dataset a run trains on: data_dir/dataset holds train.bin and val.bin (token ids as uint16, as
nanoGPT's) and meta.pkl (the tokenizer), made by prepare_shakespeare.py. Batches are random windows
of block_size + 1 tokens, read through a memory map, so a text larger than memory trains as well.
"""

import os

import numpy as np
import torch

from configurator import ConfigError, UserError
from device import Processes, on_rank0
from prepare_shakespeare import DEFAULT_DATASET, prepare_dataset
from tokenizer import bits_per_char, load_tokenizer, read_meta

TOKEN_DTYPE = np.uint16


def token_count(path):
    return os.path.getsize(path) // np.dtype(TOKEN_DTYPE).itemsize


def dataset_dir(cfg):
    return os.path.join(cfg.data_dir, cfg.dataset)


def split_path(cfg, split):
    """The token file of a split ('train' or 'val')."""
    return os.path.join(dataset_dir(cfg), f"{split}.bin")


def check_longer_than_a_block(path, block_size):
    if token_count(path) <= block_size:
        raise ConfigError(f"block_size={block_size} is not smaller than {path} ({token_count(path)} tokens); "
                          f"use a smaller --block_size or a longer text")


def ensure_prepared(cfg):
    """Prepare Tiny Shakespeare if it is missing; other datasets are prepared by hand."""
    ddir = dataset_dir(cfg)
    if all(os.path.exists(os.path.join(ddir, name)) for name in ("train.bin", "val.bin", "meta.pkl")):
        return
    if cfg.dataset != DEFAULT_DATASET:
        raise UserError(f"dataset '{cfg.dataset}' is not prepared ({ddir} lacks train.bin, val.bin or meta.pkl); "
                        f"run: python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset {cfg.dataset}")
    print(f"{ddir} is not prepared yet: preparing Tiny Shakespeare now")
    prepare_dataset(cfg.dataset, data_dir=cfg.data_dir)


def load_dataset(cfg, procs=Processes(), device="cpu"):
    """The dataset's tokenizer, once rank 0 has prepared the dataset if needed; its files are checked."""
    on_rank0(lambda: ensure_prepared(cfg), procs, device)
    tok = load_tokenizer(os.path.join(dataset_dir(cfg), "meta.pkl"))
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for split in ("train", "val"):
        path = split_path(cfg, split)
        size = os.path.getsize(path)
        if size % itemsize or (size and int(np.memmap(path, dtype=TOKEN_DTYPE, mode="r").max()) >= tok.vocab_size):
            raise UserError(f"{path} does not belong with {dataset_dir(cfg)}/meta.pkl (token ids beyond its "
                            f"{tok.vocab_size} tokens, or a truncated file); prepare the dataset again with "
                            f"prepare_shakespeare.py")
        check_longer_than_a_block(path, cfg.block_size)
    return tok


def bits_per_char_scales(cfg):
    """For each split, what turns a loss per token (nats) into bits per character of its text, so
    that character and BPE models compare on one scale (tokenizer.bits_per_char)."""
    chars = read_meta(os.path.join(dataset_dir(cfg), "meta.pkl")).get("chars", {})
    scales = {}
    for split in ("train", "val"):
        tokens = token_count(split_path(cfg, split))
        scales[split] = bits_per_char(1.0, tokens, chars.get(split, tokens))  # nanoGPT's: a token per character
    return scales


def read_windows(path, starts, block_size, device):
    """Inputs x (B, T) and targets y (B, T) from the windows of block_size + 1 tokens at `starts`;
    y is x shifted left by one: each position predicts the next token."""
    # A fresh memmap per batch keeps memory flat: pages read are not pinned to the process.
    data = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # one gather
    if torch.device(device).type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TrainBatches:
    """Random windows of a token file, one global batch per optimizer step. Every process draws the
    whole global batch from the same generator and reads its own share, so N processes train on
    exactly the batches one process would, and the generator's state is the same everywhere."""

    def __init__(self, path, batch_size, block_size, micro_steps, rng, device, procs=Processes()):
        self.path, self.batch_size, self.block_size, self.micro_steps = path, batch_size, block_size, micro_steps
        self.rng, self.device, self.procs = rng, device, procs
        check_longer_than_a_block(path, block_size)
        self.n_tokens = token_count(path)

    def next_step(self):
        """This process's micro-batches (x, y) for the next step, read as they are needed."""
        n, rank = self.micro_steps, self.procs.rank
        starts = self.rng.integers(0, self.n_tokens - self.block_size, size=(self.procs.world_size * n, self.batch_size))
        return (read_windows(self.path, s, self.block_size, self.device) for s in starts[rank * n:(rank + 1) * n])
