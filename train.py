"""
Train a character-level GPT.

    python train.py config/train_shakespeare_char.py          # the GPU recipe
    python train.py config/train_shakespeare_char_cpu.py      # 100 seconds on a laptop CPU
    torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=4

Any setting can be overridden with --key=value. This file is the recipe, top to bottom: the
settings, the learning rate schedule, one optimizer step, the evaluations, then train(), the loop.
Each other concern has a module of its own: dataset.py (token files, batches), evaluate.py (losses),
checkpoint.py, out_dir.py, files.py (safe writes, signals), device.py, metrics.py (logs).
"""

import importlib
import inspect
import math
import os
import signal
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch

from checkpoint import (CHECKPOINT_SHAPE, CKPT_NAME, RESUME_NAME, Progress, capture_rng, checkpoint_to_load,
                        init_model, load_checkpoint, model_from_checkpoint, refuse_gpt2_weights,
                        restore_training_state, save_checkpoint, training_checkpoint)
from configurator import (ConfigError, UserError, as_config_error, check, check_choice, check_seed, configure,
                          run_main)
from dataset import (TrainBatches, bits_per_char_scales, check_blocks, load_dataset, longest_block, split_file,
                     split_sizes)
from device import (DeviceSettings, autocast_context, busy_cpu_line, check_replicas_agree, describe_dtype,
                    end_processes, Processes, from_rank0, gather_from_all, grad_scaler, matmul_peak_flops,
                    newton_schulz_dtype, on_rank0, out_of_memory_in_one_line, reuse_freed_memory, select_dtype,
                    start_processes, use_compile)
from evaluate import estimate_loss, evaluate_only, final_val_loss, show_sample
from files import StopSignals
from metrics import TrainingLog, plot_metrics, start_wandb
from model import GPTConfig, build_model
from out_dir import out_dir_claimed, refuse_a_file_as_out_dir, refuse_to_replace_a_trained_run
from prepare_shakespeare import DEFAULT_DATASET, check_dataset_name
from sizing import (TIMED_STEPS, Text, as_checkpoint_model, as_chosen_before, candidate_settings, chooses_context,
                    sized_for_budget, tokens_per_iter)
from speedups import speed_up_training


