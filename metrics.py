"""
A run's record: what it prints as it trains, out_dir/config.json (its settings), out_dir/metrics.csv
(a row per log line and per eval), Weights & Biases when wandb_log=True, and out_dir/loss.png.

    python metrics.py --out_dir=out-shakespeare-char-cpu     # draw a finished run's loss.png
"""

import csv
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

from tqdm import tqdm

from configurator import UserError, check, configure, first_line, run_main
from files import write_atomic


def record_config(cfg, out_dir):
    """Write the run's effective settings to out_dir/config.json and print those that differ from
    the defaults, so that a run says what it is before its first checkpoint does."""
    settings = asdict(cfg)
    changed = {f.name: settings[f.name] for f in fields(cfg)
               if settings[f.name] != f.default and f.name not in getattr(cfg, "not_settings", {})}
    print("config: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "the defaults"))
    path = os.path.join(out_dir, "config.json")
    try:
        write_atomic(path, lambda f: f.write(json.dumps(settings, indent=2).encode("utf-8")))
    except OSError as e:
        raise UserError(f"can't write {path}: {e.strerror}") from None


class MetricsLog:
    """Appends a row per log line and per eval to out_dir/metrics.csv, for plotting the run, and
    sends the same numbers to Weights & Biases when wandb_run is given. path=None logs nothing
    (the processes other than rank 0)."""
    COLUMNS = ["iter", "kind", "loss", "train_loss", "val_loss", "lr", "tokens", "elapsed_s", "bpc", "train_bpc",
               "val_bpc"]
    WANDB_NAMES = {"train_loss": "train/loss", "val_loss": "val/loss",  # nanoGPT's names for them
                   "train_bpc": "train/bpc", "val_bpc": "val/bpc"}

    def __init__(self, path, resume_from=None, wandb_run=None, evaluates_again=True):
        self.path, self.wandb_run = path, wandb_run
        if path is None:
            return
        rows = []
        try:
            if resume_from is not None and os.path.exists(path):
                # keep what led up to the checkpoint; its eval row, where the resumed run evaluates again
                # (an iteration on eval_interval), comes again from there
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit() and (
                        int(r["iter"]) < resume_from or (int(r["iter"]) == resume_from and
                                                         (r["kind"] == "log" or not evaluates_again)))]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as e:
            raise UserError(f"can't write {path}: {e.strerror}") from None

    def write(self, **row):
        if self.path is None:
            return
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.COLUMNS).writerow(row)
        except OSError as e:
            raise UserError(f"can't write {self.path}: {e.strerror}") from None
        if self.wandb_run is not None:
            numbers = {self.WANDB_NAMES.get(k, k): float(v) for k, v in row.items() if k != "kind" and v != ""}
            self.wandb_run.log(numbers, step=row["iter"])

    def close(self, failed=False):
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)


