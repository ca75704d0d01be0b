"""corpus.py: a corpus of any size, in chunks, on every core; the same token files as one piece."""
import os

import numpy as np
import pytest

import corpus
from corpus import corpus_files, text_chunks
from prepare_shakespeare import prepare, prepare_dataset
from tokenizer import load_tokenizer

TEXT = "".join(f"line {i}: Ἐν ἀρχῇ ἦν ὁ λόγος — «Привет» 漢字 ünïcödé 🙂\n" for i in range(300))


def splits(folder, dtype=np.uint16):
    return {s: np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=dtype) for s in ("train", "val", "test")
            if os.path.exists(os.path.join(folder, f"{s}.bin"))}


def test_chunks_end_on_whole_characters_and_cover_the_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    chunks = text_chunks([str(path)], chunk_bytes=7)  # most ends fall inside a character: moved past it
    data = path.read_bytes()
    assert chunks[0].start == 0 and chunks[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    assert "".join(c.text() for c in chunks) == TEXT  # each decodes on its own
    assert any(c.end - c.start > 7 for c in chunks)  # some were moved


def test_a_corpus_in_many_chunks_on_a_pool_gives_the_one_piece_files(tmp_path, monkeypatch):
    """Character and BPE datasets prepared from chunks of 100 bytes by a pool of worker processes:
    the character one equals the one made in one piece here; the BPE one decodes to the text."""
    whole = tmp_path / "whole"
    prepare(TEXT, str(whole), test_fraction=0.05)
    pools = []
    real_get_context = corpus.get_context

    def recording_get_context(*args):
        context = real_get_context(*args)
        pools.append(context)
        return context

    monkeypatch.setattr(corpus, "get_context", recording_get_context)
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 100)
    monkeypatch.setattr(corpus, "IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    chunked = tmp_path / "chunked"
    prepare(TEXT, str(chunked), test_fraction=0.05)
    assert pools  # the workers ran
    a, b = splits(whole), splits(chunked)
    assert a.keys() == b.keys() == {"train", "val", "test"}
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert load_tokenizer(whole / "meta.pkl") == load_tokenizer(chunked / "meta.pkl")

    bpe = tmp_path / "bpe"
    tok = prepare(TEXT, str(bpe), tokenizer="bpe", vocab_size=300, test_fraction=0.05)
    ids = splits(bpe)
    n = len(TEXT)
    assert tok.decode(ids["train"].tolist()) == TEXT[:int(n * 0.9)]
    assert tok.decode(ids["val"].tolist()) == TEXT[int(n * 0.9):n - int(n * 0.05)]
    assert tok.decode(ids["test"].tolist()) == TEXT[n - int(n * 0.05):]


def test_a_folder_is_its_files_in_sorted_order(tmp_path):
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT[:5000], encoding="utf-8")
    (folder / "b" / "c.txt").write_text(TEXT[5000:], encoding="utf-8")
    (folder / ".notes.txt").write_text("not part of it", encoding="utf-8")
    assert corpus_files(str(folder)) == [str(folder / "a.txt"), str(folder / "b" / "c.txt")]
    prepare_dataset("folder", input_path=str(folder), data_dir=str(tmp_path / "data"))
    prepare(TEXT, str(tmp_path / "data" / "file"))
    a, b = splits(tmp_path / "data" / "folder"), splits(tmp_path / "data" / "file")
    assert all(np.array_equal(a[s], b[s]) for s in ("train", "val"))
    assert not (tmp_path / "data" / "folder" / "input.txt").exists()  # a folder is not copied


def test_a_vocabulary_beyond_uint16_makes_uint32_files(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars) + "".join(reversed(chars))
    tok = prepare(text, str(tmp_path / "wide"))
    assert tok.vocab_size == len(chars) > 65536
    ids = splits(tmp_path / "wide", np.uint32)
    assert tok.decode(ids["train"].tolist()) + tok.decode(ids["val"].tolist()) == text
    assert load_tokenizer(tmp_path / "wide" / "meta.pkl").vocab_size == len(chars)
    with open(tmp_path / "wide" / "meta.pkl", "rb") as f:
        import pickle
        assert pickle.load(f)["dtype"] == "uint32"


def test_text_that_is_not_utf8_is_named_with_its_byte(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"fine text\n" * 3 + b"\xff")
    with pytest.raises(corpus.CorpusError, match=r"in.txt is not UTF-8 text \(invalid start byte at byte 30\)"):
        prepare_dataset("bad", input_path=str(path), data_dir=str(tmp_path / "data"))


def test_ctrl_c_while_the_workers_encode_keeps_the_old_set_and_ends_them(tmp_path, monkeypatch, ctrl_c_raises):
    import multiprocessing
    import signal
    out = tmp_path / "data" / "mine"
    prepare("an older text\n" * 200, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 100)
    monkeypatch.setattr(corpus, "IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    real_run_tasks = corpus.run_tasks

    def interrupted_run_tasks(function, *args, **kwargs):
        for i, result in enumerate(real_run_tasks(function, *args, **kwargs)):
            if function is corpus._encode_chunk and i == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the whole process group would get it too
            yield result

    monkeypatch.setattr(corpus, "run_tasks", interrupted_run_tasks)
    with pytest.raises(KeyboardInterrupt):
        prepare(TEXT, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]
    assert multiprocessing.active_children() == []  # the pool's workers ended with it
