"""The budget-to-shape rule (sizing.py) and train.py's use of it: what it chooses, what it measures,
what it keeps of the user's settings, and what a run records of its choice."""

import csv
import json
import math
import os
from dataclasses import replace

import pytest

import sizing
from configurator import ConfigError, configure
from checkpoint import load_checkpoint
from helpers import REPO, VERSE, run_in_process, use_fake_clock
from prepare_shakespeare import prepare
from tokenizer import load_tokenizer
from sizing import (DROPOUT, MEASURE_SHARE, SHAPES, best_iters, best_tokens_m, candidates, choose, derived_settings, fit_loss,
                    model_params_m, predicted_loss, read_runs, shapes_for_budgets, sized_for_budget, tokens_per_iter)
from dataset import load_dataset, longest_block, split_file
from train import TrainConfig, step_timer, train

CPU_RECIPE = os.path.join(REPO, "config", "train_shakespeare_char_cpu.py")


def recipe(*overrides):
    return configure(TrainConfig, [CPU_RECIPE, *overrides])


def machine(flops_per_second, overhead=0.0, measured=None, clock=None):
    """A stub measurement: the seconds an iteration of each candidate takes on a machine that runs
    flops_per_second, after a fixed overhead a step (a GPU's kernel launches); records what it measured
    (layers, width, dropout, context). As train.step_timer, it times three steps, stops (inf) where the
    next would end past time_left, and adds the seconds its steps took to clock[0]."""
    def seconds_per_iter(candidate, time_left=math.inf):
        if measured is not None:
            measured.append((candidate.n_layer, candidate.n_embd, candidate.dropout, candidate.block_size))
        tokens = candidate.batch_size * candidate.block_size
        dropout_cost = 1.05 if candidate.dropout else 1.0  # dropout's masks: a little more work a step
        # 6 FLOPs a parameter a token, and attention's over the context (model.flops_per_token)
        flops_per_token = 6 * model_params_m(candidate) * 1e6 + 12 * candidate.n_layer * candidate.n_embd * \
            candidate.block_size
        seconds = overhead + dropout_cost * flops_per_token * tokens / flops_per_second
        steps = next((n for n in (1, 2) if (n + 1) * seconds > time_left), 3)
        if clock is not None:
            clock[0] += steps * seconds
        return seconds if steps == 3 else math.inf
    return seconds_per_iter


@pytest.mark.parametrize("dropout", [0.0, DROPOUT])
def test_the_prediction_never_rises_with_tokens_and_a_bigger_model_learns_more_from_few(dropout):
    for params_m in (0.2, 0.5, 1.0, 5.0):
        losses = [predicted_loss(params_m, t, dropout) for t in (0.5, 1, 2, 4, 8, 16, 64)]
        assert losses == sorted(losses, reverse=True)  # past its best tokens a model stays at its best
    few = [predicted_loss(p, 1.0, dropout) for p in (0.2, 0.5, 1.0, 2.7)]
    assert few == sorted(few, reverse=True)
    best = [best_tokens_m(p, dropout) for p in (0.2, 1.0, 5.0)]
    assert best == sorted(best, reverse=True)  # bigger models memorise sooner


def test_dropout_is_predicted_to_pay_only_where_a_model_would_memorise():
    """A model with dropout learns less from a few tokens and memorises later; for all but the smallest
    models its best is lower."""
    for params_m in (0.2, 0.5, 1.2, 2.7, 6.4):
        assert predicted_loss(params_m, 1.0, DROPOUT) > predicted_loss(params_m, 1.0)
        assert best_tokens_m(params_m, DROPOUT) > best_tokens_m(params_m)
        best_with, best_without = predicted_loss(params_m, 1e3, DROPOUT), predicted_loss(params_m, 1e3)
        assert (best_with < best_without) == (params_m > 0.5)


