"""
Train a character-level GPT.

    python train.py config/train_shakespeare_char.py          # the GPU recipe
    python train.py config/train_shakespeare_char_cpu.py      # 100 seconds on a laptop CPU
    torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char.py

Any setting can be overridden with --key=value. Read train() at the bottom first: the recipe. The
helpers above it do one thing each; device.py, checkpoint.py and metrics.py hold the plumbing.
"""

import inspect
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch

from checkpoint import (CKPT_NAME, RESUME_NAME, CheckpointError, capture_rng, check_resume_settings,
                        load_checkpoint, model_from_checkpoint, refuse_gpt2_weights, restore_training_state,
                        resume_path, same_vocabulary, save_checkpoint, training_checkpoint)
from configurator import ConfigError, UserError, as_config_error, check, check_choice, configure, run_main
from device import (DeviceSettings, Processes, any_process, autocast_context, check_replicas_agree,
                    describe_dtype, end_processes, from_rank0, gather_from_all, matmul_peak_flops,
                    newton_schulz_dtype, on_rank0, out_of_memory_in_one_line, reuse_freed_memory, select_dtype,
                    start_processes, use_compile)
from files import lock_out_dir, remove_leftovers
from metrics import TrainingLog, plot_metrics, record_config, start_wandb
from model import GPTConfig, build_model
from prepare_shakespeare import DEFAULT_DATASET, check_dataset_name, prepare_dataset
from speedups import speed_up_training
from tokenizer import bits_per_char, load_tokenizer, read_meta


