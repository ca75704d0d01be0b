import dataclasses
import io
import os

import pytest
import torch

from configurator import UserError
from conftest import run_script
from sample import SampleConfig, sample
from train import load_checkpoint, save_checkpoint, train


@pytest.fixture
def trained(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, max_iters=30, lr_decay_iters=30))
    return tiny_cfg


def sample_cfg(trained, **kw):
    return SampleConfig(out_dir=trained.out_dir, data_dir=trained.data_dir, device="cpu", dtype="float32", **kw)


def test_sample_script_end_to_end(trained):
    r = run_script("sample.py", f"--out_dir={trained.out_dir}", "--start=ROMEO:", "--num_samples=2",
                   "--max_new_tokens=50", "--seed=3")
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[2] == ""
    for s in samples[:2]:
        assert s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 50 + 1  # plus the newline


def test_seed_makes_samples_repeatable_and_streaming_matches(trained):
    outs = []
    for num_samples in (1, 1, 2):
        buf = io.StringIO()
        sample(sample_cfg(trained, start="All:", num_samples=num_samples, max_new_tokens=40, seed=5), out=buf)
        outs.append(buf.getvalue().split("---------------\n"))
    assert outs[0] == outs[1]  # same seed, same text
    assert outs[0][0] == outs[2][0]  # streaming one sample prints the same text as the batch path


def test_greedy_and_start_from_file(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First Citizen:\n", encoding="utf-8")
    buf = io.StringIO()
    sample(sample_cfg(trained, start=f"FILE:{prompt}", num_samples=2, max_new_tokens=30, temperature=0.0), out=buf)
    a, b, _ = buf.getvalue().split("---------------\n")
    assert a == b and a.startswith("First Citizen:\n")


def test_start_outside_vocabulary(trained):
    r = run_script("sample.py", f"--out_dir={trained.out_dir}", "--start=ROMEO: 🙂#")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: characters not in the vocabulary: '#🙂'")


def test_missing_checkpoint_gives_the_command(tmp_path):
    r = run_script("sample.py", f"--out_dir={tmp_path / 'none'}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "python train.py config/train_shakespeare_char.py" in r.stderr


def test_compiled_model_keys_are_stripped(trained):
    path = os.path.join(trained.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, path)
    buf = io.StringIO()
    sample(sample_cfg(trained, start="A", num_samples=1, max_new_tokens=5), out=buf)
    assert buf.getvalue().startswith("A")


def test_vocabulary_mismatch(trained):
    path = os.path.join(trained.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model_args"]["vocab_size"] += 1
    wte = ckpt["model"]["transformer.wte.weight"]
    ckpt["model"]["transformer.wte.weight"] = ckpt["model"]["lm_head.weight"] = torch.cat([wte, wte[:1]])
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match="the checkpoint's model has"):
        sample(sample_cfg(trained))


def test_bigram_checkpoint_samples(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model_type="bigram", block_size=8, learning_rate=1e-2, max_iters=30)
    train(cfg)
    buf = io.StringIO()
    sample(sample_cfg(cfg, start="ROMEO:", num_samples=2, max_new_tokens=20), out=buf)
    a, b, _ = buf.getvalue().split("---------------\n")
    assert a.startswith("ROMEO:") and len(a) == 6 + 20 + 1 and a != b
