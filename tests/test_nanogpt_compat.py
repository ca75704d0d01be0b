"""Moving between nanoGPT and this project: checkpoints resume both ways, configs run unchanged.

nanoGPT's side is tests/nanogpt_reference.py, written independently of our model and trainer."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import nanogpt_reference as nano
from configurator import ConfigError, configure
from helpers import assert_same_weights
from model import GPT, GPTConfig
from tokenizer import load_tokenizer
from sample import SampleConfig
from checkpoint import load_checkpoint, model_from_checkpoint, restore_training_state, save_checkpoint
from train import TrainConfig, train

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False)  # block_size != vocab_size


def batches(cfg, n, seed=0):
    data = np.fromfile(os.path.join(cfg.data_dir, cfg.dataset, "train.bin"), dtype=np.uint16).astype(np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(data) - SHAPE["block_size"] - 1, 4)
        w = torch.from_numpy(np.stack([data[s:s + SHAPE["block_size"] + 1] for s in starts]))
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def vocab_size(cfg):
    return load_tokenizer(os.path.join(cfg.data_dir, cfg.dataset, "meta.pkl")).vocab_size


def ours_resumed(path, cfg):
    """Our model and optimizer as --init_from=resume restores them."""
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer=cfg.optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    restore_training_state(checkpoint, model, optimizer, scaler, np.random.default_rng(0), "cpu")
    return model, optimizer


def one_step(model, optimizer, batch, ours):
    model.train()
    loss = model(*batch)[1] if ours else model(*batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_nanogpt_checkpoint_resumes_here_exactly(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, **SHAPE)
    torch.manual_seed(0)
    theirs = nano.NanoGPT(**SHAPE, vocab_size=vocab_size(cfg), dropout=0.0)
    opt = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    nano.train_steps(theirs, opt, batches(cfg, 5))
    os.makedirs(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    # the run's config, with nanoGPT's keys: resumed with the same config file, as a nanoGPT user would
    config = {k: getattr(cfg, k) if hasattr(cfg, k) else v for k, v in nano.NANOGPT_CONFIG.items()}
    nano.write_checkpoint(path, theirs, opt, dict(SHAPE, vocab_size=vocab_size(cfg), dropout=0.0), 5, 2.5, config)

    ours, our_opt = ours_resumed(path, cfg)
    next_batch = batches(cfg, 1, seed=1)[0]
    one_step(ours, our_opt, next_batch, ours=True)
    one_step(theirs, opt, next_batch, ours=False)  # the same step, continued in nanoGPT
    assert_same_weights(ours, theirs, rtol=1e-5, atol=1e-6)
    # and the whole resume path of train.py, which used to fail at its first step
    losses = train(dataclasses.replace(cfg, init_from="resume", max_iters=15, always_save_checkpoint=True,
                                       eval_interval=5))
    assert load_checkpoint(path)["iter_num"] == 15 and losses["val"] < 3.5


def test_our_checkpoint_resumes_in_nanogpt_exactly(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, **SHAPE)
    train(cfg)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    theirs, opt, _ = nano.resume(path)  # nanoGPT's loading: strict state dict, optimizer by position
    ours, our_opt = ours_resumed(path, cfg)
    next_batch = batches(cfg, 1, seed=2)[0]
    one_step(theirs, opt, next_batch, ours=False)
    one_step(ours, our_opt, next_batch, ours=True)
    assert_same_weights(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_checkpoints_from_before_nanogpt_order_still_resume(tiny_cfg, optimizer):
    """Before, wpe was registered after the blocks, so it came last in named_parameters and so in
    its optimizer group. Such a checkpoint is built as that code built it, then resumed here."""
    cfg = dataclasses.replace(tiny_cfg, **SHAPE, optimizer=optimizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, vocab_size=vocab_size(cfg), dropout=0.0))
    order = [(n, p) for n, p in model.named_parameters() if n != "transformer.wpe.weight"]
    order.append(("transformer.wpe.weight", model.transformer.wpe.weight))
    hidden = [p for n, p in order if optimizer == "muon" and p.dim() == 2 and n.startswith("transformer.h.")]
    rest = [p for n, p in order if not any(p is h for h in hidden)]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.99))
    opts = {"adamw": adamw}
    if hidden:
        opts["muon"] = torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for batch in batches(cfg, 3):
        model(*batch)[1].backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
    os.makedirs(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    state = {"muon": opts["muon"].state_dict(), "adamw": adamw.state_dict()} if hidden else adamw.state_dict()
    tok = load_tokenizer(os.path.join(cfg.data_dir, cfg.dataset, "meta.pkl"))
    save_checkpoint({"model": model.state_dict(), "optimizer": state, "model_args": dict(SHAPE, vocab_size=tok.vocab_size,
                     dropout=0.0), "iter_num": 3, "best_val_loss": 3.0, "config": dataclasses.asdict(cfg),
                     "vocab": tok.chars}, path)

    ours, our_opt = ours_resumed(path, cfg)
    next_batch = batches(cfg, 1, seed=3)[0]
    one_step(ours, our_opt, next_batch, ours=True)
    model(*next_batch)[1].backward()  # the old optimizer objects continue as the old code would,
    if hidden:  # but with this repo's Muon step (c_attn's three matrices orthogonalised apart), from their state
        muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer="muon").optimizers["muon"]
        muon.load_state_dict(opts["muon"].state_dict())
        opts["muon"] = muon
    for o in opts.values():
        o.step()
    assert_same_weights(ours, model, rtol=1e-5, atol=1e-6)


def test_nanogpt_config_files_run_unchanged(tmp_path):
    """nanoGPT's config/train_shakespeare_char.py, as it is written there (wandb keys, a comment
    block, commented-out overrides), and every key of its train.py and sample.py."""
    config = tmp_path / "train_shakespeare_char.py"
    config.write_text("""# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
""")
    cfg = configure(TrainConfig, [str(config), "--device=cpu", "--compile=False"])
    assert cfg.wandb_project == "shakespeare-char" and cfg.out_dir == "out-shakespeare-char"
    train_keys = {k for k in nano.NANOGPT_CONFIG}
    assert train_keys <= {f.name for f in dataclasses.fields(TrainConfig)}
    sample_keys = {"init_from", "out_dir", "start", "num_samples", "max_new_tokens", "temperature", "top_k",
                   "seed", "device", "dtype", "compile"}
    assert sample_keys <= {f.name for f in dataclasses.fields(SampleConfig)}
    assert configure(SampleConfig, ["--init_from=resume"]).init_from == "resume"


@pytest.mark.parametrize("script_cfg", [TrainConfig, SampleConfig])
@pytest.mark.parametrize("weights", ["gpt2", "gpt2-xl"])
def test_gpt2_weights_are_refused_with_one_line(script_cfg, weights):
    with pytest.raises(ConfigError, match=f"init_from='{weights}'.*GPT-2 weights.*not supported"):
        configure(script_cfg, [f"--init_from={weights}"])
