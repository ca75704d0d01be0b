"""nanoGPT's side of the compatibility tests, written independently of this project's code.

It lays out the model the way nanoGPT's model.py builds it (modules registered in the order wte,
wpe, drop, h, ln_f, then lm_head, tied to wte; its own LayerNorm class; the attention dropout module
nanoGPT has), groups parameters for AdamW as nanoGPT's configure_optimizers does, and reads and
writes checkpoints as nanoGPT's train.py does (a compiled model's `_orig_mod.` keys, best_val_loss
as a tensor, its config keys). Nothing here imports the project's model or training code.
"""
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

# nanoGPT's train.py globals for config/train_shakespeare_char.py: what it saves as checkpoint["config"]
NANOGPT_CONFIG = dict(
    out_dir="out-shakespeare-char", eval_interval=250, log_interval=10, eval_iters=200, eval_only=False,
    always_save_checkpoint=False, init_from="scratch", wandb_log=False, wandb_project="shakespeare-char",
    wandb_run_name="mini-gpt", dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=64,
    block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False, learning_rate=1e-3,
    max_iters=5000, weight_decay=1e-1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True, warmup_iters=100,
    lr_decay_iters=5000, min_lr=1e-4, backend="nccl", device="cuda", dtype="bfloat16", compile=True,
)


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias, dropout):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, n_embd, bias, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Layer(nn.Module):
    def __init__(self, n_embd, n_head, bias, dropout):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = SelfAttention(n_embd, n_head, bias, dropout)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = FeedForward(n_embd, bias, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Layer(n_embd, n_head, bias, dropout) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer in self.transformer.h:
            x = layer(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)  # fused on CUDA only


def train_steps(model, optimizer, batches):
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def write_checkpoint(path, model, optimizer, model_args, iter_num, best_val_loss, config):
    """As nanoGPT's train.py saves: raw_model is the compiled model, so keys carry `_orig_mod.`."""
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(best_val_loss), "config": config}, path)


def resume(path, learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.1):
    """As nanoGPT's train.py does for init_from='resume': returns (model, optimizer, checkpoint)."""
    checkpoint = torch.load(path, map_location="cpu")
    args = {k: checkpoint["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                                     "vocab_size")}
    model = NanoGPT(**args, dropout=0.0)
    state = checkpoint["model"]
    for k in list(state):
        if k.startswith("_orig_mod."):
            state[k[len("_orig_mod."):]] = state.pop(k)
    model.load_state_dict(state)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, betas)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer, checkpoint


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.8, top_k=200):
    """nanoGPT's sampling loop: no KV cache, the whole (cropped) context runs through the model for
    every new token."""
    block_size = model.transformer.wpe.weight.size(0)
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        pos = torch.arange(context.size(1), device=idx.device)
        x = model.transformer.drop(model.transformer.wte(context) + model.transformer.wpe(pos))
        for layer in model.transformer.h:
            x = layer(x)
        logits = model.lm_head(model.transformer.ln_f(x)[:, [-1], :])[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
    return idx


def main(argv):
    """python tests/nanogpt_reference.py OUT_DIR META_PKL [NUM_SAMPLES MAX_NEW_TOKENS]: what nanoGPT's
    sample.py does on a CPU (float32, samples one after another), for timing against ours.
    python tests/nanogpt_reference.py --write OUT_DIR VOCAB_SIZE: a checkpoint of the GPU recipe's shape."""
    import os
    import pickle
    import sys
    import time
    if argv[0] == "--write":
        out_dir, vocab_size = argv[1], int(argv[2])
        os.makedirs(out_dir, exist_ok=True)
        args = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False, vocab_size=vocab_size, dropout=0.2)
        model = NanoGPT(**args)
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
        write_checkpoint(os.path.join(out_dir, "ckpt.pt"), model, optimizer, args, 0, 10.0, NANOGPT_CONFIG)
        return
    t0 = time.perf_counter()
    out_dir, meta_path = argv[0], argv[1]
    num_samples, max_new_tokens = (int(a) for a in argv[2:4]) if len(argv) > 2 else (10, 500)
    torch.manual_seed(1337)
    model, _, _ = resume(os.path.join(out_dir, "ckpt.pt"))
    model.eval()
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    stoi, itos = meta["stoi"], meta["itos"]
    x = torch.tensor([stoi[c] for c in "\n"], dtype=torch.long)[None, ...]
    for _ in range(num_samples):
        y = generate(model, x, max_new_tokens)
        print("".join(itos[i] for i in y[0].tolist()))
        print("---------------")
    print(f"{time.perf_counter() - t0:.2f} s after imports", file=sys.stderr)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
