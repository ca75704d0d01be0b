"""
Checkpoints: saving and loading them, finding the one to sample, resume or fine-tune, and the model a
run starts from. A checkpoint is a dict in nanoGPT's layout (model, optimizer, model_args, iter_num,
best_val_loss, config), plus the vocabulary, the random state and the time spent, so that a resumed
run continues exactly.
"""

import errno
import glob
import os
import sys
import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch

from configurator import ConfigError, UserError, first_line
from files import write_atomic
from model import GPTConfig, build_model
from muon import torch_optimizers
from tokenizer import CharTokenizer, load_tokenizer, tokenizer_from_meta

CKPT_NAME, RESUME_NAME = "ckpt.pt", "resume.pt"  # in out_dir: the best model; a stopped run's newer state
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's


class CheckpointError(UserError):
    pass


GPT2_WEIGHTS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def refuse_gpt2_weights(init_from):
    """nanoGPT's init_from='gpt2*' loads OpenAI's weights; this project, which trains its own tokenizers, can't."""
    if init_from in GPT2_WEIGHTS:
        raise ConfigError(f"init_from='{init_from}': OpenAI's GPT-2 weights are not supported here (they need the "
                          f"transformers package, a download and GPT-2's tokenizer; this repo trains its own "
                          f"tokenizers on your text); use nanoGPT for them")


def save_checkpoint(checkpoint, path):
    """Write atomically (write_atomic): a crash at any moment leaves the old checkpoint or the new one."""
    try:
        write_atomic(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"could not write {path}: no space left on device; free some space, or resume into "
                                  f"another disk (copy the out_dir there); the previous checkpoint is untouched") from e
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; the previous checkpoint is untouched") from e
    stopped = os.path.join(os.path.dirname(path), RESUME_NAME)
    if os.path.basename(path) == CKPT_NAME and os.path.exists(stopped):
        os.remove(stopped)  # ckpt.pt is now newer than a stopped run's state: resume continues from it


def load_checkpoint(path, device="cpu", hint=""):
    """The checkpoint at path (ours or nanoGPT's), its tensors on device; hint ends the error if it is missing."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's warnings would break the one-line error
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                              f"it may be truncated or from another program") from e
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project or nanoGPT (no model or model_args)")
    return checkpoint


# The model and its vocabulary

def model_args(config):
    """A checkpoint's model_args: nanoGPT's keys, plus our other settings where they are not the
    defaults (the lecture's GPT), so that nanoGPT can load the checkpoints of the models it has."""
    args = {k: getattr(config, k) for k in MODEL_ARGS}
    for f in fields(GPTConfig):
        if f.name not in MODEL_ARGS and getattr(config, f.name) != f.default:
            args[f.name] = getattr(config, f.name)
    return args


def model_from_checkpoint(checkpoint):
    """Build the model a checkpoint describes and load its weights (compiled models' keys work too)."""
    names = {f.name for f in fields(GPTConfig)}
    model = build_model(GPTConfig(**{k: v for k, v in checkpoint["model_args"].items() if k in names}))
    prefix = "_orig_mod."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint["model"].items()
             if not k.endswith(".attn.bias")}  # nanoGPT's causal-mask buffer, on PyTorch without flash attention
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model_args: {first_line(e)}") from e
    return model


def vocabulary_entries(tok):
    """What a checkpoint holds of its tokenizer: the characters as one string (vocab) for a character
    vocabulary, the merges (tokenizer) for a BPE."""
    return {"vocab": tok.chars} if tok.kind == "char" else {"vocab": None, "tokenizer": tok.meta()}


def saved_tokenizer(checkpoint, path):
    """The tokenizer a checkpoint holds, None for nanoGPT's (which hold none)."""
    if checkpoint.get("tokenizer") is not None:
        return tokenizer_from_meta(checkpoint["tokenizer"], path)
    if checkpoint.get("vocab") is not None:
        return CharTokenizer(checkpoint["vocab"])
    return None


def same_vocabulary(checkpoint, tok):
    """Whether tok is the tokenizer the checkpoint's model was trained with: the same one where the
    checkpoint holds it (ours do), a character vocabulary of the same size where not (nanoGPT's)."""
    saved = saved_tokenizer(checkpoint, "the checkpoint")
    same = tok == saved if saved is not None else tok.kind == "char"
    return same and checkpoint["model_args"]["vocab_size"] == tok.vocab_size


