"""
Prepare a dataset: Tiny Shakespeare by default, enwik8 or text8, or your own text of any size.

    python prepare_shakespeare.py                       # download Tiny Shakespeare
    python prepare_shakespeare.py --dataset=enwik8      # or text8: the character-level benchmarks
    python prepare_shakespeare.py --input my.txt --dataset my_text      # a file, or a folder of them

writes data/<dataset>/{train.bin, val.bin, meta.pkl} (and test.bin with --test_fraction): the first
90% of the characters are train, the last test_fraction test, the rest val, as uint16 token ids
(uint32 where the vocabulary needs it); meta.pkl holds vocab_size, stoi and itos as nanoGPT's.
--tokenizer=bpe --vocab_size=N learns a byte-level BPE on the train split instead (tokenizer.py).
A corpus larger than memory prepares in bounded memory, on every core (corpus.py).
"""

import argparse
import difflib
import errno
import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import requests
from tqdm import tqdm

from configurator import ConfigError, UserError, check, run_main
from corpus import corpus_files, count_characters, encode_splits, learn_bpe, text_chunks
from files import dead_leftovers, remove_leftovers, signals_deferred, write_atomic
from tokenizer import BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer, read_meta

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATASET = "shakespeare_char"
TRAIN_FRACTION = 0.9
BPE_SAMPLE_MB = 100  # a BPE's merges are learnt on this much of the train split at most


@dataclass(frozen=True)
class Benchmark:
    """A standard character-level benchmark (mattmahoney.net/dc/textdata.html): a zip holding one
    file of 10^8 bytes, split as the papers split it: 90M train, 5M val, 5M test."""
    url: str
    member: str  # the file in the zip
    size: int
    md5: str | None  # the unzipped file's, as published; None where none is published
    alphabet: str | None  # where no checksum is published: the only characters the file may hold
    as_bytes: bool  # modelled as bytes (a vocabulary of 256), as the papers count enwik8's "characters"
    test_fraction: float = 0.05


BENCHMARKS = {
    "enwik8": Benchmark("http://mattmahoney.net/dc/enwik8.zip", "enwik8", 100_000_000,
                        "a1fa5ffddb56f4953e226637dabbb36a", None, as_bytes=True),
    "text8": Benchmark("http://mattmahoney.net/dc/text8.zip", "text8", 100_000_000,
                       None, "abcdefghijklmnopqrstuvwxyz ", as_bytes=False),
}


class DatasetError(UserError):
    pass


def check_dataset_name(key, name, data_dir_key="data_dir"):
    """A dataset is a folder directly under data_dir: a name, not a path."""
    ok = name not in ("", ".", "..") and "/" not in name and os.sep not in name
    check(ok, key, name, f"the name of a folder under {data_dir_key}")


