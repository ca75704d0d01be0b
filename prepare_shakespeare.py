"""
Prepare a character-level dataset: Tiny Shakespeare by default, or any UTF-8 text with --input.

    python prepare_shakespeare.py                       # download Tiny Shakespeare
    python prepare_shakespeare.py --input my.txt --dataset my_text

writes data/<dataset>/{input.txt, train.bin, val.bin, meta.pkl}: the first 90% of the characters
are train, the rest val, as uint16 token ids; meta.pkl holds vocab_size, stoi and itos as nanoGPT's.
This file is also the home of the character tokenizer used by train.py and sample.py.
"""

import argparse
import hashlib
import os
import pickle

import numpy as np
import requests
from tqdm import tqdm

from configurator import ConfigError, UserError, run_main

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATASET = "shakespeare_char"
TRAIN_FRACTION = 0.9


class DatasetError(UserError):
    pass


class CharTokenizer:
    """Maps each distinct character of a text to an integer id (sorted order, as the lecture)."""

    def __init__(self, chars):
        self.itos = dict(enumerate(chars))
        self.stoi = {ch: i for i, ch in self.itos.items()}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
        return cls([meta["itos"][i] for i in range(meta["vocab_size"])])

    @property
    def vocab_size(self):
        return len(self.itos)

    @property
    def chars(self):
        """The vocabulary as one string, in id order."""
        return self.decode(range(self.vocab_size))

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise DatasetError(f"characters not in the vocabulary: {''.join(unknown)!r}; "
                               f"use only characters of the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def meta(self):
        return {"vocab_size": self.vocab_size, "itos": self.itos, "stoi": self.stoi}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, timeout=30):
    """Download url to path through a temporary file that is renamed only once complete and verified."""
    tmp = path + ".part"
    try:
        with requests.get(url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                             desc=f"downloading {os.path.basename(path)}") as bar:
                for chunk in r.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256 and sha256_of(tmp) != sha256:
            raise DatasetError(f"download from {url} has the wrong SHA-256 checksum (expected {sha256}); "
                               f"try again, or pass --input with a local copy")
        os.replace(tmp, path)
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        raise DatasetError(f"could not download {url} ({reason}); check your connection, "
                           f"or pass --input with a local copy of the text") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetError(f"input text '{path}' not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"convert it, e.g. with iconv -t UTF-8") from None
    if not text:
        raise DatasetError(f"'{path}' is empty; give a text to train on")
    return text


def _write_atomic(path, write):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(text, out_dir, tok=None):
    """Tokenize text (with tok, or a vocabulary of its own characters) and write train.bin, val.bin
    and meta.pkl into out_dir; return the tokenizer."""
    tok = tok or CharTokenizer.from_text(text)
    if tok.vocab_size > np.iinfo(np.uint16).max + 1:
        raise DatasetError(f"the text has {tok.vocab_size} distinct characters; uint16 token files hold at most 65536")
    n = len(text)
    split = int(n * TRAIN_FRACTION)
    if split == 0 or split == n:
        raise DatasetError(f"the text has only {n} characters, too few to split into train and val")
    ids = np.array(tok.encode(text), dtype=np.uint16)
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "train.bin"), lambda f: ids[:split].tofile(f))
    _write_atomic(os.path.join(out_dir, "val.bin"), lambda f: ids[split:].tofile(f))
    _write_atomic(os.path.join(out_dir, "meta.pkl"), lambda f: pickle.dump(tok.meta(), f))
    return tok


def prepare_dataset(dataset=DEFAULT_DATASET, input_path=None, url=SHAKESPEARE_URL,
                    sha256=SHAKESPEARE_SHA256, data_dir="data", vocab_from=None):
    """Fetch (or copy) the text into data_dir/dataset/input.txt and prepare it; return the tokenizer.
    vocab_from names a prepared dataset whose vocabulary to use (to fine-tune a model trained on it)."""
    out_dir = os.path.join(data_dir, dataset)
    text_path = os.path.join(out_dir, "input.txt")
    tok = None
    if vocab_from is not None:
        meta = os.path.join(data_dir, vocab_from, "meta.pkl")
        if not os.path.exists(meta):
            raise DatasetError(f"--vocab_from {vocab_from}: {meta} not found; prepare that dataset first")
        tok = CharTokenizer.load(meta)
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
    tok = prepare(text, out_dir, tok)  # checks the text fits the vocabulary before writing anything
    if input_path is not None and not (os.path.exists(text_path) and os.path.samefile(input_path, text_path)):
        _write_atomic(text_path, lambda f: f.write(text.encode("utf-8")))
    split = int(len(text) * TRAIN_FRACTION)
    print(f"{out_dir}: vocab size {tok.vocab_size}, {split:,} train tokens, {len(text) - split:,} val tokens")
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
    parser.add_argument("--vocab_from", help="use the vocabulary of this prepared dataset (for fine-tuning)")
    args = parser.parse_args(argv)
    prepare_dataset(args.dataset, args.input, args.url, args.sha256, args.data_dir, args.vocab_from)


if __name__ == "__main__":
    run_main(main)