def checkpoint_tokenizer(checkpoint, path, data_dir):
    """The tokenizer of the checkpoint at path: the one it holds, or for nanoGPT's checkpoints
    (which hold none) the meta.pkl of the dataset its config names, under data_dir."""
    vocab_size = checkpoint["model_args"]["vocab_size"]
    saved = saved_tokenizer(checkpoint, path)
    if saved is not None:
        if saved.vocab_size != vocab_size:
            raise CheckpointError(f"{path} holds a vocabulary of {saved.vocab_size} tokens but its "
                                  f"model has {vocab_size}: the file was altered or is damaged")
        return saved
    dataset = checkpoint.get("config", {}).get("dataset", "shakespeare_char")
    meta_path = os.path.join(data_dir, dataset, "meta.pkl")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} holds no vocabulary (a nanoGPT checkpoint) and {meta_path}, its "
                              f"dataset's, is missing; prepare that dataset, or point --data_dir at its folder")
    tok = load_tokenizer(meta_path)
    if not same_vocabulary(checkpoint, tok):
        raise CheckpointError(f"{meta_path} is not the vocabulary the checkpoint was trained with ({tok.vocab_size} "
                              f"tokens; the checkpoint's model has {vocab_size}); the dataset was "
                              f"re-prepared from another text")
    return tok


# Which checkpoint

def how_to_train_first(out_dir=None):
    """The hint where no checkpoint is found: the command that trains one (into out_dir), or, where a
    run was stopped before it saved a model (only its resume.pt there), how to go on with it."""
    if out_dir and os.path.exists(os.path.join(out_dir, RESUME_NAME)):
        return (f"{out_dir} holds only {RESUME_NAME}, a run stopped before it saved a model: go on with it (its "
                f"train.py command with --init_from=resume), then sample")
    into = f" --out_dir={out_dir}" if out_dir else ""
    return (f"train a model first: python train.py config/train_shakespeare_char_cpu.py{into} "
            f"(on a GPU: config/train_shakespeare_char.py)")


def find_checkpoint(out_dir):
    """out_dir's ckpt.pt; without an out_dir, the most recently written */ckpt.pt under the current
    folder, so that `python sample.py` samples the run just trained, whatever its config named it."""
    if out_dir is not None:
        return os.path.join(out_dir, CKPT_NAME)
    found = glob.glob(os.path.join("*", CKPT_NAME))
    if not found:
        raise CheckpointError(f"no checkpoint in any folder under {os.getcwd()} (*/ckpt.pt); {how_to_train_first()}, "
                              f"or give --out_dir")
    path = max(found, key=os.path.getmtime)
    print(f"sampling {path}, the most recently written checkpoint here (--out_dir picks another)", file=sys.stderr)
    return path


def resume_path(out_dir):
    """What --init_from=resume continues: out_dir/resume.pt where a signal saved the run's state there
    after the best model (ckpt.pt) was saved, else ckpt.pt."""
    best, stopped = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, RESUME_NAME)
    if os.path.exists(stopped) and (not os.path.exists(best) or os.path.getmtime(stopped) >= os.path.getmtime(best)):
        return stopped
    return best


# The model a run starts from: from scratch, or from a checkpoint (to resume, evaluate or fine-tune)

def checkpoint_to_load(cfg):
    """The checkpoint file a training run starts from (None: from scratch) and a hint for when it is missing."""
    if cfg.init_from == "scratch" and not cfg.eval_only:
        return None, ""
    if cfg.init_from == "resume" and not cfg.eval_only:
        return resume_path(cfg.out_dir), "; train one first, or use --init_from=scratch"
    if cfg.init_from in ("scratch", "resume"):  # eval_only evaluates the run's own (best) checkpoint
        return os.path.join(cfg.out_dir, CKPT_NAME), "; train one first, or give the --out_dir of a trained run"
    # fine-tuning: a checkpoint file or the out_dir that holds one
    path = os.path.join(cfg.init_from, CKPT_NAME) if os.path.isdir(cfg.init_from) else cfg.init_from
    return path, "; init_from takes 'scratch', 'resume', a ckpt.pt file or an out_dir holding one"


