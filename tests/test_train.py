import csv
import dataclasses
import json
import math
import os
import struct
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from configurator import ConfigError, UserError
from conftest import run_script
from model import GPT, GPTConfig
from train import (CheckpointError, TrainConfig, get_batch, get_lr, load_checkpoint, model_from_checkpoint,
                   save_checkpoint, select_dtype, train)


def test_get_batch_windows(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    data.tofile(path)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = get_batch(str(path), 16, 32, rng, "cpu")
        assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens of the file
        assert x.min() >= 0 and y.max() <= 999  # every window inside the data
    # windows start anywhere, including the very last possible start
    starts = np.concatenate([get_batch(str(path), 64, 32, rng, "cpu")[0][:, 0].numpy() for _ in range(200)])
    assert starts.min() == 0 and starts.max() == 1000 - 33


def test_get_batch_too_short_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError, match="block_size"):
        get_batch(str(path), 2, 10, np.random.default_rng(0), "cpu")


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1000)
    assert 0 < get_lr(0, cfg) < 2e-5  # never zero, even at the first step
    assert get_lr(50, cfg) < get_lr(99, cfg) < 1e-3  # linear warmup
    assert math.isclose(get_lr(100, cfg), 1e-3)  # peak
    assert math.isclose(get_lr(550, cfg), (1e-3 + 1e-4) / 2)  # cosine midpoint
    assert get_lr(999, cfg) > 1e-4 and math.isclose(get_lr(1000, cfg), 1e-4, rel_tol=1e-6)  # end of cosine
    assert get_lr(5000, cfg) == 1e-4  # min_lr after decay
    assert all(get_lr(i, cfg) >= get_lr(i + 1, cfg) for i in range(100, 1100))
    assert get_lr(700, dataclasses.replace(cfg, decay_lr=False)) == 1e-3


def test_dtype_choice():
    assert select_dtype("auto", "mps") == "float32"
    assert select_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="float16 autocast is for GPUs"):
        select_dtype("float16", "cpu")


def test_train_loss_falls_and_checkpoint_holds_nanogpt_keys(tiny_cfg):
    losses = train(tiny_cfg)
    ckpt = load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= ckpt.keys()
    assert ckpt["iter_num"] == 40 and ckpt["config"]["batch_size"] == 8
    assert losses["val"] < 3.0 < math.log(ckpt["model_args"]["vocab_size"])  # well below uniform
    assert math.isclose(ckpt["best_val_loss"], losses["val"])
    model = model_from_checkpoint(ckpt)
    assert model.config.n_embd == 32


def test_resume_continues_from_saved_iteration(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, max_iters=20, always_save_checkpoint=True))
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    assert load_checkpoint(path)["iter_num"] == 20
    resumed = train(dataclasses.replace(tiny_cfg, max_iters=40, init_from="resume", always_save_checkpoint=True))
    assert load_checkpoint(path)["iter_num"] == 40
    straight = train(dataclasses.replace(tiny_cfg, max_iters=40, out_dir=tiny_cfg.out_dir + "2"))
    # the RNG and sampler state travel in the checkpoint, so the resumed run is the same run
    assert resumed == straight


def test_gradient_accumulation_trains(tiny_cfg):
    losses = train(dataclasses.replace(tiny_cfg, gradient_accumulation_steps=2, batch_size=4))
    assert losses["val"] < 3.0


