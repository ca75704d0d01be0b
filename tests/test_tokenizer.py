import math
import pickle

import numpy as np
import pytest

from helpers import TINY_TEXT
from prepare_shakespeare import prepare
from tokenizer import (CHUNK, BPETokenizer, CharTokenizer, TokenizerError, bits_per_char, load_tokenizer,
                       tokenizer_from_meta)

TEXT = "hello world\nà bientôt, Ελλάδα!\n" * 50  # non-ASCII, well within uint16

ODD_TEXTS = [
    "",
    "a",
    "café crème brûlée, naïve façade",
    "中文文本，没有空格。我们的模型读字节。",
    "emoji 🙂🙃 and a family 👨‍👩‍👧 (joined by zero-width joiners), flags 🇫🇷",
    "Windows lines\r\nand old Mac\rand tabs\tand a NUL \x00 byte",
    "e\u0301 combining accents, and \u200b zero width",
    "abcdefghijklmnopqrstuvwxyz0123456789",  # no pair repeats
    "snake_case__names and 'quotes' don't it's we'll   spaces   ",
]


def slow_bpe_merges(text, vocab_size):
    """BPE as it is defined: cut the text into chunks, then again and again count every adjacent pair
    in every chunk, merge the most frequent (ties: the smallest pair) wherever it occurs."""
    words = [list(chunk.encode("utf-8")) for chunk in CHUNK.findall(text)]
    merges = []
    while len(merges) < vocab_size - 256:
        counts = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = [slow_merge(word, best, 255 + len(merges)) for word in words]
    return merges


def slow_merge(word, pair, new):
    out = []
    for token in word:
        if out and out[-1] == pair[0] and token == pair[1]:  # out[-1] is never a fresh merge: new != pair[0]
            out[-1] = new
        else:
            out.append(token)
    return out


def slow_encode(text, merges):
    """Apply every merge, in the order learnt, to every chunk."""
    ids = []
    for chunk in CHUNK.findall(text):
        word = list(chunk.encode("utf-8"))
        for k, pair in enumerate(merges):
            word = slow_merge(word, pair, 256 + k)
        ids += word
    return ids


def test_chunks_cover_any_text():
    for text in ODD_TEXTS + [TINY_TEXT]:
        assert "".join(CHUNK.findall(text)) == text


def test_bpe_merges_are_the_definitions():
    text = TINY_TEXT[:3000] + ODD_TEXTS[3] + ODD_TEXTS[4]
    tok = BPETokenizer.train(text, 256 + 120, progress=False)
    assert tok.merges == slow_bpe_merges(text, 256 + 120) and tok.vocab_size == 376
    for sample in (text, TINY_TEXT[5000:7000], " ".join(ODD_TEXTS)):
        assert tok.encode(sample) == slow_encode(sample, tok.merges)


def test_bpe_round_trips_any_text_and_stops_when_pairs_run_out():
    tok = BPETokenizer.train(TINY_TEXT, 512, progress=False)
    for text in ODD_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size for i in ids)
    assert len(tok.encode(TINY_TEXT)) < len(TINY_TEXT.encode("utf-8")) / 2  # it compresses its text
    few = BPETokenizer.train("abcdef", 1000, progress=False)  # five pairs, each once: at most five merges
    assert few.vocab_size <= 261 and few.decode(few.encode("fedcba")) == "fedcba"


def test_bpe_stream_decoding_never_prints_half_a_character():
    tok = BPETokenizer([])  # bytes alone: every multi-byte character is split between tokens
    text = ODD_TEXTS[3] + ODD_TEXTS[4]
    decode = tok.stream_decoder()
    pieces = [decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["", "", "中"]


def test_bpe_is_saved_in_meta_pkl_and_prepare_encodes_each_split_on_its_own(tmp_path):
    tok = prepare(TINY_TEXT, str(tmp_path), tokenizer="bpe", vocab_size=300)
    assert load_tokenizer(tmp_path / "meta.pkl") == tok and tok.vocab_size == 300
    split = int(len(TINY_TEXT) * 0.9)
    for name, part in (("train", TINY_TEXT[:split]), ("val", TINY_TEXT[split:])):
        ids = np.fromfile(tmp_path / f"{name}.bin", dtype=np.uint16).tolist()
        assert tok.decode(ids) == part
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["chars"] == {"train": split, "val": len(TINY_TEXT) - split} and meta["tokenizer"] == "bpe"
    # merges learnt on the train split only: the same as learning from it alone
    assert tok.merges == BPETokenizer.train(TINY_TEXT[:split], 300, progress=False).merges


def test_bad_merges_are_refused_in_one_line():
    with pytest.raises(TokenizerError, match="x is not a vocabulary file.*a merge names an id not made before it"):
        tokenizer_from_meta({"tokenizer": "bpe", "merges": [(1, 2), (300, 3)]}, "x")
    with pytest.raises(TokenizerError, match="x is not a vocabulary"):
        tokenizer_from_meta({"tokenizer": "bpe", "merges": [(1,)]}, "x")


def test_bits_per_character():
    assert bits_per_char(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_char(2.0, 50, 200) == pytest.approx(2.0 * 0.25 / math.log(2))  # 4 characters a token


def test_tokenizer_round_trip():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    assert tok.itos[0] == "\n" and tok.encode(" ") == [1]  # sorted order, as the lecture


def test_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match="'xz'"):
        tok.encode("axcz")


def test_nanogpt_meta_pkl_loads(tmp_path):
    """meta.pkl as nanoGPT's data/shakespeare_char/prepare.py writes it."""
    data = TINY_TEXT
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    assert load_tokenizer(str(tmp_path / "meta.pkl")).chars == "".join(chars)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 1, "itos": {0: Payload()}, "stoi": {}}, f)
    with pytest.raises(TokenizerError, match="not a vocabulary file .*it asks for .*open, and only plain data"):
        load_tokenizer(str(tmp_path / "meta.pkl"))
    assert not marker.exists()