def init_model(cfg, tok, device):
    """Build the model from scratch or load it from a checkpoint. Returns (cfg, model, checkpoint):
    cfg with the dataset's vocab_size and the checkpoint model's settings, and the checkpoint (None
    from scratch), which still holds the optimizer and random state to resume."""
    cfg = replace(cfg, vocab_size=tok.vocab_size)
    path, hint = checkpoint_to_load(cfg)
    if path is None:
        return cfg, build_model(GPTConfig.from_settings(cfg)), None
    checkpoint = load_checkpoint(path, device, hint=hint)
    resuming = cfg.init_from == "resume" and not cfg.eval_only
    if resuming:
        check_resume_settings(cfg, checkpoint.get("config", {}), path)
        refuse_resuming_a_finished_run(cfg, Progress.from_checkpoint(checkpoint), path)
    model = model_from_checkpoint(checkpoint)
    if not same_vocabulary(checkpoint, tok):
        raise CheckpointError(f"{path} was trained with another vocabulary than dataset '{cfg.dataset}' has "
                              f"({model.config.vocab_size} vs {tok.vocab_size} tokens); prepare the dataset "
                              f"with --vocab_from set to the checkpoint's dataset")
    return adopt_checkpoint_model(cfg, model, resuming), model, checkpoint


# The model settings a checkpoint fixes: fine-tuning may also shorten the context and change dropout
CHECKPOINT_SHAPE = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size", "dropout"))


def adopt_checkpoint_model(cfg, model, resuming):
    """cfg with the checkpoint model's settings: its shape wins over the config's. Fine-tuning may
    shorten the context (cropped here) and use another dropout (set here)."""
    shape = {name: getattr(model.config, name) for name in CHECKPOINT_SHAPE}
    if resuming or cfg.eval_only:
        shape["block_size"] = model.config.block_size
    elif cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the checkpoint's {model.config.block_size}; "
                          f"fine-tune with --block_size={model.config.block_size} or less")
    model.config.dropout = cfg.dropout
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    return replace(cfg, **shape)


# Resuming a run

# What a resumed run must share with the run it continues; the rest (max_iters, max_seconds, eval and
# log settings, device, dtype, compile, wandb) may change. Changing these makes another run: fine-tune.
RESUME_FIXED = ("dataset", "batch_size", "gradient_accumulation_steps", "optimizer", "learning_rate", "min_lr",
                "warmup_iters", "lr_decay_iters", "decay_lr", "weight_decay", "beta1", "beta2", "grad_clip",
                "seed") + tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")


def check_resume_settings(cfg, saved, path):
    """cfg may resume the run whose config was `saved` only if it keeps RESUME_FIXED as they were."""
    for key in RESUME_FIXED:
        if key in saved and saved[key] != getattr(cfg, key):
            value = saved[key]
            raise ConfigError(f"{path} was trained with {key}={value!r}, not {getattr(cfg, key)!r}: resume with "
                              f"--{key}={value} (or the run's config file), or start a new run from its weights "
                              f"with --init_from={os.path.dirname(path) or '.'} --out_dir=ANOTHER_FOLDER")


def refuse_resuming_a_finished_run(cfg, progress, path):
    """A run that has trained its max_iters, or its max_seconds, has nothing left to train: resuming
    it would only evaluate it again (and its progress bar would start past its end)."""
    if progress.iter_num >= cfg.max_iters:
        why = (f"the {cfg.max_iters:,} iterations sizing.py stops it at (more would only learn the text by heart)"
               if cfg.size_to_budget else f"its max_iters={cfg.max_iters}; give a larger --max_iters to go on")
    elif 0 < cfg.max_seconds <= progress.train_seconds + progress.set_aside_seconds:
        why = f"{progress.train_seconds:.1f} s of max_seconds={cfg.max_seconds:g}; give a larger --max_seconds to go on"
    else:
        return
    raise ConfigError(f"{path} is a finished run: it has trained {why}; python sample.py "
                      f"--out_dir={os.path.dirname(path) or '.'} samples it")