@dataclass
class TrainConfig(GPTConfig, DeviceSettings):
    """The training recipe's settings, then the model's (GPTConfig) and where it runs (DeviceSettings)."""
    not_settings: ClassVar = {"vocab_size": "it is the dataset's number of tokens (its meta.pkl)",
                              "given_settings": "it records the settings config files and --key=value gave"}
    # I/O
    out_dir: str = "out"  # where checkpoints, config.json, metrics.csv and loss.png go
    eval_interval: int = 250  # evaluate (and save if val loss improved) every this many iterations, and at the end
    log_interval: int = 10  # log loss, lr, ms/iter and MFU every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate out_dir/ckpt.pt (or init_from's checkpoint) and exit
    eval_split: str = "val"  # the split eval_only evaluates whole: 'val', or 'test' (prepared with --test_fraction)
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
    batch_size: int = 64  # sequences per micro-batch (with size_to_budget, the context's unless given)
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
    max_seconds: float = 0.0  # > 0: training time to stop at; the schedule ends with it or max_iters, the first
    size_to_budget: bool = False  # pick the model for max_seconds on this machine by measuring (sizing.py): shape,
    # context, batch, learning rate and dropout, those not given
    # system (and device, dtype, compile: DeviceSettings, in device.py)
    backend: str = "auto"  # torch.distributed backend: 'auto' is nccl on CUDA, gloo elsewhere
    seed: int = 1337  # seeds the weights, dropout and batches
    given_settings: tuple = ()  # the settings config files and --key=value gave (configure fills it)

    def __post_init__(self):
        """Every setting is checked here, where it is declared: a bad value stops the run before it starts."""
        lowest_lr = self.learning_rate
        check(self.n_embd > 0, "n_embd", self.n_embd, "positive")  # before sizing.py divides by them
        check(self.block_size > 0, "block_size", self.block_size, "positive")
        check_seed(self.seed)
        if self.size_to_budget:  # the shape is sizing.py's to choose: check the model's settings with its first
            tried = candidate_settings(self)
            model_settings = {f.name for f in fields(GPTConfig)}
            as_config_error(lambda: GPTConfig.from_settings(self, **{k: v for k, v in tried[0].items()
                                                                     if k in model_settings}))
            lowest_lr = min(settings.get("learning_rate", self.learning_rate) for settings in tried)
        else:
            as_config_error(super().__post_init__)  # the model's settings: GPTConfig's checks
        refuse_gpt2_weights(self.init_from)
        for key in ("batch_size", "max_iters", "eval_iters", "eval_interval", "log_interval",
                    "gradient_accumulation_steps"):
            check(getattr(self, key) > 0, key, getattr(self, key), "positive")
        for key in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "sample_interval"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        check(0 <= self.min_lr <= lowest_lr, "min_lr", self.min_lr, f"between 0 and learning_rate ({lowest_lr}"
              + (", the lowest sizing.py would choose)" if lowest_lr != self.learning_rate else ")"))
        for key in ("beta1", "beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "in [0, 1)")
        if self.decay_lr:
            check(self.lr_decay_iters > self.warmup_iters, "lr_decay_iters", self.lr_decay_iters,
                  f"greater than warmup_iters ({self.warmup_iters})")
        check(self.max_seconds >= 0, "max_seconds", self.max_seconds, ">= 0 (0: no time limit)")
        check(self.max_seconds > 0 or not self.size_to_budget, "max_seconds", self.max_seconds,
              "> 0 with size_to_budget=True, the budget the model is sized for (or give --size_to_budget=False "
              "with the model's settings and --max_iters)")
        check(self.out_dir != "", "out_dir", self.out_dir, "a folder name")
        refuse_a_file_as_out_dir(self.out_dir)
        check_dataset_name("dataset", self.dataset)
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("eval_split", self.eval_split, ("val", "test"))
        check_choice("backend", self.backend, ("auto", "nccl", "gloo"))
        self.check_device_settings()


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
    """The schedule over iterations, or laid over the time budget: then the run's position is its share
    of the budget's seconds or of max_iters, whichever is further on, so that the schedule ends with
    whichever ends the run (sizing.py ends a run on an iteration count where more would overfit)."""
    if progress.schedule_seconds > 0:
        position = max(progress.train_seconds / progress.schedule_seconds, progress.iter_num / cfg.max_iters)
        return get_lr(position * cfg.lr_decay_iters, cfg)
    return get_lr(progress.iter_num, cfg)


# The model for the budget: sizing.py's rule, on this machine's measured speed

def step_timer(tokens, vocab_size, device, dtype, procs=Processes(), steps=TIMED_STEPS):
    """seconds_per_iter(candidate, time_left): the median of `steps` training steps of candidate's
    shape on tokens (a TokenFile), after one that warms up, run as train() runs them (uncompiled:
    compiling each candidate would cost more than it tells); inf, and no more steps, once the next
    step (as long as the last) would end past time_left seconds. On a CPU that other programs keep
    busy, says so once (device.busy_cpu_line): the speeds it measures are then the busy machine's."""
    ctx = autocast_context(device, dtype)
    scaler = grad_scaler(device, dtype)
    importlib.import_module("torch._dynamo")  # the first optimizer imports it (seconds, once): not the shapes' time
    said_busy = False

    def seconds_per_iter(candidate, time_left=math.inf):
        nonlocal said_busy
        torch.manual_seed(candidate.seed)
        model = build_model(GPTConfig.from_settings(candidate, vocab_size=vocab_size))
        model = speed_up_training(model.to(device), device, dtype)
        optimizer = build_optimizer(model, candidate, device)
        micro_steps = micro_steps_per_process(candidate, procs)
        batches = TrainBatches(tokens, candidate.batch_size, candidate.block_size, micro_steps,
                               np.random.default_rng(candidate.seed), device, procs)
        times, thread_times = [], []  # and how long this thread ran in each: did other programs take some?
        for _ in range(steps + 1):
            if times and sum(times) + times[-1] > time_left:
                return from_rank0(math.inf, procs, device)
            t0, thread_t0 = time.perf_counter(), time.thread_time()
            train_step(model, optimizer, scaler, batches.next_step(), micro_steps, ctx, candidate.grad_clip,
                       candidate.learning_rate).item()
            times.append(time.perf_counter() - t0)
            thread_times.append(time.thread_time() - thread_t0)
        busy = busy_cpu_line(sum(thread_times[1:]), sum(times[1:]))
        if busy and device == "cpu" and procs.master and not said_busy:
            print(busy)
            said_busy = True  # once a measurement
        return from_rank0(statistics.median(times[1:]), procs, device)  # every process picks rank 0's shape

    return seconds_per_iter


def fit_to_budget(cfg, tok, device, dtype, procs):
    """With size_to_budget: (cfg with the shape the rule picks for max_seconds here, said in one line,
    and max_iters where the model would only overfit past it; the seconds of the budget the measurement
    took, not for training). A resumed run keeps the choice it recorded; fine-tuning keeps its
    checkpoint's shape, dropout and context, the learning rate following its width; eval_only keeps
    the checkpoint's context."""
    if not cfg.size_to_budget:
        return cfg, 0.0
    cfg = replace(cfg, vocab_size=tok.vocab_size)  # the parameters the fit counts include the embedding
    text = Text(*(n / 1e6 for n in split_sizes(cfg)["train"]))  # the longer, the later it is learnt by heart
    if cfg.init_from != "scratch" or cfg.eval_only:
        path, hint = checkpoint_to_load(cfg)
        checkpoint = load_checkpoint(path, "cpu", hint=hint)
        if cfg.init_from == "resume" and not cfg.eval_only:
            return as_chosen_before(cfg, checkpoint.get("config", {}), text), 0.0
        # eval_only evaluates at the checkpoint's context; fine-tuning crops it to what the text holds
        longest = math.inf if cfg.eval_only else longest_block(cfg)
        return as_checkpoint_model(cfg, checkpoint["model_args"], longest), 0.0
    timer = step_timer(split_file(cfg, "train"), tok.vocab_size, device, dtype, procs)
    # every process reads rank 0's clock, as it takes rank 0's times: all make the same choices
    cfg, line, set_aside = sized_for_budget(cfg, timer, clock=lambda: from_rank0(time.perf_counter(), procs, device),
                                            longest_context=longest_block(cfg), text=text)
    if line and procs.master:
        print(line)
    return cfg, set_aside


def build_optimizer(model, cfg, device):
    return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                      torch.device(device).type, optimizer=cfg.optimizer,
                                      muon_dtype=newton_schulz_dtype(device))


