import copy
import math
import platform
from contextlib import nullcontext

import pytest
import torch

from helpers import CAN_PACK
from model import GPT, GPTConfig, KVCache, fused_adamw_devices, sample_next


def tiny(**kw):
    args = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def test_output_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 11) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 11) and loss is None  # only the last position without targets


def test_loss_at_init_close_to_uniform():
    model = tiny(vocab_size=65, n_embd=32)
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 65, (2, 8, 16), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_causality():
    model = tiny()
    idx = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    t = 9
    changed[0, t] = (idx[0, t] + 1) % 11
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])  # the past does not see the future
    assert not torch.allclose(a[:, t:], b[:, t:])  # ... and the change is visible from t on


def test_default_shakespeare_config_has_10_65M_parameters():
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False))
    assert round(model.get_num_params() / 1e6, 2) == 10.65


def test_state_dict_names_match_nanogpt():
    keys = set(tiny(n_layer=1).state_dict())
    for k in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
              "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
              "transformer.ln_f.weight", "lm_head.weight"]:
        assert k in keys
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_residual_projections_use_scaled_init():
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=8, n_head=4, n_embd=256))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_tiny_model_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(2))
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.99), "cpu")
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_weight_decay_only_on_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert opt.defaults["fused"] is True  # torch >= 2.4 has a fused AdamW for CPU


def test_greedy_generation_is_deterministic_and_equals_top_k_1():
    model = tiny().eval()
    idx = torch.tensor([[1, 2, 3]])
    a = model.generate(idx, 10, temperature=0)
    b = model.generate(idx, 10, temperature=0)
    torch.manual_seed(123)
    c = model.generate(idx, 10, temperature=1.0, top_k=1)
    assert a.shape == (1, 13) and torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[:, :3], idx)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 5), (1.3, 3), (0.0, None)])
def test_kv_cache_generates_the_same_tokens(temperature, top_k):
    model = tiny(block_size=32).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(7)
        out[use_cache] = model.generate(idx, 29, temperature, top_k, use_cache=use_cache)
    assert torch.equal(out[True], out[False])


def test_kv_cache_logits_match_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx, idx)
    cache = KVCache(model.config)
    step_logits = [model(idx[:, :5], kv_cache=cache)[0][:, -1]]
    for t in range(5, 16):
        step_logits.append(model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1])
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_with_bf16_weights_on_a_cpu_the_cache_and_its_attention_are_float32():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(idx, idx)[0]
        model.to(torch.bfloat16)
        cache = KVCache(model.config)
        step_logits = [model(idx[:, :5], kv_cache=cache)[0][:, -1]]
        for t in range(5, 16):
            step_logits.append(model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1])
    assert cache.k.dtype == cache.v.dtype == torch.float32 and step_logits[-1].dtype == torch.bfloat16
    torch.testing.assert_close(torch.stack(step_logits, 1).float(), full[:, 4:], rtol=0, atol=0.01)


def test_generation_continues_past_block_size():
    model = tiny(block_size=8).eval()
    idx = torch.tensor([[1, 2]])
    for use_cache in (True, False):
        out = model.generate(idx, 30, temperature=0, use_cache=use_cache)
        assert out.shape == (1, 32) and out.min() >= 0 and out.max() < 11
    # within the first block both paths agree exactly
    a = model.generate(idx, 6, temperature=0, use_cache=True)
    b = model.generate(idx, 6, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny(block_size=8)(torch.zeros(1, 9, dtype=torch.long))


def test_config_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_sample_next_top_k_keeps_only_k_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}


