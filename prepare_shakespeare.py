"""
Prepare a dataset: Tiny Shakespeare by default, or any UTF-8 text with --input.

    python prepare_shakespeare.py                       # download Tiny Shakespeare
    python prepare_shakespeare.py --input my.txt --dataset my_text

writes data/<dataset>/{input.txt, train.bin, val.bin, meta.pkl}: the first 90% of the characters
are train, the rest val, as uint16 token ids; meta.pkl holds vocab_size, stoi and itos as nanoGPT's.
--tokenizer=bpe --vocab_size=N learns a byte-level BPE on the train split instead (tokenizer.py).
"""

import argparse
import hashlib
import os
import pickle
import shutil

import numpy as np
import requests
from tqdm import tqdm

from configurator import ConfigError, UserError, check, run_main
from files import dead_leftovers, remove_leftovers, signals_deferred, write_atomic
from tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATASET = "shakespeare_char"
TRAIN_FRACTION = 0.9


class DatasetError(UserError):
    pass


def check_dataset_name(key, name, data_dir_key="data_dir"):
    """A dataset is a folder directly under data_dir: a name, not a path."""
    ok = name not in ("", ".", "..") and "/" not in name and os.sep not in name
    check(ok, key, name, f"the name of a folder under {data_dir_key}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, timeout=30):
    """Download url to path (write_atomic), verifying the SHA-256 as the bytes arrive: path appears
    only once the download is complete and verified."""

    def fetch(f):
        digest = hashlib.sha256()
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                for chunk in r.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256 and digest.hexdigest() != sha256:
            raise DatasetError(f"download from {url} has the wrong SHA-256 checksum (expected {sha256}); "
                               f"try again, or pass --input with a local copy")

    try:
        write_atomic(path, fetch)
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        raise DatasetError(f"could not download {url} ({reason}); check your connection, "
                           f"or pass --input with a local copy of the text") from e


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"input text '{path}' not found") from None
    except IsADirectoryError:
        raise DatasetError(f"input text '{path}' is a folder; give a text file") from None
    except OSError as e:
        raise DatasetError(f"can't read the input text '{path}': {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"convert it, e.g. with iconv -t UTF-8") from None
    if not text:
        raise DatasetError(f"'{path}' is empty; give a text to train on")
    return text


def restore_interrupted_swap(folder, name):
    """A prepare killed between its two renames left no folder `name`, and the previous set in
    .name.tmpPID.old: put it back, before leftovers are removed."""
    target = os.path.join(folder, name)
    old_sets = [n for n in dead_leftovers(folder, f".{name}.") if n.endswith(".old")]
    if old_sets and not os.path.exists(target):
        os.rename(os.path.join(folder, old_sets[0]), target)


DATASET_FILES = ("train.bin", "val.bin", "meta.pkl", "input.txt")  # what prepare writes


def copy_entry(src, dst):
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


def make_tokenizer(kind, train_text, text, vocab_size):
    """A tokenizer of the kind asked for: characters (those of the whole text), or a byte-level BPE
    of vocab_size learnt on the train split only."""
    if kind == "bpe":
        print(f"learning a BPE of {vocab_size} tokens from {len(train_text):,} characters")
        return BPETokenizer.train(train_text, vocab_size)
    return CharTokenizer.from_text(text)


def prepare(text, out_dir, tok=None, source=None, tokenizer="char", vocab_size=1024):
    """Tokenize text (with tok, or a tokenizer of the kind `tokenizer` made for it) and write train.bin,
    val.bin, meta.pkl and input.txt (a copy of the file `source`, or text) into out_dir; return the
    tokenizer. The first 90% of the characters are train, the rest val, each encoded on its own.

    The four files are written into a new folder beside out_dir that then takes its place, so that a
    reader sees the old set or the new one, never a mix, even if this process is killed midway. Other
    files in out_dir (its README.md, a user's notes) are copied into the new folder first."""
    n = len(text)
    split = int(n * TRAIN_FRACTION)
    if split == 0 or split == n:
        raise DatasetError(f"the text has only {n} characters, too few to split into train and val")
    tok = tok or make_tokenizer(tokenizer, text[:split], text, vocab_size)
    if tok.vocab_size > np.iinfo(np.uint16).max + 1:
        raise DatasetError(f"the text has {tok.vocab_size} distinct characters; uint16 token files hold at most 65536")
    ids = {name: np.array(tok.encode(part), dtype=np.uint16) for name, part in (("train", text[:split]),
                                                                                 ("val", text[split:]))}
    meta = {**tok.meta(), "chars": {"train": split, "val": n - split}}  # for bits per character
    parent, name = os.path.split(os.path.abspath(out_dir))
    staging = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    old = staging + ".old"
    try:
        os.makedirs(parent, exist_ok=True)
        restore_interrupted_swap(parent, name)
        remove_leftovers(parent, f".{name}.")
        os.makedirs(staging)
        for name, part in ids.items():
            part.tofile(os.path.join(staging, f"{name}.bin"))
        with open(os.path.join(staging, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
        if source is not None:
            shutil.copyfile(source, os.path.join(staging, "input.txt"))
        else:
            with open(os.path.join(staging, "input.txt"), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        if os.path.exists(out_dir):
            for entry in os.listdir(out_dir):
                if entry not in DATASET_FILES:
                    copy_entry(os.path.join(out_dir, entry), os.path.join(staging, entry))
        with signals_deferred():  # Ctrl-C or SIGTERM between the two renames would leave neither set
            if os.path.exists(out_dir):
                os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise DatasetError(f"could not write the dataset to {out_dir}: {e.strerror}; nothing there was changed") from None
    finally:
        if os.path.exists(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)  # the new set did not take its place: the old one stays
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return tok


def prepare_dataset(dataset=DEFAULT_DATASET, input_path=None, url=SHAKESPEARE_URL,
                    sha256=SHAKESPEARE_SHA256, data_dir="data", vocab_from=None, tokenizer="char", vocab_size=1024):
    """Fetch (or copy) the text into data_dir/dataset/input.txt and prepare it; return the tokenizer.
    vocab_from names a prepared dataset whose tokenizer to use (to fine-tune a model trained on it)."""
    out_dir = os.path.join(data_dir, dataset)
    text_path = os.path.join(out_dir, "input.txt")
    restore_interrupted_swap(*os.path.split(os.path.abspath(out_dir)))  # its input.txt spares a download
    tok = None
    if vocab_from is not None:
        meta = os.path.join(data_dir, vocab_from, "meta.pkl")
        if not os.path.exists(meta):
            raise DatasetError(f"--vocab_from {vocab_from}: {meta} not found; prepare that dataset first")
        tok = load_tokenizer(meta)
    if input_path is not None:
        text = read_text(input_path)
    else:
        if os.path.exists(text_path):
            if sha256 and sha256_of(text_path) != sha256:
                raise DatasetError(f"{text_path} exists but is not the expected text (SHA-256 differs); "
                                   f"move it away to download again, or pass --input {text_path}")
            print(f"{text_path} is already there, skipping download")
        else:
            os.makedirs(out_dir, exist_ok=True)
            download(url, text_path, sha256)
        text = read_text(text_path)
    tok = prepare(text, out_dir, tok, input_path or text_path, tokenizer, vocab_size)  # checks before writing
    tokens = {split: os.path.getsize(os.path.join(out_dir, f"{split}.bin")) // 2 for split in ("train", "val")}
    print(f"{out_dir}: {tok.kind} tokenizer, vocab size {tok.vocab_size}, {tokens['train']:,} train tokens, "
          f"{tokens['val']:,} val tokens ({len(text) / sum(tokens.values()):.2f} characters per token)")
    return tok


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like the other scripts' config errors
        raise ConfigError(f"{message}; see python prepare_shakespeare.py --help")


def main(argv):
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", help="a local UTF-8 text file to use instead of downloading")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="name of the folder under data/ to write")
    parser.add_argument("--url", default=SHAKESPEARE_URL, help="where to download the text from")
    parser.add_argument("--sha256", default=SHAKESPEARE_SHA256,
                        help="expected SHA-256 of the download ('' to skip the check)")
    parser.add_argument("--data_dir", default="data", help="folder that holds the datasets")
    parser.add_argument("--vocab_from", help="use the tokenizer of this prepared dataset (for fine-tuning)")
    parser.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                        help="char: one token per character; bpe: byte-level BPE learnt on the train split")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="the BPE's number of tokens, 256 (the bytes alone) to 65536 (default 1024)")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise ConfigError("--vocab_size is for --tokenizer=bpe (a character vocabulary is the text's characters)")
    vocab_size = 1024 if args.vocab_size is None else args.vocab_size
    check(256 <= vocab_size <= 65536, "--vocab_size", vocab_size,
          "from 256 (the bytes alone) to 65536 (uint16 token files)")
    if args.vocab_from is not None and (args.tokenizer != "char" or args.vocab_size is not None):
        raise ConfigError("--vocab_from takes that dataset's tokenizer: drop --tokenizer and --vocab_size")
    check_dataset_name("--dataset", args.dataset, "--data_dir")
    if args.vocab_from is not None:
        check_dataset_name("--vocab_from", args.vocab_from, "--data_dir")
    check(args.data_dir != "", "--data_dir", args.data_dir, "a folder")
    check(args.url.startswith(("http://", "https://")), "--url", args.url, "an http:// or https:// address")
    check(args.sha256 == "" or (len(args.sha256) == 64 and all(c in "0123456789abcdef" for c in args.sha256.lower())),
          "--sha256", args.sha256, "64 hexadecimal digits, or '' to skip the check")
    prepare_dataset(args.dataset, args.input, args.url, args.sha256, args.data_dir, args.vocab_from, args.tokenizer,
                    vocab_size)


if __name__ == "__main__":
    run_main(main)
