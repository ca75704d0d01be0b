"""
Tokenizers: text to token ids and back. Two kinds, saved in a dataset's meta.pkl and in every
checkpoint:

    CharTokenizer   the lecture's: one id per distinct character of the text (nanoGPT's meta.pkl)
    BPETokenizer    byte-level byte-pair encoding, as GPT-2 reads text, trained on your own text:
                    ids 0-255 are the bytes of UTF-8, each later id the merge of a frequent pair

Models of either kind are compared in bits per character (bits_per_char below).
"""

import codecs
import heapq
import math
import pickle
import re
from collections import Counter

import numpy as np
from tqdm import tqdm

from configurator import UserError


class TokenizerError(UserError):
    pass


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: those need no find_class, anything else does."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, and only plain data is loaded")


def bits_per_char(loss, tokens, chars):
    """A mean loss per token (in nats) as bits per character of the text: loss * tokens / chars / ln 2,
    so that models with different tokenizers compare on one scale."""
    return loss * tokens / chars / math.log(2)


def code_points(text):
    """The Unicode code points of text, as a uint32 array."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharTokenizer:
    """Maps each distinct character of a text to an integer id (sorted order, as the lecture)."""
    kind = "char"

    def __init__(self, chars):
        self.itos = dict(enumerate(chars))
        self.stoi = {ch: i for i, ch in self.itos.items()}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

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
            raise TokenizerError(f"characters not in the vocabulary: {''.join(unknown)!r}; "
                                 f"use only characters of the training text")
        return [self.stoi[ch] for ch in text]

    def encode_array(self, text):
        """encode(text) as an int64 array, for long texts: each character's code point is looked up
        among the vocabulary's, sorted, in one numpy call instead of a Python loop."""
        points = code_points(text)
        if not hasattr(self, "_sorted"):
            ours = np.array([ord(self.itos[i]) for i in range(self.vocab_size)], dtype=np.uint32)
            order = np.argsort(ours)
            self._sorted, self._ids = ours[order], order
        at = np.searchsorted(self._sorted, points).clip(max=self.vocab_size - 1)
        if not np.array_equal(self._sorted[at], points):
            self.encode(text)  # raises, naming the characters the vocabulary lacks
        return self._ids[at]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def stream_decoder(self):
        """A function that takes the next ids and returns their text (every id is a whole character)."""
        return lambda ids, final=False: self.decode(ids)

    def meta(self):
        """What meta.pkl holds: nanoGPT's keys."""
        return {"vocab_size": self.vocab_size, "itos": self.itos, "stoi": self.stoi}

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.itos == other.itos


