"""Long runs: exact resume, signals, kill -9 during saves, torchrun."""
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)  # a process group of its own: see kill_all


def kill_all(proc):
    """kill -9 proc and the processes it started (torchrun's workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_line(proc, text, timeout=300):
    """Whether proc printed a line with text; a run that has not after timeout seconds (a long wait
    even for a loaded machine) is killed, so that a run that never prints it cannot hang the suite."""
    watchdog = threading.Timer(timeout, kill_all, [proc])
    watchdog.start()
    try:
        for line in proc.stdout:
            if text in line:
                return True
        return False
    finally:
        watchdog.cancel()


def next_eval(iter_num, eval_interval):
    """The first eval step after iter_num."""
    return (iter_num // eval_interval + 1) * eval_interval


# A run meant to be stopped by a signal never ends by itself (the signal may land late on a busy
# machine, but always before its end); it is then resumed to an end set from where it stopped.
ENDLESS = 10 ** 9


def test_resume_is_bit_identical(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, dropout=0.1, eval_interval=10)
    train(dataclasses.replace(cfg, max_iters=10))
    train(dataclasses.replace(cfg, max_iters=40, init_from="resume"))
    straight = dataclasses.replace(cfg, max_iters=40, out_dir=cfg.out_dir + "-straight")
    train(straight)
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(straight.out_dir, "ckpt.pt"))


def test_interrupted_twice_equals_uninterrupted(tiny_cfg):
    """SIGTERM, then SIGINT on the resumed run, then a resume of that resume to the end."""
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, dropout=0.1, max_iters=ENDLESS,
                              lr_decay_iters=150, eval_interval=25, eval_iters=2)
    stops = []
    for attempt, sig in enumerate([signal.SIGTERM, signal.SIGINT]):
        proc = start_training(cfg, *(["--init_from=resume"] if attempt else []))
        # interrupt mid-run, after some progress: at the first eval past where the last run stopped
        seen = wait_for_line(proc, f"step {next_eval(stops[-1] if stops else 0, 25)}:")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert seen and proc.returncode == 128 + sig, err  # as a process the signal ended: 143, then 130
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped by SIG") and "Traceback" not in err
        assert last.endswith("; to continue, run the same command with --init_from=resume")
        stops.append(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["iter_num"])
    assert 25 <= stops[0] < stops[1]  # each run went on from where the last one stopped
    end = next_eval(stops[-1], 25)
    train(dataclasses.replace(cfg, init_from="resume", max_iters=end))  # the command line's resume was tested above
    straight = dataclasses.replace(cfg, max_iters=end, out_dir=cfg.out_dir + "-straight")
    train(straight)
    assert_same_weights(os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(straight.out_dir, "ckpt.pt"))
    with open(os.path.join(cfg.out_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "log"]
    assert [int(r["iter"]) for r in rows] == list(range(10, end + 1, 10))  # no gaps, no repeats


# `python -c HALTING_SAVES train.py ARGS` runs train.py with each save that would replace a checkpoint
# stopped halfway: half its bytes are in the temporary file, it prints "holding" on stdout, then it
# waits for ever (for the kill -9 to come).
HALTING_SAVES = """
import io, os, runpy, sys, threading
import torch

real_save = torch.save


def save(obj, f, *args, **kwargs):
    if not os.path.exists(f.name.rsplit(".tmp", 1)[0]):  # the first checkpoint: saved whole
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    print("holding", f.name, flush=True)
    threading.Event().wait()


torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def holds_bytes(path):
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def test_kill_9_during_saves_never_leaves_a_broken_checkpoint_or_leftovers(tiny_cfg):
    """kill -9 in the middle of a save, of a run and then of its resumed run: ckpt.pt is still the
    last whole checkpoint, a killed save's half-written temporary file is where the kill left it,
    and the next run in that out_dir removes it. The saves are held halfway (HALTING_SAVES),
    so that the kills land mid-save on any machine, however fast or busy."""
    cfg = dataclasses.replace(tiny_cfg, always_save_checkpoint=True, max_iters=ENDLESS, lr_decay_iters=100,
                              eval_interval=1, eval_iters=1)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    leftovers = []
    for resume in ([], ["--init_from=resume"]):
        proc = subprocess.Popen([sys.executable, "-c", HALTING_SAVES, os.path.join(REPO, "train.py"), *cli_args(cfg),
                                 *resume], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        tmp = os.path.join(cfg.out_dir, f"ckpt.pt.tmp{proc.pid}")
        assert wait_for_line(proc, "holding " + tmp)  # the save is held halfway until the kill
        proc.kill()
        _, err = proc.communicate()
        assert holds_bytes(tmp), f"no save was under way when the run was killed: {err}"
        assert load_checkpoint(path)["iter_num"] == 1  # the first save, whole: each later one was killed
        leftovers.append(os.path.basename(tmp))
        # what a killed run left, the next one removed
        assert [f for f in os.listdir(cfg.out_dir) if f.startswith("ckpt.pt.tmp")] == leftovers[-1:]
    train(dataclasses.replace(cfg, init_from="resume", max_iters=3))
    assert not [f for f in os.listdir(cfg.out_dir) if ".tmp" in f]
    assert load_checkpoint(path)["iter_num"] == 3


def test_signal_keeps_the_best_checkpoint_and_resumes_where_it_stopped(tiny_cfg):
    """Without always_save_checkpoint, ckpt.pt holds the best model: a signal saves the run's state in
    resume.pt instead, --init_from=resume continues from it, and an improving save retires it."""
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1, max_iters=ENDLESS, lr_decay_iters=100, eval_interval=25,
                              eval_iters=2, log_interval=1)
    proc = start_training(cfg)
    assert wait_for_line(proc, "step 25:")  # the eval line comes just before its save: the signal may come first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "saved " + os.path.join(cfg.out_dir, "resume.pt") in err, err
    best = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    stopped = load_checkpoint(os.path.join(cfg.out_dir, "resume.pt"))
    # ckpt.pt is an eval's, not replaced by the stopped run's weights; resume.pt is where the run stopped
    assert best["iter_num"] % 25 == 0 and 25 <= best["iter_num"] <= stopped["iter_num"]
    assert stopped["best_val_loss"] == best["best_val_loss"]
    end = max(next_eval(stopped["iter_num"], 25), 100)
    cfg = dataclasses.replace(cfg, max_iters=end)
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


