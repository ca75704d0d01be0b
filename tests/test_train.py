import csv
import dataclasses
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import device
import muon as muon_module
import sizing
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from configurator import ConfigError, UserError
from configurator import configure
from helpers import REPO, TINY_TEXT, assert_same_weights, run_in_process, run_script, use_fake_clock
from model import GPT, GPTConfig
from prepare_shakespeare import prepare, prepare_dataset
from train import TrainConfig, get_lr, main, train, train_step


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


def test_gradient_accumulation_equals_the_larger_batch(tiny_cfg):
    """Two micro-batches of 4 are one batch of 8: the same windows, the same gradient, the same model."""
    paths = []
    for accum, batch in ((2, 4), (1, 8)):
        cfg = dataclasses.replace(tiny_cfg, gradient_accumulation_steps=accum, batch_size=batch, max_iters=20,
                                  always_save_checkpoint=True, eval_interval=20, out_dir=f"{tiny_cfg.out_dir}-{accum}")
        train(cfg)
        paths.append(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert_same_weights(*paths, rtol=1e-4, atol=1e-6)  # up to float32 sums taken in another order


def test_the_last_line_says_what_evaluations_cost(tiny_cfg, capsys, monkeypatch):
    """Evals and saves are timed apart from the steps: on a clock where everything timed takes one
    tick, 40 steps are 40 ticks of training, and each eval one tick more, whatever the interval."""
    use_fake_clock(monkeypatch, tick=0.1)
    for eval_interval, evals in ((2, 21), (40, 2)):
        train(dataclasses.replace(tiny_cfg, eval_interval=eval_interval, out_dir=f"{tiny_cfg.out_dir}{eval_interval}"))
        assert (f"trained 40 iterations in 4.0 s of training time ({evals / 10:.1f} s more in evaluations and saves)"
                in capsys.readouterr().out)


@pytest.mark.parametrize("override, message", [
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(max_iters=-1), "max_iters must be positive"),
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(init_from="gpt2"), "GPT-2 weights are not supported"),
    (dict(init_from="nothere"), "no checkpoint at nothere; init_from takes"),
    (dict(block_size=5000), "block_size=5000 is not smaller than .*val.bin"),
    (dict(dataset="nope"), "dataset 'nope' is not prepared"),
])
def test_bad_settings_are_refused_before_training(tiny_cfg, override, message):
    with pytest.raises(UserError, match=message):
        train(dataclasses.replace(tiny_cfg, **override))
    assert not os.path.exists(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))


def test_train_script_prepares_and_trains(tiny_data, tmp_path):
    r = run_script("train.py", f"--data_dir={tiny_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}",
                   "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                   "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5",
                   "--eval_iters=2", "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and "device: cpu" in r.stdout and "step 10:" in r.stdout


def test_train_script_missing_dataset_gives_command(tmp_path):
    r = run_in_process("train.py", "--dataset=mytext", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python prepare_shakespeare.py --input YOUR_TEXT.txt --dataset mytext" in r.stderr


def test_time_budget_stops_and_saves(tiny_cfg, monkeypatch):
    use_fake_clock(monkeypatch, tick=1 / 64)  # every step takes 1/64 s: 0.5 s is 32 steps
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.5, eval_interval=10_000_000,
                              log_interval=1)
    losses = train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert ckpt["iter_num"] == 32 and ckpt["train_seconds"] == 0.5 and ckpt["val_loss"] == losses["val"]
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["kind"] == "eval" and int(rows[-1]["iter"]) == 32 and float(rows[-1]["elapsed_s"]) == 0.5
    lrs = [float(r["lr"]) for r in rows if r["kind"] == "log"]
    # the cosine laid over the budget: step i (0-based) starts at i/32 of it, so the last is near min_lr
    assert len(lrs) == 32
    assert lrs[-1] == pytest.approx(get_lr(31 / 32 * cfg.lr_decay_iters, cfg))


IDEAS = dict(mtp_weight=0.3)


@pytest.mark.parametrize("pos_encoding, ideas", [("learned", {}), ("sinusoidal", {}), ("rope", {}), ("rope", IDEAS)])
def test_model_settings_train_and_survive_save_load(tiny_cfg, pos_encoding, ideas):
    cfg = dataclasses.replace(tiny_cfg, pos_encoding=pos_encoding, **ideas,
                              out_dir=f"{tiny_cfg.out_dir}-{pos_encoding}{len(ideas)}")
    losses = train(cfg)
    assert losses["val"] < 3.0
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt).eval()
    assert model.config.pos_encoding == pos_encoding
    assert ckpt["model_args"].get("pos_encoding", "learned") == pos_encoding
    for name in IDEAS:
        assert getattr(model.config, name) == ideas.get(name, 0.0)
        assert ckpt["model_args"].get(name, 0.0) == ideas.get(name, 0.0)
    again = train(dataclasses.replace(cfg, eval_only=True))  # evaluates the reloaded checkpoint
    assert math.isclose(again["val"], ckpt["val_loss"], rel_tol=1e-5)