def test_a_longer_text_is_learnt_by_heart_later_and_the_fit_text_keeps_the_fit():
    """The memorising term follows the passes over the train split, and grows faster than them as the text
    shortens: on the fit's own text the fit is as fitted; on a longer text each model's best comes later
    and dropout pays less; a BPE of the same text, fewer tokens over the same characters, only the passes."""
    fit = sizing.FIT_TEXT
    texts = [sizing.Text(m, m) for m in (fit.chars_m / 4, fit.chars_m, fit.chars_m * 4, 90.0)]  # .. enwik8
    for params_m, dropout, block_size in ((0.8, 0.0, 128), (2.7, DROPOUT, 256)):
        e, a, b, c = sizing.fitted_terms(dropout, block_size, fit)
        assert c == (sizing.C if dropout == 0 else sizing.C_DROPOUT)
        bests = [best_tokens_m(params_m, dropout, block_size, t) for t in texts]
        assert bests == sorted(bests) and bests[1] == best_tokens_m(params_m, dropout, block_size)
        # a quarter of the text is learnt by heart 4^TEXT_EXPONENT times as fast; the BPE: as fast a pass
        memorising = lambda d, t: predicted_loss(params_m, d, dropout, block_size, t) - e - a / params_m ** sizing.ALPHA \
            - b / d ** sizing.BETA
        assert memorising(0.1, texts[0]) == pytest.approx(4 ** sizing.TEXT_EXPONENT * memorising(0.1, fit), rel=1e-3)
        bpe = sizing.Text(fit.tokens_m / 2.5, fit.chars_m)
        assert memorising(0.1, bpe) == pytest.approx(2.5 * memorising(0.1, fit), rel=1e-3)
        losses = [predicted_loss(params_m, 20.0, dropout, block_size, t) for t in texts]
        assert losses == sorted(losses, reverse=True)
    # an hour on a fast machine: Tiny Shakespeare's run takes dropout and stops at its best; enwik8's does neither
    long_budget, enwik8 = recipe("--max_seconds=3600"), texts[-1]
    on_fit_text, _, _ = sized_for_budget(long_budget, machine(3e11), clock=lambda: 0.0)
    on_enwik8, line, _ = sized_for_budget(long_budget, machine(3e11), clock=lambda: 0.0, text=enwik8)
    assert on_fit_text.dropout == DROPOUT and on_enwik8.dropout == 0.0
    assert on_fit_text.max_iters < 3600 / machine(3e11)(on_fit_text)
    assert on_enwik8.max_iters > 3600 / machine(3e11)(on_enwik8)
    assert model_params_m(on_enwik8) >= model_params_m(on_fit_text)
    assert "predicted val loss" not in line and \
        "(the fit is to Tiny Shakespeare in characters, its learning by heart scaled to this text's 90,000,000 train " \
        "tokens: no val loss predicted)" in line


def test_the_fit_is_the_one_of_the_logged_runs():
    """The constants in sizing.py are what `python sizing.py docs/sizing_runs.csv` fits."""
    *constants, rms = fit_loss(read_runs(os.path.join(REPO, "docs", "sizing_runs.csv")))
    assert constants == pytest.approx([sizing.E, sizing.A, sizing.ALPHA, sizing.B, sizing.BETA, sizing.C,
                                       sizing.A_DROPOUT, sizing.B_DROPOUT, sizing.C_DROPOUT, sizing.CONTEXT_GAIN,
                                       sizing.B_CONTEXT],
                                      abs=1e-6)
    assert rms < 0.006  # about what two seeds of one run differ by
    with pytest.raises(ValueError, match=r"dropout 0 or 0.1, not \[0.2\]"):
        fit_loss([(1.0, 1.0, 0.0, 128, 1.5), (1.0, 1.0, 0.2, 128, 1.5)])


def test_heads_and_learning_rate_follow_the_width_unless_given():
    cfg = recipe()
    assert cfg.size_to_budget and "n_embd" not in cfg.given_settings
    shapes = [(c.n_embd, c.n_head, c.learning_rate, c.dropout, c.block_size, c.batch_size) for c in candidates(cfg)]
    assert shapes[:6] == [(64, 2, 1e-2, 0.0, 128, 16), (64, 2, 1e-2, 0.0, 256, 8), (64, 2, 1e-2, DROPOUT, 128, 16),
                          (64, 2, 1e-2, DROPOUT, 256, 8), (96, 3, 1e-2, 0.0, 128, 16), (96, 3, 1e-2, 0.0, 256, 8)]
    assert shapes[-1] == (384, 12, 2.5e-3, DROPOUT, 256, 8)
    assert {c.dropout for c in candidates(recipe("--dropout=0.2"))} == {0.2}
    assert {(c.n_head, c.learning_rate) for c in candidates(recipe("--n_head=2", "--learning_rate=3e-3"))} == {(2, 3e-3)}
    assert derived_settings(128, 256, "muon", ("n_head",)) == {"learning_rate": 7.5e-3, "batch_size": 8}
    assert derived_settings(96, 64, "adamw", ()) == {"n_head": 3, "learning_rate": 2e-3, "batch_size": 32}  # AdamW's
    assert derived_settings(100, 128, "muon", ())["n_head"] == 2  # 50 channels: the nearest count that divides evenly
    # accumulated micro-batches (under torchrun, one a process at least) share the step's tokens
    assert derived_settings(128, 128, "muon", (), accumulation_steps=2)["batch_size"] == 8
    assert {tokens_per_iter(c) for c in candidates(recipe("--gradient_accumulation_steps=4"))} == {2048}
    # settings given to a config built in code are kept as they are: nothing is derived behind them
    assert (replace(cfg, n_layer=6, n_embd=384, n_head=6).n_head, replace(cfg, learning_rate=1e-3).learning_rate) \
        == (6, 1e-3)