def test_eval_only_needs_a_checkpoint(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(dataclasses.replace(tiny_cfg, eval_only=True))
    train(tiny_cfg)
    losses = train(dataclasses.replace(tiny_cfg, eval_only=True))
    assert losses["val"] < 3.0


@pytest.mark.parametrize("override, message", [
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(max_iters=-1), "max_iters must be positive"),
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(init_from="gpt2"), "GPT-2 weights are not supported"),
    (dict(init_from="nothere"), "no checkpoint at nothere; init_from takes"),
    (dict(block_size=5000), "not smaller than the val split"),
    (dict(dataset="nope"), "dataset 'nope' is not prepared"),
])
def test_bad_settings_are_refused_before_training(tiny_cfg, override, message):
    with pytest.raises(UserError, match=message):
        train(dataclasses.replace(tiny_cfg, **override))
    assert not os.path.exists(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(str(path))


def test_save_checkpoint_is_atomic(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_train_script_prepares_and_trains(tiny_data, tmp_path):
    r = run_script("train.py", f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}",
                   "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                   "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5",
                   "--eval_iters=2", "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and "device: cpu" in r.stdout and "step 10:" in r.stdout


def test_train_script_missing_dataset_gives_command(tmp_path):
    r = run_script("train.py", "--dataset=mytext", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset mytext" in r.stderr


def test_resume_without_checkpoint(tiny_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint at .*ckpt.pt; train one first"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))


def test_truncated_checkpoint(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, max_iters=20))
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is untouched"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_out_dir_that_cannot_be_written(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="can't write to out_dir"):
        train(dataclasses.replace(tiny_cfg, out_dir=str(blocker / "out")))


def test_time_budget_stops_and_saves(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.5, eval_interval=10_000_000)
    losses = train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert 0 < ckpt["iter_num"] < 10_000_000 and ckpt["val_loss"] == losses["val"]
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["kind"] == "eval" and int(rows[-1]["iter"]) == ckpt["iter_num"]
    assert 0.5 <= float(rows[-1]["elapsed_s"]) < 5
    lrs = [float(r["lr"]) for r in rows if r["kind"] == "log"]
    assert lrs[-1] < 0.2 * max(lrs)  # the cosine schedule ran its course within the budget


def test_metrics_csv_and_plot(tiny_cfg):
    pytest.importorskip("matplotlib")
    train(dataclasses.replace(tiny_cfg, plot=True))
    with open(os.path.join(tiny_cfg.out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows if r["kind"] == "eval"] == [0, 20, 40]
    assert [int(r["iter"]) for r in rows if r["kind"] == "log"] == [10, 20, 30, 40]
    assert int(rows[-1]["tokens"]) == 40 * 8 * 32
    with open(os.path.join(tiny_cfg.out_dir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tiny_cfg, monkeypatch):
    import sys
    from train import plot_metrics
    train(tiny_cfg)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_metrics(tiny_cfg.out_dir)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_position_encodings_train_and_survive_save_load(tiny_cfg, pos_encoding):
    cfg = dataclasses.replace(tiny_cfg, pos_encoding=pos_encoding, out_dir=f"{tiny_cfg.out_dir}-{pos_encoding}")
    losses = train(cfg)
    assert losses["val"] < 3.0
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt).eval()
    assert model.config.pos_encoding == pos_encoding
    assert ckpt["model_args"].get("pos_encoding", "learned") == pos_encoding
    again = train(dataclasses.replace(cfg, eval_only=True))  # evaluates the reloaded checkpoint
    assert math.isclose(again["val"], ckpt["val_loss"], rel_tol=1e-5)


def test_bigram_baseline_trains(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model_type="bigram", learning_rate=1e-2, block_size=8, max_iters=100,
                              lr_decay_iters=100, eval_interval=100)
    losses = train(cfg)
    model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")))
    assert type(model).__name__ == "Bigram" and model.get_num_params() == model.config.vocab_size ** 2
    assert losses["val"] < math.log(model.config.vocab_size) - 0.5


def test_fine_tune_from_out_dir(tiny_cfg, tiny_data):
    from conftest import TINY_TEXT
    from prepare_shakespeare import prepare_dataset
    train(tiny_cfg)
    (tiny_data / "romeo.txt").write_text(TINY_TEXT[TINY_TEXT.index("ROMEO"):][:3000], encoding="utf-8")
    prepare_dataset("romeo", input_path=str(tiny_data / "romeo.txt"), data_dir=str(tiny_data), vocab_from="tiny")
    ft = dataclasses.replace(tiny_cfg, dataset="romeo", init_from=tiny_cfg.out_dir, out_dir=tiny_cfg.out_dir + "-ft",
                             max_iters=10, lr_decay_iters=10, warmup_iters=2, eval_interval=10, block_size=16,
                             n_layer=9, learning_rate=3e-4)
    losses = train(ft)
    ckpt = load_checkpoint(os.path.join(ft.out_dir, "ckpt.pt"))
    assert ckpt["iter_num"] == 10  # a fresh iteration count
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["model_args"]["block_size"] == 16  # shape from the checkpoint
    with open(os.path.join(ft.out_dir, "metrics.csv")) as f:
        first_eval = next(r for r in csv.DictReader(f) if r["kind"] == "eval")
    assert float(first_eval["val_loss"]) < 3.0  # started from the pretrained weights, not from scratch
    assert losses["val"] < 3.0

    (tiny_data / "shout.txt").write_text(TINY_TEXT.upper()[:3000], encoding="utf-8")
    prepare_dataset("other", input_path=str(tiny_data / "shout.txt"), data_dir=str(tiny_data))  # its own vocab
    with pytest.raises(CheckpointError, match="another vocabulary"):
        train(dataclasses.replace(ft, dataset="other", out_dir=tiny_cfg.out_dir + "-other"))


def test_non_ascii_text_trains(tmp_path):
    from prepare_shakespeare import prepare
    cjk = "".join(chr(0x4E00 + i) for i in range(60))
    text = ("Ἐν ἀρχῇ ἦν ὁ λόγος — «Привет, мир!» ünïcödé " + cjk + "\n") * 100
    tok = prepare(text, str(tmp_path / "data" / "poly"))
    assert tok.vocab_size > 65 and tok.decode(tok.encode(text)) == text
    cfg = TrainConfig(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), dataset="poly",
                      n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=8, dropout=0.0, max_iters=30,
                      lr_decay_iters=30, warmup_iters=2, eval_interval=30, eval_iters=2, learning_rate=1e-2,
                      device="cpu", dtype="float32")
    assert train(cfg)["val"] < math.log(tok.vocab_size) - 1


@pytest.mark.parametrize("bf16_speedup, ns_dtype", [(2.0, torch.bfloat16), (0.02, torch.float32)])
def test_muon_trains_and_resumes_exactly(tiny_cfg, monkeypatch, bf16_speedup, ns_dtype):
    """Muon's Newton-Schulz runs in bf16 where the probe finds it native, in float32 elsewhere; both
    resume exactly."""
    import model as model_module
    import train as train_module
    monkeypatch.setattr(train_module, "cpu_bf16_speedup", lambda: bf16_speedup)
    used = []
    real_init = model_module.Muon.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        used.append(self.ns_dtype)

    monkeypatch.setattr(model_module.Muon, "__init__", recording_init)
    cfg = dataclasses.replace(tiny_cfg, optimizer="muon", always_save_checkpoint=True, eval_interval=10)
    straight = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight"))
    assert straight["val"] < 3.0
    ckpt = load_checkpoint(os.path.join(cfg.out_dir + "-straight", "ckpt.pt"))
    assert set(ckpt["optimizer"]) == {"muon", "adamw"}
    train(dataclasses.replace(cfg, max_iters=20))
    with pytest.raises(ConfigError, match="resume with --optimizer=muon"):
        train(dataclasses.replace(cfg, init_from="resume", optimizer="adamw"))
    assert train(dataclasses.replace(cfg, init_from="resume")) == straight
    assert used and set(used) == {ns_dtype}


def test_resume_is_exact_under_bf16_autocast(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16", dropout=0.1, always_save_checkpoint=True, eval_interval=10)
    straight = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight"))
    train(dataclasses.replace(cfg, max_iters=20))
    assert train(dataclasses.replace(cfg, init_from="resume")) == straight


def test_time_budget_carries_over_on_resume(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.3, eval_interval=10_000_000,
                              always_save_checkpoint=True)
    train(cfg)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    first = load_checkpoint(path)
    train(dataclasses.replace(cfg, max_seconds=0.6, init_from="resume"))
    second = load_checkpoint(path)
    assert 0.3 <= first["train_seconds"] < 0.6 <= second["train_seconds"] < 1.5
    assert second["iter_num"] > first["iter_num"]


def test_missing_shakespeare_is_prepared_automatically(tiny_cfg, tmp_path, monkeypatch, capsys):
    import train as train_module
    from conftest import TINY_TEXT
    from prepare_shakespeare import prepare
    calls = []

    def fake_prepare_dataset(dataset, data_dir):  # stands in for the download, which needs the network
        calls.append((dataset, data_dir))
        prepare(TINY_TEXT, os.path.join(data_dir, dataset))

    monkeypatch.setattr(train_module, "prepare_dataset", fake_prepare_dataset)
    cfg = dataclasses.replace(tiny_cfg, dataset="shakespeare_char", data_dir=str(tmp_path / "fresh"), max_iters=5)
    train(cfg)
    assert calls == [("shakespeare_char", str(tmp_path / "fresh"))]
    assert "is not prepared yet: preparing Tiny Shakespeare now" in capsys.readouterr().out


def test_dtype_choice_on_cuda_and_cpu(monkeypatch):
    import train as train_module
    # PyTorch calls bf16 "supported" on T4 / V100 / RTX 20xx, where it is emulated: those get float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_dtype("auto", "cuda") == "float16"  # with a GradScaler
    assert select_dtype("auto", "cuda:1") == "float16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert select_dtype("auto", "cuda") == "bfloat16"  # A100 and newer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert select_dtype("auto", "cuda") == "bfloat16"  # AMD Instinct
    # CPUs: by a measured bf16 / float32 matmul speed ratio
    monkeypatch.setattr(train_module, "cpu_bf16_speedup", lambda: 0.01)  # emulated: 100x slower
    assert select_dtype("auto", "cpu") == "float32"
    assert "0.01x float32" in train_module.describe_dtype("auto", "float32", "cpu")
    monkeypatch.setattr(train_module, "cpu_bf16_speedup", lambda: 2.1)  # AVX512-BF16, AMX, ARM BF16
    assert select_dtype("auto", "cpu") == "bfloat16"
    assert select_dtype("auto", "mps") == "float32"


def test_cpu_bf16_probe_is_quick_and_agrees_with_a_matmul_timing():
    import time
    import train as train_module
    train_module.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(0)
    speedup = train_module.cpu_bf16_speedup()
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_probe)  # the probe leaves the global generator alone
    # independently: a bigger matmul shows the same side of 1 (native bf16 faster, emulated far slower)
    a32 = torch.randn(512, 512)
    a16 = a32.bfloat16()
    a32 @ a32, a16 @ a16
    times = []
    for a in (a32, a16):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        times.append(time.perf_counter() - t0)
    assert (speedup > 1.0) == (times[0] / times[1] > 1.0)


def test_fused_adamw_covers_cuda_and_cpu():
    from model import fused_adamw_devices
    assert {"cuda", "cpu"} <= set(fused_adamw_devices())


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--batch_size=0"], "error: batch_size must be positive"),
    ("train.py", ["--block_size=-4"], "error: block_size must be positive"),
    ("train.py", ["--n_embd=100", "--n_head=3"], "error: n_embd=100 is not divisible by n_head=3"),
    ("train.py", ["no/such/config.py"], "error: config file 'no/such/config.py' not found"),
    ("train.py", ["--learning_rate=fast"], "error: learning_rate must be float"),
    ("train.py", ["--init_from=resume", "--out_dir=nowhere"], "error: no checkpoint at nowhere/ckpt.pt"),
    ("train.py", ["--eval_only=True", "--out_dir=nowhere"], "error: no checkpoint at nowhere/ckpt.pt"),
    ("sample.py", ["--out_dir=nowhere"], "error: no checkpoint at nowhere/ckpt.pt"),
    ("prepare_shakespeare.py", ["--input", "missing.txt"], "error: input text 'missing.txt' not found"),
    ("prepare_shakespeare.py", ["--inptu=x.txt"], "error: unrecognized arguments: --inptu=x.txt; see python"),
])
def test_bad_input_is_one_line_without_traceback(tiny_data, tmp_path, script, args, message):
    common = {"train.py": [f"--data_dir={tiny_data}", "--dataset=tiny"], "sample.py": [],
              "prepare_shakespeare.py": ["--data_dir", str(tiny_data)]}[script]
    before = sorted(p for p in tmp_path.rglob("*"))
    r = run_script(script, *args, *common, cwd=str(tmp_path))
    assert r.returncode in (1, 2) and r.stderr.startswith(message), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_muon_steps_through_an_enabled_grad_scaler():
    """float16 training on CUDA puts a GradScaler in front of the optimizer; Muon's pair of
    optimizers must go through it too (a CPU GradScaler exercises the same code). Scaling by a
    power of two and unscaling is exact, so the run matches one without a scaler."""
    from model import GPT, GPTConfig
    from train import train_step
    idx = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(0))
    runs = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
        optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu", optimizer="muon")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
        runs.append([train_step(model, optimizer, scaler, lambda: (idx[:, :-1], idx[:, 1:]), 1, nullcontext(),
                                1.0, 3e-3).item() for _ in range(30)])
    assert runs[0][-1] < 0.8 * runs[0][0]
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_each_process_restores_its_own_random_state():
    from train import capture_rng, restore_rng
    data_rng = np.random.default_rng(0)
    states = []
    for seed in (10, 11):  # two processes: different dropout streams, one shared batch sampler
        torch.manual_seed(seed)
        states.append(capture_rng(data_rng, "cpu"))
    expected_rank1 = torch.rand(3)
    data_rng.integers(0, 100, 5)  # move the sampler on
    torch.manual_seed(99)
    restore_rng(states, data_rng, "cpu", rank=1)
    assert torch.equal(torch.rand(3), expected_rank1)
    assert data_rng.bit_generator.state == states[0]["data"]
    # a third process (resumed on more devices) keeps its own seed instead of copying another's
    torch.manual_seed(12)
    own = torch.rand(3)
    torch.manual_seed(12)
    restore_rng(states, data_rng, "cpu", rank=2)
    assert torch.equal(torch.rand(3), own)
    # older checkpoints: one dict, with every visible GPU's state; only rank 0 takes its torch state
    old = dict(states[0], cuda=[torch.zeros(16, dtype=torch.uint8)] * 8)
    torch.manual_seed(13)
    own = torch.rand(3)
    torch.manual_seed(13)
    restore_rng(old, data_rng, "cpu", rank=1)
    assert torch.equal(torch.rand(3), own)  # rank 1 keeps its own stream
    torch.manual_seed(10)
    reference = torch.rand(3)
    restore_rng(old, data_rng, "cpu", rank=0)
    assert torch.equal(torch.rand(3), reference)


