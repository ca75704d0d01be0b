"""
Where the model runs: the device, the precision of its matmuls, whether to compile, and the
processes of a torchrun. train.py, sample.py and bench.py all make these choices here.
"""

import ctypes
import functools
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from configurator import ConfigError, UserError, check, check_choice, first_line

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_CHOICES = (True, False, "auto")


@dataclass
class DeviceSettings:
    """The settings train.py, sample.py and bench.py share (their configs extend this)."""
    device: str = "auto"  # 'auto' (CUDA, else MPS, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"  # 'auto' (see select_dtype), 'float32', 'bfloat16', 'float16'
    compile: bool | str = "auto"  # torch.compile the model; 'auto': on CUDA only (see use_compile)

    def check_device_settings(self):
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compile", self.compile, COMPILE_CHOICES)
        check_device("device", self.device)


# Device

def check_device(key, value):
    """auto, cpu, mps, cuda or cuda:N; whether this machine has it is checked when it is used."""
    kind, sep, index = value.partition(":")
    ok = value == "auto" or (kind in ("cpu", "cuda", "mps") and not sep) or (kind == "cuda" and index.isdigit())
    check(ok, key, value, "auto, cpu, cuda, cuda:N or mps")


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


def synchronize(device):
    """Wait for the device to finish its queued work (the device itself: cuda:1 is not cuda:0)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


# Precision

def matmul_seconds(device, dtype, n, repeats=3):
    """Seconds an n x n matmul in dtype takes on this device, the best of `repeats`."""
    gen = torch.Generator().manual_seed(0)  # its own: the global generator must not move
    a, b = (torch.randn(n, n, generator=gen).to(device, getattr(torch, dtype)) for _ in range(2))
    a @ b  # the first call may set up kernels
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device, dtype):
    """FLOP/s of a square matmul in dtype on this device: the peak that MFU, the model's share of it,
    is measured against. 4096 x 4096 on CUDA (smaller ones leave a GPU idle); elsewhere 256, 512 or
    1024, the first whose product takes over 20 ms: 1024 is ~20 ms in float32 on a laptop CPU, but
    10 s for four bf16 products where the CPU emulates bf16 (at 1/100 of the speed)."""
    for n in [4096] if torch.device(device).type == "cuda" else [256, 512, 1024]:
        seconds = matmul_seconds(device, dtype, n)
        if seconds > 0.02:
            break
    return 2 * n ** 3 / seconds


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(n=256, min_rounds=5, min_seconds=0.05):
    """How many times faster a 256 x 256 bfloat16 matmul runs than a float32 one on this CPU: above 1
    with native bf16 (AVX512-BF16, AMX, ARM's BF16), far below where bf16 is emulated. Measuring
    works on every OS and architecture, with no CPU flag names to know. The two are timed in turns,
    the best of each, so that a moment's slowness of a shared machine cannot decide."""
    gen = torch.Generator().manual_seed(0)  # its own: the global generator must not move
    a = torch.randn(n, n, generator=gen)
    operands = [a, a.bfloat16()]
    best = [float("inf")] * 2
    for x in operands:
        x @ x  # the first call may set up kernels
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < min_seconds:
        for i, x in enumerate(operands):
            t0 = time.perf_counter()
            x @ x
            best[i] = min(best[i], time.perf_counter() - t0)
        rounds += 1
    return best[0] / best[1]


BUSY_CPU_SHARE = 0.8  # under this share of the wall time on a CPU, other programs are slowing this one


def busy_cpu_line(thread_seconds, wall_seconds):
    """A line saying the CPU is busy, where the main thread ran under BUSY_CPU_SHARE of wall_seconds
    (thread_seconds, its CPU time) while it measured steps; else None. On an idle machine it runs all
    the time: it computes its share of each op, and spins while the other threads finish theirs. On a
    busy one the system takes it off its core, every measured step is slow, and a choice made from them
    (sizing.py) is too small."""
    share = thread_seconds / wall_seconds if wall_seconds > 0 else 1.0
    if share >= BUSY_CPU_SHARE:
        return None
    return (f"note: other programs are busy on this CPU: while measuring steps, this process ran {share:.0%} "
            f"of the time, so the speeds measured are low and the model chosen may be smaller than the one "
            f"this machine trains when idle (train when it is idle, or give --n_layer and --n_embd)")


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


def select_sampling_dtype(requested, device, batch_size):
    """The dtype sample.py stores the weights in. As select_dtype, except one stream on a CPU, which
    gets bfloat16 even where bf16 matmuls are emulated: a single token's matrix-vector products are
    bound by reading the weights, and PyTorch's own bf16 kernels for them are fast on every CPU, so
    half the bytes make each token faster."""
    if requested == "auto" and batch_size == 1 and torch.device(device).type == "cpu":
        return "bfloat16"
    return select_dtype(requested, device)


def describe_dtype(requested, dtype, device):
    """The dtype and why, for the start-up line."""
    if requested != "auto":
        return f"{dtype} (asked for)"
    if torch.device(device).type == "cpu":
        return f"{dtype} (auto: bf16 matmuls run {cpu_bf16_speedup():.2g}x float32 on this CPU)"
    return f"{dtype} (auto: bf16 {'native' if bf16_is_native(device) else 'not native'} on {device})"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() settings (malloc.h)


def reuse_freed_memory(device):
    """On a CPU device, on Linux with glibc, have the C allocator keep memory the process frees, for its
    next tensors.
    By default glibc gives each large allocation (always those over 32 MB) pages of its own, fresh from
    the kernel, and returns them when the tensor is freed; each new tensor then faults in all its pages.
    A training step on a CPU allocates and frees large activations (the (B, nh, T, T) attention
    weights) over and over, and page faults then cost as much as the maths. The cost: the process
    keeps its peak memory to the end.
    Returns whether it took effect (elsewhere, GPUs, macOS, Windows, musl, nothing changes)."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # no separate mappings for large blocks; never hand the top of the heap back (-1: no threshold)
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def autocast_context(device, dtype):
    """Mixed precision: weights stay float32, matmuls run in dtype."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def grad_scaler(device, dtype):
    """float16 gradients underflow without loss scaling; bf16 and float32 need none (a disabled scaler
    steps the optimizer as it is)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(dtype == "float16"))


def use_compile(setting, device):
    """compile='auto' compiles on CUDA only: on CPU it made bench.py's training step slower."""
    return torch.device(device).type == "cuda" if setting == "auto" else setting


@contextmanager
def out_of_memory_in_one_line(device, what_to_lower):
    """Within this context the device (or the CPU's RAM) running out of memory becomes a one-line
    UserError that names what to lower; every other error passes through."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e)
                or "DefaultCPUAllocator" in str(e)):
            raise
        where = select_device(device) if device == "auto" else device
        raise UserError(f"out of memory on {where} ({first_line(e)[:120]}); lower {what_to_lower}") from None


# Processes: torchrun starts one per GPU (or several on a CPU); they train one model together

@dataclass
class Processes:
    rank: int = 0
    local_rank: int = 0  # on this machine: the GPU a process uses
    world_size: int = 1

    @property
    def master(self):
        """Rank 0 prints, logs and writes the checkpoints."""
        return self.rank == 0


def start_processes(device_setting, backend="auto"):
    """Select the device and, under torchrun, join the process group (each process on CUDA takes its
    own GPU, cuda:LOCAL_RANK). Returns (Processes, device)."""
    device = select_device(device_setting)
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes(), device
    procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    kind = torch.device(device).type
    if kind == "mps":
        raise ConfigError("torchrun can't train on MPS: no torch.distributed backend moves MPS tensors; "
                          "run one process, or several on the CPU with --device=cpu")
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if kind == "cuda":
        device = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(device)
    return procs, device


def end_processes(failed=False):
    """Leave the process group: together after a run (a process that exits while another still talks
    to it makes gloo abort), at once after an error."""
    if torch.distributed.is_initialized():
        if not failed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# The functions below are collective: every process must call them, at the same point.

def any_process(flag, procs, device):
    """True if flag is True in any process."""
    if procs.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def from_rank0(value, procs, device):
    """Rank 0's value of a float, in every process."""
    if procs.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return t.item()


def gather_from_all(obj, procs):
    """[obj of rank 0, obj of rank 1, ...]."""
    if procs.world_size == 1:
        return [obj]
    objs = [None] * procs.world_size
    torch.distributed.all_gather_object(objs, obj)
    return objs


def check_replicas_agree(model, procs, device):
    """Data-parallel processes must end with the same weights; if not, they trained apart."""
    if procs.world_size == 1:
        return
    fingerprint = sum(p.detach().double().sum() for p in model.parameters())
    spread = torch.stack([fingerprint, -fingerprint]).to(device)
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)  # max and -min
    if spread.sum().item() != 0.0:
        raise RuntimeError("the processes ended with different weights: their replicas drifted apart")


def on_rank0(action, procs, device):
    """Run action() on rank 0 only, and return what it returns there (None elsewhere). If it fails
    with a UserError, every process stops with an error: the others would otherwise wait forever
    for rank 0 at the next collective."""
    error, result = None, None
    if procs.master:
        try:
            result = action()
        except UserError as e:
            error = e
    if any_process(error is not None, procs, device):
        raise error or UserError("stopped because rank 0 failed (its error is above)")
    return result