def test_bad_settings_for_sizing_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"n_head=5 does not split any width sizing.py tries \(64, 96, 128, 192"):
        recipe("--n_head=5")
    with pytest.raises(ConfigError, match="n_head=3 does not split n_embd=100 into heads of an even size"):
        recipe("--n_embd=100", "--n_head=3")
    with pytest.raises(ConfigError, match=r"n_embd=81 does not split into heads of an even size \(rotary positions "
                                          r"need one\); give an even --n_embd"):
        recipe("--n_embd=81")
    with pytest.raises(ConfigError, match=r"min_lr must be between 0 and learning_rate \(0.0025, the lowest sizing"):
        recipe("--min_lr=3e-3")
    with pytest.raises(ConfigError, match="dropout must be in"):
        recipe("--dropout=2.0")
    with pytest.raises(ConfigError, match="block_size must be positive, got 0"):  # before the batch divides by it
        recipe("--block_size=0", "--batch_size=4")


def test_the_choice_grows_with_the_budget_and_the_machine_speed():
    rates = (5e9, 2e10, 8e10, 3e11)  # a slow laptop core to a fast desktop
    budgets = (30, 100, 300, 600, 1800, 3600)
    chosen = {(r, b): model_params_m(choose(recipe(f"--max_seconds={b}"), machine(r), b)[0].cfg)
              for r in rates for b in budgets}
    for r in rates:
        sizes = [chosen[r, b] for b in budgets]
        assert sizes == sorted(sizes)
    for b in budgets:
        sizes = [chosen[r, b] for r in rates]
        assert sizes == sorted(sizes)
    assert chosen[rates[0], 30] < chosen[rates[-1], 3600]  # the range is used, not one shape for all


def test_only_candidates_that_could_win_are_measured_and_the_choice_is_the_best():
    for flops, budget in ((2e10, 100), (8e10, 3600)):
        cfg, measured = recipe(f"--max_seconds={budget}"), []
        best, timed = choose(cfg, machine(flops, measured=measured), budget)
        every = candidates(cfg)
        assert len(measured) < len(every)  # those that could not have won were not run: the big ones, and
        assert budget > 100 or {d for _, _, d, _ in measured} == {0.0}  # at 100 s, every one with dropout
        tokens = [budget / machine(flops)(c) * 2048 / 1e6 for c in every]
        losses = [predicted_loss(model_params_m(c), t, c.dropout, c.block_size) for c, t in zip(every, tokens)]
        assert best.cfg == every[losses.index(min(losses))]
        assert [(c.cfg.n_layer, c.cfg.n_embd, c.cfg.dropout, c.cfg.block_size) for c in timed] == measured
        assert best.cfg.dropout == (DROPOUT if budget == 3600 else 0.0)  # dropout for the long budget only


def test_a_gpu_gets_the_model_with_the_lowest_floor_and_stops_when_it_is_reached():
    """A GPU runs small models at the cost of launching their kernels: every candidate steps in about
    the same time, so each could see many times the text in 5 minutes. The rule picks the model whose
    best is lowest and ends the run where it is reached, rather than let it learn the text by heart."""
    cfg = recipe("--max_seconds=300", "--device=cuda")
    chosen, line, _ = sized_for_budget(cfg, machine(2e13, overhead=0.005), clock=lambda: 0.0)
    floors = {(c.n_layer, c.n_embd, c.dropout, c.block_size): predicted_loss(model_params_m(c), 1e9, c.dropout,
                                                                             c.block_size) for c in candidates(cfg)}
    assert (chosen.n_layer, chosen.n_embd, chosen.dropout, chosen.block_size) == min(floors, key=floors.get)
    stop = int(best_tokens_m(model_params_m(chosen), chosen.dropout, chosen.block_size) * 1e6 / tokens_per_iter(chosen))
    assert chosen.max_iters == stop < 300 / 0.005 / 2  # an iteration count, under half what the budget affords
    assert f"{stop:,} iterations (about " in line and "more would only learn the text by heart" in line
    cpu, _ = choose(recipe("--max_seconds=300"), machine(2e10), 300)
    assert model_params_m(cpu.cfg) <= model_params_m(chosen)


