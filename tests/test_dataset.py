"""dataset.py: the token files, their checks, and the batches read from them."""
import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

import device
from configurator import UserError
from dataset import (TokenFile, TrainBatches, check_blocks, existing_splits, load_dataset, longest_block, split_file,
                     split_sizes)
from helpers import TINY_TEXT
from prepare_shakespeare import prepare
from tokenizer import CharTokenizer
from train import TrainConfig, train


def test_train_batches_are_windows_of_the_file(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    data.tofile(path)
    batches = TrainBatches(TokenFile(str(path)), 16, 32, 1, np.random.default_rng(0), "cpu")
    for _ in range(20):
        (x, y), = batches.next_step()
        assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens of the file
        assert x.min() >= 0 and y.max() <= 999  # every window inside the data
    # windows start anywhere, including the very last possible start
    wide = TrainBatches(TokenFile(str(path)), 64, 32, 1, np.random.default_rng(0), "cpu")
    starts = np.concatenate([next(wide.next_step())[0][:, 0].numpy() for _ in range(200)])
    assert starts.min() == 0 and starts.max() == 1000 - 33


def test_processes_share_out_the_global_batch(tmp_path):
    """Two processes with 2 micro-steps each read, between them, the 4 micro-batches one process
    with 4 micro-steps reads, and their generators stay in step."""
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    one = TrainBatches(TokenFile(str(path)), 3, 8, 4, np.random.default_rng(5), "cpu")
    two = [TrainBatches(TokenFile(str(path)), 3, 8, 2, np.random.default_rng(5), "cpu", device.Processes(rank, rank, 2))
           for rank in (0, 1)]
    for _ in range(3):
        alone = [x for x, _ in one.next_step()]
        shared = [x for b in two for x, _ in b.next_step()]
        assert all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True))
    assert two[0].rng.bit_generator.state == two[1].rng.bit_generator.state == one.rng.bit_generator.state


def test_train_batches_refuse_a_file_shorter_than_a_block(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError, match="block_size"):
        TrainBatches(TokenFile(str(path)), 2, 10, 1, np.random.default_rng(0), "cpu")


def test_the_longest_context_is_what_training_and_its_evals_read_and_a_split_too_short_is_refused(tmp_path):
    """The rule's contexts go up to what train and val hold: a short test split (read only by
    --eval_only --eval_split=test) does not cut them. A split of one token holds no window at all."""
    prepare(TINY_TEXT, str(tmp_path / "data" / "t"), test_fraction=0.002)
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), dataset="t")
    splits = existing_splits(cfg)
    assert len(splits["test"]) < 64 < longest_block(cfg) == min(len(splits["train"]), len(splits["val"])) - 1
    with pytest.raises(UserError, match=r"block_size=64 is not smaller than .*test.bin \(\d+ tokens\)"):
        check_blocks(dataclasses.replace(cfg, block_size=64, eval_only=True, eval_split="test"))
    check_blocks(dataclasses.replace(cfg, block_size=64))  # a run that does not read the test split
    np.zeros(1, dtype=np.uint16).tofile(splits["val"].path)
    with pytest.raises(UserError, match=r"val.bin holds 1 token\(s\): too short to train or evaluate on"):
        load_dataset(cfg, block_size=None)


def test_missing_shakespeare_is_prepared_automatically(tiny_cfg, tmp_path, monkeypatch, capsys):
    import dataset
    calls = []

    def fake_prepare_dataset(dataset, data_dir):  # stands in for the download, which needs the network
        calls.append((dataset, data_dir))
        prepare(TINY_TEXT, os.path.join(data_dir, dataset))

    monkeypatch.setattr(dataset, "prepare_dataset", fake_prepare_dataset)
    cfg = dataclasses.replace(tiny_cfg, dataset="shakespeare_char", data_dir=str(tmp_path / "fresh"), max_iters=5)
    train(cfg)
    assert calls == [("shakespeare_char", str(tmp_path / "fresh"))]
    assert "is not prepared yet: preparing Tiny Shakespeare now" in capsys.readouterr().out


def test_dataset_files_that_do_not_belong_together_are_refused(tiny_cfg, tiny_data):
    meta = os.path.join(tiny_data, "tiny", "meta.pkl")
    with open(meta, "wb") as f:
        pickle.dump(CharTokenizer.from_text("abc").meta(), f)  # a smaller vocabulary than the tokens use
    with pytest.raises(UserError, match="does not belong with .*meta.pkl"):
        train(tiny_cfg)
    assert not os.path.exists(tiny_cfg.out_dir)


def test_uint32_token_files_train_and_sample(tmp_path):
    """A vocabulary beyond 65,536 characters: uint32 token files, which train.py and sample.py read."""
    from helpers import run_in_process
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars) + "".join(reversed(chars))
    tok = prepare(text, str(tmp_path / "data" / "wide"))
    cfg = TrainConfig(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), dataset="wide", n_layer=1,
                      n_head=2, n_embd=16, block_size=16, batch_size=4, dropout=0.0, max_iters=4, lr_decay_iters=4,
                      warmup_iters=1, eval_interval=4, eval_iters=1, device="cpu", dtype="float32",
                      always_save_checkpoint=True)
    train_file = split_file(cfg, "train")
    x, y = train_file.windows(np.array([65_530]), 16, "cpu")
    assert train_file.dtype == np.uint32 and tok.decode(x[0].tolist()) == text[65_530:65_546]  # ids past 65,535
    train(cfg)
    r = run_in_process("sample.py", f"--out_dir={cfg.out_dir}", "--device=cpu", f"--start={chars[-1]}",
                       "--num_samples=1", "--max_new_tokens=5")
    assert r.returncode == 0 and set(r.stdout.split("\n")[0]) <= set(chars), r.stderr


def test_nanogpts_meta_without_a_dtype_reads_uint16(tiny_cfg, tiny_data):
    meta_path = os.path.join(tiny_data, "tiny", "meta.pkl")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    with open(meta_path, "wb") as f:
        pickle.dump({k: meta[k] for k in ("vocab_size", "itos", "stoi")}, f)  # nanoGPT's keys alone
    assert train(tiny_cfg)["val"] < 3.0


def test_split_sizes_count_characters_a_bpe_token_holds_several_of(tmp_path):
    """The sizing rule reads a train split's length in tokens (its passes) and in characters (how much
    text there is to learn by heart): the same text in BPE has fewer tokens, the same characters."""
    sizes = {}
    for name, tokenizer in (("tiny", "char"), ("tiny_bpe", "bpe")):
        prepare(TINY_TEXT, str(tmp_path / name), tokenizer=tokenizer, vocab_size=300)
        sizes[name] = split_sizes(TrainConfig(data_dir=str(tmp_path), dataset=name))
        for split, (n_tokens, _) in sizes[name].items():
            assert n_tokens == len(split_file(TrainConfig(data_dir=str(tmp_path), dataset=name), split))
    assert sizes["tiny"]["train"][0] == sizes["tiny"]["train"][1] == sizes["tiny_bpe"]["train"][1]
    assert sizes["tiny_bpe"]["train"][0] < sizes["tiny_bpe"]["train"][1]
