"""A sweep of bad input against every script: each gets one line on stderr, a non-zero exit and no
traceback, and nothing on disk changes. The scripts' main() runs in this process through run_main,
as `python SCRIPT ...` runs it (the last test runs one case a script as a real command)."""
import dataclasses
import os
import pickle
import shlex

import pytest
import torch

import train
from helpers import TINY_TEXT, prepare_tiny, run_in_process, run_script, tiny_config
from prepare_shakespeare import prepare


class Hostile:
    """Unpickling this runs code: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained run, plus files of every bad kind, all under one folder that every case shares:
    each case checks that it changed nothing there."""
    root = tmp_path_factory.mktemp("world")
    cfg = dataclasses.replace(tiny_config(prepare_tiny(root), root / "out"), max_iters=10, lr_decay_iters=10,
                              eval_interval=10)
    train.train(cfg)
    d = root / "bad"
    d.mkdir()
    (d / "folder").mkdir()
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("")
    (d / "syntax.py").write_text("batch_size = = 3\n")
    (d / "raises.py").write_text("batch_size = 1 / 0\n")
    (d / "foreign.txt").write_text("ROMEO: \u4e2d\n")
    marker = str(root / "code_ran")
    for name, payload in [("truncated", None), ("list", [1, 2, 3]), ("hostile", Hostile(marker)),
                          ("folder_ckpt", None)]:
        out = d / f"out_{name}"
        out.mkdir()
        if name == "truncated":
            data = open(os.path.join(cfg.out_dir, "ckpt.pt"), "rb").read()
            (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
        elif name == "folder_ckpt":
            (out / "ckpt.pt").mkdir()
        elif name == "list":
            torch.save(payload, out / "ckpt.pt")  # a torch file from another program
        else:
            with open(out / "ckpt.pt", "wb") as f:
                pickle.dump(payload, f)
    for name, payload in [("notpickle", b"this is not a pickle"), ("hostile", Hostile(marker)),
                          ("wrongshape", {"vocab_size": 3, "itos": {0: "ab"}})]:
        ds = root / "data" / f"meta_{name}"
        ds.mkdir()
        for split in ("train.bin", "val.bin"):
            (ds / split).write_bytes((root / "data" / "tiny" / split).read_bytes())
        with open(ds / "meta.pkl", "wb") as f:
            f.write(payload) if isinstance(payload, bytes) else pickle.dump(payload, f)
    ds = root / "data" / "meta_badmerges"  # a BPE whose second merge names a token made after it
    ds.mkdir()
    for split in ("train.bin", "val.bin"):
        (ds / split).write_bytes((root / "data" / "tiny" / split).read_bytes())
    with open(ds / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 258, "tokenizer": "bpe", "merges": [(97, 98), (300, 99)]}, f)
    prepare(TINY_TEXT, str(root / "data" / "tiny_bpe"), tokenizer="bpe", vocab_size=300)
    ds = root / "data" / "odd_bin"
    ds.mkdir()
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (ds / name).write_bytes((root / "data" / "tiny" / name).read_bytes())
    with open(ds / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: truncated, or not a token file
    return root, cfg, d, marker


def snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0) for p in root.rglob("*"))


def T(cfg):
    """train.py arguments that point at the tiny dataset and run."""
    return [f"--data_dir={cfg.data_dir}", "--dataset=tiny", f"--out_dir={cfg.out_dir}", "--device=cpu",
            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--dropout=0.0",
            "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=5", "--eval_interval=10", "--eval_iters=4",
            "--learning_rate=3e-3", "--dtype=float32", "--seed=0"]


