"""
Train a character-level GPT.

    python train.py config/train_shakespeare_char.py          # the GPU recipe
    python train.py config/train_shakespeare_char_cpu.py      # 100 seconds on a laptop CPU
    torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char.py

Any setting can be overridden with --key=value. This file is also the home of device and dtype
selection, batching and checkpoint save/load, which sample.py and bench.py use.
"""

import csv
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError, UserError, check, check_choice, check_device, configure, run_main
from model import GPTConfig, build_model
from prepare_shakespeare import (DEFAULT_DATASET, CharTokenizer, check_dataset_name, prepare_dataset, remove_leftovers,
                                 write_atomic)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    log_interval: int = 10
    eval_iters: int = 200
    eval_only: bool = False  # evaluate the checkpoint in out_dir and exit
    always_save_checkpoint: bool = False  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint / out_dir to fine-tune
    # Weights & Biases logging, as nanoGPT's (needs pip install wandb)
    wandb_log: bool = False
    wandb_project: str = "gpt-char"
    wandb_run_name: str = "run"
    # data
    dataset: str = DEFAULT_DATASET
    data_dir: str = "data"
    gradient_accumulation_steps: int = 1  # global count, divided across torchrun processes
    batch_size: int = 64
    block_size: int = 256
    # model (the lecture's GPT)
    model_type: str = "gpt"  # 'gpt', or 'bigram' (the lecture's baseline)
    pos_encoding: str = "learned"  # 'learned', 'sinusoidal' or 'rope'
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    # optimizer: AdamW, or Muon for the matrices inside the blocks and AdamW for the rest
    optimizer: str = "adamw"  # 'adamw' or 'muon' (PyTorch 2.9+)
    learning_rate: float = 1e-3
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # learning rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    max_seconds: float = 0.0  # > 0: stop after this much training time, the schedule laid over it
    # system
    backend: str = "auto"  # torch.distributed backend: 'auto' is nccl on CUDA, gloo elsewhere
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
    compile: bool | str = "auto"  # torch.compile the model; 'auto': on CUDA only (see use_compile)
    seed: int = 1337
    plot: bool = False  # draw out_dir/loss.png from out_dir/metrics.csv at the end (needs matplotlib)

    def __post_init__(self):
        """Every setting is checked here, where it is declared: a bad value stops the run before it starts."""
        refuse_gpt2_weights(self.init_from)
        for key in ("batch_size", "max_iters", "eval_iters", "eval_interval", "log_interval",
                    "gradient_accumulation_steps"):
            check(getattr(self, key) > 0, key, getattr(self, key), "positive")
        for key in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
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
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("backend", self.backend, ("auto", "nccl", "gloo"))
        check_choice("compile", self.compile, COMPILE_CHOICES)
        check_device("device", self.device)
        model_config(self, vocab_size=1)  # the model's own settings, checked where the model declares them


GPT2_WEIGHTS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # the dtype settings of train.py, sample.py and bench.py
COMPILE_CHOICES = (True, False, "auto")
CKPT_NAME, RESUME_NAME = "ckpt.pt", "resume.pt"  # in out_dir: the best model; a stopped run's newer state


def refuse_gpt2_weights(init_from):
    if init_from in GPT2_WEIGHTS:
        raise ConfigError(f"init_from='{init_from}': OpenAI's GPT-2 weights are not supported here (they need the "
                          f"transformers package, a download and GPT-2's tokenizer; this repo is character-level); "
                          f"use nanoGPT for them")


MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's


def model_args(config):
    """A checkpoint's model_args: nanoGPT's keys, plus model_type and pos_encoding where they are
    not the GPT's defaults, so that nanoGPT can load the checkpoints of the models it has."""
    args = {k: getattr(config, k) for k in MODEL_ARGS}
    for k in ("model_type", "pos_encoding"):
        if getattr(config, k) != GPTConfig.__dataclass_fields__[k].default:
            args[k] = getattr(config, k)
    return args


# ----- device and precision (used by train.py, sample.py and bench.py)