def test_given_shape_settings_win_and_the_rule_chooses_the_rest():
    deep = choose(recipe("--n_layer=6"), machine(2e10), 300)[1]
    assert {c.cfg.n_layer for c in deep} == {6} and len({c.cfg.n_embd for c in deep}) > 1
    wide = [c for c in candidates(recipe("--n_embd=128"))]
    assert {c.n_embd for c in wide} == {128} and [(c.n_layer, c.dropout) for c in wide[::2]] == [
        (4, 0.0), (4, DROPOUT), (6, 0.0), (6, DROPOUT), (8, 0.0), (8, DROPOUT)]
    assert {(c.block_size, c.batch_size) for c in candidates(recipe("--block_size=64"))} == {(64, 32)}
    assert {(c.block_size, c.batch_size) for c in candidates(recipe("--batch_size=4"))} == {(128, 4), (256, 4)}
    assert {c.learning_rate for c in candidates(recipe("--learning_rate=3e-3"))} == {3e-3}
    assert {c.n_embd % 3 for c in candidates(recipe("--n_head=3", "--n_embd=96"))} == {0}
    fixed = candidates(recipe("--n_layer=3", "--n_embd=80", "--n_head=5", "--dropout=0.2", "--block_size=256"))
    assert [(c.n_layer, c.n_embd, c.n_head, c.dropout, c.block_size) for c in fixed] == [(3, 80, 5, 0.2, 256)]


def test_a_budget_is_needed():
    with pytest.raises(ConfigError, match="max_seconds must be > 0 with size_to_budget"):
        recipe("--max_seconds=0")


def test_settings_that_leave_one_shape_are_not_measured_and_the_line_gives_its_stop():
    for dropout, shape in ((0.0, "3 x 80"), (DROPOUT, "3 x 80 dropout 0.1")):
        cfg = recipe("--n_layer=3", "--n_embd=80", "--n_head=5", f"--dropout={dropout}", "--block_size=128")
        only = replace(cfg, learning_rate=1e-2, batch_size=16)  # the rate and batch that follow, not given
        stop = best_iters(only)
        assert sized_for_budget(cfg, lambda c, time_left: pytest.fail("measured")) == (
            replace(only, max_iters=stop), f"sized for 100 s: {shape} as given; it stops at {stop:,} iterations if "
                                           f"the budget lasts that long: more would only learn the text by heart", 0.0)
    with_dropout = recipe("--n_layer=3", "--n_embd=80", "--n_head=5", "--dropout=0.2", "--block_size=256")
    assert sized_for_budget(with_dropout, pytest.fail) == (  # a dropout not in the fit: no stop
        replace(with_dropout, learning_rate=1e-2, batch_size=8), None, 0.0)
    # a given shape without a given dropout leaves two candidates: the rule measures both
    measured = []
    chosen, _, _ = sized_for_budget(recipe("--n_layer=6", "--n_embd=192", "--max_seconds=3600", "--block_size=128"),
                                    machine(8e10, measured=measured), clock=lambda: 0.0)
    assert measured == [(6, 192, 0.0, 128), (6, 192, DROPOUT, 128)] and chosen.dropout == DROPOUT


def test_the_measurement_stops_at_its_share_of_the_budget_and_refuses_a_budget_shorter_than_a_step():
    measured = []
    best, _ = choose(recipe(), machine(2e10, measured=measured), 100, time_left=lambda: 0.0)
    assert measured == [(*SHAPES[0], 0.0, 128)] and (best.cfg.n_layer, best.cfg.n_embd) == SHAPES[0]
    # 30 s on a slow machine: the smallest candidate's steps take 1.0 s of the share's 1.5, and no other's
    # would fit in what is left: only it is measured, though another could have won
    clock, measured = [0.0], []
    cfg, line, spent = sized_for_budget(recipe("--max_seconds=30"), machine(1e10, measured=measured, clock=clock),
                                        clock=lambda: clock[0])
    assert measured == [(4, 64, 0.0, 128)] and (cfg.n_layer, cfg.n_embd) == (4, 64)
    assert 0.5 * MEASURE_SHARE * 30 < spent <= MEASURE_SHARE * 30 and f"in {spent:.1f} s of the budget" in line
    clock, unbounded = [0.0], []
    best, _ = choose(recipe("--max_seconds=30"), machine(1e10, measured=unbounded, clock=clock), 30)
    assert len(unbounded) > 1 and clock[0] > 2 * MEASURE_SHARE * 30  # timed in full, they would overrun
    with pytest.raises(ConfigError, match=r"max_seconds=0.01 is shorter than one step of the smallest model \(4 x 64"):
        choose(recipe(), machine(1e9), 0.01)


