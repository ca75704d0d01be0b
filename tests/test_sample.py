import dataclasses
import io
import os
import shutil

import pytest
import torch

from configurator import UserError
from helpers import CAN_PACK, run_in_process, run_script
import sample as sample_module
from speedups import PackedLinear, speed_up_sampling
from sample import SampleConfig, sample
from checkpoint import load_checkpoint, save_checkpoint
from train import train


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
    for num_samples in (1, 1, 3, 3):
        buf = io.StringIO()
        sample(sample_cfg(trained, start="All:", num_samples=num_samples, max_new_tokens=40, seed=5), out=buf)
        outs.append(buf.getvalue().split("---------------\n"))
    assert outs[0] == outs[1] and outs[2] == outs[3]  # same seed, same text
    assert len(outs[0]) == 2 and len(outs[2]) == 4 and len(set(outs[2][:3])) == 3  # one batch, three texts
    assert all(s.startswith("All:") and len(s) == 4 + 40 + 1 for s in outs[0][:1] + outs[2][:3])


def test_a_batch_of_samples_is_what_the_model_makes_one_by_one(trained, monkeypatch):
    """Each row of a batch is a valid sample: greedy decoding gives every row the single-stream text,
    also where the batch runs on packed weights (x86 CPUs) and the single stream does not."""
    packed = []

    def recording_speed_up_sampling(model, device, batch_size):
        model = speed_up_sampling(model, device, batch_size)
        packed.append(sum(isinstance(m, PackedLinear) for m in model.modules()))
        return model

    monkeypatch.setattr(sample_module, "speed_up_sampling", recording_speed_up_sampling)
    one, many = io.StringIO(), io.StringIO()
    sample(sample_cfg(trained, start="ROMEO:", num_samples=1, max_new_tokens=40, temperature=0.0), out=one)
    sample(sample_cfg(trained, start="ROMEO:", num_samples=4, max_new_tokens=40, temperature=0.0), out=many)
    assert many.getvalue() == one.getvalue() * 4
    assert packed == [0, 4 * trained.n_layer + 1 if CAN_PACK else 0]  # 4 per block and the head


def test_greedy_and_start_from_file(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First Citizen:\n", encoding="utf-8")
    buf = io.StringIO()
    sample(sample_cfg(trained, start=f"FILE:{prompt}", num_samples=2, max_new_tokens=30, temperature=0.0), out=buf)
    a, b, _ = buf.getvalue().split("---------------\n")
    assert a == b and a.startswith("First Citizen:\n")


def test_start_outside_vocabulary(trained):
    r = run_in_process("sample.py", f"--out_dir={trained.out_dir}", "--start=ROMEO: 🙂#")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: characters not in the vocabulary: '#🙂'")


def test_missing_checkpoint_gives_the_command(tmp_path):
    r = run_in_process("sample.py", f"--out_dir={tmp_path / 'none'}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.rstrip().endswith(f"; train a model first: python train.py config/train_shakespeare_char_cpu.py "
                                      f"--out_dir={tmp_path / 'none'} (on a GPU: config/train_shakespeare_char.py)")
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "resume.pt").write_bytes(b"")  # a run stopped before its first model
    r = run_in_process("sample.py", f"--out_dir={tmp_path / 'stopped'}")
    assert r.returncode == 1 and r.stderr.rstrip().endswith(
        f"; {tmp_path / 'stopped'} holds only resume.pt, a run stopped before it saved a model: go on with it (its "
        f"train.py command with --init_from=resume), then sample")


def sampled_text(cfg):
    buf = io.StringIO()
    sample(cfg, out=buf)
    return buf.getvalue()


def test_compiled_model_keys_are_stripped(trained):
    """A compiled model's checkpoint (keys prefixed _orig_mod.) samples exactly what the plain one does."""
    cfg = sample_cfg(trained, start="A", num_samples=1, max_new_tokens=40)
    expected = sampled_text(cfg)
    path = os.path.join(trained.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, path)
    assert sampled_text(cfg) == expected and len(expected) == 1 + 40 + len("\n---------------\n")


def test_vocabulary_mismatch(trained):
    path = os.path.join(trained.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model_args"]["vocab_size"] += 1
    wte = ckpt["model"]["transformer.wte.weight"]
    ckpt["model"]["transformer.wte.weight"] = ckpt["model"]["lm_head.weight"] = torch.cat([wte, wte[:1]])
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match="holds a vocabulary of 43 tokens but its model has 44"):
        sample(sample_cfg(trained))
    del ckpt["vocab"]  # as nanoGPT's: the vocabulary comes from the dataset's meta.pkl, which does not fit
    save_checkpoint(ckpt, path)
    with pytest.raises(UserError, match="the checkpoint's model has 44"):
        sample(sample_cfg(trained))


