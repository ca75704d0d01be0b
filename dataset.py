"""
The dataset a run trains on: data_dir/dataset holds train.bin, val.bin and maybe test.bin (token ids
as uint16, as nanoGPT's, or uint32 where meta.pkl says so) and meta.pkl (the tokenizer), made by
prepare_shakespeare.py. Batches are random windows of block_size + 1 tokens, read through a memory
map, so a text larger than memory trains as well.
"""

import os

import numpy as np
import torch

from configurator import ConfigError, UserError
from device import Processes, on_rank0
from prepare_shakespeare import BENCHMARKS, DEFAULT_DATASET, prepare_dataset
from tokenizer import bits_per_char, load_tokenizer, read_meta


class TokenFile:
    """A split's token ids on disk, a flat array of dtype (uint16, or uint32 for a larger vocabulary)."""

    def __init__(self, path, dtype=np.uint16):
        self.path, self.dtype = path, np.dtype(dtype)

    def __len__(self):
        return os.path.getsize(self.path) // self.dtype.itemsize

    def windows(self, starts, block_size, device):
        """Inputs x (B, T) and targets y (B, T) from the windows of block_size + 1 tokens at `starts`;
        y is x shifted left by one: each position predicts the next token."""
        # A fresh memmap per batch keeps memory flat: pages read are not pinned to the process.
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # one gather
        if torch.device(device).type == "cuda":
            windows = windows.pin_memory().to(device, non_blocking=True)
        else:
            windows = windows.to(device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def dataset_dir(cfg):
    return os.path.join(cfg.data_dir, cfg.dataset)


def token_dtype(meta):
    """The token files' dtype that a meta.pkl names; nanoGPT's (which name none) are uint16."""
    return np.dtype(meta.get("dtype", "uint16"))


def split_file(cfg, split):
    """The token file of a split ('train', 'val' or 'test')."""
    meta = read_meta(os.path.join(dataset_dir(cfg), "meta.pkl"))
    return TokenFile(os.path.join(dataset_dir(cfg), f"{split}.bin"), token_dtype(meta))


def existing_splits(cfg):
    """The dataset's token files, {split: TokenFile}: train and val, and test where it was prepared."""
    files = {split: split_file(cfg, split) for split in ("train", "val", "test")}
    return {split: tokens for split, tokens in files.items() if split != "test" or os.path.exists(tokens.path)}


def check_longer_than_a_block(tokens, block_size, remedy=None):
    if len(tokens) <= block_size:
        raise ConfigError(f"block_size={block_size} is not smaller than {tokens.path} ({len(tokens)} tokens); "
                          f"{remedy or 'use a smaller --block_size or a longer text'}")


def splits_read(cfg):
    """The splits a run reads: train and val (evals), and test for --eval_only --eval_split=test."""
    return ("train", "val") + (("test",) if cfg.eval_only and cfg.eval_split == "test" else ())


def check_blocks(cfg):
    """Every split the run reads holds a block of cfg.block_size (and the token after it). --eval_only
    reads them at its checkpoint's context, which no setting shortens."""
    remedy = "it is the checkpoint's context: evaluate it on a longer text" if cfg.eval_only else None
    splits = existing_splits(cfg)
    for split in splits_read(cfg):
        if split in splits:  # a missing test split is said where it is read
            check_longer_than_a_block(splits[split], cfg.block_size, remedy)


def longest_block(cfg):
    """The longest block_size that training and its evals can read (check_longer_than_a_block): the
    shorter of train and val, less the token each block predicts last."""
    splits = existing_splits(cfg)
    return min(len(splits["train"]), len(splits["val"])) - 1


def ensure_prepared(cfg):
    """Prepare Tiny Shakespeare or a benchmark (enwik8, text8) if it is missing: they are downloads;
    other datasets are prepared by hand."""
    ddir = dataset_dir(cfg)
    if all(os.path.exists(os.path.join(ddir, name)) for name in ("train.bin", "val.bin", "meta.pkl")):
        return
    if cfg.dataset != DEFAULT_DATASET and cfg.dataset not in BENCHMARKS:
        raise UserError(f"dataset '{cfg.dataset}' is not prepared ({ddir} lacks train.bin, val.bin or meta.pkl); "
                        f"run: python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset {cfg.dataset}")
    print(f"{ddir} is not prepared yet: preparing {'Tiny Shakespeare' if cfg.dataset == DEFAULT_DATASET else cfg.dataset} now")
    prepare_dataset(cfg.dataset, data_dir=cfg.data_dir)


def load_dataset(cfg, procs=Processes(), device="cpu", block_size=None):
    """The dataset's tokenizer, once rank 0 has prepared the dataset if needed; its files are checked,
    each against a context of block_size where it is known (cfg's, unless None is given: the context is
    still to be chosen, by the rule or from a checkpoint, and check_blocks checks it then)."""
    on_rank0(lambda: ensure_prepared(cfg), procs, device)
    tok = load_tokenizer(os.path.join(dataset_dir(cfg), "meta.pkl"))
    for split, tokens in existing_splits(cfg).items():
        size = os.path.getsize(tokens.path)
        if size % tokens.dtype.itemsize or (size and int(np.memmap(tokens.path, dtype=tokens.dtype, mode="r").max())
                                            >= tok.vocab_size):
            raise UserError(f"{tokens.path} does not belong with {dataset_dir(cfg)}/meta.pkl (token ids beyond its "
                            f"{tok.vocab_size} tokens, or a truncated file); prepare the dataset again with "
                            f"prepare_shakespeare.py")
        if block_size is not None:
            check_longer_than_a_block(tokens, block_size)
        elif len(tokens) < 2:
            raise ConfigError(f"{tokens.path} holds {len(tokens)} token(s): too short to train or evaluate on (a "
                              f"token and the one after it at the least); prepare the dataset from a longer text")
    return tok


def split_sizes(cfg):
    """{split: (its tokens, its characters)}: the characters as meta.pkl counts them (a BPE token holds
    several), else one a token (nanoGPT's meta.pkl counts none)."""
    chars = read_meta(os.path.join(dataset_dir(cfg), "meta.pkl")).get("chars", {})
    return {split: (len(tokens), chars.get(split, len(tokens))) for split, tokens in existing_splits(cfg).items()}


def bits_per_char_scales(cfg):
    """For each split, what turns a loss per token (nats) into bits per character of its text, so
    that character and BPE models compare on one scale (tokenizer.bits_per_char)."""
    return {split: bits_per_char(1.0, n_tokens, n_chars) for split, (n_tokens, n_chars) in split_sizes(cfg).items()}


class TrainBatches:
    """Random windows of a token file, one global batch per optimizer step. Every process draws the
    whole global batch from the same generator and reads its own share, so N processes train on
    exactly the batches one process would, and the generator's state is the same everywhere."""

    def __init__(self, tokens, batch_size, block_size, micro_steps, rng, device, procs=Processes()):
        self.tokens, self.batch_size, self.block_size, self.micro_steps = tokens, batch_size, block_size, micro_steps
        self.rng, self.device, self.procs = rng, device, procs
        check_longer_than_a_block(tokens, block_size)
        self.n_tokens = len(tokens)

    def next_step(self):
        """This process's micro-batches (x, y) for the next step, read as they are needed."""
        n, rank = self.micro_steps, self.procs.rank
        starts = self.rng.integers(0, self.n_tokens - self.block_size, size=(self.procs.world_size * n, self.batch_size))
        return (self.tokens.windows(s, self.block_size, self.device) for s in starts[rank * n:(rank + 1) * n])