def file_digest(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_failed(path, error, what_to_do):
    """One line for a file that could not be written, naming the reason (a full disk included)."""
    reason = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    hint = "; free some space, or use another --data_dir" if error.errno == errno.ENOSPC else ""
    return DatasetError(f"could not write {path}: {reason}{hint}; {what_to_do}")


# Downloads

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
        raise DatasetError(f"could not download {url} ({reason}); check your connection, or download it by "
                           f"hand and put it at {path}") from e
    except OSError as e:
        raise write_failed(path, e, "nothing was downloaded") from None


def is_tiny_shakespeare(path, sha256=SHAKESPEARE_SHA256):
    """Whether the file at path is the text sha256 names."""
    return os.path.isfile(path) and file_digest(path) == sha256


def fetch_shakespeare(folder, url=SHAKESPEARE_URL, sha256=SHAKESPEARE_SHA256, spare=None):
    """folder/input.txt, downloaded unless a verified copy is there, or at spare (another dataset's
    input.txt: the BPE dataset reuses the character one's); returns its path."""
    path = os.path.join(folder, "input.txt")
    if os.path.exists(path):
        if sha256 and not is_tiny_shakespeare(path, sha256):
            raise DatasetError(f"{path} exists but is not the expected text (SHA-256 differs); "
                               f"move it away to download again, or prepare it as a dataset of its own: "
                               f"--input {path} --dataset=NAME")
        print(f"{path} is already there, skipping download")
    elif spare and sha256 and is_tiny_shakespeare(spare, sha256):  # spare is not path: that does not exist
        os.makedirs(folder, exist_ok=True)
        link_or_copy(spare, path)
        print(f"{path}: the verified copy at {spare}, skipping download")
    else:
        os.makedirs(folder, exist_ok=True)
        download(url, path, sha256)
    return path


def fetch_benchmark(folder, bench, url=None):
    """folder/<member>: downloaded as folder/<zip> (unless there, e.g. put there by hand), unzipped
    and checked against its published size and checksum (or alphabet); returns its path."""
    url = url or bench.url
    zip_path = os.path.join(folder, os.path.basename(url))
    path = os.path.join(folder, bench.member)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(zip_path):
            download(url, zip_path)
        try:
            with zipfile.ZipFile(zip_path) as z, z.open(bench.member) as src:
                write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except (zipfile.BadZipFile, KeyError) as e:
            raise DatasetError(f"{zip_path} is not the {bench.member} zip ({type(e).__name__}: {e}); delete it "
                               f"to download it again") from None
        except OSError as e:
            raise write_failed(path, e, "nothing was unzipped") from None
    check_benchmark_file(path, bench)
    return path


def check_benchmark_file(path, bench):
    size = os.path.getsize(path)
    wrong = size != bench.size
    if not wrong and bench.md5:
        wrong = file_digest(path, "md5") != bench.md5
    elif not wrong and bench.alphabet:
        allowed = np.zeros(256, dtype=bool)
        allowed[np.frombuffer(bench.alphabet.encode("ascii"), dtype=np.uint8)] = True
        wrong = not allowed[np.memmap(path, dtype=np.uint8, mode="r")].all()
    if wrong:
        published = f"MD5 {bench.md5}" if bench.md5 else f"only the characters {bench.alphabet!r}"
        raise DatasetError(f"{path} is not {bench.member} ({size:,} bytes; the published file has {bench.size:,} "
                           f"bytes and {published}); delete it and its zip to download them again")


# Preparing token files from a corpus

DATASET_FILES = ("train.bin", "val.bin", "test.bin", "meta.pkl", "input.txt")  # what prepare writes


def split_bounds(n, test_fraction):
    """The splits of n units (characters, or bytes): [(name, first, end)], train first, test last."""
    train_end, test_start = int(n * TRAIN_FRACTION), n - int(n * test_fraction)
    if train_end == 0 or train_end >= test_start:
        splits = "train, val and test" if test_fraction else "train and val"
        raise DatasetError(f"the text has only {n} character{'' if n == 1 else 's'}, too few to split into {splits}")
    bounds = [("train", 0, train_end), ("val", train_end, test_start)]
    return bounds + [("test", test_start, n)] if test_start < n else bounds


def choose_tokenizer(tok, tokenizer, vocab_size, counted, chunks, per_chunk, train_end, as_bytes, sample_mb):
    """The tokenizer to encode with: tok where given (--vocab_from; its characters must cover the
    text's), bytes for a corpus modelled as bytes, else one made for this text: its characters, or
    a BPE learnt on (a sample of) its train split."""
    if tok is not None:
        if tok.kind == "char" and counted is not None:
            unknown = sorted(set(map(chr, counted.code_points.tolist())) - tok.stoi.keys())
            if unknown:
                raise TokenizerError(f"characters not in the vocabulary: {''.join(unknown)!r}; "
                                     f"use only characters of the training text")
        return tok
    if as_bytes:
        return BPETokenizer([])  # the 256 bytes, no merges
    if tokenizer == "bpe":
        print(f"learning a BPE of {vocab_size} tokens from the train split ({sample_mb:,} MB of it at most)")
        return learn_bpe(chunks, per_chunk, train_end, vocab_size, sample_mb * 1_000_000)
    return CharTokenizer([chr(c) for c in counted.code_points.tolist()])


def prepare_corpus(files, out_dir, tok=None, tokenizer="char", vocab_size=1024, test_fraction=0.0,
                   as_bytes=False, input_copy=None, sample_mb=BPE_SAMPLE_MB):
    """Tokenize the corpus in files (read in order as one text) into out_dir: train.bin, val.bin,
    test.bin (if test_fraction > 0) and meta.pkl, plus input.txt, a link to or copy of the file
    input_copy. Returns the tokenizer.

    The files are written into a new folder beside out_dir that then takes its place, so that a
    reader sees the old set or the new one, never a mix, even if this process is killed midway.
    Other files in out_dir (its README.md, a user's notes) are carried into the new folder first."""
    chunks = text_chunks(files)
    counted = None
    if as_bytes:
        per_chunk = [c.end - c.start for c in chunks]
    else:
        counted = count_characters(chunks)
        per_chunk = counted.per_chunk
    bounds = split_bounds(sum(per_chunk), test_fraction)
    tok = choose_tokenizer(tok, tokenizer, vocab_size, counted, chunks, per_chunk, bounds[0][2], as_bytes, sample_mb)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    meta = {**tok.meta(), "dtype": np.dtype(dtype).name,
            "chars": {name: end - start for name, start, end in bounds}}  # for bits per character
    parent, name = os.path.split(os.path.abspath(out_dir))
    staging = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    old = staging + ".old"
    writing = f"the dataset {out_dir}"  # what an error names: what is being written, where it will be
    try:
        os.makedirs(parent, exist_ok=True)
        restore_interrupted_swap(parent, name)
        remove_leftovers(parent, f".{name}.")
        os.makedirs(staging)
        splits = {split: open(os.path.join(staging, f"{split}.bin"), "wb") for split, _, _ in bounds}
        try:
            encode_splits(chunks, per_chunk, bounds, tok, splits, dtype, as_bytes)
        finally:
            for f in splits.values():
                f.close()
        writing = os.path.join(out_dir, "meta.pkl")
        with open(os.path.join(staging, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
        if input_copy is not None:
            writing = os.path.join(out_dir, "input.txt")
            link_or_copy(input_copy, os.path.join(staging, "input.txt"))
        writing = f"the dataset {out_dir}"
        if os.path.exists(out_dir):
            for entry in os.listdir(out_dir):
                if entry not in DATASET_FILES:
                    link_or_copy(os.path.join(out_dir, entry), os.path.join(staging, entry))
        with signals_deferred():  # Ctrl-C or SIGTERM between the two renames would leave neither set
            if os.path.exists(out_dir):
                os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise write_failed(writing, e, f"nothing in {out_dir} was changed") from None
    finally:
        if os.path.exists(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)  # the new set did not take its place: the old one stays
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return tok


def link_or_copy(src, dst):
    """dst as a hard link to src where the filesystem allows (a large corpus is not copied), else a copy."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def prepare(text, out_dir, tok=None, source=None, tokenizer="char", vocab_size=1024, test_fraction=0.0):
    """prepare_corpus for a text in memory (its input.txt is the file `source`, or the text)."""
    if source is not None:
        return prepare_corpus([source], out_dir, tok, tokenizer, vocab_size, test_fraction, input_copy=source)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "input.txt")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        return prepare_corpus([path], out_dir, tok, tokenizer, vocab_size, test_fraction, input_copy=path)


def restore_interrupted_swap(folder, name):
    """A prepare killed between its two renames left no folder `name`, and the previous set in
    .name.tmpPID.old: put it back, before leftovers are removed."""
    target = os.path.join(folder, name)
    old_sets = [n for n in dead_leftovers(folder, f".{name}.") if n.endswith(".old")]
    if old_sets and not os.path.exists(target):
        os.rename(os.path.join(folder, old_sets[0]), target)


def prepare_dataset(dataset=DEFAULT_DATASET, input_path=None, url=None, sha256=SHAKESPEARE_SHA256,
                    data_dir="data", vocab_from=None, tokenizer="char", vocab_size=1024, test_fraction=None,
                    sample_mb=BPE_SAMPLE_MB):
    """Prepare data_dir/dataset from input_path (a file or a folder), from the benchmark the dataset
    names (enwik8, text8), or from Tiny Shakespeare, downloaded (url, sha256) unless already there.
    vocab_from names a prepared dataset whose tokenizer to use (to fine-tune a model trained on it).
    Returns the tokenizer."""
    out_dir = os.path.join(data_dir, dataset)
    restore_interrupted_swap(*os.path.split(os.path.abspath(out_dir)))  # its files spare a download
    tok = None
    if vocab_from is not None:
        meta = os.path.join(data_dir, vocab_from, "meta.pkl")
        if not os.path.exists(meta):
            raise DatasetError(f"--vocab_from {vocab_from}: {meta} not found; prepare that dataset first")
        tok = load_tokenizer(meta)
    bench = BENCHMARKS.get(dataset) if input_path is None else None
    if bench is not None:
        if tokenizer != "char" or vocab_from is not None:
            raise ConfigError(f"{dataset} is prepared as the papers do ({'bytes' if bench.as_bytes else 'characters'});"
                              f" for another tokenizer, prepare its text with --input")
        files, input_copy = [fetch_benchmark(out_dir, bench, url)], None
        test_fraction = bench.test_fraction if test_fraction is None else test_fraction
    elif input_path is not None:
        files = corpus_files(input_path)
        input_copy = input_path if os.path.isfile(input_path) else None
    else:
        path = fetch_shakespeare(out_dir, url or SHAKESPEARE_URL, sha256,
                                 spare=os.path.join(data_dir, DEFAULT_DATASET, "input.txt"))
        files, input_copy = [path], path
    tok = prepare_corpus(files, out_dir, tok, tokenizer, vocab_size, test_fraction or 0.0,
                         as_bytes=bench is not None and bench.as_bytes, input_copy=input_copy, sample_mb=sample_mb)
    meta = read_meta(os.path.join(out_dir, "meta.pkl"))
    tokens = {split: os.path.getsize(os.path.join(out_dir, f"{split}.bin")) // np.dtype(meta["dtype"]).itemsize
              for split in meta["chars"]}
    print(f"{out_dir}: {tok.kind} tokenizer, vocab size {tok.vocab_size}, "
          + ", ".join(f"{n:,} {split} tokens" for split, n in tokens.items())
          + f" ({sum(meta['chars'].values()) / sum(tokens.values()):.2f} characters per token)")
    return tok


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like the other scripts' config errors
        raise ConfigError(f"{message}; see python prepare_shakespeare.py --help")


def main(argv):
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", help="a local UTF-8 text file, or a folder of them, instead of a download")
    parser.add_argument("--dataset", default=None,
                        help=f"name of the folder under data/ to write (default {DEFAULT_DATASET}, Tiny Shakespeare's);"
                             f" enwik8 and text8 download those benchmarks")
    parser.add_argument("--url", default=None, help="where to download the text (or the benchmark's zip) from")
    parser.add_argument("--sha256", default=SHAKESPEARE_SHA256,
                        help="expected SHA-256 of Tiny Shakespeare's download ('' to skip the check)")
    parser.add_argument("--data_dir", default="data", help="folder that holds the datasets")
    parser.add_argument("--vocab_from", help="use the tokenizer of this prepared dataset (for fine-tuning)")
    parser.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                        help="char: one token per character; bpe: byte-level BPE learnt on the train split")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="the BPE's number of tokens, from 256 (the bytes alone; default 1024)")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="the share of the text, at its end, kept as a test split (test.bin); 0 for your "
                             "own text, 0.05 for enwik8 and text8 (their last 5M characters)")
    parser.add_argument("--bpe_sample_mb", type=int, default=BPE_SAMPLE_MB,
                        help="the BPE's merges are learnt on this many MB of the train split at most")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise ConfigError("--vocab_size is for --tokenizer=bpe (a character vocabulary is the text's characters)")
    vocab_size = 1024 if args.vocab_size is None else args.vocab_size
    check(vocab_size >= 256, "--vocab_size", vocab_size, "at least 256 (the bytes alone)")
    if args.vocab_from is not None and (args.tokenizer != "char" or args.vocab_size is not None):
        raise ConfigError("--vocab_from takes that dataset's tokenizer: drop --tokenizer and --vocab_size")
    if args.dataset is not None:
        check_dataset_name("--dataset", args.dataset, "--data_dir")
        near = difflib.get_close_matches(args.dataset, BENCHMARKS, n=1, cutoff=0.8)
        if args.input is None and args.dataset not in BENCHMARKS and near:  # it would be Tiny Shakespeare
            raise ConfigError(f"--dataset={args.dataset} is not a benchmark this script downloads; did you mean "
                              f"{near[0]}? (to name your own text's dataset so, give its --input)")
    if args.vocab_from is not None:
        check_dataset_name("--vocab_from", args.vocab_from, "--data_dir")
    check(args.data_dir != "", "--data_dir", args.data_dir, "a folder")
    check(args.url is None or args.url.startswith(("http://", "https://")), "--url", args.url,
          "an http:// or https:// address")
    check(args.sha256 == "" or (len(args.sha256) == 64 and all(c in "0123456789abcdef" for c in args.sha256.lower())),
          "--sha256", args.sha256, "64 hexadecimal digits, or '' to skip the check")
    check(args.test_fraction is None or 0 <= args.test_fraction < 1 - TRAIN_FRACTION, "--test_fraction",
          args.test_fraction, f"at least 0 and below {1 - TRAIN_FRACTION:.1f} (the first 90% is train)")
    check(args.bpe_sample_mb > 0, "--bpe_sample_mb", args.bpe_sample_mb, "positive")
    if args.dataset is None:  # Tiny Shakespeare's folder: another text there would replace it
        if args.input is not None and os.path.exists(args.input) and args.sha256 \
                and not is_tiny_shakespeare(args.input, args.sha256):
            raise ConfigError(f"--input {args.input} is not Tiny Shakespeare, whose dataset is the default "
                              f"({DEFAULT_DATASET}): name your text's dataset, e.g. --dataset=my_text")
        args.dataset = DEFAULT_DATASET
    prepare_dataset(args.dataset, args.input, args.url, args.sha256, args.data_dir, args.vocab_from,
                    args.tokenizer, vocab_size, args.test_fraction, args.bpe_sample_mb)


if __name__ == "__main__":
    run_main(main)
