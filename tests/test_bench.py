import re
import sys

import pytest

from bench import BenchConfig, bench, cpu_name
from helpers import CAN_PACK
from dataset import TrainBatches


def test_bench_times_every_path_and_prints_one_table(capsys):
    cfg = BenchConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, device="cpu", dtype="float32",
                      steps=2, rounds=1, sample_tokens=20, num_samples=3, sizes=False)
    variants = bench(cfg)
    assert [v.name for v in variants] == ["this repo", "+ Muon, RoPE", "nanoGPT path"]
    assert [v.optimizer_name for v in variants] == ["fused AdamW", "Muon+fused AdamW", "AdamW"]
    assert [v.pos_encoding for v in variants] == ["learned", "rope", "learned"]
    assert [v.use_cache for v in variants] == [True, True, False]
    assert all(isinstance(v.batches, TrainBatches) for v in variants)  # what train.py reads its batches with
    for v in variants:
        assert len(v.step_times) == 1 and v.step_times[0] > 0 and v.sample_rates[0] > 0 and v.peak_mb > 0
        assert v.batch_times[0] > 0
    # nanoGPT makes its samples one after another: 3 samples cost 3 single streams
    nano = variants[-1]
    assert nano.batch_times[0] == pytest.approx(3 * 20 / nano.sample_rates[0])
    out = capsys.readouterr().out
    assert "ms/iter" in out and "MFU" in out and "sample tok/s" in out and "3 samples s" in out and "speedup" in out
    assert out.startswith("device: cpu (") and "threads) | torch" in out and "dtype: float32 (asked for)" in out
    # several samples run on packed weights where sample.py packs them (x86 CPUs), and the header says so
    assert [v.packed for v in variants] == [CAN_PACK, CAN_PACK, False]
    assert ("float32 for 3 samples (weights packed)" in out) == CAN_PACK


def test_bench_prints_the_shapes_the_cpu_recipe_would_train_here(capsys, monkeypatch):
    """The measurement train.py sizes its model by (two small candidates here, timed for real), and
    the choice for each budget of the README's rows."""
    import sizing
    monkeypatch.setattr(sizing, "SHAPES", ((1, 64), (2, 64)))
    assert bench(BenchConfig(device="cpu", sizes_only=True)) == []
    out = capsys.readouterr().out.splitlines()
    header = out.index("the CPU recipe (python train.py config/train_shakespeare_char_cpu.py --max_seconds=S) would "
                       "train here:")
    assert all(line.startswith("note: other programs are busy") for line in out[:header])  # on a busy machine
    rows = [line.split(": ", 1) for line in out[header + 1:]]
    assert [name.strip() for name, _ in rows] == ["100 s", "5 min", "10 min", "30 min", "1 h"]
    sizes = [1 if text.startswith("1 x 64") else 2 for _, text in rows]
    assert all(re.match(r"[12] x 64( dropout 0.1)?( context 256)?, 2 heads", text) and " ms/iter, " in text
               and " iterations" in text and "predicted val loss" in text for _, text in rows)
    assert sizes == sorted(sizes)  # a longer budget never gets a smaller model


def test_cpu_is_named():
    name = cpu_name()
    assert isinstance(name, str) and (name or not sys.platform.startswith("linux"))


def test_bench_times_the_position_encoding_asked_for_and_refuses_model_type(capsys):
    from configurator import ConfigError, configure
    cfg = BenchConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, device="cpu", steps=1, rounds=1,
                      sample_tokens=5, num_samples=2, pos_encoding="sinusoidal", recipe=False, sizes=False)
    variants = bench(cfg)
    assert [v.pos_encoding for v in variants] == ["sinusoidal", "learned"]  # nanoGPT's path: learned only
    assert variants[0].model.config.pos_encoding == "sinusoidal"
    out = capsys.readouterr().out
    assert "sampling, as sample.py stores the weights: bfloat16 for one stream" in out
    with pytest.raises(ConfigError, match="'--model_type' is not a setting here: the benchmark times the GPT"):
        configure(BenchConfig, ["--model_type=bigram"])
