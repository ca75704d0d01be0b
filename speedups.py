"""
Speed paths for CPUs, so that model.py stays the lecture's model: faster modules swapped in for
nn.Dropout and nn.Linear once the model is built, and the choices the model leaves open (the
attention's kernel, the KV cache's dtype, what generation's one-token steps run in). A swapped module
computes what the one it replaces computes (dropout masks aside, which are random either way) with
the same parameters, so names, checkpoints and nanoGPT compatibility are unchanged; no method of
the model is replaced, so a forker's new modules and forward arguments need nothing here. On GPUs
and MPS nothing changes.

    speed_up_training(model, device, dtype)        # train.py and bench.py, before training
    speed_up_sampling(model, device, batch_size)   # sample.py, once the weights are in their dtype
"""

import platform
from contextlib import contextmanager

import torch
import torch.nn as nn

from model import GPT, CausalSelfAttention


def on_cpu(device):
    return torch.device(device).type == "cpu"


class FastDropout(nn.Dropout):
    """nn.Dropout with a cheaper mask for CPUs, where bernoulli_ (nn.Dropout's mask) is slow: each
    element gets 16 random bits, four from one int64 draw, and is kept if they are at least
    round(p * 2^16), as uniform 16-bit numbers: the drop rate is p to within 2^-17."""

    def forward(self, x):
        # under torch.compile, nn.Dropout's mask, which the compiler fuses (and which compiles correctly)
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        n = x.numel()
        # (n + 3) // 4 int64s, all 64 bits random: random_() alone would leave the sign bit 0
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
        bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform in [-2^15, 2^15)
        keep = bits >= round(self.p * 2 ** 16) - 2 ** 15  # probability 1 - p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


def replace_modules(model, kind, make):
    """Replace every submodule of exactly type `kind` by make(module), under the same name."""
    found = [(n, m) for n, m in model.named_modules() if type(m) is kind]
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(module))
    return len(found)


def speed_up_training(model, device, dtype):
    """For training and evaluation on a CPU: FastDropout for every nn.Dropout and, where matmuls run
    in bfloat16, the attention maths written out (faster there than PyTorch's fused CPU kernel).
    Generation caches keys and values in float32, where attention over a cache runs faster."""
    if not on_cpu(device):
        return model
    replace_modules(model, nn.Dropout, lambda m: FastDropout(m.p))
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.fused_kernel = dtype != "bfloat16"
    if isinstance(model, GPT):
        model.kv_cache_dtype = torch.float32
    return model


def speed_up_sampling(model, device, batch_size):
    """For generating batch_size sequences on a CPU, with the weights already in their sampling
    dtype: keys and values cached in float32; for one sequence in bfloat16, its one-token steps
    without oneDNN (PyTorch's own matrix-vector kernels are faster for a single row; the prompt
    keeps oneDNN); for several, the weights packed once for oneDNN (PackedLinear)."""
    if not on_cpu(device) or not isinstance(model, GPT):
        return model
    model.kv_cache_dtype = torch.float32
    if batch_size == 1 and model.lm_head.weight.dtype == torch.bfloat16:
        model.one_token_context = onednn_disabled
    return pack_linears(model, batch_size)


@contextmanager
def onednn_disabled():
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class PackedLinear(nn.Module):
    """An nn.Linear for inference on an x86 CPU, its weight reordered once into oneDNN's blocked layout.
    F.linear lays the weight out anew at every call, which for the few rows of a step that samples
    several sequences costs as much as the product itself."""

    def __init__(self, linear, rows):
        super().__init__()
        # rows: how many rows the inputs will mostly have, for oneDNN to pick the layout (any number works)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size=rows))
        self.bias = linear.bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model, batch_size):
    """For sampling batch_size > 1 sequences at once on an x86 CPU: every nn.Linear becomes a
    PackedLinear. Left as it is for one sequence (matrix-vector kernels are faster there), on other
    CPUs (not measured), and where oneDNN cannot pack the dtype (bf16 without AVX512). The weights
    must not change afterwards: this is for generation only."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if (batch_size == 1 or not x86 or not torch.backends.mkldnn.is_available()
            or any(m.weight.device.type != "cpu" for m in linears)):
        return model
    try:
        packed = {id(m): PackedLinear(m, batch_size) for m in linears}
    except (RuntimeError, AttributeError):  # "bf16 path needs the cpu support avx512bw ...", or a PyTorch
        return model  # without these (private) oneDNN ops
    replace_modules(model, nn.Linear, lambda m: packed[id(m)])
    return model
