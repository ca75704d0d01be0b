"""
Measure training and sampling speed for a model shape on this machine.

    python bench.py                                     # the GPU recipe's shape, batch 8
    python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12
    python bench.py --sizes_only=True                   # what the CPU recipe would train here

Times what train.py runs, its batches (dataset.TrainBatches) and train_step (ms/iter, tokens/s, MFU against this
machine's measured matmul peak in the same dtype, as train.py's log), sampling speed with and without
the KV cache, and peak memory. With
--compare=True (default) it also runs nanoGPT's path (float32, unfused AdamW, no KV cache),
alternating the two so that both see the same machine conditions, and reports the ratios. Last, it
measures what train.py's sizing rule measures (sizing.py) and prints the shape the CPU recipe
(config/train_shakespeare_char_cpu.py) would train on this machine for 100 s to an hour.
"""

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from configurator import as_config_error, check, check_seed, configure, run_main
from sizing import best_iters, shapes_for_budgets
from device import (DeviceSettings, autocast_context, describe_dtype, grad_scaler, matmul_peak_flops,
                    newton_schulz_dtype, reuse_freed_memory, select_device, select_dtype, select_sampling_dtype,
                    synchronize, use_compile)
from model import GPT, GPTConfig
from muon import torch_optimizers
from speedups import PackedLinear, speed_up_sampling, speed_up_training
from dataset import TokenFile, TrainBatches
from train import TrainConfig, step_timer, train_step

CPU_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_shakespeare_char_cpu.py")
BUDGETS = {"100 s": 100, "5 min": 300, "10 min": 600, "30 min": 1800, "1 h": 3600}  # the README's rows


@dataclass
class BenchConfig(GPTConfig, DeviceSettings):
    """The benchmark's settings, then the model's (GPTConfig: the GPU recipe's by default) and where
    it runs (DeviceSettings)."""
    not_settings: ClassVar = {"model_type": "the benchmark times the GPT"}
    batch_size: int = 8  # sequences per training step
    compare: bool = True  # also time nanoGPT's path: float32, unfused AdamW, no KV cache
    recipe: bool = True  # also time the CPU recipe's choices: Muon and rotary positions
    steps: int = 10  # timed training steps per round
    rounds: int = 3  # rounds alternate the variants; medians are reported
    sample_tokens: int = 500  # new tokens per sampling measurement (sample.py's default)
    num_samples: int = 10  # sample.py's default: generated as one batch here, one after another by nanoGPT
    seed: int = 1337  # seeds the weights and batches
    sizes: bool = True  # also print the shapes the CPU recipe would train here for 100 s to an hour
    sizes_only: bool = False  # print only those (no table)

    def __post_init__(self):
        for key in ("batch_size", "steps", "rounds", "sample_tokens", "num_samples"):
            check(getattr(self, key) > 0, key, getattr(self, key), "positive")
        check_seed(self.seed)
        self.check_device_settings()
        as_config_error(super().__post_init__)  # the model's settings: GPTConfig's checks