# GPT-2's way of cutting text into chunks that merges never cross (words with their leading space,
# numbers, punctuation, whitespace), written for Python's re; the last alternative takes anything left.
CHUNK = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|[\s\S]""")


class BPETokenizer:
    """Byte-level BPE: text is UTF-8 bytes (ids 0-255), then merges[k] = (a, b) makes id 256 + k of
    the pair a, b wherever they stand side by side, in the order they were learnt. Any text encodes,
    and decode(encode(text)) == text."""
    kind = "bpe"

    def __init__(self, merges):
        self.merges = [tuple(pair) for pair in merges]
        self.rank = {pair: k for k, pair in enumerate(self.merges)}
        self.bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.bytes.append(self.bytes[a] + self.bytes[b])
        self.cache = {}

    @classmethod
    def train(cls, text, vocab_size, progress=True):
        """Learn vocab_size - 256 merges from text (a string, or several read one after another):
        each merge is the most frequent adjacent pair (ties to the smallest pair) in the text's
        chunks, counted once per distinct chunk times its count, and kept up to date for the chunks a
        merge touches only. Fewer merges if the text runs out of pairs."""
        counts = Counter()
        for part in [text] if isinstance(text, str) else text:
            counts.update(m.group() for m in CHUNK.finditer(part))  # no list of every chunk: memory stays small
        words = [list(chunk.encode("utf-8")) for chunk in counts]
        freq = list(counts.values())
        pairs, where = Counter(), {}
        for w, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pairs[pair] += freq[w]
                where.setdefault(pair, set()).add(w)
        heap = [(-n, pair) for pair, n in pairs.items()]
        heapq.heapify(heap)
        merges = []
        with tqdm(total=vocab_size - 256, desc="learning merges", unit="merge", disable=not progress) as bar:
            while len(merges) < vocab_size - 256 and heap:
                n, pair = heapq.heappop(heap)
                if pairs.get(pair, 0) != -n or n == 0:
                    continue  # a stale entry: the pair's count changed since it was pushed
                new = 256 + len(merges)
                merges.append(pair)
                bar.update()
                changed = set()
                for w in where.pop(pair):
                    word = words[w]
                    for p in zip(word, word[1:]):  # take the word's pairs out, merge, put them back
                        pairs[p] -= freq[w]
                        changed.add(p)
                    word = words[w] = merge(word, pair, new)
                    for p in zip(word, word[1:]):
                        pairs[p] += freq[w]
                        where.setdefault(p, set()).add(w)
                        changed.add(p)
                del pairs[pair]
                for p in changed:
                    if pairs.get(p, 0) > 0:
                        heapq.heappush(heap, (-pairs[p], p))
        return cls(merges)

    @property
    def vocab_size(self):
        return 256 + len(self.merges)

    def encode_chunk(self, chunk):
        ids = self.cache.get(chunk)
        if ids is None:
            ids = list(chunk.encode("utf-8"))
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, math.inf))
                if pair not in self.rank:
                    break
                ids = merge(ids, pair, 256 + self.rank[pair])
            self.cache[chunk] = ids
        return ids

    def encode(self, text):
        return [i for chunk in CHUNK.findall(text) for i in self.encode_chunk(chunk)]

    def decode(self, ids):
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function that takes the next ids and returns the text they complete: a character whose
        bytes are split between tokens waits for its last byte (final=True: no more bytes will come)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: utf8.decode(b"".join(self.bytes[i] for i in ids), final)

    def meta(self):
        return {"vocab_size": self.vocab_size, "tokenizer": "bpe", "merges": self.merges}

    def __eq__(self, other):
        return isinstance(other, BPETokenizer) and self.merges == other.merges


def merge(ids, pair, new):
    """ids with every non-overlapping occurrence of pair, left to right, replaced by new."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_from_meta(meta, where):
    """The tokenizer a meta.pkl's dict (ours or nanoGPT's) or a checkpoint's describes; `where` names
    it in errors."""
    try:
        if meta.get("tokenizer") == "bpe":
            merges = [tuple(int(x) for x in pair) for pair in meta["merges"]]
            if any(len(pair) != 2 or not all(0 <= x < 256 + k for x in pair) for k, pair in enumerate(merges)):
                raise ValueError("a merge names an id not made before it")
            return BPETokenizer(merges)
        chars = [meta["itos"][i] for i in range(meta["vocab_size"])]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TokenizerError(f"{where} is not a vocabulary file ({type(e).__name__}: {e}); prepare the dataset again "
                             f"with prepare_shakespeare.py") from None
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise TokenizerError(f"{where} is not a character vocabulary (its itos are not distinct single "
                             f"characters); prepare the dataset again with prepare_shakespeare.py")
    return CharTokenizer(chars)


def read_meta(meta_path):
    """The dict in a meta.pkl. Only plain data is unpickled: a pickle that names any class or
    function (which is how pickles run code) is refused, not loaded."""
    try:
        with open(meta_path, "rb") as f:
            meta = PlainDataUnpickler(f).load()
    except FileNotFoundError:
        raise TokenizerError(f"{meta_path} not found; prepare the dataset with prepare_shakespeare.py") from None
    except OSError as e:
        raise TokenizerError(f"can't read {meta_path}: {e.strerror}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TokenizerError(f"{meta_path} is not a vocabulary file ({type(e).__name__}: {e}); prepare the "
                             f"dataset again with prepare_shakespeare.py") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{meta_path} is not a vocabulary file (it holds no dict); prepare the dataset again "
                             f"with prepare_shakespeare.py")
    return meta


def load_tokenizer(meta_path):
    return tokenizer_from_meta(read_meta(meta_path), meta_path)
