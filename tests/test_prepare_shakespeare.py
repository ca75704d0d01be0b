import dataclasses
import errno
import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from helpers import REPO, TINY_TEXT
from configurator import ConfigError, UserError
from prepare_shakespeare import BENCHMARKS, DatasetError, main, prepare, prepare_dataset
from tokenizer import TokenizerError, load_tokenizer

TEXT = "hello world\nà bientôt, Ελλάδα!\n" * 50  # non-ASCII, well within uint16


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
    assert load_tokenizer(tmp_path / "meta.pkl").stoi == tok.stoi


@pytest.mark.parametrize("content, message", [(b"", "the input is empty"),
                                              (b"a", "the text has only 1 character, too few to split into train and val$"),
                                              (b"ok\n\xff\xfe bad", r"in.txt is not UTF-8 text \(invalid start byte at byte 3\)")])
def test_bad_input_text(tmp_path, content, message):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_dataset("bad", input_path=str(path), data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "bad").exists()


def test_prepare_from_local_input(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text(TINY_TEXT, encoding="utf-8")
    main(["--input", str(src), "--dataset", "mine", "--data_dir", str(tmp_path / "data")])
    out = tmp_path / "data" / "mine"
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert {p.name for p in out.iterdir()} == {"input.txt", "train.bin", "val.bin", "meta.pkl"}


def zipped(name, data):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buffer.getvalue()


# small stand-ins for the benchmarks, zipped as theirs are: a byte file whose end cuts a character
# in two (enwik8 is modelled as bytes), and text8's 27 characters
SMALL = {"enwik8": ("<page><title>Ελλάδα</title> &amp; text\n" * 60).encode("utf-8")[:2001],
         "text8": ("the quick brown fox jumps over the lazy dog " * 50)[:2000].encode("ascii")}


class _Handler(BaseHTTPRequestHandler):
    bodies = {"/input.txt": TINY_TEXT.encode("utf-8"), "/enwik8.zip": zipped("enwik8", SMALL["enwik8"]),
              "/text8.zip": zipped("text8", SMALL["text8"]), "/wrong8.zip": zipped("enwik8", b"x" * 2001)}

    def do_GET(self):
        body = self.bodies.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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


def test_another_shakespeare_dataset_reuses_the_verified_copy_and_no_other(tmp_path):
    """The BPE dataset of Tiny Shakespeare takes the character dataset's input.txt, once its SHA-256
    matches, instead of downloading (an unreachable URL proves it); a copy that does not match is
    neither used nor changed."""
    chars = tmp_path / "shakespeare_char"
    chars.mkdir()
    (chars / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    unreachable = "http://127.0.0.1:9/none"
    tok = prepare_dataset("bpe", url=unreachable, sha256=GOOD_SHA, data_dir=str(tmp_path), tokenizer="bpe",
                          vocab_size=260)
    assert tok.kind == "bpe" and (tmp_path / "bpe" / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    (chars / "input.txt").unlink()
    (chars / "input.txt").write_text("my own notes", encoding="utf-8")
    with pytest.raises(DatasetError, match="could not download"):
        prepare_dataset("bpe2", url=unreachable, sha256=GOOD_SHA, data_dir=str(tmp_path))
    assert (chars / "input.txt").read_text(encoding="utf-8") == "my own notes"


def test_another_text_needs_a_dataset_name_of_its_own(tmp_path, capsys):
    """--input without --dataset writes Tiny Shakespeare's folder, so it must be Tiny Shakespeare (a local
    copy, for a machine offline); another text is refused there, the prepared set left as it was."""
    data = tmp_path / "data"
    shakespeare, mine = tmp_path / "input.txt", tmp_path / "mine.txt"
    shakespeare.write_text(TINY_TEXT, encoding="utf-8")
    mine.write_text(TEXT, encoding="utf-8")
    main(["--input", str(shakespeare), "--sha256", GOOD_SHA, "--data_dir", str(data)])
    before = {p.name: p.read_bytes() for p in (data / "shakespeare_char").iterdir()}
    with pytest.raises(ConfigError, match=f"--input {mine} is not Tiny Shakespeare, whose dataset is the default "
                                          r"\(shakespeare_char\): name your text's dataset, e.g. --dataset=my_text"):
        main(["--input", str(mine), "--sha256", GOOD_SHA, "--data_dir", str(data)])
    assert {p.name: p.read_bytes() for p in (data / "shakespeare_char").iterdir()} == before
    main(["--input", str(mine), "--dataset", "mine", "--data_dir", str(data)])
    assert (data / "mine" / "input.txt").read_text(encoding="utf-8") == TEXT


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
    with pytest.raises(TokenizerError, match="characters not in the vocabulary: 'xyz'"):
        prepare_dataset("new", input_path=str(src), data_dir=str(tmp_path), vocab_from="base")
    assert not (tmp_path / "new").exists()
    src.write_text("cab bac\n" * 20, encoding="utf-8")
    tok = prepare_dataset("new", input_path=str(src), data_dir=str(tmp_path), vocab_from="base")
    assert tok.stoi == load_tokenizer(tmp_path / "base" / "meta.pkl").stoi  # the base's ids, not its own


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_preparing_again_replaces_the_whole_set_and_removes_leftovers(tmp_path):
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    leftover = tmp_path / "data" / f".mine.tmp{dead_pid()}"  # a prepare killed midway
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\0\0")
    tok = prepare(TINY_TEXT, str(out))
    assert load_tokenizer(str(out / "meta.pkl")).chars == tok.chars
    assert tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist()) == TINY_TEXT[int(len(TINY_TEXT) * 0.9):]
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]


def test_preparing_again_keeps_the_folders_other_files(tmp_path):
    """The repo tracks data/shakespeare_char/README.md; a user may keep notes beside the data."""
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    (out / "README.md").write_text("# mine\n")
    (out / "notes").mkdir()
    (out / "notes" / "run1.txt").write_text("val 1.55\n")
    prepare(TINY_TEXT, str(out))
    assert (out / "README.md").read_text() == "# mine\n"
    assert (out / "notes" / "run1.txt").read_text() == "val 1.55\n"
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert sorted(os.listdir(out)) == ["README.md", "input.txt", "meta.pkl", "notes", "train.bin", "val.bin"]


def test_a_prepare_killed_between_its_renames_loses_nothing(tmp_path):
    """Killed after moving the old set aside (.mine.tmpPID.old) and before moving the new one in:
    the next prepare puts the old set back first, so the folder's other files survive."""
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    (out / "README.md").write_text("# mine\n")
    out.rename(tmp_path / "data" / f".mine.tmp{dead_pid()}.old")
    prepare(TINY_TEXT, str(out))
    assert (out / "README.md").read_text() == "# mine\n"
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]
    # the same, through prepare_dataset with no --input: the old set's input.txt is found, no download
    out.rename(tmp_path / "data" / f".mine.tmp{dead_pid()}.old")
    prepare_dataset("mine", url="http://127.0.0.1:9/unreachable", sha256=None, data_dir=str(tmp_path / "data"))
    assert (out / "README.md").read_text() == "# mine\n"
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]


