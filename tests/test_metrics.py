import csv
import dataclasses
import json
import os
import re
import struct
import sys
import time

import pytest

from configurator import UserError
from helpers import TINY_TEXT, run_in_process, run_script
from train import Progress
from metrics import TrainingLog, plot_metrics
from train import train


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
    train(tiny_cfg)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_metrics(tiny_cfg.out_dir)


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
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(tiny_cfg, wandb_log=True, wandb_project="tiny-project", wandb_run_name="tiny-run")
    losses = train(cfg)
    wandb.teardown()  # what the process's exit does: wandb's service closes the run's file
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds, f"no run record in {files[0].stat().st_size} bytes; records: {kinds[:30]}"
    run = records[kinds.index("run")].run
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
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match="wandb_log=True needs the wandb package: pip install wandb"):
        train(dataclasses.replace(tiny_cfg, wandb_log=True))


def test_the_run_records_its_config(tiny_cfg, capsys):
    train(tiny_cfg)
    with open(os.path.join(tiny_cfg.out_dir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded == dataclasses.asdict(dataclasses.replace(tiny_cfg, vocab_size=recorded["vocab_size"]))
    assert recorded["vocab_size"] == len(set(TINY_TEXT))  # the dataset's, not the default
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("config: "))
    assert "batch_size=8" in line and "n_layer=2" in line and "beta1" not in line  # only what differs



def test_a_finished_run_is_plotted_by_a_plain_command(tiny_cfg, tmp_path):
    pytest.importorskip("matplotlib")
    train(tiny_cfg)
    assert not os.path.exists(os.path.join(tiny_cfg.out_dir, "loss.png"))
    r = run_script("metrics.py", f"--out_dir={tiny_cfg.out_dir}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"loss curves drawn in {os.path.join(tiny_cfg.out_dir, 'loss.png')}"
    with open(os.path.join(tiny_cfg.out_dir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    r = run_in_process("metrics.py", f"--out_dir={tmp_path / 'nothing'}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: no loss curves to draw: can't read") and "train a run" in r.stderr


def test_log_lines_show_ms_per_iteration_and_mfu(tiny_cfg, capsys):
    """MFU is the model's FLOPs per iteration over the time per iteration, as a share of the peak."""
    os.makedirs(tiny_cfg.out_dir)
    with TrainingLog(tiny_cfg, Progress(), tokens_per_iter=256, flops_per_iter=1e9, peak_flops=4e9, master=True) as log:
        log.window_start, log.window_iters = time.perf_counter() - 2.0, 2  # two iterations in 2 s
        log.log(Progress(iter_num=10), loss=1.5, lr=1e-3)
        assert "loss 1.5000 (2.164 bpc), lr 1.00e-03, 1000 ms/iter, 256 tok/s, MFU 25.0%" in log.bar.postfix
    train(tiny_cfg)
    assert re.search(r"\d+ ms/iter, [\d,]+ tok/s, MFU \d+\.\d%", capsys.readouterr().err)  # a real run's