def test_bench_chooses_as_train_does_the_share_of_each_budget_used_up_alike():
    """bench.py measures each candidate once for all its budgets and replays, for each, the measurement
    train.py would make (shapes_for_budgets): where the share stops the slow candidates, bench does too."""
    def chosen(c):
        return tuple(getattr(c, k) for k in sizing.CHOSEN)

    share_decided = False
    # a CPU, and a GPU whose steps all cost about the same: at a few seconds, the share measures only some
    for flops, overhead, budgets in ((3e9, 0.0, (300,)), (2e13, 0.02, (3, 30))):
        choices = shapes_for_budgets(recipe(), machine(flops, overhead), budgets)
        for budget, choice in choices.items():
            clock = [0.0]
            cfg, _, _ = sized_for_budget(recipe(f"--max_seconds={budget}"), machine(flops, overhead, clock=clock),
                                         clock=lambda: clock[0])
            assert chosen(choice.cfg) == chosen(cfg)
            unlimited = choose(recipe(f"--max_seconds={budget}"), machine(flops, overhead), budget)[0]
            share_decided = share_decided or chosen(unlimited.cfg) != chosen(cfg)
    assert share_decided  # somewhere the share kept the best of all from being measured, as in train.py


def test_the_step_timer_stops_where_its_next_step_would_end_past_the_time_left(tiny_cfg, monkeypatch):
    import train as train_module
    use_fake_clock(monkeypatch, tick=1 / 64)  # a step lasts one tick
    steps, train_step = [], train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *args: steps.append(1) or train_step(*args))
    timer = step_timer(split_file(tiny_cfg, "train"), load_dataset(tiny_cfg).vocab_size, "cpu", "float32")
    assert timer(tiny_cfg) == 1 / 64 and len(steps) == 3  # a warm-up step and two timed
    steps.clear()
    assert timer(tiny_cfg, time_left=3 / 64) == 1 / 64 and len(steps) == 3
    steps.clear()
    assert timer(tiny_cfg, time_left=2.5 / 64) == math.inf and len(steps) == 2  # a third would end at 3 ticks


def test_a_budget_the_measurement_uses_up_is_refused():
    readings = iter([0.0])  # the measurement takes 200 s of a 100 s budget (a machine far busier than it was)
    with pytest.raises(ConfigError, match=r"max_seconds=100 is used up by measuring the model's speed \(200.0 s; a "
                                          r"step of 4 x 64 takes .* s\); give a longer budget"):
        sized_for_budget(recipe(), machine(2e10), clock=lambda: next(readings, 200.0))


def test_the_measurement_comes_out_of_the_budget():
    readings = iter([10.0])  # the clock reads 10.0 before measuring, 12.5 at every reading after
    cfg, line, spent = sized_for_budget(recipe(), machine(2e10), clock=lambda: next(readings, 12.5))
    assert spent == 2.5 and cfg.max_seconds == 100  # the run's Progress takes the 2.5 s off (train.py)
    assert line.startswith("sized for 100 s: ") and "in 2.5 s of the budget" in line
    assert f"{cfg.n_layer} x {cfg.n_embd}" in line.split(";")[0]


@pytest.fixture
def two_small_shapes(monkeypatch):
    """Two small candidates at one context, measured for real, and all the time they take: a run on the fake clock
    has a budget of a second or less, where the measurement's usual share would not cover two."""
    monkeypatch.setattr(sizing, "SHAPES", ((1, 32), (2, 64)))
    monkeypatch.setattr(sizing, "CONTEXTS", (128,))
    monkeypatch.setattr(sizing, "MEASURE_SHARE", 1.0)
    monkeypatch.setattr(sizing, "TEXT_EXPONENT", 1.0)  # the passes alone: at 2.5 the tiny text is learnt at once


def sized_run(tiny_data, out_dir, *overrides):
    """The CPU recipe on the tiny dataset, with dropout given (0, unless overridden): the rule sizes the shape."""
    return recipe(f"--data_dir={tiny_data}", "--dataset=tiny", "--eval_iters=1", "--eval_interval=10",
                  f"--out_dir={out_dir}", "--dropout=0.0", *overrides)


