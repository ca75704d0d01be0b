"""
The budget-to-shape rule: the model that trains best on this machine in --max_seconds.

    python train.py config/train_shakespeare_char_cpu.py --max_seconds=300

A bigger model learns more per step but takes fewer steps in the same time, and which wins depends on
how fast this machine runs each shape. So the rule measures that, then predicts:
1. Candidates: the shapes of SHAPES, smallest first, each without dropout and with DROPOUT, and each
   of those at the contexts of CONTEXTS (the same tokens a step: a longer context, a smaller batch), with
   any setting the user gave in their place (--n_layer=6 leaves the rule the width, dropout and
   context to choose).
   Heads are about HEAD_SIZE channels each, the learning rate follows the width and the batch the
   context (derived_settings), unless given.
2. Measure a few training steps of each candidate on this machine (train.py's step_timer): its
   seconds per iteration, hence the iterations, and tokens, the budget affords it.
3. Predict each candidate's val loss from its parameters, tokens and context (predicted_loss, a fit
   to runs of 0.2-2.7M parameters over up to 20M tokens: docs/experiments.md, "The budget-to-shape rule")
   and train the lowest. Where that model would start to learn the text by heart before the budget
   ends (best_tokens_m), the run ends there instead. Dropout costs a short run but lets a model
   train far longer before that: it wins the long budgets. A longer context costs a little more a
   step (attention grows with it) and predicts each character from more of the text before it.
A candidate is only measured while it could still beat the best so far, taking it to be no faster than
the smaller candidates measured before it; and its steps stop where they would take the measurement,
all candidates together, past MEASURE_SHARE of the budget (a model that slow gets too few steps to
win). The measurement takes seconds, and they come out of the budget.
"""

import csv
import itertools
import math
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, replace

import numpy as np
import torch

from configurator import ConfigError
from model import GPTConfig, build_model

# (n_layer, n_embd), smallest first: each is slower per step than the one before it
SHAPES = ((4, 64), (4, 96), (4, 128), (6, 128), (6, 192), (8, 256), (8, 384))
HEAD_SIZE = 32  # channels per attention head
DROPOUT = 0.1  # the dropout a candidate may have (the fit's runs have none or this)
CONTEXTS = (128, 256)  # the contexts a candidate may have (the fit's runs have these), shortest first
STEP_TOKENS = 2048  # the tokens of a step (the fit's runs have these): a batch of 16 at context 128, 8 at 256
# what the rule sets; n_head and learning_rate follow n_embd, the batch the context (derived_settings)
CHOSEN = ("n_layer", "n_embd", "n_head", "learning_rate", "dropout", "block_size", "batch_size")

# The fitted loss: L(N, D) = E + A / N^ALPHA + B / D^BETA + C * N * D, N the parameters in millions,
# D the training tokens in millions. The first three terms are Chinchilla's form: what no model of
# this kind learns, what a bigger model learns more of, what more tokens teach. The last is
# memorising: a 1 MB text seen many times, and the more parameters the sooner, is learnt by heart and
# the val loss turns up (docs/experiments.md, "The budget-to-shape rule", has the runs and the fit).
# Learning by heart follows the passes over the train split (D over its tokens), and the more so the
# less text there is for the parameters to hold (its characters, T): on another text than the fit's the
# last term is C * N * D times FIT_TEXT.tokens_m / text.tokens_m and (FIT_TEXT.chars_m / T)^(TEXT_EXPONENT - 1)
# (docs/experiments.md, "The length of the text"). A BPE of Tiny Shakespeare has its characters, fewer tokens.
# A model with DROPOUT has its own A, B and C: it learns less (A_DROPOUT > A, the more so the smaller the
# model) and less from each token (B_DROPOUT > B), but memorises far later (C_DROPOUT < C).
# A longer context (256) lowers the floor, E - CONTEXT_GAIN: each character is predicted from more of
# the text before it. But a model learns to use it only with training: more tokens are needed to
# get there (B + B_CONTEXT), so that a short run gains nothing from it.
E, A, ALPHA, B, BETA, C = 1.128308, 0.182672, 0.29, 0.32783, 0.72, 0.00557
A_DROPOUT, B_DROPOUT, C_DROPOUT = 0.226374, 0.47857, 0.000593
CONTEXT_GAIN, B_CONTEXT = 0.015918, 0.020991
Text = namedtuple("Text", "tokens_m chars_m")  # a train split's length: millions of tokens, of characters
FIT_TEXT = Text(1.003854, 1.003854)  # the fit's train split: Tiny Shakespeare's first 90%, in characters
TEXT_EXPONENT = 2.5  # a quarter of the text is learnt by heart 4^2.5 times as fast (above)
MEASURE_SHARE = 0.05  # the most of the budget the measurement takes (but one candidate is always measured)
TIMED_STEPS = 2  # the steps of a candidate the measurement times, after one that warms up (train.step_timer)


