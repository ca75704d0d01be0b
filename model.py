"""
A GPT language model in one file, following Karpathy's "Let's build GPT" lecture and nanoGPT.

Read it top to bottom: the model's settings, position encodings, attention, MLP, the transformer
block, then the GPT that stacks blocks, trains with cross-entropy and samples text (with a key/value
cache, so each new token costs one position of compute rather than the whole context), and the
bigram model the lecture starts from. After the models: Muon, an optimizer for the hidden matrices,
and last, the few speed paths for CPUs, kept apart so the model above reads as the lecture's.

Parameter names match nanoGPT's, so checkpoints move between the two projects.
"""

import inspect
import math
import platform
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """The model's settings, declared once: train.py's and bench.py's settings extend these."""
    block_size: int = 256  # longest context the model sees
    vocab_size: int = 65  # Tiny Shakespeare has 65 distinct characters
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False  # bias in Linear and LayerNorm layers: GPT-2 had them; nanoGPT trains without
    model_type: str = "gpt"  # 'gpt', or 'bigram': the lecture's first model, a next-character lookup table
    pos_encoding: str = "learned"  # 'learned' (GPT-2, the lecture's), 'sinusoidal' (fixed) or 'rope' (rotary)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.model_type not in ("gpt", "bigram"):
            raise ValueError(f"model_type must be 'gpt' or 'bigram', got '{self.model_type}'")
        if self.pos_encoding not in ("learned", "sinusoidal", "rope"):
            raise ValueError(f"pos_encoding must be 'learned', 'sinusoidal' or 'rope', got '{self.pos_encoding}'")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, but n_embd / n_head = {self.n_embd // self.n_head}")


def sinusoidal_table(n_positions, dim):
    """Fixed position encodings of "Attention Is All You Need": (n_positions, dim), sines in the even
    channels and cosines in the odd ones, with wavelengths from 2*pi to 10000*2*pi."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def rope_tables(n_positions, head_size, base=10000.0):
    """cos and sin of the rotary angles, laid out for apply_rope: each (n_positions, head_size), the
    angle of channel pair i in columns i and i + head_size / 2, the sines negative in the first half."""
    freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * freq
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair of channels (i, i + hs/2) of x (..., T, hs) by its position's angle, so that
    q . k depends only on how far apart the two positions are (RoFormer, Su et al. 2021):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as x * cos + (x2, x1) * sin with rope_tables'."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for every layer: (n_layer, B, nh, block_size, hs).

    Generation prefills it with the prompt once, then adds one position per new token, so attention
    for the new token reads the cached keys and values instead of recomputing the whole context.
    """

    def __init__(self, config):
        self.config = config
        self.k = self.v = None  # allocated on first use, in the dtype attention runs in
        self.pos = 0  # number of positions filled; advanced by GPT.forward after all layers ran

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) for `layer` at the next T positions; return all keys and values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            shape = (self.config.n_layer, B, nh, self.config.block_size, hs)
            self.k = torch.empty(shape, device=k.device, dtype=k.dtype)
            self.v = torch.empty(shape, device=v.device, dtype=v.dtype)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # queries, keys and values for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # Dropout on the attention weights (some positions ignored at random), as the lecture's and
        # nanoGPT's, and on the residual output. (FastDropout is nn.Dropout, made faster on CPUs: end of file.)
        self.attn_dropout = FastDropout(config.dropout)
        self.resid_dropout = FastDropout(config.dropout)

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.size()  # batch, time (sequence length), channels (n_embd)
        # queries, keys and values, each split into heads: (B, T, 3C) -> (3, B, nh, T, hs)
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:  # rotary positions: rotate queries and keys (in one go), before keys are cached
            (q, k), v = apply_rope(qkv[:2], *rope), qkv[2]
        else:
            q, k, v = qkv
        if kv_cache is not None:
            if kv_cache.pos > 0 and T > 1:
                raise ValueError("a KV cache extends one token at a time after the prompt")
            if q.device.type == "cpu":  # a CPU speed path: attention over a cache runs several times faster
                q, k, v = q.float(), k.float(), v.float()  # in float32 than in bf16 (120 vs 530 us, 10 x 250)
            k, v = kv_cache.update(self.layer_idx, k, v)
        # The causal (lower-triangular) mask lets position t attend to positions <= t only, so the
        # model cannot peek at the token it is asked to predict. A single new token attends to all
        # cached positions, which are all in its past, so it needs no mask.
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # a CPU speed path (end of file)
            y = explicit_attention(q, k, v, self.attn_dropout)
        else:
            dropout_p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout_p)
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = FastDropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a residual path, pre-LayerNorm."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Attention alone does not know where a token is; the position encoding tells it.
        # 'learned': a trained vector per position (wpe), added to the token's. nanoGPT's order of
        # modules (wte, wpe, drop, h, ln_f) is kept: optimizer states are matched to parameters by
        # position, so the same order lets either project resume the other's checkpoints.
        learned = config.pos_encoding == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=FastDropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_encoding == "sinusoidal":  # a fixed vector per position, added
            # scaled to the token embeddings' size (std 0.02): at full size, values in [-1, 1], it
            # drowns the tokens and training stalls (measured: 3.2 vs 1.7 loss on a tiny model)
            table = 0.02 * sinusoidal_table(config.block_size, config.n_embd)
            self.register_buffer("sinusoid", table, persistent=False)
        elif config.pos_encoding == "rope":  # nothing added; queries and keys are rotated in every attention layer
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the same matrix maps tokens to vectors and vectors back to token logits.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth (two residual adds per layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Number of parameters; by default without the position embedding (the token embedding
        counts, because it is also the output head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def flops_per_token(self):
        """Training FLOPs per token, forward and backward: 6 per parameter (2 forward, 4 backward),
        plus attention's q @ k and att @ v over the context (PaLM paper, appendix B)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) and the mean cross-entropy loss when
        targets (B, T) are given; otherwise logits of the last position only, (B, 1, vocab_size)."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)

        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe(pos)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.sinusoid[pos]
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, rope)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            # only the last position's logits are needed to sample the next token
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune a model with a shorter block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for name in ("sinusoid", "rope_cos", "rope_sin"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None, optimizer="adamw",
                             muon_dtype=torch.bfloat16):
        """AdamW with weight decay on matrices (2+ dimensions) only; biases and LayerNorm gains are
        not decayed. fused=None fuses it into one kernel per step where this PyTorch supports that.

        optimizer='muon' trains the matrices inside the blocks with Muon (below) and the embeddings,
        head and gains with AdamW. Muon's step sizes are matched to AdamW's, so the same learning
        rate and schedule serve both. muon_dtype is the precision of its orthogonalisation: bfloat16
        where the device multiplies bf16 natively, float32 where bf16 would be emulated (and slow).
        """
        if fused is None:
            fused = device_type in fused_adamw_devices()
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        in_blocks = {n for n, p in params if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")}
        hidden = [p for n, p in params if n in in_blocks]
        rest = [p for n, p in params if n not in in_blocks]
        adamw = torch.optim.AdamW([
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ], lr=learning_rate, betas=betas, fused=fused)
        if not hidden:  # AdamW asked for, or no hidden matrices (the bigram)
            return adamw
        qkv = {p: 3 for n, p in params if n in in_blocks and n.endswith("attn.c_attn.weight")}
        return Optimizers(muon=Muon(hidden, lr=learning_rate, weight_decay=weight_decay, ns_dtype=muon_dtype,
                                    parts=qkv),
                          adamw=adamw)

    @torch.inference_mode()  # no autograd bookkeeping at all: 5-10% faster per token than no_grad on CPU
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Yield max_new_tokens new tokens, each (B, 1), continuing the context idx (B, T).

        temperature 0 picks the most likely token (greedy); top_k keeps only the k most likely.
        With use_cache the prompt runs through the model once and each new token costs one position.
        When the cache is full (block_size positions), it is refilled from the last half of the
        context, so generation goes on past block_size with at least block_size // 2 of context.
        Without the cache every step reruns the last block_size tokens, as nanoGPT does.
        """
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos == block_size:
                keep = block_size if cache is None else max(block_size // 2, 1)
                cache = KVCache(self.config)
                logits, _ = self(idx[:, -keep:], kv_cache=cache)
            else:
                with one_token_speed_path(idx, self.lm_head.weight.dtype):
                    logits, _ = self(idx[:, -1:], kv_cache=cache)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Return idx (B, T) extended by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache, generator))
        return torch.cat([idx] + new, dim=1)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick one token per row from logits (B, vocab_size) -> (B, 1)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):  # (sample.py's 200 keeps all 65 characters)
        v, _ = torch.topk(logits, top_k)
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class Bigram(nn.Module):
    """The lecture's first model: each character alone predicts the next, through a table whose row
    for a character holds the logits of the character after it. No context, no attention."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        torch.nn.init.normal_(self.token_embedding_table.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        return self.token_embedding_table.weight.numel()

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
        if targets is None:
            return logits[:, [-1], :], None
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def flops_per_token(self):
        return 6 * self.get_num_params()  # the lookup is a one-hot matmul with the table

    @torch.inference_mode()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """As GPT.generate_tokens; the next character depends on the last one only, so no cache."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -1:])
            idx = sample_next(logits[:, -1, :], temperature, top_k, generator)
            yield idx

    # The GPT's optimizer set-up (AdamW: the table is a matrix) and generate(), which collects generate_tokens.
    configure_optimizers = GPT.configure_optimizers
    generate = GPT.generate