def test_train_sizes_the_model_records_the_choice_and_resumes_it(tiny_data, tmp_path, monkeypatch, capsys, two_small_shapes):
    use_fake_clock(monkeypatch, tick=1 / 64)  # every reading of the clock 1/64 s after the last
    cfg = sized_run(tiny_data, tmp_path / "out", "--max_seconds=0.5")
    train(cfg)
    out = capsys.readouterr().out
    # the rule reads the clock, both candidates take 3 steps of 2 readings with one more between them (is
    # the time up?), and the rule reads it again: 14 ticks
    assert "sized for 0.5 s: 2 x 64 (" in out and "measured ms/iter: 1 x 32 16, 2 x 64 16, in 0.2 s" in out
    # sized for this text's length, not the fit's (Tiny Shakespeare's): no loss is predicted for it
    assert f"scaled to this text's {len(split_file(cfg, 'train')):,} train tokens: no val loss predicted" in out
    assert "other programs are busy" not in out  # the fake machine is idle
    with open(tmp_path / "out" / "config.json") as f:
        saved = json.load(f)
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"], saved["learning_rate"]) == (2, 64, 2, 1e-2)
    assert saved["max_seconds"] == 0.5 and "n_layer" not in saved["given_settings"]
    assert "trained 18 iterations in 0.3 s" in out  # (0.5 - 14/64) s of 1/64 s steps
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["set_aside_seconds"] == 14 / 64
    # the same command resumes the same model, without measuring again, to a longer budget
    train(replace(cfg, init_from="resume", max_seconds=1.0))
    out = capsys.readouterr().out
    assert "sized for" not in out and "trained 50 iterations in 0.8 s" in out  # (1.0 - 14/64) s
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["n_layer"] == 2
    with open(tmp_path / "out" / "metrics.csv") as f:
        evals = [int(r["iter"]) for r in csv.DictReader(f) if r["kind"] == "eval"]
    assert evals == [0, 10, 18, 20, 30, 40, 50]  # the first run's last eval (18) is kept by the resume
    # resumed again with the same budget: nothing is left to train, and nothing is touched
    files = {name: (tmp_path / "out" / name).read_bytes() for name in ("config.json", "metrics.csv", "ckpt.pt")}
    with pytest.raises(ConfigError, match=r"out/ckpt.pt is a finished run: it has trained 0.8 s of max_seconds=1; "
                                          r"give a larger --max_seconds to go on; python sample.py --out_dir=.*out samples it"):
        train(replace(cfg, init_from="resume", max_seconds=1.0))
    assert files == {name: (tmp_path / "out" / name).read_bytes() for name in files}