# One case a line: the script, its arguments (as a shell splits them) | what its one line of error says
# [| the machines it is for, where the machine decides: 'no CUDA', 'no MPS'; elsewhere it is skipped].
CASES_TABLE = """
# train.py: settings
train --batch_size=0                                               | batch_size must be positive, got 0
train --block_size=-4                                              | block_size must be positive, got -4
train --n_embd=100 --n_head=3                                      | n_embd=100 is not divisible by n_head=3; e.g. n_head=2, or n_embd=99
train --learning_rate=fast                                         | learning_rate must be float
train --learning_rate=-1                                           | learning_rate must be positive, got -1.0
train --learning_rate=1e999                                        | learning_rate must be a finite number
train --min_lr=0.5                                                 | min_lr must be between 0 and learning_rate
train --beta2=1.5                                                  | beta2 must be in [0, 1)
train --dropout=1.0                                                | dropout must be in [0, 1)
train --grad_clip=-1                                               | grad_clip must be >= 0
train --warmup_iters=500 --lr_decay_iters=100                      | lr_decay_iters must be greater than warmup_iters
train --device=cpu:x                                               | device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:x'
train --device=cuda:0                                              | this PyTorch sees no CUDA GPU | no CUDA
train --device=mps                                                 | MPS is not available here | no MPS
train --device=cuda:99                                             | device=cuda:99 but {no_cuda_99}
train --dtype=float8                                               | dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'
train --dtype=float16                                              | float16 autocast is for GPUs
train --compile=yes                                                | compile must be one of True, False, 'auto'
train --optimizer=sgd                                              | optimizer must be one of 'adamw', 'muon'
train --backend=mpi                                                | backend must be one of
train --pos_encoding=alibi                                         | pos_encoding must be 'learned', 'sinusoidal' or 'rope'
train --vocab_size=100                                             | '--vocab_size' is not a setting here: it is the dataset's number of tokens
train --init_from=gpt2-xl                                          | GPT-2 weights are not supported
train --max_seconds=-1                                             | max_seconds must be >= 0
train --eval_iters=0                                               | eval_iters must be positive
train --eval_split=train                                           | eval_split must be one of 'val', 'test'
train --eval_only=True --eval_split=test                           | has no test split
train --dataset=../elsewhere                                       | dataset must be the name of a folder under data_dir
train --n_layer=2.5                                                | n_layer must be int
train config/train_shakespeare_char_cpu.py --n_embd=0              | n_embd must be positive, got 0
train --seed=-1                                                    | seed must be between 0 and 2**63 - 1, got -1
train --init_from=resume                                           | is a finished run: it has trained its max_iters=10; give a larger --max_iters to go on
train --batch_size                                                 | '--batch_size' has no value
# train.py: files
train no/such/config.py                                            | config file 'no/such/config.py' not found
train '{d}/folder'                                                 | is a folder; give a .py file
train '{d}/latin1.txt'                                             | is not UTF-8 text
train '{d}/syntax.py'                                              | failed to run: SyntaxError
train '{d}/raises.py'                                              | failed to run: ZeroDivisionError
train --init_from=resume '--out_dir={d}/out_truncated'             | is not a readable checkpoint
train --init_from=resume '--out_dir={d}/out_folder_ckpt'           | is not a readable checkpoint
train --init_from=resume '--out_dir={d}/out_list'                  | is not a checkpoint of this project or nanoGPT
train --init_from=resume '--out_dir={d}/out_hostile'               | is not a readable checkpoint
train '--init_from={d}/out_hostile/ckpt.pt' '--out_dir={d}/new'    | is not a readable checkpoint
train --init_from=resume --batch_size=4                            | was trained with batch_size=8, not 4
train --dataset=meta_notpickle                                     | meta.pkl is not a vocabulary file
train --dataset=meta_hostile                                       | meta.pkl is not a vocabulary file (UnpicklingError: it asks for
train --dataset=meta_wrongshape                                    | meta.pkl is not a vocabulary file
train --dataset=meta_badmerges                                     | meta.pkl is not a vocabulary file (ValueError: a merge names an id not made before it)
train '--init_from={d}/../out' --dataset=tiny_bpe '--out_dir={d}/ft' | was trained with another vocabulary than dataset 'tiny_bpe' has (43 vs 300 tokens)
train --dataset=odd_bin                                            | does not belong with
train --dataset=missing                                            | dataset 'missing' is not prepared
train --init_from=resume '--out_dir={d}/nowhere'                   | no checkpoint at {d}/nowhere/ckpt.pt
train --eval_only=True '--out_dir={d}/nowhere'                     | no checkpoint at {d}/nowhere/ckpt.pt
# sample.py
sample --start=                                                    | start must be a prompt of at least one character
sample --seed=99999999999999999999                                 | seed must be between 0 and 2**63 - 1
sample '--start=FILE:{d}/empty.txt'                                | the prompt file {d}/empty.txt is empty
sample '--start=FILE:{d}/folder'                                   | is a folder; give a text file
sample '--start=FILE:{d}/latin1.txt'                               | is not UTF-8 text
sample '--start=FILE:{d}/nothere.txt'                              | can't read the prompt file
sample '--start=FILE:{d}/foreign.txt'                              | characters not in the vocabulary
sample --top_k=0                                                   | top_k must be positive, or None
sample --top_k=-3                                                  | top_k must be positive, or None
sample --temperature=-1                                            | temperature must be >= 0
sample --num_samples=0                                             | num_samples must be positive
sample --max_new_tokens=0                                          | max_new_tokens must be positive
sample --device=cpu:x                                              | device must be auto, cpu, cuda, cuda:N or mps
sample --device=cuda:99                                            | device=cuda:99 but {no_cuda_99}
sample --init_from=gpt2                                            | GPT-2 weights are not supported
sample --init_from=scratch                                         | init_from must be 'resume'
sample '--out_dir={d}/out_truncated'                               | is not a readable checkpoint
sample '--out_dir={d}/out_hostile'                                 | is not a readable checkpoint
sample '--out_dir={d}/nothing'                                     | no checkpoint at
# prepare_shakespeare.py
prepare --input '{d}/folder' --dataset=mine                        | holds no files; give a text file or a folder of them
prepare --input '{d}/latin1.txt' --dataset=mine                    | is not UTF-8 text
prepare --input '{d}/empty.txt' --dataset=mine                     | is empty
prepare --input '{d}/nothere.txt'                                  | not found
prepare --input '{d}/foreign.txt'                                  | is not Tiny Shakespeare, whose dataset is the default
prepare --input '{d}/foreign.txt' --dataset=m --vocab_from meta_hostile | meta.pkl is not a vocabulary file
prepare --input '{d}/foreign.txt' --dataset=m --vocab_from tiny    | characters not in the vocabulary
prepare --input '{d}/foreign.txt' --dataset=m --data_dir '{d}/latin1.txt/data' | could not write the dataset {d}/latin1.txt/data
prepare --input '{d}/foreign.txt' --vocab_size=300                | --vocab_size is for --tokenizer=bpe
prepare --input '{d}/foreign.txt' --tokenizer=bpe --vocab_size=100 | --vocab_size must be at least 256 (the bytes alone), got 100
prepare --input '{d}/foreign.txt' --test_fraction=0.2              | --test_fraction must be at least 0 and below 0.1
prepare --input '{d}/foreign.txt' --tokenizer=wordpiece            | argument --tokenizer: invalid choice: 'wordpiece'
prepare --input '{d}/foreign.txt' --tokenizer=bpe --vocab_from tiny | --vocab_from takes that dataset's tokenizer
prepare --dataset ../x                                             | --dataset must be the name of a folder under --data_dir, got '../x'
prepare --dataset=enwik9                                            | --dataset=enwik9 is not a benchmark this script downloads; did you mean enwik8? (to name your own text
prepare --url ftp://x/y                                            | --url must be an http:// or https:// address
prepare --sha256 abc                                               | --sha256 must be 64 hexadecimal digits
# bench.py
bench --steps=0                                                    | steps must be positive
bench --seed=-1                                                    | seed must be between 0 and 2**63 - 1
bench --n_embd=100 --n_head=3                                      | n_embd=100 is not divisible by n_head=3
bench --device=gpu                                                 | device must be auto, cpu, cuda, cuda:N or mps
"""