def test_bigram_baseline_trains(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model_type="bigram", learning_rate=1e-2, block_size=8, max_iters=100,
                              lr_decay_iters=100, eval_interval=100)
    losses = train(cfg)
    model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")))
    assert type(model).__name__ == "Bigram" and model.get_num_params() == model.config.vocab_size ** 2
    assert losses["val"] < math.log(model.config.vocab_size) - 0.5
    # fine-tuned with a shorter context: a table has no positions to crop, the run records the context
    tuned = dataclasses.replace(cfg, init_from=cfg.out_dir, out_dir=cfg.out_dir + "-ft", block_size=4, max_iters=5)
    train(tuned)
    assert load_checkpoint(os.path.join(tuned.out_dir, "ckpt.pt"))["model_args"]["block_size"] == 4


def test_fine_tune_from_out_dir(tiny_cfg, tiny_data):
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
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: bf16_speedup)
    used = []
    real_init = muon_module.Muon.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        used.append(self.ns_dtype)

    monkeypatch.setattr(muon_module.Muon, "__init__", recording_init)
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
    # few iterations: bf16 matmuls are ~100x slower than float32 on CPUs without native bf16
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16", dropout=0.1, always_save_checkpoint=True,
                              max_iters=12, lr_decay_iters=12, warmup_iters=2, eval_interval=6, eval_iters=2)
    straight = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight"))
    train(dataclasses.replace(cfg, max_iters=6))
    assert train(dataclasses.replace(cfg, init_from="resume")) == straight


def test_time_budget_carries_over_on_resume(tiny_cfg, monkeypatch):
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.25, eval_interval=10_000_000,
                              always_save_checkpoint=True)
    train(cfg)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    first = load_checkpoint(path)
    train(dataclasses.replace(cfg, max_seconds=0.5, init_from="resume"))  # the budget counts the first run's time
    second = load_checkpoint(path)
    assert (first["iter_num"], first["train_seconds"]) == (16, 0.25)
    assert (second["iter_num"], second["train_seconds"]) == (32, 0.5)