@dataclass
class Progress:
    """Where a run is, besides its weights and optimizer state (all saved in its checkpoints)."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0  # time in training steps, evals excluded: what max_seconds budgets
    # the budget the learning rate schedule is laid over: the first run's max_seconds, so that a
    # resumed run with a larger budget goes on at min_lr instead of rewinding the schedule
    schedule_seconds: float = 0.0
    # of max_seconds, what is not for training: size_to_budget's measurement (sizing.py)
    set_aside_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, checkpoint):
        schedule = checkpoint.get("schedule_seconds", checkpoint.get("config", {}).get("max_seconds", 0.0))
        return cls(checkpoint["iter_num"], float(checkpoint["best_val_loss"]), checkpoint.get("train_seconds", 0.0),
                   schedule, checkpoint.get("set_aside_seconds", 0.0))


def training_checkpoint(model, optimizer, scaler, progress, cfg, tok, rng, val_loss):
    """Everything --init_from=resume needs; rng holds one random state per process (capture_rng)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "model_args": model_args(model.config),
        "iter_num": progress.iter_num,
        "train_seconds": progress.train_seconds,
        "schedule_seconds": progress.schedule_seconds,
        "set_aside_seconds": progress.set_aside_seconds,
        "best_val_loss": progress.best_val_loss,
        "val_loss": val_loss,
        "config": asdict(cfg),
        **vocabulary_entries(tok),
        "rng": rng,  # one entry per process: each has its own dropout stream
        "param_order": "nanogpt",  # optimizer state in nanoGPT's parameter order (older ones: wpe last)
    }


def legacy_param_order(state, optimizer, model):
    """Optimizer state saved by this project before it kept nanoGPT's order of modules: wpe came
    last among the parameters, so it was the last of its group. Renumber it into today's order."""
    if "wpe" not in getattr(model, "transformer", {}):
        return state  # no learned positions: the order never differed
    wpe = model.transformer.wpe.weight
    pairs = [(state[name], opt) for name, opt in optimizer.optimizers.items()] if hasattr(optimizer, "optimizers") \
        else [(state, optimizer)]
    for saved, opt in pairs:
        now = [p for g in opt.param_groups for p in g["params"]]
        then = []
        for g in opt.param_groups:
            then += [p for p in g["params"] if p is not wpe] + [p for p in g["params"] if p is wpe]
        index = {id(p): i for i, p in enumerate(now)}
        saved["state"] = {index[id(then[int(i)])]: v for i, v in saved["state"].items()}
    return state


def check_optimizer_state(optimizer):
    """Every optimizer state tensor has its parameter's shape (else training fails at the first step)."""
    for opt in torch_optimizers(optimizer):
        for p, s in opt.state.items():
            for name, t in s.items():
                if torch.is_tensor(t) and t.dim() > 0 and t.shape != p.shape:
                    raise CheckpointError(f"the checkpoint's optimizer state does not fit the model: {name} of "
                                          f"shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")


def capture_rng(data_rng, device):
    """This process's random state: its torch generators (dropout) and the batch sampler's."""
    state = {"torch": torch.get_rng_state(), "data": data_rng.bit_generator.state}
    kind = torch.device(device).type
    if kind == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif kind == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(saved, data_rng, device, rank=0):
    """Restore this process's random state from a checkpoint's: one entry per process that saved it
    (a dict, with every visible GPU's CUDA state, in checkpoints before per-process states). With
    more processes than saved, the extra ones keep their fresh seeds; the batches stay exact."""
    if not saved:
        return  # a nanoGPT checkpoint: no random state to restore
    states = [saved] if isinstance(saved, dict) else saved
    data_rng.bit_generator.state = states[0]["data"]  # the sampler is shared by all processes
    if rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"].cpu())
    device = torch.device(device)
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: the state of every GPU rank 0 saw
        index = device.index if device.index is not None else 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


def restore_training_state(checkpoint, model, optimizer, scaler, data_rng, device, rank=0):
    """Load the optimizer, scaler and random state a checkpoint holds."""
    state = checkpoint.get("optimizer")
    if not state:
        raise CheckpointError("the checkpoint holds weights only, no optimizer state, so it can't be resumed; "
                              "fine-tune from it instead: --init_from=PATH_TO_ITS_OUT_DIR")
    if "vocab" in checkpoint and checkpoint.get("param_order") != "nanogpt":
        state = legacy_param_order(state, optimizer, model)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({e})") from None
    check_optimizer_state(optimizer)
    restore_rng(checkpoint.get("rng"), data_rng, device, rank)
    if scaler.is_enabled() and checkpoint.get("scaler"):  # empty when the run that saved it had no scaler
        scaler.load_state_dict(checkpoint["scaler"])
