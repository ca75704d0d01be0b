import hashlib
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import TINY_TEXT
from prepare_shakespeare import CharTokenizer, DatasetError, main, prepare, prepare_dataset, read_text

TEXT = "hello world\nà bientôt, Ελλάδα!\n" * 50  # non-ASCII, well within uint16


def test_tokenizer_round_trip():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    assert tok.itos[0] == "\n" and tok.encode(" ") == [1]  # sorted order, as the lecture


def test_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DatasetError, match="'xz'"):
        tok.encode("axcz")


def test_prepare_writes_splits_and_meta(tmp_path):
    tok = prepare(TEXT, str(tmp_path))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    n = len(TEXT)
    assert len(train) == int(n * 0.9) and len(train) + len(val) == n
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == tok.vocab_size > 65 - 60
    assert meta["stoi"] == tok.stoi and meta["itos"] == tok.itos
    assert CharTokenizer.load(tmp_path / "meta.pkl").stoi == tok.stoi


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\xff\xfe bad", "not UTF-8")])
def test_bad_input_text(tmp_path, content, message):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_text(str(path))


def test_prepare_from_local_input(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text(TINY_TEXT, encoding="utf-8")
    main(["--input", str(src), "--dataset", "mine", "--data_dir", str(tmp_path / "data")])
    out = tmp_path / "data" / "mine"
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert {p.name for p in out.iterdir()} == {"input.txt", "train.bin", "val.bin", "meta.pkl"}


class _Handler(BaseHTTPRequestHandler):
    body = TINY_TEXT.encode("utf-8")

    def do_GET(self):
        if self.path != "/input.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


GOOD_SHA = hashlib.sha256(TINY_TEXT.encode("utf-8")).hexdigest()


def test_download_verifies_and_prepares(server, tmp_path):
    tok = prepare_dataset("dl", url=f"{server}/input.txt", sha256=GOOD_SHA, data_dir=str(tmp_path))
    out = tmp_path / "dl"
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert tok.vocab_size == len(set(TINY_TEXT))
    assert not [p for p in out.iterdir() if p.suffix in (".part", ".tmp")]


def test_download_skipped_when_verified_copy_exists(tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    (out / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    # an unreachable URL proves no download is attempted
    prepare_dataset("dl", url="http://127.0.0.1:9/none", sha256=GOOD_SHA, data_dir=str(tmp_path))
    assert (out / "train.bin").exists()


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(DatasetError, match="checksum"):
        prepare_dataset("dl", url=f"{server}/input.txt", sha256="0" * 64, data_dir=str(tmp_path))
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_http_404_leaves_nothing(server, tmp_path):
    with pytest.raises(DatasetError, match="404"):
        prepare_dataset("dl", url=f"{server}/missing.txt", sha256=GOOD_SHA, data_dir=str(tmp_path))
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_connection_refused(tmp_path):
    with pytest.raises(DatasetError, match="could not download"):
        prepare_dataset("dl", url="http://127.0.0.1:9/input.txt", sha256=GOOD_SHA, data_dir=str(tmp_path))
    assert list((tmp_path / "dl").iterdir()) == []


def test_existing_input_with_wrong_checksum_is_not_overwritten(server, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    (out / "input.txt").write_text("my own notes", encoding="utf-8")
    with pytest.raises(DatasetError, match="SHA-256"):
        prepare_dataset("dl", url=f"{server}/input.txt", sha256=GOOD_SHA, data_dir=str(tmp_path))
    assert (out / "input.txt").read_text(encoding="utf-8") == "my own notes"


def test_vocab_from_refuses_foreign_characters_and_writes_nothing(tmp_path):
    prepare("abc abc\n" * 20, str(tmp_path / "base"))
    src = tmp_path / "new.txt"
    src.write_text("abc xyz\n" * 20, encoding="utf-8")
    with pytest.raises(DatasetError, match="characters not in the vocabulary: 'xyz'"):
        prepare_dataset("new", input_path=str(src), data_dir=str(tmp_path), vocab_from="base")
    assert not (tmp_path / "new").exists()
    src.write_text("cab bac\n" * 20, encoding="utf-8")
    tok = prepare_dataset("new", input_path=str(src), data_dir=str(tmp_path), vocab_from="base")
    assert tok.stoi == CharTokenizer.load(tmp_path / "base" / "meta.pkl").stoi  # the base's ids, not its own
