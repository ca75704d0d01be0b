import copy
import platform

import pytest
import torch

from helpers import CAN_PACK
from model import GPT, GPTConfig, CausalSelfAttention
from speedups import FastDropout, PackedLinear, pack_linears, speed_up_sampling, speed_up_training


def tiny(**kw):
    args = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_speedups_keep_the_parameters_and_the_results(dtype):
    """Swapped in after the model is built: the same parameter names and tensors (so checkpoints
    and nanoGPT compatibility are unchanged), no slow dropout mask left, and the attention written
    out where matmuls run in bf16; the model computes what the plain one does."""
    plain = tiny(dropout=0.1)
    fast = speed_up_training(copy.deepcopy(plain), "cpu", dtype)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    assert all(m.p == 0.1 for m in fast.modules() if isinstance(m, FastDropout))
    attention = [m for m in fast.modules() if isinstance(m, CausalSelfAttention)]
    assert all(m.fused_kernel == (dtype != "bfloat16") for m in attention)
    assert fast.kv_cache_dtype == torch.float32
    idx = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        ours, theirs = fast.eval()(idx, idx)[1], plain.eval()(idx, idx)[1]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-2 if dtype == "bfloat16" else 1e-5)


def test_nothing_is_swapped_off_the_cpu():
    for device in ("cuda", "cuda:1", "mps"):
        model = tiny(dropout=0.1)
        assert speed_up_training(model, device, "bfloat16") is model and speed_up_sampling(model, device, 4) is model
        assert all(type(m) is not FastDropout for m in model.modules())
        assert all(m.fused_kernel for m in model.modules() if isinstance(m, CausalSelfAttention))
        assert model.kv_cache_dtype is None


def test_cpu_dropout_rate_scale_and_gradient():
    drop = FastDropout(0.25).train()
    torch.manual_seed(0)
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of the 4 elements an int64 draw covers
    y = drop(x)
    dropped = (y == 0).float()
    five_sigma = 5 * (0.25 * 0.75 / 250_000) ** 0.5
    # each of the four 16-bit lanes of a draw drops at rate p (a lane of biased bits would not)
    for lane in range(4):
        assert abs(dropped[lane::4].mean().item() - 0.25) < five_sigma
    values = y.unique()
    assert len(values) == 2 and values[0] == 0 and abs(values[1] - 4 / 3) < 1e-6  # survivors scaled up
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes through the same mask, scaled
    assert drop(torch.ones(3, 5, 7, dtype=torch.bfloat16)).dtype == torch.bfloat16
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(1_000_003)), y.detach())  # the global seed decides the mask
    assert torch.equal(drop.eval()(torch.ones(5)), torch.ones(5))


def test_cpu_dropout_under_torch_compile_is_nn_dropout(monkeypatch):
    """While torch.compile traces, FastDropout hands the mask to nn.Dropout, which the compiler fuses
    (the fast mask, compiled, failed with a garbage view shape at batch 8)."""
    x = torch.ones(4, 64, 64)
    torch.manual_seed(0)
    fast = FastDropout(0.25).train()(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    traced = FastDropout(0.25).train()(x)
    torch.manual_seed(0)
    assert torch.equal(traced, torch.nn.Dropout(0.25).train()(x))
    assert not torch.equal(traced, fast)


def test_one_stream_in_bf16_runs_its_one_token_steps_without_onednn(monkeypatch):
    """One stream with bf16 weights on a CPU: each new token's step (a single row through every linear
    layer) runs without oneDNN and the prompt with it; the text is the plain model's, and oneDNN is
    on again afterwards, even after an error."""
    plain = tiny(block_size=32).eval().to(torch.bfloat16)
    model = speed_up_sampling(copy.deepcopy(plain), "cpu", 1)
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].size(1), torch.backends.mkldnn.enabled))
        if seen.count((1, False)) > 3:
            raise RuntimeError("a failing step")

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    prompt = torch.zeros((1, 3), dtype=torch.long)
    torch.manual_seed(0)
    fast_text = model.generate(prompt, 3)
    assert seen == [(3, True), (1, False), (1, False)]
    with pytest.raises(RuntimeError, match="a failing step"):
        model.generate(prompt, 20)
    assert torch.backends.mkldnn.enabled
    hook.remove()
    torch.manual_seed(0)
    assert torch.equal(fast_text, plain.generate(prompt, 3))


@pytest.mark.skipif(not CAN_PACK, reason="weights are packed on x86 CPUs with oneDNN only")
def test_packed_linears_give_the_plain_models_logits_and_text():
    plain = tiny(block_size=32).eval()
    packed = speed_up_sampling(copy.deepcopy(plain), "cpu", 4)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert n_linear == 9 and sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    idx = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(packed(idx)[0], plain(idx)[0], rtol=1e-4, atol=1e-5)
    # the prompt (4 x 7 rows), then one row per sequence per step, past a cache refill
    greedy = [m.generate(idx, 40, temperature=0.0) for m in (plain, packed)]
    assert torch.equal(greedy[0], greedy[1])


def test_pack_linears_leaves_the_model_as_it_is_where_it_does_not_pay_or_cannot(monkeypatch):
    model = tiny()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def unchanged():
        return [m for m in model.modules() if isinstance(m, torch.nn.Linear)] == linears

    assert pack_linears(model, 1) is model and unchanged()  # one stream: matrix-vector kernels are faster
    with monkeypatch.context() as m:
        m.setattr(platform, "machine", lambda: "arm64")  # not measured there
        assert pack_linears(model, 4) is model and unchanged()

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for error in (RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw"),
                  AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")):
        refused = []

        def refuse(weight, batch_size=None):
            refused.append(weight.shape)
            raise error

        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
        assert pack_linears(model, 4) is model and unchanged() and refused  # tried, refused, left as it was