def test_sampling_needs_no_dataset(trained, tmp_path):
    """Our checkpoints hold their vocabulary: sampling makes the same text with the data moved away."""
    cfg = sample_cfg(trained, start="ROMEO:", num_samples=1, max_new_tokens=40)
    expected = sampled_text(cfg)
    os.rename(trained.data_dir, str(tmp_path / "moved"))
    assert sampled_text(cfg) == expected and len(set(expected[6:])) > 5  # a real sample, not an echo


def test_without_out_dir_the_newest_checkpoint_is_sampled(trained, tmp_path, monkeypatch, capsys):
    newer = tmp_path / "out-newer"
    newer.mkdir()
    shutil.copy(os.path.join(trained.out_dir, "ckpt.pt"), newer / "ckpt.pt")
    os.utime(os.path.join(trained.out_dir, "ckpt.pt"), (1_000_000_000, 1_000_000_000))
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    sample(SampleConfig(device="cpu", dtype="float32", start="ROMEO:", num_samples=1, max_new_tokens=5), out=buf)
    assert f"sampling {os.path.join('out-newer', 'ckpt.pt')}, the most recently written" in capsys.readouterr().err
    assert buf.getvalue().startswith("ROMEO:")


def test_the_two_commands_of_the_quick_start_work_together(tiny_data, tmp_path):
    """python train.py CONFIG, then python sample.py --start=ROMEO: with no --out_dir."""
    r = run_script("train.py", f"--data_dir={tiny_data}", "--dataset=tiny", "--out_dir=out-tiny", "--device=cpu",
                   "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=10",
                   "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run_script("sample.py", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=10", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and "sampling out-tiny/ckpt.pt" in r.stderr


def test_no_checkpoint_anywhere_names_the_command(tmp_path):
    r = run_in_process("sample.py", cwd=str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "no checkpoint in any folder under" in r.stderr
    assert "python train.py config/train_shakespeare_char_cpu.py (on a GPU: config/train_shakespeare_char.py)" in r.stderr


def test_bigram_checkpoint_samples(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model_type="bigram", block_size=8, learning_rate=1e-2, max_iters=30)
    train(cfg)
    buf = io.StringIO()
    sample(sample_cfg(cfg, start="ROMEO:", num_samples=2, max_new_tokens=20), out=buf)
    a, b, _ = buf.getvalue().split("---------------\n")
    assert a.startswith("ROMEO:") and len(a) == 6 + 20 + 1 and a != b


def test_a_bpe_model_samples_whole_characters_and_fine_tunes_with_its_merges(tiny_cfg, tmp_path):
    """A BPE checkpoint decodes its tokens; one stream never prints half a character, even where a
    character's bytes are split between tokens; --vocab_from gives a new text the same merges."""
    from prepare_shakespeare import prepare_dataset
    text = ("ROMEO: café 🙂 — " * 40) + "JULIET: naïve 中文\n" * 40
    src = tmp_path / "odd.txt"
    src.write_text(text, encoding="utf-8")
    tok = prepare_dataset("odd", input_path=str(src), data_dir=tiny_cfg.data_dir, tokenizer="bpe", vocab_size=270)
    cfg = dataclasses.replace(tiny_cfg, dataset="odd", block_size=16, max_iters=20, lr_decay_iters=20)
    train(cfg)
    one, two = io.StringIO(), io.StringIO()  # streamed token by token, and decoded whole at the end
    sample(sample_cfg(cfg, start="JULIET: ", num_samples=1, max_new_tokens=60, temperature=0.0), out=one)
    sample(sample_cfg(cfg, start="JULIET: ", num_samples=2, max_new_tokens=60, temperature=0.0), out=two)
    assert two.getvalue() == one.getvalue() * 2 and one.getvalue().startswith("JULIET: ")
    (tmp_path / "more.txt").write_text("ROMEO: 🙂 café\n" * 30, encoding="utf-8")
    tuned = prepare_dataset("more", input_path=str(tmp_path / "more.txt"), data_dir=tiny_cfg.data_dir,
                            vocab_from="odd")
    assert tuned == tok
    losses = train(dataclasses.replace(cfg, dataset="more", init_from=cfg.out_dir, out_dir=cfg.out_dir + "-ft",
                                       max_iters=10, lr_decay_iters=10))
    assert losses["val_full"] > 0


def test_compile_samples_the_plain_models_text(trained, monkeypatch):
    """--compile=True compiles the model (Module.compile, no method replaced); the text is the same.
    The compiler's eager backend keeps the test fast: tracing is what sample.py's path adds."""
    compiled = []
    real_compile = torch.nn.Module.compile

    def eager_compile(self, **kwargs):
        compiled.append(type(self).__name__)
        return real_compile(self, backend="eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    outs = []
    for compile in (False, True):
        buf = io.StringIO()
        sample(sample_cfg(trained, start="All:", num_samples=1, max_new_tokens=30, temperature=0.0,
                          compile=compile), out=buf)
        outs.append(buf.getvalue())
    assert compiled == ["GPT"] and outs[0] == outs[1]