def test_muon_steps_through_an_enabled_grad_scaler():
    """float16 training on CUDA puts a GradScaler in front of the optimizer; Muon's pair of
    optimizers must go through it too (a CPU GradScaler exercises the same code). Scaling by a
    power of two and unscaling is exact, so the run matches one without a scaler."""
    idx = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(0))
    runs = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
        optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu", optimizer="muon")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
        runs.append([train_step(model, optimizer, scaler, [(idx[:, :-1], idx[:, 1:])], 1, nullcontext(),
                                1.0, 3e-3).item() for _ in range(30)])
    assert runs[0][-1] < 0.8 * runs[0][0]
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_compile_time_is_not_training_time(tiny_cfg, monkeypatch, capsys):
    """The first step of a compiled model spends its time compiling: with a time budget, that time
    must not count. A stand-in for torch.compile makes the first step take 1000 s more on a clock
    where every other step takes 1/64 s: the budget of 0.5 s is then the 32 steps after it."""
    clock = use_fake_clock(monkeypatch, tick=1 / 64)
    compiled = []

    class FakeCompiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled() and not compiled:
                compiled.append(True)
                clock.now += 1000.0
            return self.model(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", FakeCompiled)
    cfg = dataclasses.replace(tiny_cfg, compile=True, max_iters=10_000_000, max_seconds=0.5,
                              eval_interval=10_000_000)
    train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert compiled and (ckpt["iter_num"], ckpt["train_seconds"]) == (33, 0.5)
    assert "compiled in 1000.0 s (not counted as training time)" in capsys.readouterr().out


def test_raising_the_time_budget_on_resume_does_not_rewind_the_schedule(tiny_cfg, monkeypatch, capsys):
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = dataclasses.replace(tiny_cfg, max_iters=10_000_000, max_seconds=0.3, eval_interval=10_000_000,
                              always_save_checkpoint=True, log_interval=1, warmup_iters=2)
    train(cfg)
    first = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["iter_num"]
    capsys.readouterr()
    train(dataclasses.replace(cfg, max_seconds=0.6, init_from="resume"))
    assert ("resumed with max_seconds=0.6: the learning rate schedule ends where the run's first 0.3 s of training "
            f"did; the 0.3 s past that train at min_lr ({cfg.min_lr:g})") in capsys.readouterr().out
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows if r["kind"] == "log"]
    # the first budget (20 steps of 1/64 s) ended the cosine: its last step's rate is in the schedule's last 5%
    assert first == 20 and len(lrs) == 39
    assert cfg.min_lr <= lrs[first - 1] < cfg.min_lr + 0.05 * (cfg.learning_rate - cfg.min_lr)
    assert max(lrs[first:]) <= cfg.min_lr * 1.000001  # and past it the rate stays at min_lr
    evals = [int(r["iter"]) for r in rows if r["kind"] == "eval"]
    assert len(evals) == len(set(evals))  # no eval row twice at the resume point


def test_a_timed_schedule_ends_with_max_iters_where_that_ends_the_run_first(tiny_cfg, monkeypatch):
    """The schedule is laid over whichever of max_seconds and max_iters ends the run: here the
    iterations (30 of the budget's 64 steps of 1/64 s), and the cosine is over by the last of them."""
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = dataclasses.replace(tiny_cfg, max_iters=30, max_seconds=1.0, eval_interval=10_000_000, log_interval=1,
                              warmup_iters=2)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r["kind"] == "log"]
    assert len(lrs) == 30 and lrs[2:] == sorted(lrs[2:], reverse=True)  # after the warmup, the cosine
    assert cfg.min_lr <= lrs[-1] < cfg.min_lr + 0.01 * (cfg.learning_rate - cfg.min_lr)


def test_out_of_memory_is_one_line_naming_what_to_lower(tiny_cfg, monkeypatch):
    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPT, "forward", exhausted)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(tiny_cfg).items() if k not in TrainConfig.not_settings]
    with pytest.raises(UserError, match=r"out of memory on cpu .*lower --batch_size \(8\) or --block_size \(32\)"):
        main(args)
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory")))
    with pytest.raises(UserError, match="out of memory on cpu"):
        main(args)


def test_a_bpe_dataset_trains_resumes_exactly_and_reports_bits_per_character(tiny_cfg, capsys):
    """The same recipe on a byte-level BPE: the checkpoint carries the merges, a resumed run equals a
    straight one, and every loss is also given in bits per character of the text."""
    from tokenizer import load_tokenizer
    prepare(TINY_TEXT, os.path.join(tiny_cfg.data_dir, "tiny_bpe"), tokenizer="bpe", vocab_size=300)
    tok = load_tokenizer(os.path.join(tiny_cfg.data_dir, "tiny_bpe", "meta.pkl"))
    cfg = dataclasses.replace(tiny_cfg, dataset="tiny_bpe", block_size=16, always_save_checkpoint=True,
                              eval_interval=10, dropout=0.1)
    train(dataclasses.replace(cfg, max_iters=20))
    resumed = train(dataclasses.replace(cfg, init_from="resume"))
    straight = train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight"))
    assert resumed == straight
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir + "-straight", "ckpt.pt"))
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert ckpt["model_args"]["vocab_size"] == 300 and ckpt["tokenizer"]["merges"] == tok.merges
    val = np.fromfile(os.path.join(cfg.data_dir, "tiny_bpe", "val.bin"), dtype=np.uint16)
    val_chars = len(TINY_TEXT) - int(len(TINY_TEXT) * 0.9)
    bpc = straight["val_full"] * len(val) / val_chars / math.log(2)
    out = capsys.readouterr().out
    assert f"val loss over the whole val split: {straight['val_full']:.4f} ({bpc:.4f} bits per character" in out
    assert len(val) < val_chars / 1.5  # BPE tokens hold several characters: bpc is not loss / ln 2 here
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        row = [r for r in csv.DictReader(f) if r["kind"] == "eval"][-1]
    assert float(row["val_bpc"]) == pytest.approx(float(row["val_loss"]) * len(val) / val_chars / math.log(2), rel=1e-5)