def build_model(config):
    """The model config.model_type names."""
    return Bigram(config) if config.model_type == "bigram" else GPT(config)


# Muon: an optimizer for the matrices inside the blocks (optimizer='muon' in configure_optimizers)

def orthogonalize(g, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """Newton-Schulz iterations that take the matrix g (or each of a stack of them, (k, m, n)) to about
    U V^T, where g = U S V^T: every singular value moves into roughly [0.7, 1.2]. A quintic with
    coefficients tuned by Keller Jordan for speed, not exact convergence; it needs only matmuls, so it
    runs in whatever dtype is fastest."""
    if g.dim() == 2:
        return orthogonalize(g[None], steps, dtype, eps)[0]
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: x @ x.T is then the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius bounds spectral: all singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for 2-D weight matrices: SGD with Nesterov momentum whose update is
    orthogonalised, so that every direction of the matrix moves by a similar amount.

    The update is torch.optim.Muon's with adjust_lr_fn='match_rms_adamw' (the same learning rate as
    AdamW, scaled by 0.2 * sqrt(max dimension)), with three differences: torch runs Newton-Schulz in
    bfloat16 on every device, 100x slower than float32 on CPUs without bf16 instructions, where
    ns_dtype picks the precision; matrices of the same shape are orthogonalised together, as one
    batch of matmuls (on 2 CPU cores, 40% faster than one by one); and `parts` names matrices that are
    several stacked by rows, such as c_attn (queries, keys and values, fused for speed only): each part
    is orthogonalised, and scaled, as a matrix of its own. Their state dicts load in each other.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16,
                 parts=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group setting: a checkpoint from another machine must not bring its own
        self.parts = parts or {}  # {parameter: how many matrices it stacks}; 1 for any other

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape = {}  # shape of a matrix -> [(parameter, its update before orthogonalisation)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # an exponential moving average of the gradients
                update = p.grad.lerp(buf, momentum)  # Nesterov: look ahead along the average
                update = update.view(self.parts.get(p, 1), -1, p.size(-1))  # (parts, rows of a part, columns)
                same_shape.setdefault(update.shape[1:], []).append((p, update))
            for shape, pairs in same_shape.items():
                ortho = orthogonalize(torch.cat([u for _, u in pairs]), group["ns_steps"], self.ns_dtype)
                for (p, _), o in zip(pairs, ortho.split([len(u) for _, u in pairs])):
                    p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW
                    p.add_(o.reshape(p.shape), alpha=-lr * 0.2 * math.sqrt(max(shape)))


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest)."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def torch_optimizers(optimizer):
    """The torch optimizers in what configure_optimizers returned: AdamW alone, or Muon's and AdamW's."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, Optimizers) else [optimizer]


def fused_adamw_devices():
    """Device types with a fused AdamW kernel in this PyTorch (CPU since 2.4, CUDA, MPS ...)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return ()
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: CUDA has had fused AdamW since 2.0
        return ("cuda",)