def tensor_mb(tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # CPU and MPS: the process's peak resident memory so far (Linux reports KiB, macOS bytes)
    try:
        import resource  # not on Windows
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if os.uname().sysname == "Darwin" else peak / 2 ** 10


def cpu_name():
    """The processor's marketing name, on Linux, macOS and Windows ('' if it can't be found)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith(("model name", "Model")):  # x86; ARM boards
                        return line.split(":", 1)[1].strip()
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor()


def describe_device(device):
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if torch.device(device).type == "cpu":
        return f"cpu ({cpu_name() or 'unknown CPU'}, {torch.get_num_threads()} threads)"
    return device


class Variant:
    """One way of running the model: its dtype, optimizer, position encoding and whether generation caches."""

    def __init__(self, name, cfg, device, dtype, data_path, fused=None, use_cache=True, optimizer="adamw",
                 pos_encoding="learned"):
        self.name, self.device, self.dtype, self.use_cache = name, device, dtype, use_cache
        self.pos_encoding, self.requested_dtype = pos_encoding, cfg.dtype
        self.device_type = torch.device(device).type
        torch.manual_seed(cfg.seed)
        self.model = GPT(GPTConfig.from_settings(cfg, pos_encoding=pos_encoding)).to(device)
        # every variant gets the CPU dropout mask, so that the comparison is of dtype, optimizer and cache
        speed_up_training(self.model, device, dtype)
        self.optimizer = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), self.device_type, fused=fused,
                                                         optimizer=optimizer, muon_dtype=newton_schulz_dtype(device))
        adamw = torch_optimizers(self.optimizer)[-1]
        self.optimizer_name = ("Muon+" if optimizer == "muon" else "") + \
            ("fused AdamW" if adamw.defaults.get("fused") else "AdamW")
        self.step_model = torch.compile(self.model) if use_compile(cfg.compile, device) else self.model
        self.scaler = grad_scaler(device, dtype)
        self.ctx = autocast_context(device, dtype)
        self.batches = TrainBatches(TokenFile(data_path), cfg.batch_size, cfg.block_size, 1, np.random.default_rng(cfg.seed), device)
        self.step_times, self.sample_rates, self.batch_times = [], [], []
        self.peak_mb = 0.0
        self.packed = False  # whether sampling ran on packed weights (pack_linears)

    def resident_mb(self):
        """Memory this variant holds between steps: weights and optimizer state."""
        state = [t for o in torch_optimizers(self.optimizer) for s in o.state.values() for t in s.values()
                 if torch.is_tensor(t)]
        return tensor_mb(list(self.model.parameters()) + state)

    def time_steps(self, steps):
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = train_step(self.step_model, self.optimizer, self.scaler, self.batches.next_step(), 1, self.ctx,
                              1.0, 1e-3)
        loss.item()  # wait for the last step
        self.step_times.append((time.perf_counter() - t0) / steps)

    def sampling_model(self, batch_size):
        """The model as sample.py holds it for batch_size samples: weights stored in its sampling
        dtype, and packed for several samples (nanoGPT's sample.py: float32 on a CPU, as it is)."""
        model = GPT(self.model.config).to(self.device)  # the plain modules, as sample.py builds them
        model.load_state_dict(self.model.state_dict())
        if not self.use_cache:  # nanoGPT's path
            return model.eval()
        dtype = select_sampling_dtype(self.requested_dtype, self.device, batch_size)
        model = speed_up_sampling(model.eval().to(dtype=getattr(torch, dtype)), self.device, batch_size)
        self.packed = self.packed or any(isinstance(m, PackedLinear) for m in model.modules())
        return model

    def time_sampling(self, new_tokens, num_samples):
        """Characters per second of one stream, and seconds for num_samples samples: one batch here,
        one sample after another on nanoGPT's path (as its sample.py does)."""
        idx = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        model = self.sampling_model(1)
        synchronize(self.device)
        t0 = time.perf_counter()
        model.generate(idx, new_tokens, temperature=0.8, top_k=200, use_cache=self.use_cache)
        synchronize(self.device)
        one = time.perf_counter() - t0
        self.sample_rates.append(new_tokens / one)
        if not self.use_cache:  # nanoGPT's loop: every sample costs what one does
            self.batch_times.append(num_samples * one)
            return
        model = self.sampling_model(num_samples)
        t0 = time.perf_counter()
        model.generate(idx.expand(num_samples, -1), new_tokens, temperature=0.8, top_k=200)
        synchronize(self.device)
        self.batch_times.append(time.perf_counter() - t0)


def recipe_sizes(cfg, device, dtype, tokens):
    """{budget name: sizing.Choice}: the shape train.py's CPU recipe picks for each of BUDGETS on this
    machine, from the same measurement (sizing.py, train.step_timer) on tokens."""
    recipe = configure(TrainConfig, [CPU_RECIPE, f"--device={cfg.device}", f"--dtype={cfg.dtype}"])
    timer = step_timer(tokens, cfg.vocab_size, device, dtype)
    chosen = shapes_for_budgets(recipe, timer, BUDGETS.values())
    return {name: chosen[seconds] for name, seconds in BUDGETS.items()}


def report_sizes(sizes):
    print("the CPU recipe (python train.py config/train_shakespeare_char_cpu.py --max_seconds=S) would train here:")
    for name, c in sizes.items():
        stop = best_iters(c.cfg, c.params_m)
        iters = f"{stop:,} iterations (its best: more would learn the text by heart)" if stop < c.iters else \
            f"about {c.iters:,} iterations"
        print(f"  {name:>6}: {c.shape()}, {c.cfg.n_head} heads ({c.params_m:.2f}M parameters, learning rate "
              f"{c.cfg.learning_rate:.2g}): {c.seconds_per_iter * 1e3:.0f} ms/iter, {iters}, "
              f"predicted val loss {c.loss:.2f}")


def bench(cfg):
    device = select_device(cfg.device)
    device_type = torch.device(device).type
    reuse_freed_memory(device)  # as train.py (so nanoGPT's path, in this process, gets it too)
    dtype = select_dtype(cfg.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "tokens.bin")
        np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000, dtype=np.uint16).tofile(data_path)
        if cfg.sizes_only:
            report_sizes(recipe_sizes(cfg, device, dtype, TokenFile(data_path)))
            return []
        variants = [Variant("this repo", cfg, device, dtype, data_path, pos_encoding=cfg.pos_encoding)]
        if cfg.recipe:
            variants.append(Variant("+ Muon, RoPE", cfg, device, dtype, data_path, optimizer="muon", pos_encoding="rope"))
        if cfg.compare:  # nanoGPT has learned positions only
            variants.append(Variant("nanoGPT path", cfg, device, "float32", data_path, fused=False, use_cache=False))
        peaks = {dt: matmul_peak_flops(device, dt) for dt in {v.dtype for v in variants}}
        for v in variants:  # warm up: first steps allocate, autotune and (with compile) compile
            v.time_steps(2)
            v.step_times.clear()
        for _ in range(cfg.rounds):
            for v in variants:
                if device_type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                v.time_steps(cfg.steps)
                # on CUDA the peak includes the other variants' weights and optimizer state: take them off
                others = sum(w.resident_mb() for w in variants if w is not v) if device_type == "cuda" else 0.0
                v.peak_mb = max(v.peak_mb, peak_memory_mb(device) - others)
        for _ in range(cfg.rounds):
            for v in variants:
                v.time_sampling(cfg.sample_tokens, cfg.num_samples)
        sizes = recipe_sizes(cfg, device, dtype, TokenFile(data_path)) if cfg.sizes else None

    report(cfg, device, dtype, peaks, variants)
    if sizes:
        report_sizes(sizes)
    return variants


def report(cfg, device, dtype, peaks, variants):
    tokens_per_iter = cfg.batch_size * cfg.block_size
    one, batch = (select_sampling_dtype(cfg.dtype, device, n) for n in (1, cfg.num_samples))
    print(f"device: {describe_device(device)} | torch {torch.__version__}")
    print(f"dtype: {describe_dtype(cfg.dtype, dtype, device)}; sampling, as sample.py stores the weights: "
          f"{one} for one stream, {batch} for {cfg.num_samples} samples" +
          (" (weights packed)" if variants[0].packed else ""))
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, "
          f"batch {cfg.batch_size}, {variants[0].model.get_num_params() / 1e6:.2f}M parameters")
    print("matmul peak (MFU is against it): " + ", ".join(f"{dt} {f / 1e9:,.0f} GFLOP/s" for dt, f in sorted(peaks.items())))
    samples = f"{cfg.num_samples} samples s"
    header = f"{'variant':<14} {'dtype':<9} {'optimizer':<17} {'positions':<9} {'KV cache':<8} {'ms/iter':>8} " \
             f"{'tokens/s':>9} {'MFU':>6} {'sample tok/s':>12} {samples:>12} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    medians = {}
    for v in variants:
        step, rate, batch_s = (statistics.median(t) for t in (v.step_times, v.sample_rates, v.batch_times))
        medians[v.name] = step, rate, batch_s
        mfu = v.model.flops_per_token() * tokens_per_iter / step / peaks[v.dtype]
        print(f"{v.name:<14} {v.dtype:<9} {v.optimizer_name:<17} {v.pos_encoding:<9} {'yes' if v.use_cache else 'no':<8} "
              f"{step * 1e3:>8.1f} {tokens_per_iter / step:>9,.0f} {mfu:>6.1%} {rate:>12,.1f} {batch_s:>12.2f} "
              f"{v.peak_mb:>8,.0f}")
    if cfg.compare:
        ours, nano = medians[variants[0].name], medians[variants[-1].name]
        print(f"{'speedup':<14} {'':<9} {'':<17} {'':<9} {'':<8} {nano[0] / ours[0]:>7.2f}x {'':>9} {'':>6} "
              f"{ours[1] / nano[1]:>11.1f}x {nano[2] / ours[2]:>11.1f}x")


def main(argv):
    bench(configure(BenchConfig, argv))


if __name__ == "__main__":
    run_main(main)