def test_a_full_disk_while_preparing_keeps_the_old_set(tmp_path, monkeypatch):
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pickle, "dump", full)  # the third of the four files
    with pytest.raises(DatasetError, match="could not write .*meta.pkl: no space left on device; free some space, "
                                           "or use another --data_dir; nothing in .*mine was changed"):
        prepare(TINY_TEXT, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]


class Stopped(Exception):
    pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["before the first rename", "between the renames", "after the second rename",
                                  "while writing the new set"])
def test_a_signal_at_any_step_of_preparing_leaves_a_whole_set(tmp_path, monkeypatch, ctrl_c_raises, signum, when):
    """Ctrl-C or SIGTERM, sent at each step of swapping the new set in: the folder then holds the old
    set or the new one, complete, with the user's files; the signal still stops the program."""
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    (out / "README.md").write_text("# mine\n")
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename, real_dump, renames = os.rename, pickle.dump, []

    def rename(src, dst):
        if when == "before the first rename" and not renames or when == "between the renames" and len(renames) == 1:
            os.kill(os.getpid(), signum)
        real_rename(src, dst)
        renames.append(dst)
        if when == "after the second rename" and len(renames) == 2:
            os.kill(os.getpid(), signum)

    def dump(*args, **kwargs):
        os.kill(os.getpid(), signum)
        real_dump(*args, **kwargs)

    def stop(s, frame):  # what SIGTERM's default would do, but leaving pytest alive
        raise Stopped

    monkeypatch.setattr(os, "rename", rename)
    if when == "while writing the new set":
        monkeypatch.setattr(pickle, "dump", dump)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Stopped):
            prepare(TINY_TEXT, str(out))
    finally:
        signal.signal(signal.SIGTERM, previous)
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    if when == "while writing the new set":
        assert now == old
    else:  # the swap had begun: it was finished before the signal acted
        assert now["input.txt"] == TINY_TEXT.encode() and now["README.md"] == b"# mine\n"
        assert load_tokenizer(str(out / "meta.pkl")).decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist()) \
            == TINY_TEXT[int(len(TINY_TEXT) * 0.9):]
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]


