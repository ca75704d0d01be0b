"""
A GPT language model in one file, following Karpathy's "Let's build GPT" lecture and nanoGPT: the
settings, position encodings, attention, MLP, the transformer block, the GPT (training loss, optimizer
groups, generation with a key/value cache), then the bigram the lecture starts from. Parameter names
match nanoGPT's, so checkpoints move between the two. A new idea is a GPTConfig field used here: the
scripts' settings, --help and checkpoints pick it up. speedups.py swaps in faster modules for CPUs.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from muon import Muon, Optimizers


@dataclass
class GPTConfig:
    """The model's settings, declared once: train.py's and bench.py's settings extend these."""
    block_size: int = 256  # longest context the model sees
    vocab_size: int = 65  # Tiny Shakespeare has 65 distinct characters
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # width of the residual stream
    dropout: float = 0.2  # on the attention weights, the residual branches and the embeddings
    bias: bool = False  # bias in Linear and LayerNorm layers: GPT-2 had them; nanoGPT trains without
    model_type: str = "gpt"  # 'gpt', or 'bigram': the lecture's first model, a next-character lookup table
    pos_encoding: str = "learned"  # 'learned' (GPT-2, the lecture's), 'sinusoidal' (fixed) or 'rope' (rotary)
    mtp_weight: float = 0.0  # multi-token prediction: a second head learns the token after next, at this weight

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            heads = min((h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0),
                        key=lambda h: abs(h - self.n_head))  # the nearest count that divides it, the fewer if tied
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; e.g. n_head={heads}, "
                             f"or n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mtp_weight < 0:
            raise ValueError(f"mtp_weight must be at least 0 (0 turns it off), got {self.mtp_weight}")
        if self.model_type not in ("gpt", "bigram"):
            raise ValueError(f"model_type must be 'gpt' or 'bigram', got '{self.model_type}'")
        if self.pos_encoding not in ("learned", "sinusoidal", "rope"):
            raise ValueError(f"pos_encoding must be 'learned', 'sinusoidal' or 'rope', got '{self.pos_encoding}'")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, but n_embd / n_head = {self.n_embd // self.n_head}")

    @classmethod
    def from_settings(cls, settings, **changes):
        """The model's part of a script's settings (a dataclass that extends GPTConfig), with changes."""
        return cls(**{**{f.name: getattr(settings, f.name) for f in fields(cls)}, **changes})


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

    def __init__(self, config, dtype=None):
        self.config = config
        self.dtype = dtype  # None: the dtype attention runs in
        self.k = self.v = None  # allocated on first use
        self.pos = 0  # number of positions filled; advanced by GPT.forward after all layers ran

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) for `layer` at the next T positions; return all keys and values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            shape = (self.config.n_layer, B, nh, self.config.block_size, hs)
            self.k = torch.empty(shape, device=k.device, dtype=self.dtype or k.dtype)
            self.v = torch.empty(shape, device=v.device, dtype=self.dtype or v.dtype)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        # queries, keys and values for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # dropout on the attention weights (each position ignores some others at random) and on the output
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # PyTorch's fused kernel (scaled_dot_product_attention); False: the lecture's maths, written out
        # (faster for bf16 on a CPU: speedups.py chooses)
        self.fused_kernel = True

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
            k, v = kv_cache.update(self.layer_idx, k, v)  # all positions so far: (B, nh, T_k, hs)
            q = q.to(k.dtype)  # the cache may hold another dtype than the weights (speedups.py)
        # The causal (lower-triangular) mask lets position t attend to positions <= t only, so the
        # model cannot peek at the token it is asked to predict. A single new token attends to all
        # cached positions, which are all in its past, so it needs no mask.
        if self.fused_kernel:
            dropout_p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout_p)
        else:
            T_k, hs = k.size(-2), k.size(-1)
            mask = torch.full((T, T_k), float("-inf"), device=q.device, dtype=q.dtype).triu(T_k - T + 1)
            # affinities (B, nh, T, T_k): mask + q @ k^T / sqrt(hs), in one baddbmm
            att = torch.baddbmm(mask, q.flatten(0, 1), k.flatten(0, 1).mT, alpha=1.0 / math.sqrt(hs))
            att = self.attn_dropout(F.softmax(att.view(B, self.n_head, T, T_k), dim=-1))
            y = att @ v  # (B, nh, T, hs): a weighted average of the values each position attends to
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

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
        # modules is kept: optimizer states are matched to parameters by position.
        learned = config.pos_encoding == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_encoding == "sinusoidal":  # a fixed vector per position, added
            # scaled to the token embeddings' size (std 0.02): at full size it drowns them and training stalls
            self.register_buffer("sinusoid", 0.02 * sinusoidal_table(config.block_size, config.n_embd),
                                 persistent=False)
        elif config.pos_encoding == "rope":  # nothing added; queries and keys are rotated in every attention layer
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the same matrix maps tokens to vectors and vectors back to token logits.
        self.transformer.wte.weight = self.lm_head.weight
        self.kv_cache_dtype = None  # the dtype generation caches keys and values in (None: attention's)
        # what each of generation's cached one-token steps runs in (speedups.py turns oneDNN off there)
        self.one_token_context = nullcontext
        if config.mtp_weight:  # one residual step from the last layer's output, then the shared lm_head
            self.mtp = nn.Linear(config.n_embd, config.n_embd, bias=False)

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
        plus attention's q @ k and att @ v over the context (PaLM paper, appendix B). With mtp_weight the
        output matrix serves twice (parameters count once): 6 per its weight more."""
        cfg = self.config
        second_head = 6 * cfg.n_embd * cfg.vocab_size if cfg.mtp_weight else 0
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size + second_head

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits, loss, extra_loss). With targets (B, T): logits (B, T,
        vocab_size), loss the mean cross-entropy of the next token (what evals report), and in
        training extra_loss, the weighted terms of other objectives that training adds to it (None
        if there are none). Without targets: the last position's logits (B, 1, vocab_size), None, None."""
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

        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, None  # sampling needs the last position's logits only
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        extra_loss = None
        if self.config.mtp_weight and self.training:
            # multi-token prediction: also predict the token after next, from one residual step past the
            # last layer. Position t's target is position t+1's (the last position has none).
            h = x[:, :-1]
            after_next = self.lm_head(h + self.mtp(h))
            extra_loss = self.config.mtp_weight * F.cross_entropy(
                after_next.reshape(-1, after_next.size(-1)), targets[:, 1:].reshape(-1), ignore_index=-1)
        return logits, loss, extra_loss

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
        optimizer='muon' trains the matrices inside the blocks with Muon (muon.py), in muon_dtype,
        and the rest with AdamW; the same learning rate and schedule serve both."""
        if fused is None:  # PyTorch's one-kernel AdamW, on the devices that have it
            fused = device_type in ("cuda", "cpu", "mps", "xpu")
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        in_blocks = {n for n, p in params if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")}
        rest = [p for n, p in params if n not in in_blocks]
        adamw = torch.optim.AdamW([
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ], lr=learning_rate, betas=betas, fused=fused)
        if not in_blocks:  # AdamW asked for, or no hidden matrices (the bigram)
            return adamw
        hidden = [p for n, p in params if n in in_blocks]
        qkv = {p: 3 for n, p in params if n in in_blocks and n.endswith("attn.c_attn.weight")}  # 3 matrices in one
        muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, ns_dtype=muon_dtype, parts=qkv)
        return Optimizers(muon=muon, adamw=adamw)

    @torch.inference_mode()  # no autograd bookkeeping at all
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Yield max_new_tokens new tokens, each (B, 1), continuing the context idx (B, T).
        temperature 0 is greedy; top_k keeps only the k most likely. With use_cache the prompt runs
        once and each new token costs one position; a full cache is refilled from the last half of
        the context. Without it every step reruns the last block_size tokens, as nanoGPT does."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos == block_size:
                keep = block_size if cache is None else max(block_size // 2, 1)
                cache = KVCache(self.config, self.kv_cache_dtype)
                logits, _, _ = self(idx[:, -keep:], kv_cache=cache)
            else:
                with self.one_token_context():
                    logits, _, _ = self(idx[:, -1:], kv_cache=cache)
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
    if top_k is not None and top_k < logits.size(-1):
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
        """As GPT.forward: (logits, loss, extra_loss); a table has no other objective."""
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
        if targets is None:
            return logits[:, [-1], :], None, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, None

    def flops_per_token(self):
        return 6 * self.get_num_params()  # the lookup is a one-hot matmul with the table

    def crop_block_size(self, block_size):
        """As GPT.crop_block_size: the table has no positions to cut, only the context to record."""
        self.config.block_size = block_size

    @torch.inference_mode()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """As GPT.generate_tokens; the next character depends on the last one only, so no cache."""
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -1:])
            idx = sample_next(logits[:, -1, :], temperature, top_k, generator)
            yield idx

    # The GPT's optimizer set-up (AdamW: the table is a matrix) and generate(), which collects generate_tokens.
    configure_optimizers = GPT.configure_optimizers
    generate = GPT.generate


def build_model(config):
    """The model config.model_type names."""
    return Bigram(config) if config.model_type == "bigram" else GPT(config)
