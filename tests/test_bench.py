from bench import BenchConfig, bench, flops_per_iter
from model import GPT, GPTConfig


def test_bench_times_both_paths_and_prints_one_table(capsys):
    cfg = BenchConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, device="cpu", dtype="float32",
                      steps=2, rounds=1, sample_tokens=20)
    variants = bench(cfg)
    assert [v.name for v in variants] == ["this repo", "nanoGPT path"]
    assert variants[0].fused and not variants[1].fused and variants[0].use_cache and not variants[1].use_cache
    for v in variants:
        assert len(v.step_times) == 1 and v.step_times[0] > 0 and v.sample_rates[0] > 0 and v.peak_mb > 0
    out = capsys.readouterr().out
    assert "ms/iter" in out and "MFU" in out and "sample tok/s" in out and "speedup" in out


def test_flops_per_iter_follows_the_6n_rule():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=2, n_head=2, n_embd=16))
    n = model.get_num_params()
    assert flops_per_iter(model, batch_size=3) == (6 * n + 12 * 2 * 16 * 8) * 8 * 3
