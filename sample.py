"""
Sample text from a trained checkpoint.

    python sample.py --start="ROMEO:"            # the checkpoint written last under this folder
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:"
    python sample.py --start=FILE:prompt.txt --num_samples=1 --max_new_tokens=2000
"""

import sys
from dataclasses import dataclass

import torch

from checkpoint import (checkpoint_tokenizer, find_checkpoint, how_to_train_first, load_checkpoint, model_from_checkpoint,
                        refuse_gpt2_weights)
from configurator import ConfigError, UserError, check, check_seed, configure, run_main
from device import DeviceSettings, out_of_memory_in_one_line, select_device, select_sampling_dtype, use_compile
from speedups import speed_up_sampling


@dataclass
class SampleConfig(DeviceSettings):
    """The sampling settings, then where it runs (DeviceSettings)."""
    init_from: str = "resume"  # as nanoGPT's: sample out_dir's checkpoint (GPT-2 weights are not supported)
    out_dir: str | None = None  # None: the most recently written */ckpt.pt under the current folder
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10  # samples to print (made together, as one batch); 1 streams as it is made
    max_new_tokens: int = 500  # tokens to generate per sample (characters, for a character model)
    temperature: float = 0.8  # 1.0 samples the model's distribution, < 1 is more conservative, 0 is greedy
    top_k: int | None = 200  # keep only the top_k most likely tokens (None: all)
    seed: int = 1337  # the same seed makes the same text
    data_dir: str = "data"  # where nanoGPT's checkpoints (which hold no vocabulary) find their meta.pkl

    def __post_init__(self):
        refuse_gpt2_weights(self.init_from)
        check(self.out_dir is None or self.out_dir != "", "out_dir", self.out_dir, "a folder name")
        check(self.start != "", "start", self.start, "a prompt of at least one character, e.g. --start=ROMEO:")
        check(self.num_samples > 0, "num_samples", self.num_samples, "positive")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "positive")
        check_seed(self.seed)
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0: always the most likely character)")
        check(self.top_k is None or self.top_k > 0, "top_k", self.top_k, "positive, or None for all characters")
        self.check_device_settings()
        if self.init_from != "resume":
            raise ConfigError(f"init_from must be 'resume' (sample the checkpoint in out_dir), got '{self.init_from}'")


def load_model_and_tokenizer(cfg):
    """The checkpoint's model (on the CPU) and vocabulary."""
    path = find_checkpoint(cfg.out_dir)
    checkpoint = load_checkpoint(path, hint=f"; {how_to_train_first(cfg.out_dir)}")
    return model_from_checkpoint(checkpoint), checkpoint_tokenizer(checkpoint, path, cfg.data_dir)


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
    dtype = select_sampling_dtype(cfg.dtype, device, cfg.num_samples)
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg)
    # Each new token reads every weight, so sampling is bound by reading them: weights stored in the
    # sampling dtype (rather than cast by autocast at every step) make it faster.
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    if use_compile(cfg.compile, device):
        model.compile(dynamic=True)  # generate() calls the model, which now runs compiled
    else:
        speed_up_sampling(model, device, cfg.num_samples)
    prompt = read_start(cfg.start)
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    if cfg.num_samples == 1:  # stream it, character by character
        out.write(prompt)
        decode = tok.stream_decoder()  # a character split between BPE tokens waits for its last byte
        for token in model.generate_tokens(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k):
            out.write(decode(token[0].tolist()))
            out.flush()
        out.write(decode([], final=True))
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
