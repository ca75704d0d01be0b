"""
A text corpus of any size, tokenized in bounded memory: one file, or a folder of text files read in
sorted order as one text. It is cut into chunks of about CHUNK_BYTES that end on whole characters;
worker processes (one per core) decode, count and encode the chunks, and the token ids are written
to the split files as they come back, so memory grows with the chunk size, not the corpus's.

    chunks = text_chunks(corpus_files(path))
    counted = count_characters(chunks)                  # pass 1: how many characters, which ones
    encode_splits(chunks, counted.per_chunk, bounds, tokenizer, files, dtype)   # pass 2: ids into the splits

prepare_shakespeare.py drives it. A corpus modelled as bytes (enwik8) skips the first pass: its
tokens are its bytes. A word that a chunk's end cuts in two is encoded as two by a BPE: one word in
millions of characters.
"""

import os
import signal
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context

import numpy as np
from tqdm import tqdm

from configurator import UserError
from tokenizer import BPETokenizer, code_points

CHUNK_BYTES = 4 << 20  # per task: a worker holds a few times this in memory
IN_PROCESS_BYTES = 16 << 20  # a corpus smaller than this is tokenized in this process: no pool to start


class CorpusError(UserError):
    pass


@dataclass(frozen=True)
class Chunk:
    """Bytes start:end of one file of the corpus, whole characters only."""
    path: str
    start: int
    end: int

    def read(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)

    def text(self):
        data = self.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{self.path} is not UTF-8 text ({e.reason} at byte {self.start + e.start}); "
                              f"convert it, e.g. with iconv -t UTF-8, or leave it out of the corpus") from None


def corpus_files(path):
    """The files of a corpus: path itself, or every file in the folder path and its subfolders
    (hidden ones left out), sorted, so that the same folder always makes the same text."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CorpusError(f"input text '{path}' not found")
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise CorpusError(f"the folder '{path}' holds no files; give a text file or a folder of them")
    return files


def text_chunks(files, chunk_bytes=None):
    """The corpus as chunks of about chunk_bytes (CHUNK_BYTES), each ending where a character starts
    (a UTF-8 continuation byte, 10xxxxxx, never starts a chunk)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    chunks = []
    for path in files:
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    end = min(start + chunk_bytes, size)
                    f.seek(end)
                    for byte in f.read(3):  # at most 3 continuation bytes follow a character's first
                        if byte & 0xC0 != 0x80:
                            break
                        end += 1
                    chunks.append(Chunk(path, start, end))
                    start = end
        except OSError as e:
            raise CorpusError(f"can't read the input text '{path}': {e.strerror}") from None
    if not chunks:
        raise CorpusError("the input is empty; give a text to train on")
    return chunks


# The workers' tasks: top-level functions, so that a pool can run them

def _count_chunk(chunk):
    """(number of characters, the distinct code points) of a chunk."""
    text = chunk.text()
    return len(text), np.flatnonzero(np.bincount(code_points(text)))


_tokenizer = None  # the worker's: set by _start_worker


def _start_worker(tokenizer):
    global _tokenizer
    _tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool


def _encode_chunk(task):
    """The token ids of each piece of a chunk: [(split, ids)], a piece being the chunk's characters
    (or bytes) from one split boundary to the next, encoded on its own."""
    chunk, pieces, dtype, as_bytes = task
    tok = _tokenizer
    if as_bytes:  # a byte-level tokenizer: the ids are the bytes
        data = np.frombuffer(chunk.read(), dtype=np.uint8)
        return [(split, data[a:b].astype(dtype)) for split, a, b in pieces]
    text = chunk.text()
    if tok.kind == "char":
        ids = tok.encode_array(text).astype(dtype)  # a character a token: pieces cut the ids as the text
        return [(split, ids[a:b]) for split, a, b in pieces]
    if len(tok.cache) > 1_000_000:  # the BPE's cache of encoded words: bounded, whatever the corpus
        tok.cache.clear()
    return [(split, np.array(tok.encode(text[a:b]), dtype=dtype)) for split, a, b in pieces]


def run_tasks(function, tasks, sizes, desc, tokenizer=None):
    """function over tasks, in order: in a pool of one worker per core for a large corpus, here for a
    small one; a progress bar over the bytes done, with an ETA."""
    total = sum(sizes)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < IN_PROCESS_BYTES) as bar:
        if total < IN_PROCESS_BYTES or (os.cpu_count() or 1) == 1:
            global _tokenizer
            _tokenizer = tokenizer
            for task, size in zip(tasks, sizes):
                yield function(task)
                bar.update(size)
            return
        context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with context.Pool(os.cpu_count(), initializer=_start_worker, initargs=(tokenizer,)) as pool:
            for result, size in zip(pool.imap(function, tasks), sizes):
                yield result
                bar.update(size)


@dataclass
class CharacterCount:
    per_chunk: list  # characters in each chunk
    code_points: np.ndarray  # the distinct code points of the corpus, sorted


def count_characters(chunks):
    """The first pass: how many characters each chunk holds, and which characters the corpus uses."""
    per_chunk, seen = [], set()
    for n, present in run_tasks(_count_chunk, chunks, [c.end - c.start for c in chunks], "counting"):
        per_chunk.append(n)
        seen.update(present.tolist())
    return CharacterCount(per_chunk, np.array(sorted(seen), dtype=np.uint32))


def chunk_pieces(per_chunk, bounds):
    """For each chunk, its pieces [(split, start, end)] in the chunk's own units (characters, or
    bytes): bounds are the splits' (name, first unit, end unit) over the whole corpus, in order."""
    tasks, offset = [], 0
    for n in per_chunk:
        tasks.append([(name, max(a, offset) - offset, min(b, offset + n) - offset) for name, a, b in bounds
                      if a < offset + n and b > offset])
        offset += n
    return tasks


def encode_splits(chunks, per_chunk, bounds, tokenizer, files, dtype, as_bytes=False):
    """The second pass: encode every chunk, piece by piece, and append each piece's ids to the open
    file of its split (files[split]). as_bytes: the units are bytes and the tokenizer byte-level, so
    the ids are the bytes."""
    tasks = [(c, p, dtype, as_bytes) for c, p in zip(chunks, chunk_pieces(per_chunk, bounds))]
    for pieces in run_tasks(_encode_chunk, tasks, [c.end - c.start for c in chunks], "encoding", tokenizer):
        for split, ids in pieces:
            files[split].write(memoryview(ids))


def train_sample(chunks, per_chunk, train_units, sample_bytes):
    """Up to sample_bytes of the train split's text, for learning a BPE: the chunks of the train split
    spread evenly over it (all of it if it is no larger), in corpus order."""
    train = [(c, min(n, train_units - offset)) for c, n, offset in zip(chunks, per_chunk, np.cumsum([0] + per_chunk))
             if offset < train_units]
    size = sum(c.end - c.start for c, _ in train)
    if size > sample_bytes:
        keep = max(1, round(len(train) * sample_bytes / size))
        train = [train[i] for i in np.linspace(0, len(train) - 1, keep).round().astype(int)]
    for chunk, n in train:
        yield chunk.text()[:n]


def learn_bpe(chunks, per_chunk, train_units, vocab_size, sample_bytes):
    """A BPE of vocab_size learnt on a sample of the train split (train_sample)."""
    return BPETokenizer.train(train_sample(chunks, per_chunk, train_units, sample_bytes), vocab_size)
