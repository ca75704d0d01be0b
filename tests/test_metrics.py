import csv
import dataclasses
import json
import os
import re
import sys

import pytest

from configurator import UserError
from helpers import TINY_TEXT, run_in_process, run_script
from checkpoint import Progress
import metrics
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


class RecordedRun:
    """A wandb run, with what the program hands it through wandb's public API (run.log, run.finish)
    noted on the way: what a W&B user then sees of the run, without reading wandb's private files."""

    def __init__(self, run):
        self.run, self.logged, self.exit_codes = run, [], []

    def log(self, data, step=None, **kwargs):
        self.logged.append((step, dict(data)))
        return self.run.log(data, step=step, **kwargs)

    def finish(self, exit_code=None, **kwargs):
        self.exit_codes.append(exit_code)
        return self.run.finish(exit_code=exit_code, **kwargs)

    def __getattr__(self, name):
        return getattr(self.run, name)


def test_wandb_logs_the_metrics_and_config_offline(tiny_cfg, tmp_path, monkeypatch):
    """A real wandb run in offline mode (no account, no network): it gets the run's project, name and
    config, the numbers metrics.csv gets at the same iterations (under nanoGPT's names for the eval
    losses), and is finished, leaving its offline run under WANDB_DIR for `wandb sync` to upload."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs, real_init = [], wandb.init

    def init(*args, **kwargs):
        runs.append(RecordedRun(real_init(*args, **kwargs)))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    cfg = dataclasses.replace(tiny_cfg, wandb_log=True, wandb_project="tiny-project", wandb_run_name="tiny-run")
    try:
        losses = train(cfg)
    finally:
        wandb.teardown()  # what the process's exit does: wandb's service closes the run's files
    assert len(runs) == 1
    run = runs[0]
    assert (run.project, run.name, run.offline) == ("tiny-project", "tiny-run", True)
    assert run.config["n_embd"] == 32 and run.config["wandb_log"] is True
    assert run.exit_codes == [0]  # finished, as a success
    # the run's folder, in WANDB_DIR: what `wandb sync` uploads
    folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and [f.stat().st_size > 0 for f in folders[0].glob("run-*.wandb")] == [True]
    # the charts W&B draws: a row per iteration, the eval's and the log line's numbers together
    history = {}
    for step, data in run.logged:
        history.setdefault(step, {}).update(data)
    assert sorted(history) == [0, 10, 20, 30, 40]
    last = history[40]
    assert {"train/loss", "val/loss", "loss", "lr", "tokens", "elapsed_s"} <= last.keys()
    assert last["val/loss"] == pytest.approx(losses["val"], abs=1e-5)
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        last_log = [r for r in csv.DictReader(f) if r["kind"] == "log"][-1]
    assert last["loss"] == pytest.approx(float(last_log["loss"])) and last["tokens"] == int(last_log["tokens"])


def test_wandb_missing_is_one_line(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match="wandb_log=True needs the wandb package: pip install wandb"):
        train(dataclasses.replace(tiny_cfg, wandb_log=True))


def test_the_run_records_its_config(tiny_cfg, capsys):
    train(tiny_cfg)
    with open(os.path.join(tiny_cfg.out_dir, "config.json")) as f:
        recorded = json.load(f)
    as_json = json.dumps(dataclasses.asdict(dataclasses.replace(tiny_cfg, vocab_size=recorded["vocab_size"])))
    assert recorded == json.loads(as_json)  # every setting (tuples as JSON lists)
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


class Clock:
    """A stand-in for metrics.py's time module: perf_counter() reads seconds the test sets."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def test_log_lines_show_ms_per_iteration_and_mfu(tiny_cfg, capsys, monkeypatch):
    """MFU is the model's FLOPs per iteration over the time per iteration, as a share of the peak;
    the time is a clock the test moves, so that the numbers shown are exact on any machine."""
    os.makedirs(tiny_cfg.out_dir)
    clock = Clock()
    monkeypatch.setattr(metrics, "time", clock)
    with TrainingLog(tiny_cfg, Progress(), tokens_per_iter=256, flops_per_iter=1e9, peak_flops=4e9, master=True) as log:
        for _ in range(2):  # two iterations in 2 s
            clock.now += 1.0
            log.step(1.0)
        log.log(Progress(iter_num=10), loss=1.5, lr=1e-3)
    assert "loss 1.5000 (2.164 bpc), lr 1.00e-03, 1000 ms/iter, 256 tok/s, MFU 25.0%" in capsys.readouterr().err
    monkeypatch.undo()
    train(tiny_cfg)
    assert re.search(r"\d+ ms/iter, [\d,]+ tok/s, MFU \d+\.\d%", capsys.readouterr().err)  # a real run's