# The model the steps run

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


# One optimizer step

def train_step(model, optimizer, scaler, batches, accum_steps, ctx, grad_clip, lr):
    """One optimizer step over accum_steps micro-batches; returns the mean next-token loss as a
    tensor (no sync). The objective is that loss plus the model's extra terms (multi-token prediction)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro, (x, y) in enumerate(batches):
        # under DDP, all-reduce the gradients only once, on the last micro-step
        sync = nullcontext() if micro == accum_steps - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx:
                _, loss, extra_loss = model(x, y)
                objective = loss if extra_loss is None else loss + extra_loss
            scaler.scale(objective / accum_steps).backward()
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


# Training time

class TrainingClock:
    """The run's training time, which max_seconds budgets and the time-laid schedule follows: the
    optimizer steps only, not evals, saves, samples or the first compiled step's compiling. Under
    torchrun every process takes rank 0's clock, so that they agree on the learning rate and the end."""

    def __init__(self, cfg, progress, compiled, procs, device):
        self.cfg, self.progress, self.procs, self.device = cfg, progress, procs, device
        self.timed = cfg.max_seconds > 0  # a time budget ends the run
        self.needed = self.timed or progress.schedule_seconds > 0  # for the budget, or for the lr
        self.compiling_step = progress.iter_num + 1 if compiled else None

    def out_of_budget(self):
        cfg, progress = self.cfg, self.progress
        return progress.iter_num >= cfg.max_iters or \
            (self.timed and progress.train_seconds >= cfg.max_seconds - progress.set_aside_seconds)

    def count_step(self, loss, t0, log):
        """Count the step that started at t0 (and has just raised iter_num); returns its seconds."""
        if self.needed or self.progress.iter_num % self.cfg.log_interval == 0:
            loss.item()  # wait for the step (otherwise the device runs ahead of the loop)
        seconds = time.perf_counter() - t0
        if self.progress.iter_num == self.compiling_step:
            log.write(f"compiled in {seconds:.1f} s (not counted as training time)")
            seconds = 0.0
        self.progress.train_seconds += seconds
        if self.needed:
            self.progress.train_seconds = from_rank0(self.progress.train_seconds, self.procs, self.device)
        return seconds