def test_float16_resume_of_a_checkpoint_saved_without_scaler(tiny_cfg):
    """A float32 / bf16 / CPU run saves the state of a disabled GradScaler ({}): resuming it with
    --dtype=float16 (CUDA) starts a fresh scaler instead of failing in GradScaler.load_state_dict."""
    from train import restore_training_state
    train(tiny_cfg)
    checkpoint = load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    assert checkpoint["scaler"] == {}
    model = GPT(GPTConfig(**{k: v for k, v in checkpoint["model_args"].items()}))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what float16 on CUDA builds
    it, best, _ = restore_training_state(checkpoint, tiny_cfg, model, optimizer, scaler, np.random.default_rng(0), "cpu")
    assert it == 40 and best == checkpoint["best_val_loss"] and scaler.get_scale() == 2.0 ** 16


def test_torchrun_on_mps_is_refused_before_joining(monkeypatch, tiny_cfg):
    from train import setup_distributed
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun can't train on MPS.*--device=cpu"):
        setup_distributed(dataclasses.replace(tiny_cfg, device="auto"))
    assert not torch.distributed.is_initialized()


def test_compile_time_is_not_training_time(tiny_cfg, monkeypatch):
    """The first step of a compiled model spends its time compiling: with a time budget, that time
    must not count. A stand-in for torch.compile makes the first step take 1000 s on a fake clock."""
    import train as train_module
    clock = {"offset": 0.0}
    real = time.perf_counter
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: real() + clock["offset"])

    class FakeCompiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled() and not clock.get("compiled"):
                clock["compiled"], clock["offset"] = True, clock["offset"] + 1000.0
            return self.model(*args, **kwargs)

    fake_compile = FakeCompiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = dataclasses.replace(tiny_cfg, compile=True, max_iters=10_000_000, max_seconds=0.5,
                              eval_interval=10_000_000)
    train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert clock["compiled"] and ckpt["iter_num"] > 5 and 0.5 <= ckpt["train_seconds"] < 5