# Speed paths for CPUs: same results as the plain PyTorch above, faster on a CPU

class FastDropout(nn.Dropout):
    """nn.Dropout, made faster on CPUs, where bernoulli_ (nn.Dropout's mask) or a torch.rand float per
    element cost 10% of a training step and more: here each element gets 16 random bits, four from one
    int64 draw, and is kept if they are at least round(p * 2^16), as uniform 16-bit numbers: the drop
    rate is p to within 2^-17. 2.4x faster than torch.rand (78 vs 186 ms for the GPU recipe's
    attention weights, (64, 6, 256, 256), on 2 cores)."""

    def forward(self, x):
        # under torch.compile, nn.Dropout's mask, which the compiler fuses: with this one the compiled
        # CPU training step of the GPU recipe's model failed at batch 8 (a garbage view shape, torch 2.13.0)
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        n = x.numel()
        # (n + 3) // 4 int64s, all 64 bits random: random_() alone would leave the sign bit 0
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
        bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform in [-2^15, 2^15)
        keep = bits >= round(self.p * 2 ** 16) - 2 ** 15  # probability 1 - p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


def explicit_attention(q, k, v, dropout=None):
    """Causal softmax(q k^T / sqrt(hs)) v written out, as in the lecture, with dropout (a module) on
    the attention weights. On CPUs in bfloat16 this runs about twice as fast as
    scaled_dot_product_attention's CPU kernel for training."""
    B, nh, T, hs = q.shape
    T_k = k.size(-2)
    # -inf above the diagonal: position t attends to 0..t only (a single new token sees all of its past)
    mask = torch.full((T, T_k), float("-inf"), device=q.device, dtype=q.dtype).triu(T_k - T + 1)
    # (B, nh, T, T_k) affinities: scaled, masked and multiplied in one baddbmm (mask + scale * q @ k^T)
    att = torch.baddbmm(mask, q.reshape(B * nh, T, hs), k.reshape(B * nh, T_k, hs).mT, alpha=1.0 / math.sqrt(hs))
    att = F.softmax(att.view(B, nh, T, T_k), dim=-1)
    if dropout is not None:
        att = dropout(att)
    return att @ v  # (B, nh, T, hs)