# The evaluations a run makes

def evaluate_and_save(model, cfg, progress, save, log, device, ctx, procs):
    """The evals along a run: both splits' losses on fixed batches, logged; the model is saved to
    ckpt.pt when its val loss is the best so far (or at every eval, with always_save_checkpoint)."""
    losses = estimate_loss(model, cfg, device, ctx, procs)
    log.eval(progress, losses)
    improved = losses["val"] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
    if progress.iter_num > 0 and (improved or cfg.always_save_checkpoint):
        save(os.path.join(cfg.out_dir, CKPT_NAME), losses["val"])
    return losses


class Interrupted(UserError):
    """Raised after SIGINT or SIGTERM, once the checkpoint is saved: a stop asked for, not an error. The
    exit code is the one that signal gives a process it ends, 128 + its number (130 for Ctrl-C), which
    shells and schedulers read as "stopped", not "failed"."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name].value

    def line(self):
        return str(self)


def save_and_stop(cfg, progress, save, stop):
    """A signal asked to stop: save the run's state and end it with a one-line message. ckpt.pt keeps
    the best model unless every eval saves anyway; --init_from=resume picks the newer of the two."""
    path = os.path.join(cfg.out_dir, CKPT_NAME if cfg.always_save_checkpoint else RESUME_NAME)
    save(path)
    raise Interrupted(f"stopped by {stop.received or 'a signal to another process'} after iteration "
                      f"{progress.iter_num}; saved {path}; to continue, run the same command with --init_from=resume",
                      stop.received or "SIGTERM")  # what torchrun forwards to every process


def note_a_longer_budget(cfg, progress):
    """A resumed run given more seconds than its schedule was laid over goes on at min_lr (Progress's
    schedule_seconds): say so, since it is not what a new run of that budget would do."""
    beyond = cfg.max_seconds - progress.set_aside_seconds - progress.schedule_seconds
    if progress.schedule_seconds > 0 and beyond > 0:
        print(f"resumed with max_seconds={cfg.max_seconds:g}: the learning rate schedule ends where the run's first "
              f"{progress.schedule_seconds:.3g} s of training did; the {beyond:.3g} s past that train at min_lr "
              f"({cfg.min_lr:g})")


def note_the_checkpoint_shape(asked, adopted):
    """Fine-tuning trains the checkpoint's model as it is shaped (adopt_checkpoint_model): say which shape
    settings a config file or --key=value gave that it does not train with."""
    unused = [f"{k}={getattr(asked, k)!r} (it has {getattr(adopted, k)!r})" for k in CHECKPOINT_SHAPE
              if k in asked.given_settings and getattr(asked, k) != getattr(adopted, k)]
    if unused:
        print(f"fine-tuning keeps {asked.init_from}'s model, so these settings are not used: {', '.join(unused)}")


def report_start(model, cfg, step_tokens, dtype, device, procs):
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M | tokens per iteration: {step_tokens:,} | "
          f"device: {device} | dtype: {describe_dtype(cfg.dtype, dtype, device)}"
          + (f" | processes: {procs.world_size}" if procs.world_size > 1 else ""))


def kept_model_loss(cfg, progress, device, ctx):
    """Where ckpt.pt, the model sample.py uses, holds an earlier model than the last (the run kept its
    best eval's, and trained on past it), the end-of-run val pass of that one too: (loss, its
    iteration), or None where ckpt.pt holds the last model or none."""
    path = os.path.join(cfg.out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return None
    checkpoint = load_checkpoint(path)  # on the CPU: only its model goes to the device, not its optimizer
    if checkpoint["iter_num"] == progress.iter_num:
        return None
    loss, _, _ = final_val_loss(model_from_checkpoint(checkpoint).to(device), cfg, device, ctx)
    return loss, checkpoint["iter_num"]


def report_end(cfg, progress, paused_seconds, val_full, covered, bpc, val_seconds, start_iter, kept):
    print(f"trained {progress.iter_num} iterations in {progress.train_seconds:.1f} s of training time "
          f"({paused_seconds:.1f} s more in evaluations and saves{' and samples' if cfg.sample_interval else ''}); "
          f"val loss over {covered}: {val_full:.4f} ({val_full * bpc:.4f} bits per character, in {val_seconds:.1f} s)"
          + (f" for the last model; {kept[0]:.4f} ({kept[0] * bpc:.4f}) for ckpt.pt, the model of iteration "
             f"{kept[1]} that sample.py uses" if kept else ""))
    if not os.path.exists(os.path.join(cfg.out_dir, CKPT_NAME)):
        print(f"no checkpoint written: the val loss never improved on step {start_iter}'s "
              f"(--always_save_checkpoint=True keeps the last model anyway)")
    if cfg.plot:
        try:
            print(f"loss curves drawn in {plot_metrics(cfg.out_dir)}")
        except UserError as e:
            print(f"warning: {e}")


# The recipe

def train(cfg):
    """Train the model cfg describes; return the last evaluation's losses and the end-of-run val
    pass's (final_val_loss: the whole val split, or an even sample of a very large one)."""
    procs, device = start_processes(cfg.device, cfg.backend)
    reuse_freed_memory(device)  # on a CPU: large activations, freed and allocated every step, stay mapped
    micro_steps = micro_steps_per_process(cfg, procs)
    dtype = select_dtype(cfg.dtype, device)
    ctx = autocast_context(device, dtype)  # mixed precision: matmuls in dtype, weights in float32
    # the context is checked against the text now where it is known, else once it is (check_blocks)
    tok = load_dataset(cfg, procs, device, None if chooses_context(cfg) or cfg.eval_only else cfg.block_size)
    if cfg.init_from != "resume" and not cfg.overwrite and not cfg.eval_only:
        refuse_to_replace_a_trained_run(cfg)  # now: not after seconds of measuring, nor after wandb starts a run
    cfg, set_aside_seconds = fit_to_budget(cfg, tok, device, dtype, procs)  # first: it draws random numbers
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs per process
    data_rng = np.random.default_rng(cfg.seed)  # the same in every process: see TrainBatches
    asked = cfg  # the settings given, before a checkpoint's model replaces its shape
    cfg, raw_model, checkpoint = init_model(cfg, tok, device)
    check_blocks(cfg)  # the context from the rule or the checkpoint, now known
    if cfg.init_from not in ("scratch", "resume") and not cfg.eval_only and procs.master:  # fine-tuning
        note_the_checkpoint_shape(asked, cfg)
    raw_model = speed_up_training(raw_model.to(device), device, dtype)
    if cfg.eval_only:
        return evaluate_only(raw_model, cfg, device, ctx, procs)

    # wandb before out_dir is claimed: a run it refuses to log leaves out_dir as it was (--overwrite=True too)
    wandb_run = on_rank0(lambda: start_wandb(cfg) if cfg.wandb_log else None, procs, device)
    with out_dir_claimed(cfg, procs, device):  # only now: a run refused above leaves nothing behind
        optimizer = build_optimizer(raw_model, cfg, device)
        scaler = grad_scaler(device, dtype)
        progress = Progress(schedule_seconds=cfg.max_seconds - set_aside_seconds, set_aside_seconds=set_aside_seconds)
        if cfg.init_from == "resume":
            restore_training_state(checkpoint, raw_model, optimizer, scaler, data_rng, device, procs.rank)
            progress = Progress.from_checkpoint(checkpoint)
            if procs.master:
                note_a_longer_budget(cfg, progress)
        checkpoint = None  # free its memory
        compiled = use_compile(cfg.compile, device)
        model = prepare_model(raw_model, compiled, device, procs)  # raw_model: the same weights, to save and sample
        step_tokens = tokens_per_iter(cfg)
        batches = TrainBatches(split_file(cfg, "train"), cfg.batch_size, cfg.block_size, micro_steps, data_rng,
                               device, procs)

        def save(path, val_loss=None):
            """Write the run's state to path. Every process calls this: each adds its random state; rank 0 writes."""
            rng = gather_from_all(capture_rng(data_rng, device), procs)
            state = lambda: training_checkpoint(raw_model, optimizer, scaler, progress, cfg, tok, rng, val_loss)
            on_rank0(lambda: save_checkpoint(state(), path), procs, device)  # all wait for rank 0's save

        if procs.master:
            report_start(raw_model, cfg, step_tokens, dtype, device, procs)
        # MFU: this process's FLOPs per iteration against its device's peak, measured in the run's dtype
        flops = raw_model.flops_per_token() * step_tokens / procs.world_size
        peak = matmul_peak_flops(device, dtype) if procs.master else 1.0
        clock, start_iter = TrainingClock(cfg, progress, compiled, procs, device), progress.iter_num
        with StopSignals() as stop, TrainingLog(cfg, progress, step_tokens, flops, peak, procs.master,
                                                wandb_run, bits_per_char_scales(cfg)) as log:
            while True:
                done = clock.out_of_budget()  # every process holds rank 0's clock, so all agree
                if progress.iter_num % cfg.eval_interval == 0 or done:
                    with log.paused():  # evals and saves are not training time
                        losses = evaluate_and_save(model, cfg, progress, save, log, device, ctx, procs)
                if cfg.sample_interval and progress.iter_num % cfg.sample_interval == 0 and procs.master:
                    with log.paused():
                        log.write(f"sample at step {progress.iter_num}:\n"
                                  f"{show_sample(raw_model, tok, ctx, device, cfg.seed)}")
                if done:
                    break
                if stop.asked(progress.iter_num, cfg.log_interval, procs, device):
                    save_and_stop(cfg, progress, save, stop)

                t0, lr = time.perf_counter(), lr_now(progress, cfg)
                loss = train_step(model, optimizer, scaler, batches.next_step(), micro_steps, ctx, cfg.grad_clip, lr)
                progress.iter_num += 1
                log.step(clock.count_step(loss, t0, log))
                if progress.iter_num % cfg.log_interval == 0:
                    log.log(progress, mean_over_processes(loss, procs), lr)

        check_replicas_agree(raw_model, procs, device)
        losses["val_full"], covered, val_seconds = final_val_loss(raw_model, cfg, device, ctx, procs)
        if procs.master:
            kept = kept_model_loss(cfg, progress, device, ctx)
            report_end(cfg, progress, log.paused_seconds, losses["val_full"], covered,
                       bits_per_char_scales(cfg)["val"], val_seconds, start_iter, kept)
        return losses


def main(argv):
    cfg = configure(TrainConfig, argv)
    failed = True
    try:
        # a sized run's batch and context are not known yet: the hint names them without values
        lower = "--batch_size or --block_size" if cfg.size_to_budget else \
            f"--batch_size ({cfg.batch_size}) or --block_size ({cfg.block_size})"
        with out_of_memory_in_one_line(cfg.device, f"{lower}; --gradient_accumulation_steps keeps the batch with "
                                                   f"smaller pieces"):
            train(cfg)
        failed = False
    finally:
        end_processes(failed)


if __name__ == "__main__":
    run_main(main)