def test_a_chosen_context_is_recorded_resumed_evaluated_and_kept_by_fine_tuning(tiny_data, tmp_path, monkeypatch,
                                                                                 capsys, two_small_shapes):
    """Where the fit favours the longer context (made to here), the run trains at it, with the batch
    that keeps 2,048 tokens a step, and records both; resuming, evaluating and fine-tuning keep them."""
    monkeypatch.setattr(sizing, "CONTEXTS", (16, 32))
    monkeypatch.setattr(sizing, "CONTEXT_GAIN", 0.05)
    monkeypatch.setattr(sizing, "B_CONTEXT", 0.0)
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = sized_run(tiny_data, tmp_path / "out", "--max_seconds=1", "--always_save_checkpoint=True")
    train(replace(cfg, max_iters=5))  # stopped at 5, as by Ctrl-C
    out = capsys.readouterr().out
    assert "sized for 1 s: 2 x 64 context 32 (" in out
    assert "measured ms/iter: 1 x 32 16, 1 x 32 context 32 16, 2 x 64 16, 2 x 64 context 32 16, in" in out
    saved = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert saved["model_args"]["block_size"] == 32 and (saved["config"]["block_size"], saved["config"]["batch_size"]) \
        == (32, 64)
    train(replace(cfg, init_from="resume"))
    assert "sized for" not in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["config"]["block_size"] == 32
    own = train(replace(cfg, eval_only=True))  # the recipe gives no context: the model's own
    assert own == train(sized_run(tiny_data, tmp_path / "out", "--eval_only=True", "--block_size=32"))
    train(replace(cfg, init_from=str(tmp_path / "out"), out_dir=str(tmp_path / "tuned")))
    with open(tmp_path / "tuned" / "config.json") as f:
        assert {k: v for k, v in json.load(f).items() if k in ("block_size", "batch_size")} == \
            {"block_size": 32, "batch_size": 64}
    # a text too short for the model's context: fine-tuning crops the context to what the text holds;
    # evaluating the model on it, which reads it at its own context, is refused in one line
    prepare(VERSE, str(tiny_data / "short"), tok=load_tokenizer(str(tiny_data / "tiny" / "meta.pkl")))
    short = replace(cfg, dataset="short")
    holds = longest_block(short)
    assert holds < 32
    train(replace(short, init_from=str(tmp_path / "out"), out_dir=str(tmp_path / "short-tuned"), max_iters=2))
    with open(tmp_path / "short-tuned" / "config.json") as f:
        assert {k: v for k, v in json.load(f).items() if k in ("block_size", "batch_size")} == \
            {"block_size": holds, "batch_size": 2048 // holds}
    assert load_checkpoint(str(tmp_path / "short-tuned" / "ckpt.pt"))["model_args"]["block_size"] == holds
    with pytest.raises(ConfigError, match=r"block_size=32 is not smaller than .*short.val.bin \(\d+ tokens\); it is "
                                          r"the checkpoint's context: evaluate it on a longer text"):
        train(replace(short, eval_only=True))


def test_the_contexts_tried_are_those_the_text_holds_and_given_ones_win():
    cfg = recipe()
    assert {c.block_size for c in candidates(cfg, longest_context=200)} == {128}
    assert {(c.block_size, c.batch_size) for c in candidates(cfg, longest_context=100)} == {(100, 20)}
    assert {c.block_size for c in candidates(recipe("--block_size=512"), longest_context=200)} == {512}  # refused later


def test_the_longer_context_is_predicted_to_pay_only_for_longer_runs():
    """A longer context lowers the loss a model can reach, but a model learns to use it only with
    training: from a few tokens, it learns less."""
    for params_m, dropout in ((0.5, 0.0), (1.2, 0.0), (2.7, DROPOUT)):
        assert predicted_loss(params_m, 1.0, dropout, 256) > predicted_loss(params_m, 1.0, dropout, 128)
        assert predicted_loss(params_m, 10.0, dropout, 256) < predicted_loss(params_m, 10.0, dropout, 128)
        assert predicted_loss(params_m, 1e3, dropout, 256) < predicted_loss(params_m, 1e3, dropout, 128)
    assert predicted_loss(1.2, 10.0, 0.0, 512) == predicted_loss(1.2, 10.0, 0.0, 256)  # the nearest the fit knows


def test_a_busy_cpu_is_said_once_before_the_choice(tiny_data, tmp_path, monkeypatch, capsys, two_small_shapes):
    clock = use_fake_clock(monkeypatch, tick=1 / 64)
    clock.cpu_share = 0.5  # other programs had half of the time
    train(sized_run(tiny_data, tmp_path / "out", "--max_seconds=0.5"))
    out = capsys.readouterr().out
    assert out.count("note: other programs are busy on this CPU") == 1  # two candidates measured, said once
    assert out.index("other programs are busy") < out.index("sized for 0.5 s")


def test_a_chosen_dropout_is_recorded_resumed_and_kept_by_fine_tuning(tiny_data, tmp_path, monkeypatch, capsys,
                                                                       two_small_shapes):
    """Where the fit favours dropout (made to here, at every budget), the run trains with it, records it,
    and a resumed run, or one fine-tuned from its weights, keeps it without measuring again."""
    monkeypatch.setattr(sizing, "fitted_terms",
                        lambda dropout, *context_and_text: (sizing.E, sizing.A, sizing.B / (1 + bool(dropout)), sizing.C))
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = recipe(f"--data_dir={tiny_data}", "--dataset=tiny", "--eval_iters=1", "--eval_interval=10",
                 f"--out_dir={tmp_path / 'out'}", "--max_seconds=1", "--always_save_checkpoint=True")
    assert "dropout" not in cfg.given_settings
    train(replace(cfg, max_iters=5))  # stopped at 5, as by Ctrl-C
    out = capsys.readouterr().out
    assert "sized for 1 s: 2 x 64 dropout 0.1 (" in out
    # 2 x 64 without dropout could not beat 1 x 32 with it: not measured
    assert "measured ms/iter: 1 x 32 16, 1 x 32 dropout 0.1 16, 2 x 64 dropout 0.1 16, in 0.3 s" in out
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["model_args"]["dropout"] == DROPOUT
    train(replace(cfg, init_from="resume"))
    assert "sized for" not in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["config"]["dropout"] == DROPOUT
    train(replace(cfg, init_from=str(tmp_path / "out"), out_dir=str(tmp_path / "tuned")))
    with open(tmp_path / "tuned" / "config.json") as f:
        assert json.load(f)["dropout"] == DROPOUT


def test_a_stopped_sized_run_resumes_to_the_budget_it_was_sized_for(tiny_data, tmp_path, monkeypatch, capsys,
                                                                    two_small_shapes):
    """The measurement's seconds stay out of the budget after a resume: the run ends where an
    uninterrupted one does, not 14 ticks later."""
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = sized_run(tiny_data, tmp_path / "out", "--max_seconds=0.5", "--always_save_checkpoint=True")
    train(replace(cfg, max_iters=10))  # stopped early, as by Ctrl-C
    train(replace(cfg, init_from="resume"))
    assert "trained 18 iterations in 0.3 s" in capsys.readouterr().out


def test_a_sized_run_ends_at_its_best_iterations_its_schedule_complete_and_resumes_to_them(
        tiny_data, tmp_path, monkeypatch, capsys, two_small_shapes):
    """Where the budget affords more steps than the model's best (the fit's, made 12 here), the run
    ends on that iteration count with its learning rate at the end of its cosine, and an interrupted run
    resumed with a larger budget ends there too."""
    monkeypatch.setattr(sizing, "best_tokens_m", lambda params_m, *terms: 12.5 * 2048 / 1e6)
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = sized_run(tiny_data, tmp_path / "out", "--max_seconds=1", "--log_interval=1")
    train(cfg)
    out = capsys.readouterr().out
    assert "sized for 1 s: " in out and "12 iterations (about 0 s): more would only learn the text by heart" in out
    assert "trained 12 iterations in 0.2 s" in out  # of the 50 the budget had left
    with open(tmp_path / "out" / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r["kind"] == "log"]
    assert len(lrs) == 12 and lrs[-1] < cfg.min_lr + 0.05 * (1e-2 - cfg.min_lr)  # the step at 11/12 of the cosine
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["max_iters"] == 12
    # with a dropout the fit knows nothing of, the budget ends the run
    with_dropout, _, _ = sized_for_budget(replace(cfg, dropout=0.2), lambda c, time_left: 1 / 64, clock=lambda: 0.0)
    assert with_dropout.max_iters == cfg.max_iters
    interrupted = sized_run(tiny_data, tmp_path / "again", "--max_seconds=1", "--always_save_checkpoint=True")
    train(replace(interrupted, max_iters=5))  # stopped at 5, as by Ctrl-C
    assert load_checkpoint(str(tmp_path / "again" / "ckpt.pt"))["iter_num"] == 5
    capsys.readouterr()
    train(replace(interrupted, init_from="resume", max_seconds=2))
    assert "trained 12 iterations" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="is a finished run: it has trained the 12 iterations sizing.py stops it at"):
        train(replace(interrupted, init_from="resume", max_seconds=2))


