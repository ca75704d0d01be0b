"""Long runs: exact resume, signals, kill -9 during saves, torchrun."""
import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, assert_same_weights
from checkpoint import load_checkpoint
from train import TrainConfig, train

pytestmark = pytest.mark.slow


def cli_args(cfg):
    """The --key=value arguments that reproduce cfg on the command line."""
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k not in TrainConfig.not_settings]


def start_training(cfg, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *cli_args(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_for_line(proc, text):
    for line in proc.stdout:
        if text in line:
            return True
    return False


def test_resume_is_bit_identical(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, dropout=0.1, eval_interval=10)
    train(dataclasses.replace(cfg, max_iters=10))
    train(dataclasses.replace(cfg, max_iters=40, init_from="resume"))
    straight = dataclasses.replace(cfg, max_iters=40, out_dir=cfg.out_dir + "-straight")
    train(straight)
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(straight.out_dir, "ckpt.pt"))


def test_interrupted_twice_equals_uninterrupted(tiny_cfg):
    """SIGTERM, then SIGINT on the resumed run, then a resume of that resume to the end."""
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, dropout=0.1, max_iters=150,
                              lr_decay_iters=150, eval_interval=25, eval_iters=2)
    stops = []
    for attempt, sig in enumerate([signal.SIGTERM, signal.SIGINT]):
        proc = start_training(cfg, *(["--init_from=resume"] if attempt else []))
        seen = wait_for_line(proc, f"step {25 * (attempt + 1)}:")  # interrupt mid-run, after some progress
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert seen and proc.returncode == 1, err
        assert err.strip().splitlines()[-1].startswith("error: stopped by SIG") and "Traceback" not in err
        stops.append(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["iter_num"])
    assert stops == sorted(stops) and stops[-1] < 150
    train(dataclasses.replace(cfg, init_from="resume"))  # the command line's resume was tested above
    straight = dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight")
    train(straight)
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(straight.out_dir, "ckpt.pt"))
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "log"]
    assert [int(r["iter"]) for r in rows] == list(range(10, 151, 10))  # no gaps, no repeats


def test_kill_9_during_saves_never_leaves_a_broken_checkpoint_or_leftovers(tiny_cfg):
    """kill -9 the moment a save's temporary file appears: the kill lands mid-save (the temporary
    file is still there afterwards, proof that the rename never happened), yet ckpt.pt always loads,
    and the next run in that out_dir removes what the killed ones left."""
    cfg = dataclasses.replace(tiny_cfg, n_layer=4, n_head=4, n_embd=128, always_save_checkpoint=True,
                              max_iters=100_000, lr_decay_iters=100_000, eval_interval=1, eval_iters=1)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    landed = 0
    for attempt in range(30):
        resume = ["--init_from=resume"] if os.path.exists(path) else []
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *cli_args(cfg), *resume],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        tmp = os.path.join(cfg.out_dir, f"ckpt.pt.tmp{proc.pid}")
        deadline = time.monotonic() + 60
        while not (os.path.exists(path) and os.path.exists(tmp)) and proc.poll() is None \
                and time.monotonic() < deadline:
            os.sched_yield()  # watch for a save to begin once a checkpoint exists, leaving the cores to others
        proc.kill()
        proc.wait()
        landed += os.path.exists(tmp)
        if os.path.exists(path):
            assert load_checkpoint(path)["iter_num"] >= 1  # the old checkpoint or the new one, never half
        if landed == 2:
            break
    assert landed == 2, f"only {landed} of {attempt + 1} kills landed during a save"
    assert len([f for f in os.listdir(cfg.out_dir) if f.startswith("ckpt.pt.tmp")]) >= 1
    done = load_checkpoint(path)["iter_num"] + 2
    train(dataclasses.replace(cfg, init_from="resume", max_iters=done))
    assert not [f for f in os.listdir(cfg.out_dir) if ".tmp" in f]
    assert load_checkpoint(path)["iter_num"] == done