@contextmanager
def one_token_speed_path(idx, weight_dtype):
    """For the forward of one new token of one sequence on a CPU, with bfloat16 weights: PyTorch's own
    matrix-vector kernels, not oneDNN's, which it picks otherwise and which cost twice the time for a
    single row (2.4 vs 4.7 ms per token for the GPU recipe's model on an AVX512-BF16 CPU, measured)."""
    if idx.device.type != "cpu" or idx.size(0) != 1 or weight_dtype != torch.bfloat16:
        yield
        return
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
    PackedLinear. 10 samples of 300 characters from the GPU recipe's model then take 12% less time
    where bf16 is native, 27% less where only AVX2 float32 is fast (README, Performance). Left as it
    is for one sequence (PyTorch's matrix-vector kernels are faster there, see one_token_speed_path),
    on other CPUs (not measured), and where oneDNN cannot pack the dtype (bf16 without AVX512). The
    weights must not change afterwards: this is for generation only."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if (batch_size == 1 or not x86 or not torch.backends.mkldnn.is_available()
            or any(m.weight.device.type != "cpu" for _, m in linears)):
        return model
    try:
        packed = [(n, PackedLinear(m, batch_size)) for n, m in linears]
    except (RuntimeError, AttributeError):  # "bf16 path needs the cpu support avx512bw ...", or a PyTorch
        return model  # without these (private) oneDNN ops
    for name, module in packed:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model