def select_device(device="auto"):
    """'auto' is CUDA if there is a GPU, else Apple's MPS, else the CPU. On CUDA, float32 matmuls may
    use TF32 tensor cores (Ampere and newer), as nanoGPT allows: 10 bits of mantissa are plenty here."""
    check_device("device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this PyTorch sees no CUDA GPU; use --device=cpu or --device=auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} but MPS is not available here; use --device=cpu or --device=auto")
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(n=256, repeats=3):
    """How many times faster an n x n bfloat16 matmul runs than a float32 one on this CPU (best of
    `repeats`). CPUs with native bf16 (AVX512-BF16, AMX, ARM's BF16) give 1.5-4x; elsewhere bf16 is
    emulated and about 100x slower. Measuring works on every OS and architecture (no CPU flag names
    to know) and costs a few milliseconds, about 50 where bf16 is emulated."""
    times = {}
    numbers = torch.Generator().manual_seed(0)  # its own: the global generator must not move
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, generator=numbers).to(dtype) for _ in range(2))
        a @ b  # the first call may set up kernels
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        times[dtype] = best
    return times[torch.float32] / times[torch.bfloat16]


def bf16_is_native(device):
    """Whether bfloat16 matmuls run natively (fast) on device: CUDA GPUs of compute capability 8.0
    (Ampere) and newer, and AMD GPUs; CPUs where a measured bf16 matmul beats float32; not MPS.
    torch.cuda.is_bf16_supported() is no guide: it is also True where bf16 is emulated (T4, V100)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    if kind == "cpu":
        return cpu_bf16_speedup() > 1.0
    return False


def newton_schulz_dtype(device):
    """The precision of Muon's orthogonalisation: bf16 where bf16 matmuls are native, else float32."""
    return torch.bfloat16 if bf16_is_native(device) else torch.float32


def select_dtype(dtype, device):
    """'auto': bfloat16 where bf16 matmuls are native (recent GPUs, CPUs with bf16 instructions),
    float16 on older CUDA GPUs (with a GradScaler), float32 elsewhere (MPS, other CPUs)."""
    kind = torch.device(device).type
    if dtype == "auto":
        if bf16_is_native(device):
            return "bfloat16"
        return "float16" if kind == "cuda" else "float32"
    check_choice("dtype", dtype, DTYPES)
    if dtype == "float16" and kind == "cpu":
        raise ConfigError("float16 autocast is for GPUs; on CPU use --dtype=bfloat16 or --dtype=float32")
    return dtype


def use_compile(setting, device):
    """compile='auto' compiles on CUDA only. On CPU (and MPS) it made the step slower, measured: 452 vs
    334 ms for the GPU recipe's model on CPU, after a 30 s compile."""
    return torch.device(device).type == "cuda" if setting == "auto" else setting


def describe_dtype(requested, dtype, device):
    """The dtype and why, for the start-up line."""
    if requested != "auto":
        return f"{dtype} (asked for)"
    if torch.device(device).type == "cpu":
        return f"{dtype} (auto: bf16 matmuls run {cpu_bf16_speedup():.2g}x float32 on this CPU)"
    return f"{dtype} (auto: bf16 {'native' if bf16_is_native(device) else 'not native'} on {device})"


def autocast_context(device_type, dtype):
    """Mixed precision: weights stay float32, matmuls run in dtype."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# ----- data

def dataset_dir(cfg):
    return os.path.join(cfg.data_dir, cfg.dataset)


def ensure_dataset(cfg, verbose=True):
    """Return the dataset's tokenizer; prepare Tiny Shakespeare if it is missing."""
    ddir = dataset_dir(cfg)
    needed = [os.path.join(ddir, name) for name in ("train.bin", "val.bin", "meta.pkl")]
    if not all(os.path.exists(p) for p in needed):
        if cfg.dataset != DEFAULT_DATASET:
            raise UserError(f"dataset '{cfg.dataset}' is not prepared ({ddir} lacks train.bin, val.bin or meta.pkl); "
                            f"run: python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset {cfg.dataset}")
        if verbose:
            print(f"{ddir} is not prepared yet: preparing Tiny Shakespeare now")
        prepare_dataset(cfg.dataset, data_dir=cfg.data_dir)
    tok = CharTokenizer.load(os.path.join(ddir, "meta.pkl"))
    for split in ("train", "val"):
        path = os.path.join(ddir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % 2 or (size and int(np.memmap(path, dtype=np.uint16, mode="r").max()) >= tok.vocab_size):
            raise UserError(f"{path} does not belong with {ddir}/meta.pkl (token ids beyond its {tok.vocab_size} "
                            f"characters, or a truncated file); prepare the dataset again with prepare_shakespeare.py")
    return tok


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


def get_batch(path, batch_size, block_size, rng, device):
    """A batch of batch_size random windows from a uint16 token file."""
    n_tokens = os.path.getsize(path) // 2
    if n_tokens <= block_size:
        raise UserError(f"{path} has {n_tokens} tokens, not more than block_size={block_size}; "
                        f"use a smaller --block_size or a longer text")
    return read_windows(path, rng.integers(0, n_tokens - block_size, size=batch_size), block_size, device)


# ----- learning rate

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


# ----- checkpoints (used by train.py, sample.py and bench.py)

class CheckpointError(UserError):
    pass


def save_checkpoint(checkpoint, path):
    """Write atomically (write_atomic): a crash at any moment leaves the old checkpoint or the new one."""
    try:
        write_atomic(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror}; the previous checkpoint is untouched") from e


def load_checkpoint(path, device="cpu", hint=""):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's warnings would break the one-line error
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                              f"it may be truncated or from another program") from e
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project or nanoGPT (no model or model_args)")
    return checkpoint