@pytest.mark.parametrize("overrides, seconds", [([], 100), (["--max_seconds=300"], 300), (["--max_seconds=600"], 600)])
def test_the_cpu_recipe_stops_on_time_evaluates_rarely_and_keeps_the_best(tiny_data, tmp_path, capsys, monkeypatch,
                                                                          overrides, seconds):
    path = os.path.join(REPO, "config", "train_shakespeare_char_cpu.py")
    cfg = configure(TrainConfig, [path, *overrides])
    assert cfg.max_seconds == seconds and cfg.max_iters >= 1_000_000  # the clock ends the run
    assert cfg.size_to_budget and cfg.optimizer == "muon"  # the shape and learning rate: sizing.py's
    assert not {"block_size", "batch_size"} & set(cfg.given_settings) and cfg.mtp_weight == 0.3  # sizing.py's too
    assert cfg.eval_interval >= 500 and not cfg.always_save_checkpoint and cfg.device == "cpu"
    assert cfg.out_dir == "out-shakespeare-char-cpu"
    # the whole recipe, on the tiny dataset for a moment of its budget (the 100-second shape, given)
    cfg = configure(TrainConfig, [path, *overrides, f"--data_dir={tiny_data}", "--dataset=tiny", "--max_seconds=0.5",
                                  "--eval_iters=1", "--eval_interval=5", f"--out_dir={tmp_path / 'out'}",
                                  "--n_layer=4", "--n_embd=96", "--dropout=0.0", "--block_size=128"])
    use_fake_clock(monkeypatch, tick=1 / 64)  # every step 1/64 s: the budget of 0.5 s is 32 steps
    monkeypatch.setattr(sizing, "TEXT_EXPONENT", 1.0)  # by its passes alone: the tiny text is not learnt by heart yet
    train(cfg)
    assert "trained 32 iterations in 0.5 s of training time" in capsys.readouterr().out
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))  # the best eval's model
    assert ckpt["val_loss"] == ckpt["best_val_loss"] and ckpt["model_args"]["n_layer"] == 4
    assert ckpt["model_args"]["mtp_weight"] == 0.3 and ckpt["model_args"]["n_head"] == 3  # sizing.py's heads
    assert ckpt["config"]["learning_rate"] == 1e-2  # and learning rate, for that width
    assert ckpt["config"]["batch_size"] == 16  # and the batch of 2,048 tokens, for that context


def test_the_enwik8_recipe_has_the_literatures_shape_and_trains(tiny_data, tmp_path):
    path = os.path.join(REPO, "config", "train_enwik8.py")
    cfg = configure(TrainConfig, [path])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 8, 512, 512) and cfg.dataset == "enwik8"
    # one step of the recipe at its shape, on the tiny dataset and a batch of one
    cfg = configure(TrainConfig, [path, f"--data_dir={tiny_data}", "--dataset=tiny", "--batch_size=1",
                                  "--max_iters=1", "--eval_iters=1", "--device=cpu", f"--out_dir={tmp_path / 'out'}",
                                  "--always_save_checkpoint=True"])
    train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert ckpt["iter_num"] == 1 and GPT(GPTConfig(**{k: v for k, v in ckpt["model_args"].items()
                                                      if k in GPTConfig.__dataclass_fields__})).get_num_params() > 37e6