def test_sigterm_between_the_renames_kills_a_real_process_after_the_swap(tmp_path):
    """The same with SIGTERM's own default action (the process dies), in a real process."""
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    script = f"""
import os, signal
import prepare_shakespeare
real_rename, calls = os.rename, []
def rename(src, dst):
    real_rename(src, dst)
    calls.append(dst)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
os.rename = rename
prepare_shakespeare.prepare({TINY_TEXT!r}, {str(out)!r})
print("not reached")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM and "not reached" not in r.stdout, (r.returncode, r.stderr)
    assert (out / "input.txt").read_text(encoding="utf-8") == TINY_TEXT
    assert sorted(os.listdir(out)) == ["input.txt", "meta.pkl", "train.bin", "val.bin"]
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]


@pytest.fixture
def small_benchmarks(monkeypatch):
    """BENCHMARKS with the published size and checksum of SMALL's stand-ins."""
    for name, data in SMALL.items():
        bench = BENCHMARKS[name]
        monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(
            bench, size=len(data), md5=hashlib.md5(data).hexdigest() if bench.md5 else None))


@pytest.mark.parametrize("name", ["enwik8", "text8"])
def test_a_benchmark_downloads_checks_and_splits_as_the_papers_do(server, tmp_path, small_benchmarks, name):
    tok = prepare_dataset(name, url=f"{server}/{name}.zip", data_dir=str(tmp_path))
    out = tmp_path / name
    data = SMALL[name]
    n = len(data)
    ids = {s: np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [int(n * 0.9), n - int(n * 0.9) - int(n * 0.05),
                                                                int(n * 0.05)]
    with open(out / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["chars"] == {s: len(ids[s]) for s in ids}  # bits per character count bytes for enwik8
    everything = np.concatenate([ids["train"], ids["val"], ids["test"]])
    if name == "enwik8":  # bytes: a vocabulary of 256, the ids the bytes themselves
        assert tok.vocab_size == 256 and everything.astype(np.uint8).tobytes() == data
    else:
        assert tok.vocab_size == 27 and tok.decode(everything.tolist()) == data.decode()
    assert {p.name for p in out.iterdir()} == {f"{name}.zip", name, "train.bin", "val.bin", "test.bin", "meta.pkl"}


def test_a_benchmark_without_a_network_says_where_to_put_its_zip(tmp_path, small_benchmarks):
    with pytest.raises(DatasetError, match=f"could not download http://127.0.0.1:9/enwik8.zip .*; check your "
                                           f"connection, or download it by hand and put it at "
                                           f"{tmp_path / 'enwik8' / 'enwik8.zip'}$"):
        prepare_dataset("enwik8", url="http://127.0.0.1:9/enwik8.zip", data_dir=str(tmp_path))
    (tmp_path / "enwik8" / "enwik8.zip").write_bytes(_Handler.bodies["/enwik8.zip"])  # by hand
    tok = prepare_dataset("enwik8", url="http://127.0.0.1:9/enwik8.zip", data_dir=str(tmp_path))
    assert tok.vocab_size == 256 and (tmp_path / "enwik8" / "test.bin").exists()


def test_a_benchmark_file_that_is_not_the_published_one_is_refused(server, tmp_path, small_benchmarks):
    with pytest.raises(DatasetError, match="enwik8 is not enwik8 .*the published file has 2,001 bytes and MD5"):
        prepare_dataset("enwik8", url=f"{server}/wrong8.zip", data_dir=str(tmp_path))
    assert not (tmp_path / "enwik8" / "train.bin").exists()


def test_a_test_split_holds_the_texts_end(tmp_path):
    tok = prepare(TEXT, str(tmp_path), test_fraction=0.05)
    n = len(TEXT)
    test = np.fromfile(tmp_path / "test.bin", dtype=np.uint16)
    assert tok.decode(test.tolist()) == TEXT[n - int(n * 0.05):]
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert tok.decode(val.tolist()) == TEXT[int(n * 0.9):n - int(n * 0.05)]
    prepare(TEXT, str(tmp_path))  # prepared again without one: no test split left behind
    assert not (tmp_path / "test.bin").exists()


def test_a_full_disk_while_writing_tokens_names_the_reason(tmp_path, monkeypatch):
    """The token files written to /dev/full: the operating system's own ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "data" / "mine"
    prepare(TEXT, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import prepare_shakespeare
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        return real_open("/dev/full" if str(path).endswith(".bin") else path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare_shakespeare, "open", full_disk, raising=False)
    with pytest.raises(DatasetError, match="could not write the dataset .*mine: no space left on device; free some "
                                           "space, or use another --data_dir; nothing in .*mine was changed"):
        prepare(TINY_TEXT, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path / "data")) == ["mine"]
