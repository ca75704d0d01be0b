"""
Sample text from a trained checkpoint.

    python sample.py --start="ROMEO:"            # the checkpoint written last under this folder
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:"
    python sample.py --start=FILE:prompt.txt --num_samples=1 --max_new_tokens=2000
"""

import glob
import os
import sys
from dataclasses import dataclass

import torch

from configurator import ConfigError, UserError, configure, run_main
from prepare_shakespeare import CharTokenizer
from train import (CheckpointError, load_checkpoint, model_from_checkpoint, refuse_gpt2_weights, same_vocabulary,
                   select_device, select_dtype)


@dataclass
class SampleConfig:
    init_from: str = "resume"  # as nanoGPT's: sample out_dir's checkpoint (GPT-2 weights are not supported)
    out_dir: str | None = None  # None: the most recently written */ckpt.pt under the current folder
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8  # 1.0 samples the model's distribution, < 1 is more conservative, 0 is greedy
    top_k: int | None = 200  # keep only the top_k most likely characters (None: all)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    data_dir: str = "data"

    def __post_init__(self):
        refuse_gpt2_weights(self.init_from)
        if self.init_from != "resume":
            raise ConfigError(f"init_from must be 'resume' (sample the checkpoint in out_dir), got '{self.init_from}'")


def find_checkpoint(out_dir):
    """out_dir's ckpt.pt; without an out_dir, the most recently written */ckpt.pt under the current
    folder, so that `python sample.py` samples the run just trained, whatever its config named it."""
    if out_dir is not None:
        return os.path.join(out_dir, "ckpt.pt")
    found = glob.glob(os.path.join("*", "ckpt.pt"))
    if not found:
        raise CheckpointError(f"no checkpoint in any folder under {os.getcwd()} (*/ckpt.pt); train a model first: "
                              f"python train.py config/train_shakespeare_char.py, or give --out_dir")
    path = max(found, key=os.path.getmtime)
    print(f"sampling {path}, the most recently written checkpoint here (--out_dir picks another)", file=sys.stderr)
    return path


def load_model_and_tokenizer(cfg, device):
    """The checkpoint's model, and its vocabulary: the one the checkpoint holds, or for nanoGPT's
    checkpoints (which hold none) the meta.pkl of the dataset it names, under data_dir."""
    ckpt_path = find_checkpoint(cfg.out_dir)
    checkpoint = load_checkpoint(ckpt_path, device,
                                 hint=f"; train a model first: python train.py config/train_shakespeare_char.py "
                                      f"--out_dir={cfg.out_dir}")
    model = model_from_checkpoint(checkpoint)
    if checkpoint.get("vocab") is not None:
        if len(checkpoint["vocab"]) != model.config.vocab_size:
            raise CheckpointError(f"{ckpt_path} holds a vocabulary of {len(checkpoint['vocab'])} characters but its "
                                  f"model has {model.config.vocab_size}: the file was altered or is damaged")
        return model, CharTokenizer(checkpoint["vocab"])
    dataset = checkpoint.get("config", {}).get("dataset", "shakespeare_char")
    meta_path = os.path.join(cfg.data_dir, dataset, "meta.pkl")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{ckpt_path} holds no vocabulary (a nanoGPT checkpoint) and {meta_path}, its "
                              f"dataset's, is missing; prepare that dataset, or point --data_dir at its folder")
    tok = CharTokenizer.load(meta_path)
    if not same_vocabulary(checkpoint, tok):
        raise CheckpointError(f"{meta_path} is not the vocabulary the checkpoint was trained with ({tok.vocab_size} "
                              f"characters; the checkpoint's model has {model.config.vocab_size}); the dataset was "
                              f"re-prepared from another text")
    return model, tok


def read_start(start):
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"can't read the prompt file {start[5:]}: {e}") from None
    return start


def sample(cfg, out=sys.stdout):
    """Print cfg.num_samples samples, separated by a line of dashes; one sample streams as it is made."""
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg, device)
    # Sampling one sequence reads every weight per new token, so it is bound by memory bandwidth:
    # weights stored in bfloat16 (rather than cast by autocast at every step) make it faster.
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    if cfg.compile:
        model.forward = torch.compile(model.forward, dynamic=True)  # generate() calls forward
    prompt = read_start(cfg.start)
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    for _ in range(cfg.num_samples):
        if cfg.num_samples == 1:
            out.write(prompt)
            for token in model.generate_tokens(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k):
                out.write(tok.decode(token[0].tolist()))
                out.flush()
            out.write("\n")
        else:
            y = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
            out.write(tok.decode(y[0].tolist()) + "\n")
        out.write("---------------\n")
        out.flush()


def main(argv):
    sample(configure(SampleConfig, argv))


if __name__ == "__main__":
    run_main(main)