def test_explicit_attention_equals_sdpa():
    from model import explicit_attention
    q, k, v = torch.randn(3, 2, 4, 10, 8, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(explicit_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)
    # and its gradients (the scale and mask live inside one baddbmm)
    w = torch.randn(2, 4, 10, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for attention in (explicit_attention, lambda *qkv: torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (attention(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # one new token against cached keys and values: no mask, as scaled_dot_product_attention without is_causal
    last = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v)
    torch.testing.assert_close(explicit_attention(q[:, :, -1:], k, v), last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # scaled_dot_product_attention, explicit
def test_attention_weights_get_dropout_in_training_only(dtype):
    from model import CausalSelfAttention
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=16, n_head=2, block_size=8, dropout=0.5), layer_idx=0)
    x = torch.randn(2, 8, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        plain = attn.eval()(x).float()
        attn.train()
        attn.resid_dropout.eval()  # only the attention weights' dropout left on
        draws = torch.stack([attn(x).float() for _ in range(400)])
    assert not torch.allclose(draws[0], plain, atol=1e-3)  # some weights were dropped
    assert not torch.allclose(draws[0], draws[1], atol=1e-3)  # a fresh mask every call
    torch.testing.assert_close(draws.mean(0), plain, atol=0.05, rtol=0)  # and scaled: unbiased on average


def test_bf16_autocast_close_to_fp32():
    model = tiny(vocab_size=65, n_embd=32)
    idx = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(5))
    _, loss32 = model(idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(idx[:, :-1], idx[:, 1:])
    assert logits16.dtype == torch.bfloat16  # the bf16 path (explicit attention on CPU) really ran
    assert abs(loss16.item() - loss32.item()) < 0.02


def test_cpu_dropout_rate_scale_and_gradient():
    from model import FastDropout
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
    (compiling the fast mask made the GPU recipe's CPU step fail at batch 8, torch 2.13.0)."""
    from model import FastDropout
    x = torch.ones(4, 64, 64)
    torch.manual_seed(0)
    fast = FastDropout(0.25).train()(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    traced = FastDropout(0.25).train()(x)
    torch.manual_seed(0)
    assert torch.equal(traced, torch.nn.Dropout(0.25).train()(x))
    assert not torch.equal(traced, fast)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_position_encodings_are_causal_and_cache_exact(pos_encoding):
    model = tiny(block_size=32, pos_encoding=pos_encoding).eval()
    idx = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 11
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(7)
        out[use_cache] = model.generate(idx[:, :4], 28, temperature=0.9, top_k=6, use_cache=use_cache)
    assert torch.equal(out[True], out[False])


def test_position_encodings_tell_order_apart():
    # without positions, attention is blind to order: "1 2 3 4" and "2 1 3 4" would predict alike
    for pe in ("learned", "sinusoidal", "rope"):
        model = tiny(pos_encoding=pe).eval()
        a, _ = model(torch.tensor([[1, 2, 3, 4]]))
        b, _ = model(torch.tensor([[2, 1, 3, 4]]))
        assert not torch.allclose(a, b), pe


def test_sinusoidal_table_and_rope_rotation():
    from model import apply_rope, rope_tables, sinusoidal_table
    table = sinusoidal_table(50, 8)
    assert table.shape == (50, 8) and torch.equal(table[0], torch.tensor([0.0, 1.0] * 4))
    # rotary: q . k depends only on the distance between positions
    cos, sin = rope_tables(20, 8)
    q, k = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    def dot(i, j):
        return (apply_rope(q.view(1, 1, 1, 8), cos[i], sin[i]) * apply_rope(k.view(1, 1, 1, 8), cos[j], sin[j])).sum()
    torch.testing.assert_close(dot(3, 1), dot(12, 10))
    assert not torch.allclose(dot(3, 1), dot(3, 2))
    # the rotation itself, pair by pair: channels (i, i + 4) of position p turn by p / 10000^(2i / 8);
    # a checkpoint trained with rope depends on exactly this pairing
    x = torch.randn(2, 3, 20, 8, generator=torch.Generator().manual_seed(1))
    angle = torch.arange(20.0)[:, None] / 10000 ** (torch.arange(0, 8, 2) / 8)
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_bigram_model():
    from model import build_model
    model = build_model(GPTConfig(model_type="bigram", vocab_size=11, block_size=8))
    idx = torch.randint(0, 11, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 11) and abs(loss.item() - math.log(11)) < 0.1
    torch.manual_seed(0)
    out = model.generate(idx[:, :1], 20, temperature=0)
    # greedy bigram: each token is the argmax of the row of the token before it
    table = model.token_embedding_table.weight
    assert all(out[0, t + 1] == table[out[0, t]].argmax() for t in range(20))


def test_muon_matches_torch_optim_muon_and_loads_its_state():
    """With bfloat16 Newton-Schulz our Muon is torch.optim.Muon (adjust_lr_fn='match_rms_adamw'),
    step for step and bit for bit, for wide, tall and same-shaped matrices (those are orthogonalised
    as one batch); and it continues from torch's saved state."""
    from model import Muon
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40)),
            torch.nn.Parameter(torch.randn(48, 16))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon(ours, lr=3e-3, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")

    def step(params, opt, grads):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    for i in range(4):
        grads = [torch.randn_like(p) for p in ours]
        step(ours, a, grads)
        step(theirs, b, grads)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    c = Muon(resumed, lr=1.0, ns_dtype=torch.bfloat16)
    c.load_state_dict(copy.deepcopy(b.state_dict()))  # torch's state: lr, momentum and buffers come with it
    grads = [torch.randn_like(p) for p in ours]
    step(resumed, c, grads)
    step(theirs, b, grads)
    assert all(torch.equal(p, q) for p, q in zip(resumed, theirs))


def test_muon_orthogonalises_each_part_of_a_stacked_matrix_as_a_matrix_of_its_own():
    """c_attn stacks the query, key and value matrices: with parts={c_attn: 3} Muon updates it as
    torch.optim.Muon updates three separate matrices (so the parts' update differs from the whole's)."""
    from model import GPT, Muon
    torch.manual_seed(0)
    qkv, square = torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 16))
    tall = torch.nn.Parameter(torch.randn(80, 16))  # two tall parts, 40 x 16
    separate = [torch.nn.Parameter(t.detach().clone()) for t in (*qkv.chunk(3), square, *tall.chunk(2))]
    whole = torch.nn.Parameter(qkv.detach().clone())
    a = Muon([qkv, square, tall], lr=3e-3, ns_dtype=torch.bfloat16, parts={qkv: 3, tall: 2})
    b = torch.optim.Muon(separate, lr=3e-3, adjust_lr_fn="match_rms_adamw")
    c = Muon([whole], lr=3e-3, ns_dtype=torch.bfloat16)
    for _ in range(3):
        g_qkv, g_square, g_tall = torch.randn(48, 16), torch.randn(16, 16), torch.randn(80, 16)
        qkv.grad, square.grad, tall.grad, whole.grad = g_qkv.clone(), g_square.clone(), g_tall.clone(), g_qkv.clone()
        for p, g in zip(separate, (*g_qkv.chunk(3), g_square, *g_tall.chunk(2))):
            p.grad = g.clone()
        for opt in (a, b, c):
            opt.step()
    assert torch.equal(qkv, torch.cat(separate[:3])) and torch.equal(square, separate[3])
    assert torch.equal(tall, torch.cat(separate[4:]))
    assert not torch.allclose(qkv, whole)
    # the GPT hands Muon its c_attn matrices as three parts each, and nothing else
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer="muon").optimizers["muon"]
    assert set(muon.parts) == {block.attn.c_attn.weight for block in model.transformer.h}
    assert set(muon.parts.values()) == {3}


def test_orthogonalize_in_float32_moves_singular_values_near_one():
    from model import orthogonalize
    torch.manual_seed(0)
    g = torch.randn(96, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values over 2 decades
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(orthogonalize(g, dtype=dtype).float())
        assert orthogonalize(g, dtype=dtype).dtype == dtype
        assert 0.5 < s.min() and s.max() < 1.5, (dtype, s)
    diff = orthogonalize(g, dtype=torch.float32) - orthogonalize(g, dtype=torch.bfloat16).float()
    assert diff.norm() / orthogonalize(g, dtype=torch.float32).norm() < 0.05  # the same update, up to bf16 rounding


def test_fused_adamw_covers_cuda_and_cpu():
    assert {"cuda", "cpu"} <= set(fused_adamw_devices())



def test_flops_per_token_follows_the_6n_rule():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=2, n_head=2, n_embd=16))
    assert model.flops_per_token() == 6 * model.get_num_params() + 12 * 2 * 16 * 8


def test_one_token_speed_path_is_taken_agrees_and_restores_onednn():
    """One stream with bf16 weights on a CPU runs its single-token steps without oneDNN (the prompt
    with it); the logits agree with oneDNN's, and oneDNN is on again afterwards, even after an error."""
    from model import one_token_speed_path
    model = tiny(block_size=32).eval().to(torch.bfloat16)
    seen = []
    real_forward = GPT.forward

    def recording_forward(self, idx, targets=None, kv_cache=None):
        seen.append((idx.size(1), torch.backends.mkldnn.enabled))
        return real_forward(self, idx, targets, kv_cache)

    GPT.forward = recording_forward
    try:
        model.generate(torch.zeros((1, 3), dtype=torch.long), 20)
    finally:
        GPT.forward = real_forward
    assert seen[0] == (3, True) and seen[1:] == [(1, False)] * 19
    assert torch.backends.mkldnn.enabled
    idx = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(0))
    logits = []
    for speed_path in (True, False):
        cache = KVCache(model.config)
        with torch.inference_mode():
            model(idx[:, :-1], kv_cache=cache)
            with one_token_speed_path(idx, torch.bfloat16) if speed_path else nullcontext():
                logits.append(model(idx[:, -1:], kv_cache=cache)[0].float())
    assert torch.allclose(logits[0], logits[1], atol=2e-2)
    with pytest.raises(RuntimeError):
        with one_token_speed_path(idx, torch.bfloat16):
            raise RuntimeError
    assert torch.backends.mkldnn.enabled


@pytest.mark.skipif(not CAN_PACK, reason="weights are packed on x86 CPUs with oneDNN only")
def test_packed_linears_give_the_plain_models_logits_and_text():
    from model import PackedLinear, pack_linears
    plain = tiny(block_size=32).eval()
    packed = pack_linears(copy.deepcopy(plain), 4)
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
    from model import pack_linears
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