@dataclass
class TrainConfig(GPTConfig, DeviceSettings):
    """The training recipe's settings, then the model's (GPTConfig) and where it runs (DeviceSettings)."""
    not_settings: ClassVar = {"vocab_size": "it is the dataset's number of tokens (its meta.pkl)"}
    # I/O
    out_dir: str = "out"  # where checkpoints, config.json, metrics.csv and loss.png go
    eval_interval: int = 250  # evaluate (and save if val loss improved) every this many iterations, and at the end
    log_interval: int = 10  # log loss, lr, ms/iter and MFU every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate out_dir/ckpt.pt (or init_from's checkpoint) and exit
    always_save_checkpoint: bool = False  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume' (continue out_dir's run), or a checkpoint / out_dir to fine-tune
    overwrite: bool = False  # from scratch into an out_dir that holds a trained run: replace it (else refused)
    sample_interval: int = 0  # > 0: print a short sample every sample_interval iterations, to watch it learn
    plot: bool = False  # draw out_dir/loss.png from out_dir/metrics.csv at the end (needs matplotlib)
    # Weights & Biases logging, as nanoGPT's (needs pip install wandb)
    wandb_log: bool = False  # log the run to Weights & Biases (WANDB_MODE=offline logs locally)
    wandb_project: str = "gpt-char"  # the W&B project
    wandb_run_name: str = "run"  # the W&B run's name
    # data
    dataset: str = DEFAULT_DATASET  # folder under data_dir made by prepare_shakespeare.py
    data_dir: str = "data"  # where datasets live
    gradient_accumulation_steps: int = 1  # global count, divided across torchrun processes
    batch_size: int = 64  # sequences per micro-batch
    # optimizer: AdamW, or Muon for the matrices inside the blocks and AdamW for the rest
    optimizer: str = "adamw"  # 'adamw' or 'muon'
    learning_rate: float = 1e-3  # peak learning rate (Muon's steps are scaled to match AdamW's)
    max_iters: int = 5000  # optimizer steps to run
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9  # AdamW's momentum
    beta2: float = 0.99  # AdamW's average of squared gradients
    grad_clip: float = 1.0  # 0 disables clipping
    # learning rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = True  # False: learning_rate throughout
    warmup_iters: int = 100  # iterations of linear warmup
    lr_decay_iters: int = 5000  # the cosine reaches min_lr here (usually max_iters)
    min_lr: float = 1e-4  # the schedule's floor (about learning_rate / 10)
    max_seconds: float = 0.0  # > 0: stop after this much training time, the schedule laid over it
    # system (and device, dtype, compile: DeviceSettings, in device.py)
    backend: str = "auto"  # torch.distributed backend: 'auto' is nccl on CUDA, gloo elsewhere
    seed: int = 1337  # seeds the weights, dropout and batches

    def __post_init__(self):
        """Every setting is checked here, where it is declared: a bad value stops the run before it starts."""
        as_config_error(super().__post_init__)  # the model's settings: GPTConfig's checks
        refuse_gpt2_weights(self.init_from)
        for key in ("batch_size", "max_iters", "eval_iters", "eval_interval", "log_interval",
                    "gradient_accumulation_steps"):
            check(getattr(self, key) > 0, key, getattr(self, key), "positive")
        for key in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "sample_interval"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        check(0 <= self.min_lr <= self.learning_rate, "min_lr", self.min_lr,
              f"between 0 and learning_rate ({self.learning_rate})")
        for key in ("beta1", "beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "in [0, 1)")
        if self.decay_lr:
            check(self.lr_decay_iters > self.warmup_iters, "lr_decay_iters", self.lr_decay_iters,
                  f"greater than warmup_iters ({self.warmup_iters})")
        check(self.max_seconds >= 0, "max_seconds", self.max_seconds, ">= 0 (0: no time limit)")
        check(self.out_dir != "", "out_dir", self.out_dir, "a folder name")
        check_dataset_name("dataset", self.dataset)
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("backend", self.backend, ("auto", "nccl", "gloo"))
        self.check_device_settings()


# Data: train.bin and val.bin hold token ids as uint16, read through a memory map

def token_count(path):
    return os.path.getsize(path) // 2


def dataset_dir(cfg):
    return os.path.join(cfg.data_dir, cfg.dataset)


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
    ddir = dataset_dir(cfg)
    tok = load_tokenizer(os.path.join(ddir, "meta.pkl"))
    for split in ("train", "val"):
        path = os.path.join(ddir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % 2 or (size and int(np.memmap(path, dtype=np.uint16, mode="r").max()) >= tok.vocab_size):
            raise UserError(f"{path} does not belong with {ddir}/meta.pkl (token ids beyond its {tok.vocab_size} "
                            f"tokens, or a truncated file); prepare the dataset again with prepare_shakespeare.py")
        check_longer_than_a_block(path, cfg.block_size)
    return tok


def bits_per_char_scales(cfg):
    """For each split, what turns a loss per token (nats) into bits per character of its text, so
    that character and BPE models compare on one scale (tokenizer.bits_per_char)."""
    chars = read_meta(os.path.join(dataset_dir(cfg), "meta.pkl")).get("chars", {})
    scales = {}
    for split in ("train", "val"):
        tokens = token_count(os.path.join(dataset_dir(cfg), f"{split}.bin"))
        scales[split] = bits_per_char(1.0, tokens, chars.get(split, tokens))  # nanoGPT's: a token per character
    return scales


def read_windows(path, starts, block_size, device):
    """Inputs x (B, T) and targets y (B, T) from the windows of block_size + 1 tokens at `starts`;
    y is x shifted left by one: each position predicts the next token."""
    # A fresh memmap per batch keeps memory flat: pages read are not pinned to the process.
    data = np.memmap(path, dtype=np.uint16, mode="r")
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


# Learning rate

def get_lr(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, min_lr after.
    `it` may be fractional (the time-budgeted schedule)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)  # never 0, even at it=0
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def lr_now(progress, cfg):
    """The schedule over iterations, or laid over the time budget (the run's position in seconds)."""
    if progress.schedule_seconds > 0:
        return get_lr(progress.train_seconds / progress.schedule_seconds * cfg.lr_decay_iters, cfg)
    return get_lr(progress.iter_num, cfg)


# The model: from scratch, or from a checkpoint (to resume, evaluate or fine-tune)

def checkpoint_to_load(cfg):
    """The checkpoint file the run starts from (None: from scratch) and a hint for when it is missing."""
    if cfg.init_from == "scratch" and not cfg.eval_only:
        return None, ""
    train_first = "; train one first, or use --init_from=scratch"
    if cfg.init_from == "resume" and not cfg.eval_only:
        return resume_path(cfg.out_dir), train_first
    if cfg.init_from in ("scratch", "resume"):  # eval_only evaluates the run's own (best) checkpoint
        return os.path.join(cfg.out_dir, CKPT_NAME), train_first
    # fine-tuning: a checkpoint file or the out_dir that holds one
    path = os.path.join(cfg.init_from, CKPT_NAME) if os.path.isdir(cfg.init_from) else cfg.init_from
    return path, "; init_from takes 'scratch', 'resume', a ckpt.pt file or an out_dir holding one"


def init_model(cfg, tok, device):
    """Build the model from scratch or load it from a checkpoint. Returns (cfg, model, checkpoint):
    cfg with the dataset's vocab_size and the checkpoint model's settings, and the checkpoint (None
    from scratch), which still holds the optimizer and random state to resume."""
    cfg = replace(cfg, vocab_size=tok.vocab_size)
    path, hint = checkpoint_to_load(cfg)
    if path is None:
        return cfg, build_model(GPTConfig.from_settings(cfg)), None
    checkpoint = load_checkpoint(path, device, hint=hint)
    resuming = cfg.init_from == "resume" and not cfg.eval_only
    if resuming:
        check_resume_settings(cfg, checkpoint.get("config", {}), path)
    model = model_from_checkpoint(checkpoint)
    if not same_vocabulary(checkpoint, tok):
        raise CheckpointError(f"{path} was trained with another vocabulary than dataset '{cfg.dataset}' has "
                              f"({model.config.vocab_size} vs {tok.vocab_size} tokens); prepare the dataset "
                              f"with --vocab_from set to the checkpoint's dataset")
    return adopt_checkpoint_model(cfg, model, resuming), model, checkpoint


def adopt_checkpoint_model(cfg, model, resuming):
    """cfg with the checkpoint model's settings: its shape wins over the config's. Fine-tuning may
    shorten the context (cropped here) and use another dropout (set here)."""
    shape = {f.name: getattr(model.config, f.name) for f in fields(GPTConfig)
             if f.name not in ("vocab_size", "block_size", "dropout")}
    if resuming or cfg.eval_only:
        shape["block_size"] = model.config.block_size
    elif cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the checkpoint's {model.config.block_size}; "
                          f"fine-tune with --block_size={model.config.block_size} or less")
    model.config.dropout = cfg.dropout
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    return replace(cfg, **shape)


def prepare_model(model, compiled, device, procs):
    """The model the steps run: compiled where compiling pays, wrapped for data parallelism under torchrun."""
    if compiled:
        model = torch.compile(model)
    if procs.world_size > 1:
        # No buffers to sync in forward: rope and sinusoid tables are the same everywhere, and a sync in
        # forward would hang an eval where some process has no batch to run. (PyTorch 2.13 renamed the
        # setting: broadcast_buffers, which it now warns about, became forward_sync_buffers.)
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        on_cuda = torch.device(device).type == "cuda"
        model = ddp(model, device_ids=[procs.local_rank] if on_cuda else None, **{no_sync: False})
    return model


# Evaluation

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
    path = os.path.join(dataset_dir(cfg), f"{split}.bin")
    rng = np.random.default_rng([cfg.seed, 1000 + seed_offset])
    starts = rng.integers(0, token_count(path) - cfg.block_size, size=(cfg.eval_iters, cfg.batch_size))
    losses = torch.zeros(cfg.eval_iters, device=device)
    for k in range(procs.rank, cfg.eval_iters, procs.world_size):
        x, y = read_windows(path, starts[k], cfg.block_size, device)
        with ctx:
            _, loss = model(x, y)
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
                _, loss = model(x, y)
            total += loss.float() * len(starts)
    if procs.world_size > 1:
        torch.distributed.all_reduce(total)
    return total.item() / n_windows


EVAL_TOKENS = 16384  # per batch of the whole-val pass: few enough for any device that trains the model


def whole_val_loss(model, cfg, device, ctx, procs):
    """The figure the README reports: the loss over every window of the val split, in batches sized
    for speed (a small training batch would make many small steps), never smaller than training's."""
    batch_size = max(cfg.batch_size, EVAL_TOKENS // cfg.block_size)
    return evaluate_split(model, os.path.join(dataset_dir(cfg), "val.bin"), cfg.block_size, batch_size,
                          device, ctx, procs)


def evaluate_only(model, cfg, device, ctx, procs):
    """--eval_only: the checkpoint's loss on eval_iters batches of each split (nanoGPT's estimate) and
    over the whole val split."""
    losses = estimate_loss(model, cfg, device, ctx, procs)
    t0 = time.perf_counter()
    losses["val_full"] = whole_val_loss(model, cfg, device, ctx, procs)
    seconds = time.perf_counter() - t0
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


# One optimizer step

def train_step(model, optimizer, scaler, batches, accum_steps, ctx, grad_clip, lr):
    """One optimizer step over accum_steps micro-batches; returns the mean loss as a tensor (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro, (x, y) in enumerate(batches):
        # under DDP, all-reduce the gradients only once, on the last micro-step
        sync = nullcontext() if micro == accum_steps - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx:
                _, loss = model(x, y)
            scaler.scale(loss / accum_steps).backward()
        total = total + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / accum_steps


def micro_steps_per_process(cfg, procs):
    """gradient_accumulation_steps counts the micro-steps of all processes together, as nanoGPT's."""
    if cfg.gradient_accumulation_steps % procs.world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                          f"of the number of processes ({procs.world_size})")
    return cfg.gradient_accumulation_steps // procs.world_size


def mean_over_processes(loss, procs):
    """The global batch's loss, not just this process's share."""
    if procs.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss = loss / procs.world_size
    return loss.item()


# Stopping and saving

class Interrupted(UserError):
    """Raised after SIGINT or SIGTERM, once the checkpoint is saved."""


class StopSignals:
    """Within this context SIGINT (Ctrl-C) and SIGTERM set .received instead of killing the process,
    so the loop can finish its step and save. A second Ctrl-C stops at once; more SIGTERMs change
    nothing, because torchrun forwards the one it gets and schedulers (SLURM) often signal every
    process as well: a process may see two for one request to stop."""

    def __init__(self):
        self.received = None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def asked(self, iter_num, log_interval, procs, device):
        """Whether a signal asked any process to stop. Under torchrun a signal may reach some processes
        only; they vote on it at log steps (all processes call this at every step)."""
        vote = procs.world_size == 1 or iter_num % log_interval == 0
        return vote and any_process(self.received is not None, procs, device)


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
    """A run from scratch must not replace the checkpoints of a trained one by accident."""
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
        raise ConfigError(f"{path} holds a trained run ({what}); continue it with --init_from=resume, train into "
                          f"another --out_dir, or start over there with --overwrite=True")


def claim_out_dir(cfg):
    """Make out_dir this run's: it exists and can be written, no other run trains into it (its lock
    is taken and returned), a trained run there is not replaced from scratch unless asked, and
    half-written checkpoints of runs killed with -9 are removed."""
    ensure_writable(cfg.out_dir)
    lock = lock_out_dir(cfg.out_dir)
    try:
        if cfg.init_from == "scratch":
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


def report_start(model, cfg, tokens_per_iter, dtype, device, procs):
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M | tokens per iteration: {tokens_per_iter:,} | "
          f"device: {device} | dtype: {describe_dtype(cfg.dtype, dtype, device)}"
          + (f" | processes: {procs.world_size}" if procs.world_size > 1 else ""))