def test_torchrun_sizes_the_model_once_for_all_processes(tiny_cfg):
    """Every process measures, takes rank 0's times and budget, and so trains the same shape for as long."""
    args = [a for a in cli_args(tiny_cfg) if a.split("=")[0] not in ("--n_layer", "--n_embd", "--n_head",
                                                                       "--learning_rate", "--max_seconds")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "train.py"), *args, "--size_to_budget=True", "--max_seconds=3",
                        "--eval_interval=1000", "--gradient_accumulation_steps=2", "--always_save_checkpoint=True"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("sized for 3 s: ") == 1 and "processes: 2" in r.stdout
    with open(os.path.join(tiny_cfg.out_dir, "config.json")) as f:
        saved = json.load(f)
    checkpoint = load_checkpoint(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    assert 0 < checkpoint["set_aside_seconds"] < 3 and saved["max_seconds"] == 3  # 3 s: room on a busy machine
    shape = [checkpoint["model_args"][k] for k in ("n_layer", "n_embd", "n_head")]
    assert shape == [saved[k] for k in ("n_layer", "n_embd", "n_head")] and f"sized for 3 s: {shape[0]} x {shape[1]}" \
        in r.stdout  # the shape the line names is the one trained and recorded


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def torchrun(cfg, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "train.py"), *cli_args(cfg), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
def test_torchrun_sigterm_everywhere_saves_and_resumes_on_fewer_processes(tiny_cfg):
    """A scheduler's SIGTERM reaches torchrun (which forwards it) and every worker too: the run
    still saves once, with each process's own random state, and resumes with 2 processes or 1.
    Rotary positions and eval_iters=1 < 2 processes: one process has no eval batch (no buffer
    broadcast may hang it); a time budget: one clock for all, or the replicas drift apart. The
    budget is far longer than the run lasts until its signal, however busy the machine; the resumed
    run is given a second more than the stopped one had used, and must end there together."""
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1, pos_encoding="rope", eval_iters=1, eval_interval=5,
                              log_interval=1, max_iters=ENDLESS, max_seconds=600.0, gradient_accumulation_steps=2,
                              always_save_checkpoint=True)  # the stopped state and the end, in ckpt.pt
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

    budget = stopped["train_seconds"] + 1.0
    proc = torchrun(cfg, "--init_from=resume", f"--max_seconds={budget}")  # to the end of a budget, with two processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # includes the check that the replicas ended equal
    assert "whole val split" in out
    ended = load_checkpoint(path)
    assert ended["iter_num"] > stopped["iter_num"] and ended["train_seconds"] >= budget  # it used the budget
    train(dataclasses.replace(one, init_from="resume", max_seconds=0, max_iters=stopped["iter_num"] + 5))
    assert load_checkpoint(os.path.join(one.out_dir, "ckpt.pt"))["iter_num"] == stopped["iter_num"] + 5


def test_torchrun_error_on_rank0_stops_every_process(tiny_cfg):
    """Rank 0 alone writes checkpoints: when its save fails (here ckpt.pt is a folder), the other
    process stops with a line of its own, instead of waiting for rank 0 at the next collective (a
    hang under NCCL) or dying there with a traceback (gloo: "connection closed by peer")."""
    os.makedirs(os.path.join(tiny_cfg.out_dir, "ckpt.pt"))
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, eval_interval=10, gradient_accumulation_steps=2)
    proc = torchrun(cfg)
    try:
        _, err = proc.communicate(timeout=300)  # far more than it takes, even on a busy machine
    except subprocess.TimeoutExpired:
        kill_all(proc)
        pytest.fail(f"a process waited for rank 0 after its failed save: {proc.communicate()[1]}")
    assert proc.returncode != 0
    assert "error: could not write" in err and "the previous checkpoint is untouched" in err, err
    assert "error: stopped because rank 0 failed" in err, err  # the other process's own line