def derived_settings(n_embd, block_size, optimizer, given, accumulation_steps=1):
    """The settings that follow the width and the context, those the user did not give: about HEAD_SIZE
    channels a head, a learning rate that falls as the model widens (Muon's 1e-2 suits 96 wide, 7e-3
    about 128; AdamW takes a fifth of Muon's), and the batch that makes STEP_TOKENS a step over
    accumulation_steps micro-batches (gradient_accumulation_steps: under torchrun, one a process at least)."""
    even_heads = [h for h in range(1, n_embd + 1) if n_embd % h == 0 and (n_embd // h) % 2 == 0]
    n_head = min(even_heads, key=lambda h: abs(h - n_embd / HEAD_SIZE), default=1)
    peak = 1e-2 if optimizer == "muon" else 2e-3
    derived = {"n_head": n_head, "learning_rate": peak * min(1.0, 96 / n_embd),
               "batch_size": max(1, STEP_TOKENS // (block_size * accumulation_steps))}
    return {k: v for k, v in derived.items() if k not in given}


def chooses_context(cfg):
    """Whether the rule sets the context of cfg's run, none being given: a run from scratch gets the
    context the rule chooses (one the text holds), any other run its checkpoint's."""
    return cfg.size_to_budget and "block_size" not in cfg.given_settings


def longer_context(block_size):
    """Whether the fit takes a context of block_size as its longer one (CONTEXTS[1]) rather than its
    shorter: a context its runs did not have is taken as the nearest they had."""
    return min(CONTEXTS, key=lambda context: abs(math.log(block_size / context))) != CONTEXTS[0]


def fitted_terms(dropout, block_size=CONTEXTS[0], text=FIT_TEXT):
    """(E, A, B, C) of the fit for a model with this dropout and context, on the train split text (a
    Text): any dropout is taken as DROPOUT, the nearest the fit knows (with_stop does not trust it to
    stop a run at another)."""
    e, a, b, c = (E, A, B, C) if dropout == 0 else (E, A_DROPOUT, B_DROPOUT, C_DROPOUT)
    c = c * FIT_TEXT.tokens_m / text.tokens_m * (FIT_TEXT.chars_m / text.chars_m) ** (TEXT_EXPONENT - 1)
    return (e - CONTEXT_GAIN, a, b + B_CONTEXT, c) if longer_context(block_size) else (e, a, b, c)


def predicted_loss(params_m, tokens_m, dropout=0.0, block_size=CONTEXTS[0], text=FIT_TEXT):
    """The val loss the fit predicts for a run of a model of params_m million parameters given the time
    for tokens_m million tokens. Past its best_tokens_m the loss would rise, and the rule ends such a
    run there (sized_for_budget): no model is predicted worse for a longer budget."""
    e, a, b, c = fitted_terms(dropout, block_size, text)
    tokens_m = min(tokens_m, best_tokens_m(params_m, dropout, block_size, text))
    return e + a / params_m ** ALPHA + b / tokens_m ** BETA + c * params_m * tokens_m


def best_tokens_m(params_m, dropout=0.0, block_size=CONTEXTS[0], text=FIT_TEXT):
    """Where more tokens stop paying for a model of params_m million parameters: where the fit's
    learning from tokens (B / D^BETA, falling) and its memorising (C * N * D, rising) balance."""
    _, _, b, c = fitted_terms(dropout, block_size, text)
    return (BETA * b / (c * params_m)) ** (1 / (BETA + 1))


def best_iters(cfg, params_m=None, text=FIT_TEXT):
    """The iterations where the model cfg describes (of params_m million parameters) reaches its
    best_tokens_m on the train split text."""
    params_m = model_params_m(cfg) if params_m is None else params_m
    return int(best_tokens_m(params_m, cfg.dropout, cfg.block_size, text) * 1e6 / tokens_per_iter(cfg))


def with_stop(cfg, params_m=None, text=FIT_TEXT):
    """cfg ending at its model's best_iters at most: a sized run ends there or where its budget does,
    whichever comes first, its schedule complete either way (train.py's lr_now). An iteration count, not
    seconds, so that the stop does not move with the noise of a few measured steps. With a dropout the
    fit's runs did not have (neither 0 nor DROPOUT), the budget alone ends the run."""
    if cfg.dropout not in (0.0, DROPOUT):
        return cfg
    return replace(cfg, max_iters=min(cfg.max_iters, best_iters(cfg, params_m, text)))


def tokens_per_iter(cfg):
    """The tokens one optimizer step trains on (all processes together)."""
    return cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


def model_params_m(cfg):
    """The parameters, in millions, of the model cfg describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return build_model(GPTConfig.from_settings(cfg)).get_num_params() / 1e6


def candidate_settings(cfg, longest_context=math.inf):
    """The settings of each candidate: a shape of SHAPES, without dropout and with DROPOUT, at each
    context of CONTEXTS up to longest_context (the longest the text holds; a shorter text, its own
    length), with the settings the user gave in its place, and the heads, learning rate and batch that
    follow its width and context; smallest first, each once, the shapes that a given n_head does not
    divide (or splits into odd heads, for rotary positions) left out."""
    found = []
    contexts = [c for c in CONTEXTS if c <= longest_context] or [longest_context]
    for (n_layer, n_embd), dropout, context in itertools.product(SHAPES, (0.0, DROPOUT), contexts):
        shape = {"n_layer": n_layer, "n_embd": n_embd, "dropout": dropout, "block_size": context}
        settings = {k: v for k, v in shape.items() if k not in cfg.given_settings}
        width, block_size = settings.get("n_embd", cfg.n_embd), settings.get("block_size", cfg.block_size)
        settings.update(derived_settings(width, block_size, cfg.optimizer, cfg.given_settings,
                                         cfg.gradient_accumulation_steps))
        heads = settings.get("n_head", cfg.n_head)
        odd_heads = cfg.pos_encoding == "rope" and (width // heads) % 2
        if width % heads == 0 and not odd_heads and settings not in found:
            found.append(settings)
    if not found:  # a given n_head, or a given width no count of heads splits evenly
        widths = f"n_embd={cfg.n_embd}" if "n_embd" in cfg.given_settings else \
            f"any width sizing.py tries ({', '.join(str(c) for c in sorted({c for _, c in SHAPES}))})"
        if "n_head" not in cfg.given_settings:
            raise ConfigError(f"{widths} does not split into heads of an even size (rotary positions need one); "
                              f"give an even --n_embd")
        raise ConfigError(f"n_head={cfg.n_head} does not split {widths} into heads of an even size; "
                          f"give another --n_head, or leave it out")
    return found


def candidates(cfg, longest_context=math.inf):
    """cfg with each candidate's settings (candidate_settings), smallest first."""
    return [replace(cfg, **settings) for settings in candidate_settings(cfg, longest_context)]


@dataclass
class Choice:
    """A candidate, what the measurement found and what the fit predicts for it."""
    cfg: object
    seconds_per_iter: float
    iters: int
    params_m: float
    loss: float

    def shape(self):
        return shape_name(self.cfg)


def shape_name(cfg):
    """How the rule's lines name a candidate: "6 x 128", "6 x 128 dropout 0.1", or with a context other
    than the shortest the rule tries, "6 x 128 dropout 0.1 context 256"."""
    return f"{cfg.n_layer} x {cfg.n_embd}" + (f" dropout {cfg.dropout:g}" if cfg.dropout else "") \
        + (f" context {cfg.block_size}" if cfg.block_size != CONTEXTS[0] else "")


def no_faster(candidate, other):
    """Whether candidate's steps take at least as long as other's: it is as large or larger in every way
    the candidates differ (layers, width, dropout, context; SHAPES grow in both layers and width)."""
    return (candidate.n_layer >= other.n_layer and candidate.n_embd >= other.n_embd
            and candidate.dropout >= other.dropout and candidate.block_size >= other.block_size)


def choose(cfg, seconds_per_iter, budget_seconds, time_left=lambda: math.inf, longest_context=math.inf,
           text=FIT_TEXT):
    """The candidate predicted to reach the lowest val loss in budget_seconds on the train split text (a
    Text), given seconds_per_iter(candidate cfg, the seconds its steps may take), the measurement, while
    time_left() of its share. Returns (the best Choice, every Choice measured)."""
    measured, too_slow = [], []
    for candidate in candidates(cfg, longest_context):
        params_m, tokens_m_per_iter = model_params_m(candidate), tokens_per_iter(candidate) / 1e6
        best = min(measured, key=lambda c: c.loss, default=None)
        left = math.inf  # the first candidate is measured in full: some model has to train
        if best:
            left = time_left()
            if left <= 0:
                break
            if any(no_faster(candidate, slow) for slow in too_slow):
                continue
            # it is no faster than the slowest measured candidate it is as large as: measure it only if
            # its steps could fit in the time left, and the most tokens it could get could beat the best
            slowest = max((c.seconds_per_iter for c in measured if no_faster(candidate, c.cfg)), default=0.0)
            if (TIMED_STEPS + 1) * slowest > left:
                too_slow.append(candidate)  # to measure now, as is any larger one
                continue
            most_tokens_m = int(budget_seconds / slowest) * tokens_m_per_iter if slowest else math.inf
            if not most_tokens_m or predicted_loss(params_m, most_tokens_m, candidate.dropout,
                                                   candidate.block_size, text) >= best.loss:
                continue
        seconds = seconds_per_iter(candidate, left)
        if seconds == math.inf:  # its steps alone would overrun the share: too slow to win, as is any larger
            too_slow.append(candidate)
            continue
        iters = int(budget_seconds / seconds)
        loss = predicted_loss(params_m, iters * tokens_m_per_iter, candidate.dropout, candidate.block_size,
                              text) if iters else math.inf
        measured.append(Choice(candidate, seconds, iters, params_m, loss))
    best = min(measured, key=lambda c: c.loss)
    if best.iters == 0:
        raise ConfigError(f"max_seconds={budget_seconds:g} is shorter than one step of the smallest model "
                          f"({best.shape()}: {best.seconds_per_iter:.2f} s); give a longer budget")
    return best, measured


def sized_for_budget(cfg, seconds_per_iter, clock=time.perf_counter, longest_context=math.inf,
                     text=FIT_TEXT):
    """(cfg with the rule's shape for its max_seconds and its stop (with_stop), the line that says what
    was chosen and why, the seconds the measurement took, which come out of the budget), of candidates
    with contexts up to longest_context, for the train split text. Where the given settings leave one
    candidate, there is nothing to choose or measure: (it, the line if it has a stop, else None; 0.0)."""
    only = candidates(cfg, longest_context)
    if len(only) == 1:
        chosen = with_stop(only[0], text=text)
        return chosen, (f"sized for {cfg.max_seconds:g} s: {shape_name(chosen)} as given; it stops at "
                        f"{chosen.max_iters:,} iterations if the budget lasts that long: more would only learn the "
                        f"text by heart" if chosen.max_iters < cfg.max_iters else None), 0.0
    t0 = clock()
    best, measured = choose(cfg, seconds_per_iter, cfg.max_seconds,
                            time_left=lambda: MEASURE_SHARE * cfg.max_seconds - (clock() - t0),
                            longest_context=longest_context, text=text)
    spent = clock() - t0
    chosen = with_stop(best.cfg, best.params_m, text)
    iters_left = min(int(max(cfg.max_seconds - spent, 0.0) / best.seconds_per_iter), cfg.max_iters)
    if iters_left == 0:
        raise ConfigError(f"max_seconds={cfg.max_seconds:g} is used up by measuring the model's speed ({spent:.1f} s; "
                          f"a step of {best.shape()} takes {best.seconds_per_iter:.2f} s); give a longer budget")
    line = (f"sized for {cfg.max_seconds:g} s: {best.shape()} ({best.params_m:.2f}M parameters, {best.cfg.n_head} "
            f"heads, learning rate {best.cfg.learning_rate:.2g}), "
            + (f"{chosen.max_iters:,} iterations (about {chosen.max_iters * best.seconds_per_iter:.0f} s): more "
               f"would only learn the text by heart" if chosen.max_iters < iters_left
               else f"about {iters_left:,} iterations")
            + (f", predicted val loss {best.loss:.2f}" if text == FIT_TEXT
               else f" (the fit is to Tiny Shakespeare in characters, its learning by heart scaled to this text's "
                    f"{text.tokens_m * 1e6:,.0f} train tokens: no val loss predicted)")
            + "; measured ms/iter: "
            + ", ".join(f"{c.shape()} {c.seconds_per_iter * 1e3:.0f}" for c in measured)
            + f", in {spent:.1f} s of the budget")
    return chosen, line, spent


def as_checkpoint_model(cfg, model_args, longest_context=math.inf):
    """cfg for a run that starts from a checkpoint's model (fine-tuning, --eval_only): the model's own
    dropout and context (at most longest_context: fine-tuning on a shorter text crops it) where they
    were not given, and the settings that follow its width and that context. Its shape is its own."""
    kept = {k: model_args[k] for k in ("dropout", "block_size") if k in model_args and k not in cfg.given_settings}
    if "block_size" in kept:
        kept["block_size"] = min(kept["block_size"], longest_context)
    given = (*cfg.given_settings, "n_head")  # the checkpoint's heads are its own
    return replace(cfg, **kept, **derived_settings(model_args["n_embd"], kept.get("block_size", cfg.block_size),
                                                   cfg.optimizer, given, cfg.gradient_accumulation_steps))


def as_chosen_before(cfg, saved, text=FIT_TEXT):
    """cfg with the choice a run recorded (its checkpoint's config), for --init_from=resume: the rule's
    settings the user did not give are taken from it, so that the run goes on with the same model, to
    the same stop (on the same text)."""
    chosen = replace(cfg, **{k: saved[k] for k in CHOSEN if k in saved and k not in cfg.given_settings})
    return with_stop(chosen, text=text)


def shapes_for_budgets(cfg, seconds_per_iter, budgets):
    """{budget: best Choice} for each of budgets (seconds), as train.py would choose, for bench.py: each
    candidate is measured once, in full, and each budget's choice replays the measurement train.py would
    make for it, its share used up as its steps would use it (step_timer's: a candidate whose next step
    would overrun the share is stopped there, as too slow)."""
    measured = {}

    def choice_for(budget):
        spent = 0.0

        def replayed(candidate, time_left=math.inf):
            nonlocal spent
            key = tuple(getattr(candidate, k) for k in CHOSEN)  # what tells candidates apart
            if key not in measured:
                measured[key] = seconds_per_iter(candidate)
            seconds, steps = measured[key], TIMED_STEPS + 1  # the timed steps and the one that warms up
            if steps * seconds > time_left:
                spent += max(1, math.floor(time_left / seconds)) * seconds
                return math.inf
            spent += steps * seconds
            return seconds

        return choose(replace(cfg, max_seconds=budget), replayed, budget,
                      time_left=lambda: MEASURE_SHARE * budget - spent)[0]

    return {budget: choice_for(budget) for budget in budgets}


# The fit behind predicted_loss: `python sizing.py docs/sizing_runs.csv` prints its constants

def fit_loss(runs):
    """(E, A, ALPHA, B, BETA, C, A_DROPOUT, B_DROPOUT, C_DROPOUT, CONTEXT_GAIN, B_CONTEXT) of
    predicted_loss's form (without the best_tokens_m cap: each run's own last loss) fitted to runs, rows
    of (params_m, tokens_m, dropout, block_size, val_loss), dropout 0 or DROPOUT: least squares for
    the linear constants (the A's, B's and C's not negative) at each exponent pair of a grid, the best
    pair kept; with the fit's root-mean-square error last."""
    params, tokens, dropout, block_size, loss = (np.array(column, dtype=float) for column in zip(*runs))
    if not np.isin(dropout, (0.0, DROPOUT)).all():
        others = sorted(float(d) for d in set(dropout) - {0.0, DROPOUT})
        raise ValueError(f"the fit takes runs with dropout 0 or {DROPOUT}, not {others}")
    without, with_dropout = dropout == 0, dropout == DROPOUT
    longer = np.array([longer_context(t) for t in block_size], dtype=float)
    exponents = np.arange(0.05, 1.5, 0.01)
    best = None
    for alpha in exponents:
        # one least-squares problem for each beta, solved together: features are (beta, run, term)
        terms = (params ** -alpha, tokens ** -exponents[:, None], params * tokens)  # A's, B's and C's
        features = np.stack(np.broadcast_arrays(np.ones_like(loss), *(t * without for t in terms),
                                                *(t * with_dropout for t in terms), -longer, longer * terms[1]),
                            axis=-1)
        coef = (np.linalg.pinv(features) @ loss[:, None])[..., 0]
        error = np.sqrt(np.mean(((features @ coef[..., None])[..., 0] - loss) ** 2, axis=-1))
        error[coef[..., 1:-2].min(axis=-1) < 0] = np.inf  # the context's two may take either sign
        i = int(error.argmin())
        if best is None or error[i] < best[-1]:
            e, a, b, c, *dropout_terms, gain, b_context = coef[i]
            best = (e, a, alpha, b, exponents[i], c, *dropout_terms, gain, b_context, error[i])
    return tuple(round(float(x), 6) for x in best)


def read_runs(path):
    """The rows of a runs file (columns params_m, tokens_m, dropout, block_size, val_loss and any others)
    as fit_loss takes them."""
    with open(path, newline="") as f:
        return [tuple(float(r[k]) for k in ("params_m", "tokens_m", "dropout", "block_size", "val_loss"))
                for r in csv.DictReader(f)]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        asked = sys.argv[1:] in (["-h"], ["--help"])
        print("usage: python sizing.py RUNS.csv: fits predicted_loss's constants to the runs in RUNS.csv "
              "(docs/sizing_runs.csv: the fit in this file)", file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    *constants, rms = fit_loss(read_runs(sys.argv[1]))
    print("E, A, ALPHA, B, BETA, C = " + ", ".join(repr(c) for c in constants[:6]))
    print("A_DROPOUT, B_DROPOUT, C_DROPOUT = " + ", ".join(repr(c) for c in constants[6:9]))
    print(f"CONTEXT_GAIN, B_CONTEXT = {constants[9]!r}, {constants[10]!r}  # RMS error {rms:.4f}")