def report_end(cfg, progress, eval_seconds, val_full, val_bpc, val_seconds, start_iter):
    print(f"trained {progress.iter_num} iterations in {progress.train_seconds:.1f} s of training time "
          f"({eval_seconds:.1f} s more in evaluations and saves); "
          f"val loss over the whole val split: {val_full:.4f} ({val_bpc:.4f} bits per character, in {val_seconds:.1f} s)")
    if not os.path.exists(os.path.join(cfg.out_dir, CKPT_NAME)):
        print(f"no checkpoint written: the val loss never improved on step {start_iter}'s "
              f"(--always_save_checkpoint=True keeps the last model anyway)")
    if cfg.plot:
        try:
            print(f"loss curves drawn in {plot_metrics(cfg.out_dir)}")
        except UserError as e:
            print(f"warning: {e}")


# Where a run is

@dataclass
class Progress:
    """Where a run is, besides its weights and optimizer state (all saved in its checkpoints)."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0  # time in training steps, evals excluded: what max_seconds budgets
    # the budget the learning rate schedule is laid over: the first run's max_seconds, so that a
    # resumed run with a larger budget goes on at min_lr instead of rewinding the schedule
    schedule_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, checkpoint):
        schedule = checkpoint.get("schedule_seconds", checkpoint.get("config", {}).get("max_seconds", 0.0))
        return cls(checkpoint["iter_num"], float(checkpoint["best_val_loss"]), checkpoint.get("train_seconds", 0.0),
                   schedule)


# The recipe

def train(cfg):
    """Train the model cfg describes; return the last evaluation's losses (and the whole val split's)."""
    procs, device = start_processes(cfg.device, cfg.backend)
    reuse_freed_memory(device)  # on a CPU: large activations, freed and allocated every step, stay mapped
    micro_steps = micro_steps_per_process(cfg, procs)
    dtype = select_dtype(cfg.dtype, device)
    ctx = autocast_context(device, dtype)  # mixed precision: matmuls in dtype, weights in float32
    tok = load_dataset(cfg, procs, device)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs per process
    data_rng = np.random.default_rng(cfg.seed)  # the same in every process: see TrainBatches
    cfg, raw_model, checkpoint = init_model(cfg, tok, device)
    raw_model = speed_up_training(raw_model.to(device), device, dtype)
    if cfg.eval_only:
        return evaluate_only(raw_model, cfg, device, ctx, procs)

    with out_dir_claimed(cfg, procs, device):  # only now: a run refused above leaves nothing behind
        device_type = torch.device(device).type
        optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                                   device_type, optimizer=cfg.optimizer,
                                                   muon_dtype=newton_schulz_dtype(device))
        scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # float16 needs one
        progress = Progress(schedule_seconds=cfg.max_seconds)
        if cfg.init_from == "resume":
            restore_training_state(checkpoint, raw_model, optimizer, scaler, data_rng, device, procs.rank)
            progress = Progress.from_checkpoint(checkpoint)
        checkpoint = None  # free its memory
        compiled = use_compile(cfg.compile, device)
        model = prepare_model(raw_model, compiled, device, procs)  # raw_model: the same weights, to save and sample
        tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        batches = TrainBatches(os.path.join(dataset_dir(cfg), "train.bin"), cfg.batch_size, cfg.block_size,
                               micro_steps, data_rng, device, procs)

        def save(path, val_loss=None):
            """Write the run's state to path. Every process calls this: each adds its random state; rank 0 writes."""
            rng = gather_from_all(capture_rng(data_rng, device), procs)
            state = lambda: training_checkpoint(raw_model, optimizer, scaler, progress, cfg, tok, rng, val_loss)
            on_rank0(lambda: save_checkpoint(state(), path), procs, device)  # all wait for rank 0's save

        wandb_run = on_rank0(lambda: start_wandb(cfg) if cfg.wandb_log else None, procs, device)
        if procs.master:
            report_start(raw_model, cfg, tokens_per_iter, dtype, device, procs)
        # this process's FLOPs per iteration against its device's peak (measured in the run's dtype)
        flops = raw_model.flops_per_token() * tokens_per_iter / procs.world_size
        peak = matmul_peak_flops(device, dtype) if procs.master else 1.0
        timed = cfg.max_seconds > 0  # a time budget ends the run
        clocked = timed or progress.schedule_seconds > 0  # the step times count: for the budget, or for the lr
        start_iter = progress.iter_num
        eval_seconds = 0.0  # what the evals and saves cost this run: eval_interval sets it

        bpc = bits_per_char_scales(cfg)
        with StopSignals() as stop, TrainingLog(cfg, progress, tokens_per_iter, flops, peak, procs.master,
                                                wandb_run, bpc) as log:
            while True:
                # every process holds the same train_seconds (rank 0's clock), so they agree on the end
                done = progress.iter_num >= cfg.max_iters or (timed and progress.train_seconds >= cfg.max_seconds)
                if progress.iter_num % cfg.eval_interval == 0 or done:
                    t0 = time.perf_counter()
                    losses = estimate_loss(model, cfg, device, ctx, procs)
                    log.eval(progress, losses)
                    improved = losses["val"] < progress.best_val_loss
                    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
                    if progress.iter_num > 0 and (improved or cfg.always_save_checkpoint):
                        save(os.path.join(cfg.out_dir, CKPT_NAME), losses["val"])
                    eval_seconds += time.perf_counter() - t0
                    log.restart_clock()  # evals and saves are not training time
                if cfg.sample_interval and progress.iter_num % cfg.sample_interval == 0 and procs.master:
                    text = show_sample(raw_model, tok, ctx, device, cfg.seed)
                    log.write(f"sample at step {progress.iter_num}:\n{text}")
                    log.restart_clock()
                if done:
                    break
                if stop.asked(progress.iter_num, cfg.log_interval, procs, device):
                    # ckpt.pt keeps the best model unless every eval saves anyway; resume picks the newer file
                    path = os.path.join(cfg.out_dir, CKPT_NAME if cfg.always_save_checkpoint else RESUME_NAME)
                    save(path)
                    raise Interrupted(f"stopped by {stop.received or 'a signal to another process'} after iteration "
                                      f"{progress.iter_num}; saved {path}; continue with --init_from=resume")

                t0 = time.perf_counter()
                lr = lr_now(progress, cfg)
                loss = train_step(model, optimizer, scaler, batches.next_step(), micro_steps, ctx, cfg.grad_clip, lr)
                progress.iter_num += 1
                log_step = progress.iter_num % cfg.log_interval == 0
                if log_step or clocked:
                    loss.item()  # wait for the step (otherwise the device runs ahead of the loop)
                step_seconds = time.perf_counter() - t0
                if compiled and progress.iter_num == start_iter + 1:
                    log.write(f"compiled in {step_seconds:.1f} s (not counted as training time)")
                    step_seconds = 0.0
                progress.train_seconds += step_seconds
                if clocked:
                    progress.train_seconds = from_rank0(progress.train_seconds, procs, device)  # one clock, one lr
                log.step(step_seconds)
                if log_step:
                    log.log(progress, mean_over_processes(loss, procs), lr)

        check_replicas_agree(raw_model, procs, device)
        t0 = time.perf_counter()
        losses["val_full"] = whole_val_loss(raw_model, cfg, device, ctx, procs)
        if procs.master:
            report_end(cfg, progress, eval_seconds, losses["val_full"], losses["val_full"] * bpc["val"],
                       time.perf_counter() - t0, start_iter)
        return losses


def main(argv):
    cfg = configure(TrainConfig, argv)
    failed = True
    try:
        with out_of_memory_in_one_line(cfg.device, f"--batch_size ({cfg.batch_size}) or --block_size "
                                                   f"({cfg.block_size}); --gradient_accumulation_steps keeps the "
                                                   f"batch with smaller pieces"):
            train(cfg)
        failed = False
    finally:
        end_processes(failed)


if __name__ == "__main__":
    run_main(main)