def read_wandb_records(path):
    """The records of an offline run's .wandb file: a 7-byte header, then a log of 32 KiB blocks whose
    records each have a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last part)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, records, parts = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def test_wandb_logs_the_metrics_and_config_offline(tiny_cfg, tmp_path, monkeypatch):
    """A real wandb run in offline mode (no account, no network): it gets the config and the numbers
    metrics.csv gets, under nanoGPT's names for the eval losses."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(tiny_cfg, wandb_log=True, wandb_project="tiny-project", wandb_run_name="tiny-run")
    losses = train(cfg)
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    name = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    config = {name(item): json.loads(item.value_json) for item in run.config.update}
    assert (run.project, run.display_name) == ("tiny-project", "tiny-run")
    assert config["n_embd"] == 32 and config["wandb_log"] is True
    history = [{name(item): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["iter"] for h in history] == [0, 10, 20, 30, 40]
    assert history[-1]["val/loss"] == pytest.approx(losses["val"], abs=1e-5)
    assert {"train/loss", "val/loss", "loss", "lr", "tokens", "elapsed_s"} <= history[-1].keys()
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        last_log = [r for r in csv.DictReader(f) if r["kind"] == "log"][-1]
    assert history[-1]["loss"] == pytest.approx(float(last_log["loss"]))


def test_wandb_missing_is_one_line(tiny_cfg, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match="wandb_log=True needs the wandb package: pip install wandb"):
        train(dataclasses.replace(tiny_cfg, wandb_log=True))


@pytest.mark.parametrize("override, key", [(dict(batch_size=4), "batch_size"), (dict(block_size=16), "block_size"),
                                           (dict(learning_rate=1e-2), "learning_rate"),
                                           (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps")])
def test_resume_refuses_settings_that_change_the_run(tiny_cfg, override, key):
    train(tiny_cfg)
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    before = os.path.getmtime(path)
    with pytest.raises(ConfigError, match=f"was trained with {key}=.*resume with --{key}=.*--init_from="):
        train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60, **override))
    assert os.path.getmtime(path) == before
    # what may change: the length of the run, evaluation and logging
    train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60, lr_decay_iters=40, eval_interval=10,
                              eval_iters=2, log_interval=5))