def same_vocabulary(checkpoint, tok):
    """Whether tok is the vocabulary the checkpoint's model was trained with: the same characters
    where the checkpoint records them (ours do), the same size where it does not (nanoGPT's)."""
    vocab = checkpoint.get("vocab")
    return checkpoint["model_args"]["vocab_size"] == tok.vocab_size and vocab in (None, tok.chars)


def model_from_checkpoint(checkpoint):
    """Build the GPT a checkpoint describes and load its weights (compiled models' keys work too)."""
    args = {k: v for k, v in checkpoint["model_args"].items() if k in GPTConfig.__dataclass_fields__}
    model = build_model(GPTConfig(**args))
    prefix = "_orig_mod."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint["model"].items()
             if not k.endswith(".attn.bias")}  # nanoGPT's causal-mask buffer, on PyTorch without flash attention
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model_args: {str(e).splitlines()[0]}") from e
    return model


# ----- training

def model_config(cfg, vocab_size):
    """The GPTConfig that cfg's model settings describe (GPTConfig's defaults for those cfg lacks);
    GPTConfig's checks become ConfigErrors."""
    args = {k: getattr(cfg, k) for k in GPTConfig.__dataclass_fields__ if k != "vocab_size" and hasattr(cfg, k)}
    try:
        return GPTConfig(vocab_size=vocab_size, **args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def setup_distributed(cfg):
    """Under torchrun: join the process group. Returns (rank, local_rank, world_size)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device_type = torch.device(select_device(cfg.device)).type
    if device_type == "mps":
        raise ConfigError("torchrun can't train on MPS: no torch.distributed backend moves MPS tensors; "
                          "run one process, or several on the CPU with --device=cpu")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                          f"of the number of processes ({world_size})")
    return rank, local_rank, world_size


@torch.no_grad()
def estimate_loss(model, cfg, device, ctx, rank=0, world_size=1):
    """Mean loss over eval_iters batches per split. The batches are the same at every call (a
    fixed seed), so evals along a run are comparable; under torchrun the ranks share them out."""
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        path = os.path.join(dataset_dir(cfg), f"{split}.bin")
        n_tokens = os.path.getsize(path) // 2
        rng = np.random.default_rng([cfg.seed, 1000 + i])
        starts = rng.integers(0, n_tokens - cfg.block_size, size=(cfg.eval_iters, cfg.batch_size))
        losses = torch.zeros(cfg.eval_iters, device=device)
        for k in range(rank, cfg.eval_iters, world_size):
            x, y = read_windows(path, starts[k], cfg.block_size, device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.float()
        if world_size > 1:
            torch.distributed.all_reduce(losses)  # each batch's loss was filled in by one rank
        out[split] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, path, block_size, batch_size, device, ctx, rank=0, world_size=1):
    """Mean loss over the whole token file, read as consecutive non-overlapping windows; under
    torchrun the processes take turns at the batches and add up their sums."""
    n_windows = (os.path.getsize(path) // 2 - 1) // block_size
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for start in range(rank * batch_size, n_windows, world_size * batch_size):
        starts = np.arange(start, min(start + batch_size, n_windows)) * block_size
        x, y = read_windows(path, starts, block_size, device)
        with ctx:
            _, loss = model(x, y)
        total += loss.float() * len(starts)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return total.item() / n_windows


def train_step(model, optimizer, scaler, next_batch, accum_steps, ctx, grad_clip, lr):
    """One optimizer step over accum_steps micro-batches; returns the mean loss as a tensor (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(accum_steps):
        x, y = next_batch()
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


def ensure_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"can't write to out_dir '{out_dir}': {e.strerror}; pick another --out_dir") from None


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


class MetricsLog:
    """Appends a row per log line and per eval to out_dir/metrics.csv, for plotting the run, and
    sends the same numbers to Weights & Biases when wandb_run is given. path=None logs nothing
    (the processes other than rank 0)."""
    COLUMNS = ["iter", "kind", "loss", "train_loss", "val_loss", "lr", "tokens", "elapsed_s"]
    WANDB_NAMES = {"train_loss": "train/loss", "val_loss": "val/loss"}  # nanoGPT's names for them

    def __init__(self, path, resume_from=None, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run
        if path is None:
            return
        rows = []
        try:
            if resume_from is not None and os.path.exists(path):
                # keep what led up to the checkpoint; its eval row comes again from the resumed run
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit() and (
                        int(r["iter"]) < resume_from or (int(r["iter"]) == resume_from and r["kind"] == "log"))]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            raise UserError(f"can't write {path}: {e.strerror}") from None

    def write(self, **row):
        if self.path is None:
            return
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.COLUMNS).writerow(row)
        except OSError as e:
            raise UserError(f"can't write {self.path}: {e.strerror}") from None
        if self.wandb_run is not None:
            numbers = {self.WANDB_NAMES.get(k, k): float(v) for k, v in row.items() if k != "kind" and v != ""}
            self.wandb_run.log(numbers, step=row["iter"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if exc[0] is None else 1)


def start_wandb(cfg):
    """A Weights & Biases run for cfg, as nanoGPT's wandb_log starts one (wandb is imported only here)."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)") from None
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    except Exception as e:  # not logged in, no network, a bad project name ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"wandb could not start a run ({first}); run `wandb login`, or set WANDB_MODE=offline "
                        f"to log locally") from None


def init_model(cfg, tok, device):
    """The model to train and the checkpoint it came from (None when training from scratch)."""
    if cfg.init_from == "scratch" and not cfg.eval_only:
        return build_model(model_config(cfg, tok.vocab_size)), None
    if cfg.init_from == "resume" and not cfg.eval_only:
        path, hint = resume_path(cfg.out_dir), "; train one first, or use --init_from=scratch"
    elif cfg.init_from in ("scratch", "resume"):  # eval_only evaluates the run's own (best) checkpoint
        path, hint = os.path.join(cfg.out_dir, CKPT_NAME), "; train one first, or use --init_from=scratch"
    else:  # fine-tuning: a checkpoint file or the out_dir that holds one
        path = os.path.join(cfg.init_from, CKPT_NAME) if os.path.isdir(cfg.init_from) else cfg.init_from
        hint = "; init_from takes 'scratch', 'resume', a ckpt.pt file or an out_dir holding one"
    checkpoint = load_checkpoint(path, device, hint=hint)
    if cfg.init_from == "resume" and not cfg.eval_only:
        check_resume_settings(cfg, checkpoint.get("config", {}), path)
    model = model_from_checkpoint(checkpoint)
    if not same_vocabulary(checkpoint, tok):
        raise CheckpointError(f"{path} was trained with another vocabulary than dataset '{cfg.dataset}' has "
                              f"({model.config.vocab_size} vs {tok.vocab_size} characters); prepare the dataset "
                              f"with --vocab_from set to the checkpoint's dataset")
    for k in ("n_layer", "n_head", "n_embd", "bias", "model_type", "pos_encoding"):
        setattr(cfg, k, getattr(model.config, k))  # the checkpoint's model wins over the config
    if cfg.init_from == "resume" or cfg.eval_only:
        cfg.block_size = model.config.block_size
    elif cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the checkpoint's {model.config.block_size}; "
                          f"fine-tune with --block_size={model.config.block_size} or less")
    model.config.dropout = cfg.dropout
    for m in model.modules():  # fine-tuning may use another dropout than pretraining did
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    return model, checkpoint


# What a resumed run must share with the run it continues; the rest (max_iters, max_seconds, eval and
# log settings, device, dtype, compile, wandb) may change. Changing these makes another run: fine-tune.
RESUME_FIXED = ("dataset", "batch_size", "block_size", "gradient_accumulation_steps", "model_type", "pos_encoding",
                "n_layer", "n_head", "n_embd", "bias", "dropout", "optimizer", "learning_rate", "min_lr",
                "warmup_iters", "lr_decay_iters", "decay_lr", "weight_decay", "beta1", "beta2", "grad_clip", "seed")


def check_resume_settings(cfg, saved, path):
    for key in RESUME_FIXED:
        if key in saved and saved[key] != getattr(cfg, key):
            value = saved[key]
            raise ConfigError(f"{path} was trained with {key}={value!r}, not {getattr(cfg, key)!r}: resume with "
                              f"--{key}={value} (or the run's config file), or start a new run from its weights "
                              f"with --init_from={os.path.dirname(path) or '.'} --out_dir=ANOTHER_FOLDER")


def resume_path(out_dir):
    """What --init_from=resume continues: out_dir/resume.pt where a signal saved the run's state there
    after the best model (ckpt.pt) was saved, else ckpt.pt."""
    best, stopped = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, RESUME_NAME)
    if os.path.exists(stopped) and (not os.path.exists(best) or os.path.getmtime(stopped) >= os.path.getmtime(best)):
        return stopped
    return best


def _torch_optimizers(optimizer):
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def legacy_param_order(state, optimizer, model):
    """Optimizer state saved by this project before it kept nanoGPT's order of modules: wpe came
    last among the parameters, so it was the last of its group. Renumber it into today's order."""
    if "wpe" not in getattr(model, "transformer", {}):
        return state  # no learned positions: the order never differed
    wpe = model.transformer.wpe.weight
    pairs = [(state[name], opt) for name, opt in optimizer.optimizers.items()] if hasattr(optimizer, "optimizers") \
        else [(state, optimizer)]
    for saved, opt in pairs:
        now = [p for g in opt.param_groups for p in g["params"]]
        then = []
        for g in opt.param_groups:
            then += [p for p in g["params"] if p is not wpe] + [p for p in g["params"] if p is wpe]
        index = {id(p): i for i, p in enumerate(now)}
        saved["state"] = {index[id(then[int(i)])]: v for i, v in saved["state"].items()}
    return state


def check_optimizer_state(optimizer):
    """Every optimizer state tensor has its parameter's shape (else training fails at the first step)."""
    for opt in _torch_optimizers(optimizer):
        for p, s in opt.state.items():
            for name, t in s.items():
                if torch.is_tensor(t) and t.dim() > 0 and t.shape != p.shape:
                    raise CheckpointError(f"the checkpoint's optimizer state does not fit the model: {name} of "
                                          f"shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")


def record_config(cfg):
    """Write the run's effective settings to out_dir/config.json and print those that differ from
    TrainConfig's defaults, so that a run says what it is before the first checkpoint does."""
    settings = asdict(cfg)
    changed = {k: v for k, v in settings.items() if v != TrainConfig.__dataclass_fields__[k].default}
    print("config: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "the defaults"))
    try:
        write_atomic(os.path.join(cfg.out_dir, "config.json"),
                     lambda f: f.write(json.dumps(settings, indent=2).encode("utf-8")))
    except OSError as e:
        raise UserError(f"can't write {os.path.join(cfg.out_dir, 'config.json')}: {e.strerror}") from None


def restore_training_state(checkpoint, cfg, model, optimizer, scaler, data_rng, device, rank=0):
    """Load what --init_from=resume continues from; returns (iter_num, best_val_loss, train_seconds)."""
    state = checkpoint.get("optimizer")
    if not state:
        raise CheckpointError("the checkpoint holds weights only, no optimizer state, so it can't be resumed; "
                              "fine-tune from it instead: --init_from=PATH_TO_ITS_OUT_DIR")
    if "vocab" in checkpoint and checkpoint.get("param_order") != "nanogpt":
        state = legacy_param_order(state, optimizer, model)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({e})") from None
    check_optimizer_state(optimizer)
    restore_rng(checkpoint.get("rng"), data_rng, device, rank)
    if scaler.is_enabled() and checkpoint.get("scaler"):  # empty when the run that saved it had no scaler
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["iter_num"], float(checkpoint["best_val_loss"]), checkpoint.get("train_seconds", 0.0)


def train(cfg):
    """Run the training recipe cfg describes; return the last evaluation's losses."""
    rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0
    device = select_device(cfg.device)
    if world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    device_type = torch.device(device).type
    dtype = select_dtype(cfg.dtype, device)
    ctx = autocast_context(device_type, dtype)
    ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)  # the best model (the latest with always_save_checkpoint)
    stopped_path = os.path.join(cfg.out_dir, RESUME_NAME)  # a stopped run's state, when ckpt.pt must keep the best
    tok = ensure_dataset(cfg, verbose=master) if master else None
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 may have just prepared the data
    tok = tok or CharTokenizer.load(os.path.join(dataset_dir(cfg), "meta.pkl"))

    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
    data_rng = np.random.default_rng(cfg.seed)  # the same on every rank: see next_step_batches
    model, checkpoint = init_model(cfg, tok, device)
    val_tokens = os.path.getsize(os.path.join(dataset_dir(cfg), "val.bin")) // 2
    if val_tokens <= cfg.block_size:
        raise ConfigError(f"block_size={cfg.block_size} is not smaller than the val split ({val_tokens} tokens); "
                          f"use a smaller --block_size or a longer text")
    if master and not cfg.eval_only:
        ensure_writable(cfg.out_dir)  # only now: a run refused above leaves nothing behind
        for name in (CKPT_NAME, RESUME_NAME):  # half-written checkpoints of runs killed with -9
            remove_leftovers(cfg.out_dir, name + ".")
    model.to(device)
    raw_model = model

    muon_dtype = newton_schulz_dtype(device) if cfg.optimizer == "muon" else None
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           optimizer=cfg.optimizer, muon_dtype=muon_dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    # train_seconds: time spent in training steps, evals excluded: what max_seconds budgets.
    # schedule_seconds: the budget the learning rate schedule is laid over: the first run's max_seconds,
    # so that a resumed run with a larger budget goes on at min_lr instead of rewinding the schedule.
    iter_num, best_val_loss, train_seconds, schedule_seconds = 0, float("inf"), 0.0, cfg.max_seconds
    if cfg.init_from == "resume" and not cfg.eval_only:
        iter_num, best_val_loss, train_seconds = restore_training_state(checkpoint, cfg, raw_model, optimizer, scaler,
                                                                        data_rng, device, rank)
        schedule_seconds = checkpoint.get("schedule_seconds", checkpoint.get("config", {}).get("max_seconds", 0.0))
    checkpoint = None  # free its memory

    compiled = use_compile(cfg.compile, device)
    if compiled:
        model = torch.compile(model)
    if world_size > 1:
        # no buffers to broadcast: rope and sinusoid tables are the same everywhere, and a broadcast in
        # forward would hang an eval where some process has no batch to run
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None,
                                                          broadcast_buffers=False)

    accum = cfg.gradient_accumulation_steps // world_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master and not cfg.eval_only:
        record_config(cfg)
    if master:
        print(f"parameters: {raw_model.get_num_params() / 1e6:.2f}M | tokens per iteration: {tokens_per_iter:,} | "
              f"device: {device} | dtype: {describe_dtype(cfg.dtype, dtype, device)}" + (f" | processes: {world_size}" if world_size > 1 else ""))

    if cfg.eval_only:
        losses = estimate_loss(model, cfg, device, ctx, rank, world_size)
        if master:
            print(f"eval: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return losses

    def save(val_loss, path=ckpt_path):
        """Every process calls this: each contributes its random state; rank 0 writes."""
        rng = gather_from_all(capture_rng(data_rng, device), world_size)
        if master:
            save_checkpoint({
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "model_args": model_args(raw_model.config),
                "iter_num": iter_num,
                "train_seconds": train_seconds,
                "schedule_seconds": schedule_seconds,
                "best_val_loss": best_val_loss,
                "val_loss": val_loss,
                "config": asdict(cfg),
                "vocab": tok.chars,
                "rng": rng,  # one entry per process: each has its own dropout stream
                "param_order": "nanogpt",  # optimizer state in nanoGPT's parameter order (older ones: wpe last)
            }, path)
            if path == ckpt_path and os.path.exists(stopped_path):
                os.remove(stopped_path)  # ckpt.pt is now the newer state
        if world_size > 1:
            torch.distributed.barrier()  # no process leaves (or is killed by torchrun) while rank 0 saves

    train_path = os.path.join(dataset_dir(cfg), "train.bin")
    n_train = os.path.getsize(train_path) // 2

    def next_step_batches():
        """This rank's micro-batches for one optimizer step. Every rank draws the whole global batch
        from the shared generator and reads its own share, so N processes train on exactly the
        batches one process would, and the generator's state is the same everywhere."""
        starts = data_rng.integers(0, n_train - cfg.block_size, size=(world_size * accum, cfg.batch_size))
        mine = iter(starts[rank * accum:(rank + 1) * accum])
        return lambda: read_windows(train_path, next(mine), cfg.block_size, device)

    start_iter = iter_num
    metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.csv") if master else None,
                         resume_from=iter_num if cfg.init_from == "resume" else None,
                         wandb_run=start_wandb(cfg) if master and cfg.wandb_log else None)
    # the bar runs over iterations, or over the seconds of a time budget (so that its ETA is right)
    timed = cfg.max_seconds > 0
    clocked = timed or schedule_seconds > 0  # each step's time decides when to stop or what the lr is
    bar = tqdm(total=cfg.max_seconds if timed else cfg.max_iters, initial=train_seconds if timed else iter_num,
               unit="s" if timed else "it", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
               if timed else None, disable=not master, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    losses = None
    window_start, window_iters = time.perf_counter(), 0
    with StopSignals() as stop, metrics:
        while True:
            # every process holds the same train_seconds (rank 0's clock), so they agree on the end
            done = iter_num >= cfg.max_iters or (timed and train_seconds >= cfg.max_seconds)
            if iter_num % cfg.eval_interval == 0 or done:
                losses = estimate_loss(model, cfg, device, ctx, rank, world_size)  # the same on every process
                if master:
                    bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    metrics.write(iter=iter_num, kind="eval", train_loss=f"{losses['train']:.6f}",
                                  val_loss=f"{losses['val']:.6f}", tokens=iter_num * tokens_per_iter,
                                  elapsed_s=f"{train_seconds:.3f}")
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and (improved or cfg.always_save_checkpoint):
                    save(losses["val"])
                window_start, window_iters = time.perf_counter(), 0  # eval time is not training time
            if done:
                break
            # Under torchrun a signal may reach some processes only: they vote at log steps.
            vote = world_size == 1 or iter_num % cfg.log_interval == 0
            if vote and any_process(stop.received is not None, world_size, device):
                # ckpt.pt keeps the best model unless every eval saves anyway; resume picks the newer file
                path = ckpt_path if cfg.always_save_checkpoint else stopped_path
                save(None, path)
                bar.close()
                raise Interrupted(f"stopped by {stop.received or 'a signal to another process'} after iteration "
                                  f"{iter_num}; saved {path}; continue with --init_from=resume")

            t0 = time.perf_counter()
            if schedule_seconds > 0:  # the schedule laid over the time budget instead of iterations
                lr = get_lr(train_seconds / schedule_seconds * cfg.lr_decay_iters, cfg)
            else:
                lr = get_lr(iter_num, cfg)
            loss = train_step(model, optimizer, scaler, next_step_batches(), accum, ctx, cfg.grad_clip, lr)
            iter_num += 1
            window_iters += 1
            logging = iter_num % cfg.log_interval == 0
            if logging or clocked:
                loss.item()  # wait for the step: the only host-device sync (every step on a time budget)
            step_seconds = time.perf_counter() - t0
            if compiled and iter_num == start_iter + 1:  # this step compiled the model: not training time
                bar.write(f"compiled in {step_seconds:.1f} s (not counted as training time)")
                step_seconds = 0.0
            train_seconds += step_seconds
            if clocked and world_size > 1:
                train_seconds = from_rank0(train_seconds, device)  # one clock, so one learning rate for all
            bar.update(min(step_seconds, cfg.max_seconds - bar.n) if timed else 1)
            if logging:
                if world_size > 1:
                    torch.distributed.all_reduce(loss)
                    loss /= world_size  # the global batch's loss, not just this process's share
                if master:
                    now = time.perf_counter()
                    seconds = max(now - window_start, 1e-9)
                    tok_per_s, ms_per_iter = window_iters * tokens_per_iter / seconds, 1000 * seconds / window_iters
                    window_start, window_iters = now, 0
                    bar.set_postfix_str(f"{'iter ' + str(iter_num) + ', ' if timed else ''}loss {loss.item():.4f}, "
                                        f"lr {lr:.2e}, {ms_per_iter:.0f} ms/iter, {tok_per_s:,.0f} tok/s",
                                        refresh=False)
                    metrics.write(iter=iter_num, kind="log", loss=f"{loss.item():.6f}", lr=f"{lr:.6e}",
                                  tokens=iter_num * tokens_per_iter, elapsed_s=f"{train_seconds:.3f}")
    bar.close()
    if world_size > 1:
        check_replicas_agree(raw_model, device)
    val_path = os.path.join(dataset_dir(cfg), "val.bin")
    losses["val_full"] = evaluate_split(raw_model, val_path, cfg.block_size, cfg.batch_size, device, ctx,
                                        rank, world_size)
    if master:
        print(f"trained {iter_num} iterations in {train_seconds:.1f} s of training time; "
              f"val loss over the whole val split: {losses['val_full']:.4f}")
        if not os.path.exists(ckpt_path):
            print(f"no checkpoint written: the val loss never improved on step {start_iter}'s "
                  f"(--always_save_checkpoint=True keeps the last model anyway)")
        if cfg.plot:
            try:
                print(f"loss curves drawn in {plot_metrics(cfg.out_dir)}")
            except UserError as e:
                print(f"warning: {e}", file=sys.stderr)
    if world_size > 1:
        # leave together: a process that exits while another still talks to it makes gloo abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return losses


def plot_metrics(out_dir):
    """Draw out_dir/metrics.csv as out_dir/loss.png: step loss and eval losses against iterations."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed, so no loss.png; pip install matplotlib") from None
    try:
        with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit()]
    except OSError as e:
        raise UserError(f"no loss curves to draw: can't read {os.path.join(out_dir, 'metrics.csv')} "
                        f"({e.strerror})") from None
    logs = [r for r in rows if r["kind"] == "log"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([int(r["iter"]) for r in logs], [float(r["loss"]) for r in logs], lw=0.8, alpha=0.5, label="batch loss")
    for split in ("train", "val"):
        ax.plot([int(r["iter"]) for r in evals], [float(r[f"{split}_loss"]) for r in evals], marker="o", label=f"{split} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(out_dir)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"can't write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return path


def any_process(flag, world_size, device):
    """True if flag is True in any process (all processes must call this together)."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def check_replicas_agree(model, device):
    """Data-parallel processes must end with the same weights; if not, they trained apart."""
    fingerprint = sum(p.detach().double().sum() for p in model.parameters())
    spread = torch.stack([fingerprint, -fingerprint]).to(device)
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)  # max and -min
    if spread.sum().item() != 0.0:
        raise RuntimeError("the processes ended with different weights: their replicas drifted apart")


