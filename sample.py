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

from configurator import ConfigError, UserError, check, check_choice, check_device, configure, run_main
from prepare_shakespeare import CharTokenizer
from train import (CKPT_NAME, COMPILE_CHOICES, DTYPES, CheckpointError, load_checkpoint, model_from_checkpoint,
                   out_of_memory_in_one_line, refuse_gpt2_weights, same_vocabulary, select_device, select_dtype,
                   use_compile)


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
    compile: bool | str = "auto"  # 'auto': on CUDA only
    data_dir: str = "data"

    def __post_init__(self):
        refuse_gpt2_weights(self.init_from)
        check(self.out_dir is None or self.out_dir != "", "out_dir", self.out_dir, "a folder name")
        check(self.start != "", "start", self.start, "a prompt of at least one character, e.g. --start=ROMEO:")
        check(self.num_samples > 0, "num_samples", self.num_samples, "positive")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "positive")
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0: always the most likely character)")
        check(self.top_k is None or self.top_k > 0, "top_k", self.top_k, "positive, or None for all characters")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compile", self.compile, COMPILE_CHOICES)
        check_device("device", self.device)
        if self.init_from != "resume":
            raise ConfigError(f"init_from must be 'resume' (sample the checkpoint in out_dir), got '{self.init_from}'")


def find_checkpoint(out_dir):
    """out_dir's ckpt.pt; without an out_dir, the most recently written */ckpt.pt under the current
    folder, so that `python sample.py` samples the run just trained, whatever its config named it."""
    if out_dir is not None:
        return os.path.join(out_dir, CKPT_NAME)
    found = glob.glob(os.path.join("*", CKPT_NAME))
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
    """The prompt: start itself, or the text of the file FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        raise UserError(f"the prompt file {path} is a folder; give a text file") from None
    except OSError as e:
        raise UserError(f"can't read the prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"the prompt file {path} is not UTF-8 text") from None
    if not text:
        raise UserError(f"the prompt file {path} is empty; the model needs at least one character to continue")
    return text


def sample(cfg, out=sys.stdout):
    """Print cfg.num_samples samples, separated by a line of dashes; one sample streams as it is made."""
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg, device)
    # Sampling one sequence reads every weight per new token, so it is bound by memory bandwidth:
    # weights stored in bfloat16 (rather than cast by autocast at every step) make it faster.
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    if use_compile(cfg.compile, device):
        model.forward = torch.compile(model.forward, dynamic=True)  # generate() calls forward
    prompt = read_start(cfg.start)
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    if cfg.num_samples == 1:  # stream it, character by character
        out.write(prompt)
        for token in model.generate_tokens(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k):
            out.write(tok.decode(token[0].tolist()))
            out.flush()
        out.write("\n---------------\n")
    else:
        # All samples at once, as one batch: a step costs little more for 10 rows than for one, since
        # it is bound by reading the weights. (The text differs from sampling them one by one.)
        y = model.generate(idx.expand(cfg.num_samples, -1), cfg.max_new_tokens, cfg.temperature, cfg.top_k)
        for row in y:
            out.write(tok.decode(row.tolist()) + "\n---------------\n")
    out.flush()


def main(argv):
    cfg = configure(SampleConfig, argv)
    with out_of_memory_in_one_line(cfg.device, f"--num_samples ({cfg.num_samples}), or sample on the CPU"):
        sample(cfg)


if __name__ == "__main__":
    run_main(main)