def test_raising_the_time_budget_on_resume_does_not_rewind_the_schedule(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.3, eval_interval=10_000_000,
                              always_save_checkpoint=True, log_interval=1, warmup_iters=2)
    train(cfg)
    first = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["iter_num"]
    train(dataclasses.replace(cfg, max_seconds=0.6, init_from="resume"))
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows if r["kind"] == "log"]
    assert len(lrs) > first + 5
    assert lrs[first - 1] == pytest.approx(cfg.min_lr, rel=0.2)  # the first budget ended the cosine
    assert max(lrs[first:]) <= cfg.min_lr * 1.000001  # and past it the rate stays at min_lr
    evals = [int(r["iter"]) for r in rows if r["kind"] == "eval"]
    assert len(evals) == len(set(evals))  # no eval row twice at the resume point


def test_resume_of_a_weights_only_checkpoint_is_one_line(tiny_cfg):
    train(tiny_cfg)
    path = os.path.join(tiny_cfg.out_dir, "ckpt.pt")
    slim = {k: v for k, v in load_checkpoint(path).items() if k in ("model", "model_args", "config", "iter_num",
                                                                    "best_val_loss")}
    torch.save(slim, path)
    with pytest.raises(CheckpointError, match="holds weights only, no optimizer state.*fine-tune from it"):
        train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=60))