def from_rank0(value, device):
    """Rank 0's value of a float, in every process (all processes must call this together)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return t.item()


def gather_from_all(obj, world_size):
    """[obj of rank 0, obj of rank 1, ...] (all processes must call this together)."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    torch.distributed.all_gather_object(objs, obj)
    return objs


def capture_rng(data_rng, device):
    """This process's random state: its torch generators (dropout) and the batch sampler's."""
    state = {"torch": torch.get_rng_state(), "data": data_rng.bit_generator.state}
    kind = torch.device(device).type
    if kind == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif kind == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(saved, data_rng, device, rank=0):
    """Restore this process's random state from a checkpoint's: one entry per process that saved it
    (a dict, with every visible GPU's CUDA state, in checkpoints before per-process states). With
    more processes than saved, the extra ones keep their fresh seeds; the batches stay exact."""
    if not saved:
        return  # a nanoGPT checkpoint: no random state to restore
    states = [saved] if isinstance(saved, dict) else saved
    data_rng.bit_generator.state = states[0]["data"]  # the sampler is shared by all processes
    if rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"].cpu())
    device = torch.device(device)
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: the state of every GPU rank 0 saw
        index = device.index if device.index is not None else 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


@contextmanager
def out_of_memory_in_one_line(device, what_to_lower):
    """Within this context the device (or the CPU's RAM) running out of memory becomes a one-line
    UserError that names what to lower; every other error passes through."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        text = str(e)
        if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
                or "DefaultCPUAllocator" in text):
            raise
        where = select_device(device) if device == "auto" else device
        first = text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__
        raise UserError(f"out of memory on {where} ({first}); lower {what_to_lower}") from None


def main(argv):
    cfg = configure(TrainConfig, argv)
    with out_of_memory_in_one_line(cfg.device, f"--batch_size ({cfg.batch_size}) or --block_size ({cfg.block_size}); "
                                               f"--gradient_accumulation_steps keeps the batch with smaller pieces"):
        train(cfg)


if __name__ == "__main__":
    run_main(main)