def test_signal_keeps_the_best_checkpoint_and_resumes_where_it_stopped(tiny_cfg):
    """Without always_save_checkpoint, ckpt.pt holds the best model: a signal saves the run's state in
    resume.pt instead, --init_from=resume continues from it, and an improving save retires it."""
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1, max_iters=100, lr_decay_iters=100, eval_interval=25,
                              eval_iters=2, log_interval=1)
    proc = start_training(cfg)
    assert wait_for_line(proc, "step 25:")
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")) and time.monotonic() < deadline:
        os.sched_yield()  # the eval line comes just before its save
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "saved " + os.path.join(cfg.out_dir, "resume.pt") in err
    best = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert best["iter_num"] == 25  # not replaced by the stopped run's weights
    stopped = load_checkpoint(os.path.join(cfg.out_dir, "resume.pt"))
    assert stopped["iter_num"] >= 25 and stopped["best_val_loss"] == best["best_val_loss"]
    resumed = dataclasses.replace(cfg, init_from="resume")
    train(resumed)
    assert not os.path.exists(os.path.join(cfg.out_dir, "resume.pt"))  # ckpt.pt saved since: it is newer
    straight = dataclasses.replace(cfg, out_dir=cfg.out_dir + "-straight")
    train(straight)
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(straight.out_dir, "ckpt.pt"))


def test_torchrun_two_processes_match_one(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, lr_decay_iters=20, eval_interval=10, eval_iters=4,
                              log_interval=1, gradient_accumulation_steps=2)
    one = train(cfg)
    two_cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir + "-ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "train.py"), *cli_args(two_cfg)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "processes: 2" in r.stdout

    def curve(out_dir):
        with open(os.path.join(out_dir, "metrics.csv")) as f:
            return [(int(r["iter"]), float(r["loss"] or r["val_loss"])) for r in csv.DictReader(f)]

    a, b = curve(cfg.out_dir), curve(two_cfg.out_dir)
    assert [i for i, _ in a] == [i for i, _ in b] and len(a) == 23
    # same batches, same global batch: only the order of floating-point sums differs
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    assert abs(float(r.stdout.rsplit("whole val split:", 1)[1].split()[0]) - one["val_full"]) < 1e-4


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def torchrun(cfg, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "train.py"), *cli_args(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
def test_torchrun_sigterm_everywhere_saves_and_resumes_on_fewer_processes(tiny_cfg):
    """A scheduler's SIGTERM reaches torchrun (which forwards it) and every worker too: the run
    still saves once, with each process's own random state, and resumes with 2 processes or 1.
    Rotary positions and eval_iters=1 < 2 processes: one process has no eval batch (no buffer
    broadcast may hang it); a time budget: one clock for all, or the replicas drift apart."""
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1, pos_encoding="rope", eval_iters=1, eval_interval=5,
                              log_interval=1, max_iters=10_000_000, max_seconds=2.5, gradient_accumulation_steps=2)
    proc = torchrun(cfg)
    assert wait_for_line(proc, "step 10:")
    for pid in [proc.pid] + children(proc.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM after iteration" in err, err
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    stopped = load_checkpoint(path)
    assert stopped["iter_num"] >= 10 and len(stopped["rng"]) == 2
    assert not torch.equal(stopped["rng"][0]["torch"], stopped["rng"][1]["torch"])
    one = dataclasses.replace(cfg, out_dir=cfg.out_dir + "-one")
    os.makedirs(one.out_dir)
    shutil.copy(path, one.out_dir)

    proc = torchrun(cfg, "--init_from=resume")  # to the end of the budget, with two processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # includes the check that the replicas ended equal
    assert "whole val split" in out
    train(dataclasses.replace(one, init_from="resume", max_seconds=0, max_iters=stopped["iter_num"] + 5))
    assert load_checkpoint(os.path.join(one.out_dir, "ckpt.pt"))["iter_num"] == stopped["iter_num"] + 5


def test_torchrun_error_on_rank0_stops_every_process(tiny_cfg):
    """Rank 0 alone writes checkpoints: when its save fails (here ckpt.pt is a folder), the other
    process stops with a line of its own, instead of waiting for rank 0 at the next collective (a
    hang under NCCL) or dying there with a traceback (gloo: "connection closed by peer")."""
    os.makedirs(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, eval_interval=10, gradient_accumulation_steps=2)
    proc = torchrun(cfg)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 60
    assert "error: could not write" in err and "the previous checkpoint is untouched" in err, err
    assert "error: stopped because rank 0 failed" in err, err  # the other process's own line