def start_wandb(cfg):
    """A Weights & Biases run for cfg, as nanoGPT's wandb_log starts one (wandb is imported only here)."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)") from None
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    except Exception as e:  # not logged in, no network, a bad project name ...
        raise UserError(f"wandb could not start a run ({first_line(e)}); run `wandb login`, or set WANDB_MODE=offline "
                        f"to log locally") from None


class TrainingLog:
    """What a training run shows and records: a progress bar (over iterations, or over the seconds of
    a time budget, so that its ETA is right), the evals, and every log_interval iterations the loss,
    learning rate, ms/iter, tokens/s and MFU (model FLOPs utilisation: the share of the device's
    measured matmul peak the model's arithmetic runs at). Losses also go as bits per character:
    bpc[split] times the loss per token. Only rank 0 (master) prints and writes."""

    def __init__(self, cfg, progress, tokens_per_iter, flops_per_iter, peak_flops, master, wandb_run=None,
                 bpc=None):
        self.cfg, self.tokens_per_iter, self.flops_per_iter, self.peak_flops = \
            cfg, tokens_per_iter, flops_per_iter, peak_flops
        self.bpc = bpc or {"train": 1 / math.log(2), "val": 1 / math.log(2)}  # a token per character
        self.master = master
        self.timed = cfg.max_seconds > 0
        resumed = cfg.init_from == "resume"
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.csv") if master else None,
                                  resume_from=progress.iter_num if resumed else None, wandb_run=wandb_run,
                                  evaluates_again=progress.iter_num % cfg.eval_interval == 0)
        self.bar = tqdm(total=cfg.max_seconds if self.timed else cfg.max_iters,
                        initial=progress.train_seconds if self.timed else progress.iter_num,
                        unit="s" if self.timed else "it", disable=not master, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
                        if self.timed else None,
                        mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
        self.paused_seconds = 0.0  # in evals, saves and samples: not training time
        self.restart_clock()

    def restart_clock(self):
        """Start timing the next log window here."""
        self.window_start, self.window_iters = time.perf_counter(), 0

    @contextmanager
    def paused(self):
        """What runs within this context is not training time: it counts in paused_seconds, not in
        the next log line's ms/iter."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - t0
            self.restart_clock()

    def write(self, text):
        if self.master:
            self.bar.write(text)

    def eval(self, progress, losses):
        bpc = {split: losses[split] * self.bpc[split] for split in ("train", "val")}
        self.write(f"step {progress.iter_num}: train loss {losses['train']:.4f} ({bpc['train']:.4f} bpc), "
                   f"val loss {losses['val']:.4f} ({bpc['val']:.4f} bpc)")
        self.metrics.write(iter=progress.iter_num, kind="eval", train_loss=f"{losses['train']:.6f}",
                           val_loss=f"{losses['val']:.6f}", tokens=progress.iter_num * self.tokens_per_iter,
                           elapsed_s=f"{progress.train_seconds:.3f}", train_bpc=f"{bpc['train']:.6f}",
                           val_bpc=f"{bpc['val']:.6f}")

    def step(self, step_seconds):
        self.window_iters += 1
        self.bar.update(min(step_seconds, self.cfg.max_seconds - self.bar.n) if self.timed else 1)

    def log(self, progress, loss, lr):
        """A log line: loss is the global batch's (a float), the speeds are over the iterations since the last."""
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9) / max(self.window_iters, 1)
        mfu = self.flops_per_iter / seconds / self.peak_flops
        bpc = loss * self.bpc["train"]
        self.bar.set_postfix_str(f"{'iter ' + str(progress.iter_num) + ', ' if self.timed else ''}loss {loss:.4f} "
                                 f"({bpc:.3f} bpc), lr {lr:.2e}, {1000 * seconds:.0f} ms/iter, "
                                 f"{self.tokens_per_iter / seconds:,.0f} tok/s, MFU {mfu:.1%}", refresh=False)
        self.metrics.write(iter=progress.iter_num, kind="log", loss=f"{loss:.6f}", lr=f"{lr:.6e}",
                           tokens=progress.iter_num * self.tokens_per_iter, elapsed_s=f"{progress.train_seconds:.3f}",
                           bpc=f"{bpc:.6f}")
        self.window_start, self.window_iters = now, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.metrics.close(failed=exc[0] is not None)


def plot_metrics(out_dir):
    """Draw out_dir/metrics.csv as out_dir/loss.png: step loss and eval losses against iterations."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed, so no loss.png; pip install matplotlib") from None
    try:
        with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit()]
    except OSError as e:
        raise UserError(f"no loss curves to draw: can't read {os.path.join(out_dir, 'metrics.csv')} "
                        f"({e.strerror}); train a run into that out_dir first") from None
    if not rows:
        raise UserError(f"{os.path.join(out_dir, 'metrics.csv')} holds no rows yet: nothing to draw")
    logs = [r for r in rows if r["kind"] == "log"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([int(r["iter"]) for r in logs], [float(r["loss"]) for r in logs], lw=0.8, alpha=0.5, label="batch loss")
    for split in ("train", "val"):
        ax.plot([int(r["iter"]) for r in evals], [float(r[f"{split}_loss"]) for r in evals], marker="o", label=f"{split} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(out_dir)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"can't write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return path


@dataclass
class PlotConfig:
    out_dir: str = "out"  # the run's folder, holding the metrics.csv that train.py wrote

    def __post_init__(self):
        check(self.out_dir != "", "out_dir", self.out_dir, "a folder name")


def main(argv):
    cfg = configure(PlotConfig, argv)
    print(f"loss curves drawn in {plot_metrics(cfg.out_dir)}")


if __name__ == "__main__":
    run_main(main)