# Where a case asks for a device: whether this machine lacks it, and what a GPU index past its GPUs gets
MACHINES = {"no CUDA": not torch.cuda.is_available(), "no MPS": not torch.backends.mps.is_available()}
NO_CUDA_99 = (f"this machine has {torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available()
              else "this PyTorch sees no CUDA GPU")


def case(line):
    command, message, *machines = [part.strip() for part in line.split(" | ")]
    script, *args = shlex.split(command)
    marks = [pytest.mark.skipif(not MACHINES[m], reason=f"for a machine with {m}: this one has it") for m in machines]
    return pytest.param(script, args, message.replace("{no_cuda_99}", NO_CUDA_99), marks=marks,
                        id=" ".join([script] + args))


CASES = [case(line) for line in CASES_TABLE.strip().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("script, args, message", CASES)
def test_bad_input_gets_one_line_and_changes_nothing(world, script, args, message):
    root, cfg, d, marker = world
    args = [a.replace("{d}", str(d)) for a in args]
    common = {"train": T(cfg), "sample": [f"--out_dir={cfg.out_dir}", "--device=cpu"],
              "prepare": ["--data_dir", cfg.data_dir], "bench": ["--device=cpu"]}[script]
    # config files come first, as on a command line; the case's own --key=value come last and win
    argv = [a for a in args if not a.startswith("-")] + common + [a for a in args if a.startswith("-")]
    if script == "prepare":
        argv = common + args
    before = snapshot(root)
    r = run_in_process({"prepare": "prepare_shakespeare"}.get(script, script) + ".py", *argv)
    assert r.returncode in (1, 2), r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert message.replace("{d}", str(d)) in r.stderr, r.stderr
    assert snapshot(root) == before
    assert not os.path.exists(marker)  # no file this repo reads can run code


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--batch_size=0"], "error: batch_size must be positive"),
    ("sample.py", ["--out_dir=nowhere"], "error: no checkpoint at nowhere/ckpt.pt"),
    ("prepare_shakespeare.py", ["--inptu=x.txt"], "error: unrecognized arguments: --inptu=x.txt; see python"),
    ("bench.py", ["--steps=0"], "error: steps must be positive"),
])
def test_bad_input_is_one_line_without_traceback(tiny_data, tmp_path, script, args, message):
    """The sweep above as real commands, one per script: `python SCRIPT` reaches run_main too."""
    common = {"train.py": [f"--data_dir={tiny_data}", "--dataset=tiny"], "sample.py": [], "bench.py": [],
              "prepare_shakespeare.py": ["--data_dir", str(tiny_data)]}[script]
    before = sorted(p for p in tmp_path.rglob("*"))
    r = run_script(script, *args, *common, cwd=str(tmp_path))
    assert r.returncode in (1, 2) and r.stderr.startswith(message), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written
