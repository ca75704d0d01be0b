"""A forker's idea is a GPTConfig field used in model.py, and nothing else: every script takes it up.

The idea here is the test's own (a gain on the final hidden states, so that it changes every logit),
written into a copy of the repo's model.py; the other files are copied unchanged."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, prepare_tiny

FIELD = "    mtp_weight: float = 0.0"
IDEA = "    hidden_gain: float = 1.0  # the test's idea: scale the final hidden states\n"
USE = "        x = self.transformer.ln_f(x)\n"


def fork_with_an_idea(root):
    """A copy of the repo's scripts and configs under root, its model.py given the field hidden_gain."""
    for path in glob.glob(os.path.join(REPO, "*.py")):
        shutil.copy(path, root)
    shutil.copytree(os.path.join(REPO, "config"), os.path.join(root, "config"))
    model_py = os.path.join(root, "model.py")
    with open(model_py) as f:
        source = f.read()
    assert source.count(FIELD) == 1 and source.count(USE) == 1, "model.py changed: update this test's patch"
    source = source.replace(FIELD, IDEA + FIELD).replace(USE, USE + "        x = x * self.config.hidden_gain\n")
    with open(model_py, "w") as f:
        f.write(source)


def run(root, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, script, *args], cwd=root, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_an_idea_added_in_model_py_alone_works_in_every_script(tmp_path):
    root = tmp_path / "fork"
    root.mkdir()
    fork_with_an_idea(root)
    data = prepare_tiny(tmp_path)
    assert "--hidden_gain=1.0" in run(root, "train.py", "--help")

    tiny = [f"--data_dir={data}", "--dataset=tiny", "--out_dir=out", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=8", "--warmup_iters=2", "--lr_decay_iters=12", "--eval_interval=6",
            "--eval_iters=2", "--always_save_checkpoint=True", "--device=cpu", "--dtype=float32",
            "--hidden_gain=3.0"]
    run(root, "train.py", *tiny, "--max_iters=6")
    run(root, "train.py", *tiny, "--max_iters=12", "--init_from=resume")
    ckpt_path = root / "out" / "ckpt.pt"
    checkpoint = torch.load(ckpt_path, weights_only=True)
    assert checkpoint["model_args"]["hidden_gain"] == 3.0 and checkpoint["iter_num"] == 12

    # sample.py on each CPU path: one stream in bf16 (one-token steps without oneDNN), several (packed layers),
    # float32; the same checkpoint with the idea's gain set back to 1.0 must sample other text
    plain = dict(checkpoint, model_args=dict(checkpoint["model_args"], hidden_gain=1.0))
    os.makedirs(root / "plain")
    torch.save(plain, root / "plain" / "ckpt.pt")
    for args in (["--num_samples=1", "--dtype=bfloat16"], ["--num_samples=3", "--dtype=float32"],
                 ["--num_samples=1", "--dtype=float32"]):
        common = ["--start=ROMEO:", "--max_new_tokens=60", "--temperature=0.8", "--device=cpu", *args]
        with_idea = run(root, "sample.py", "--out_dir=out", *common)
        without = run(root, "sample.py", "--out_dir=plain", *common)
        assert with_idea.startswith("ROMEO:") and with_idea != without, args

    run(root, "bench.py", "--hidden_gain=2.0", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
        "--batch_size=2", "--steps=1", "--rounds=1", "--sample_tokens=4", "--num_samples=2", "--compare=False",
        "--recipe=False", "--sizes=False", "--device=cpu")