def test_out_of_memory_is_one_line_naming_what_to_lower(tiny_cfg, monkeypatch):
    from model import GPT as GPTModel
    from train import main

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPTModel, "forward", exhausted)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(tiny_cfg).items()]
    with pytest.raises(UserError, match=r"out of memory on cpu .*lower --batch_size \(8\) or --block_size \(32\)"):
        main(args)
    monkeypatch.setattr(GPTModel, "forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory")))
    with pytest.raises(UserError, match="out of memory on cpu"):
        main(args)


def test_dataset_files_that_do_not_belong_together_are_refused(tiny_cfg, tiny_data):
    from prepare_shakespeare import CharTokenizer
    meta = os.path.join(tiny_data, "tiny", "meta.pkl")
    import pickle
    with open(meta, "wb") as f:
        pickle.dump(CharTokenizer.from_text("abc").meta(), f)  # a smaller vocabulary than the tokens use
    with pytest.raises(UserError, match="does not belong with .*meta.pkl"):
        train(tiny_cfg)
    assert not os.path.exists(tiny_cfg.out_dir)


def test_compile_follows_the_device_unless_set():
    from train import use_compile
    assert use_compile("auto", "cuda") and use_compile("auto", "cuda:1")
    assert not use_compile("auto", "cpu") and not use_compile("auto", "mps")
    assert use_compile(True, "cpu") and not use_compile(False, "cuda")
    from configurator import configure
    from conftest import REPO
    assert configure(TrainConfig, [os.path.join(REPO, "config", "train_shakespeare_char.py")]).compile == "auto"


def test_the_run_records_its_config(tiny_cfg, capsys):
    train(tiny_cfg)
    with open(os.path.join(tiny_cfg.out_dir, "config.json")) as f:
        assert json.load(f) == dataclasses.asdict(tiny_cfg)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("config: "))
    assert "batch_size=8" in line and "n_layer=2" in line and "beta1" not in line  # only what differs
