import math
import os
import subprocess
import sys

import pytest
import torch

import device
from configurator import ConfigError, configure
from device import select_dtype, start_processes, use_compile
from helpers import REPO
from train import TrainConfig


def test_dtype_choice():
    assert select_dtype("auto", "mps") == "float32"
    assert select_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="float16 autocast is for GPUs"):
        select_dtype("float16", "cpu")


def test_dtype_choice_on_cuda_and_cpu(monkeypatch):
    # PyTorch calls bf16 "supported" on T4 / V100 / RTX 20xx, where it is emulated: those get float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_dtype("auto", "cuda") == "float16"  # with a GradScaler
    assert select_dtype("auto", "cuda:1") == "float16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert select_dtype("auto", "cuda") == "bfloat16"  # A100 and newer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert select_dtype("auto", "cuda") == "bfloat16"  # AMD Instinct
    # CPUs: by a measured bf16 / float32 matmul speed ratio
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 0.01)  # emulated: 100x slower
    assert select_dtype("auto", "cpu") == "float32"
    assert "0.01x float32" in device.describe_dtype("auto", "float32", "cpu")
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 2.1)  # AVX512-BF16, AMX, ARM BF16
    assert select_dtype("auto", "cpu") == "bfloat16"
    assert select_dtype("auto", "mps") == "float32"


class Clock:
    """A stand-in for device.py's time module: perf_counter() reads seconds that only matmuls move."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class TimedMatmuls(torch.overrides.TorchFunctionMode):
    """Within this context every matmul moves the clock on by the seconds its dtype takes, and the
    matmuls numbered in `stalls` (counting from 0, per dtype) by a second more: the moments a shared
    machine was busy with something else."""

    def __init__(self, clock, seconds, stalls):
        super().__init__()
        self.clock, self.seconds, self.stalls, self.count = clock, seconds, stalls, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            dtype = args[0].dtype
            n = self.count[dtype] = self.count.get(dtype, -1) + 1
            self.clock.now += self.seconds[dtype] + (1.0 if n in self.stalls.get(dtype, ()) else 0.0)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("float32_s, bfloat16_s, dtype", [(0.004, 0.002, "bfloat16"),  # native bf16: 2x
                                                          (0.004, 0.4, "float32")])  # emulated: 100x slower
def test_auto_dtype_on_a_cpu_follows_the_measured_bf16_speed_even_on_a_busy_machine(monkeypatch, float32_s,
                                                                                      bfloat16_s, dtype):
    """On a CPU, dtype='auto' is bfloat16 where a bf16 matmul is faster than a float32 one, and the
    start-up line says by how much; a moment's stall of the machine (here the first matmul of each
    dtype after the warm-up, and a later one) does not change the answer. Matmuls are timed on a
    clock of their own, so that the machine's real speed and load play no part."""
    clock = Clock()
    monkeypatch.setattr(device, "time", clock)
    device.cpu_bf16_speedup.cache_clear()
    try:
        with TimedMatmuls(clock, {torch.float32: float32_s, torch.bfloat16: bfloat16_s},
                          stalls={torch.float32: {1, 4}, torch.bfloat16: {1, 3}}):
            assert device.cpu_bf16_speedup() == pytest.approx(float32_s / bfloat16_s)
            assert select_dtype("auto", "cpu") == dtype
            assert f"{float32_s / bfloat16_s:.2g}x float32" in device.describe_dtype("auto", dtype, "cpu")
    finally:
        device.cpu_bf16_speedup.cache_clear()  # the next test measures this machine's own


def test_the_cpu_bf16_probe_is_measured_once_and_leaves_the_seed_alone():
    device.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(0)
    speedup = device.cpu_bf16_speedup()
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_probe)  # the probe leaves the global generator alone
    assert speedup > 0 and device.cpu_bf16_speedup() == speedup  # measured once: dtype and start-up line agree
    assert select_dtype("auto", "cpu") == ("bfloat16" if speedup > 1.0 else "float32")


def test_the_mfu_peak_is_measured_on_a_size_the_dtype_can_afford(monkeypatch):
    """A 1024 x 1024 product where bf16 is emulated takes seconds: train.py's start must not."""
    for per_flop, sizes_tried in ((1e-11, [256, 512, 1024]), (1e-8, [256])):  # float32; emulated bf16
        sizes = []
        monkeypatch.setattr(device, "matmul_seconds", lambda dev, dt, n: sizes.append(n) or 2 * n ** 3 * per_flop)
        device.matmul_peak_flops.cache_clear()
        assert math.isclose(device.matmul_peak_flops("cpu", "float32"), 1 / per_flop)
        assert sizes == sizes_tried
    device.matmul_peak_flops.cache_clear()
    sizes.clear()
    device.matmul_peak_flops("cuda", "bfloat16")
    assert sizes == [4096]  # a GPU is only busy with a big one
    device.matmul_peak_flops.cache_clear()


def test_torchrun_on_mps_is_refused_before_joining(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun can't train on MPS.*--device=cpu"):
        start_processes("auto")
    assert not torch.distributed.is_initialized()


def test_compile_follows_the_device_unless_set():
    assert use_compile("auto", "cuda") and use_compile("auto", "cuda:1")
    assert not use_compile("auto", "cpu") and not use_compile("auto", "mps")
    assert use_compile(True, "cpu") and not use_compile(False, "cuda")
    assert configure(TrainConfig, [os.path.join(REPO, "config", "train_shakespeare_char.py")]).compile == "auto"



def test_one_stream_samples_in_bfloat16_on_any_cpu(monkeypatch):
    """sample.py's weights: bf16 for one stream on every CPU (matrix-vector products, bound by reading
    the weights); for a batch, bf16 only where bf16 matmuls are native; what the user asks for wins."""
    for speedup, batch_dtype in ((0.01, "float32"), (2.0, "bfloat16")):
        monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
        assert device.select_sampling_dtype("auto", "cpu", 1) == "bfloat16"
        assert device.select_sampling_dtype("auto", "cpu", 10) == batch_dtype
        assert device.select_sampling_dtype("float32", "cpu", 1) == "float32"
    assert device.select_sampling_dtype("auto", "mps", 1) == "float32"


FAULTS_SCRIPT = """
import resource, torch
from device import reuse_freed_memory

def faults():  # page faults of a 64 MB tensor written and freed, per page of it, on average over 5
    for _ in range(10):  # settle: the heap grows to what the tensors need
        torch.ones(2 ** 24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(2 ** 24)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5 / (2 ** 26 / resource.getpagesize())

plain = faults()
print(reuse_freed_memory("cpu"), plain, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_freed_memory_is_reused_without_page_faults():
    assert device.reuse_freed_memory("cuda") is False  # a GPU's memory is not the C allocator's
    # in a process of its own: the setting is for the whole process, and train() may have made it here
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("no glibc mallopt here")
    plain, reused = float(out[1]), float(out[2])
    assert plain > 0.9  # by default every page of every new large tensor faults
    assert reused < 0.05  # with it, a freed tensor's pages serve the next one


def test_a_busy_cpu_is_named_with_the_share_of_the_time_the_process_ran():
    line = device.busy_cpu_line(thread_seconds=0.5, wall_seconds=1.0)  # another program had the other half
    assert line.startswith("note: other programs are busy on this CPU") and "this process ran 50% of the time" in line
    assert "\n" not in line
    assert device.busy_cpu_line(thread_seconds=0.9, wall_seconds=1.0) is None  # idle
    assert device.busy_cpu_line(thread_seconds=0.0, wall_seconds=0.0) is None  # nothing measured