def test_a_sized_run_trains_as_the_same_shape_given_by_hand(tiny_data, tmp_path, monkeypatch, capsys,
                                                            two_small_shapes):
    """Measuring draws random numbers and runs steps: none of that reaches the run it sizes."""
    use_fake_clock(monkeypatch, tick=1 / 64)
    sized = train(sized_run(tiny_data, tmp_path / "a", "--max_seconds=0.5"))
    use_fake_clock(monkeypatch, tick=1 / 64)
    by_hand = train(sized_run(tiny_data, tmp_path / "b", f"--max_seconds={0.5 - 14 / 64}", "--n_layer=2",
                              "--n_embd=64", "--size_to_budget=False", "--n_head=2", "--learning_rate=1e-2",
                              "--block_size=128", "--batch_size=16"))
    assert sized["val_full"] == by_hand["val_full"] and sized["val"] == by_hand["val"]


def test_fine_tuning_keeps_the_checkpoint_shape_says_so_and_its_width_sets_the_learning_rate(
        tiny_data, tmp_path, monkeypatch, capsys):
    use_fake_clock(monkeypatch, tick=1 / 64)
    train(sized_run(tiny_data, tmp_path / "a", "--max_seconds=0.25", "--n_layer=1", "--n_embd=128", "--n_head=8"))
    capsys.readouterr()
    train(sized_run(tiny_data, tmp_path / "b", "--max_seconds=0.25", f"--init_from={tmp_path / 'a'}", "--n_layer=3"))
    out = capsys.readouterr().out
    assert "sized for" not in out
    assert f"fine-tuning keeps {tmp_path / 'a'}'s model, so these settings are not used: n_layer=3 (it has 1)\n" in out
    with open(tmp_path / "b" / "config.json") as f:
        saved = json.load(f)
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"], saved["learning_rate"]) == (1, 128, 8, 7.5e-3)


def test_a_run_that_would_replace_a_trained_one_is_refused_before_measuring(tiny_data, tmp_path, monkeypatch,
                                                                          capsys, two_small_shapes):
    import train as train_module
    use_fake_clock(monkeypatch, tick=1 / 64)
    cfg = sized_run(tiny_data, tmp_path / "out", "--max_seconds=0.5")
    train(cfg)
    monkeypatch.setattr(train_module, "step_timer", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(ConfigError, match="holds a trained run"):
        train(cfg)


def test_the_command_line_says_what_was_chosen(tiny_data, tmp_path, monkeypatch, two_small_shapes):
    result = run_in_process("train.py", CPU_RECIPE, f"--data_dir={tiny_data}", "--dataset=tiny", "--max_seconds=2",
                            "--n_layer=1", "--eval_iters=1", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr  # 2 s: time left to train on a busy machine, after measuring
    assert "sized for 2 s: 1 x " in result.stdout
    bad = run_in_process("train.py", CPU_RECIPE, "--max_seconds=0", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "size_to_budget" in bad.stderr
