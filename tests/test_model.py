import copy
import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, CausalSelfAttention, GPTConfig, KVCache, sample_next


def tiny(**kw):
    args = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def test_output_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss, _ = model(idx, idx)
    assert logits.shape == (3, 16, 11) and loss.shape == ()
    logits, loss, _ = model(idx)
    assert logits.shape == (3, 1, 11) and loss is None  # only the last position without targets


def test_loss_at_init_close_to_uniform():
    model = tiny(vocab_size=65, n_embd=32)
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 65, (2, 8, 16), generator=g)
    _, loss, _ = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_causality():
    model = tiny()
    idx = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    t = 9
    changed[0, t] = (idx[0, t] + 1) % 11
    a, _, _ = model(idx, idx)
    b, _, _ = model(changed, changed)
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
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
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
    full, _, _ = model(idx, idx)
    cache = KVCache(model.config)
    step_logits = [model(idx[:, :5], kv_cache=cache)[0][:, -1]]
    for t in range(5, 16):
        step_logits.append(model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1])
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_a_float32_cache_serves_bf16_weights():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(idx, idx)[0]
        model.to(torch.bfloat16)
        cache = KVCache(model.config, torch.float32)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_equals_the_fused_kernel(dtype):
    """The lecture's maths (fused_kernel=False) and scaled_dot_product_attention: the same outputs and
    gradients, for a whole sequence and for one new token against a cache."""
    torch.manual_seed(0)
    fused = CausalSelfAttention(GPTConfig(n_embd=32, n_head=4, block_size=16, dropout=0.0), layer_idx=0)
    explicit = copy.deepcopy(fused)
    explicit.fused_kernel = False
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(2))
    tol = dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    outs, grads = [], []
    for attn in (fused, explicit):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = attn(xi)
        (y.float() * w).sum().backward()
        outs.append(y.float())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    config = GPTConfig(n_embd=32, n_head=4, block_size=16, n_layer=1)
    steps = []
    for attn in (fused, explicit):
        cache = KVCache(config)
        with torch.no_grad():
            attn(x[:, :9], cache)
            cache.pos = 9
            steps.append(attn(x[:, 9:], cache))  # no mask: every cached position is in its past
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # and the last position of the whole sequence
        torch.testing.assert_close(steps[0], outs[0][:, 9:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mtp_weight", [0.0, 0.3])
def test_flops_per_token_matches_the_flops_pytorch_counts(mtp_weight):
    """6 per parameter and 12 * n_layer * n_embd * block_size for attention (the whole T x T, as the
    written-out maths computes it): the FLOPs that torch's FLOP counter sees in a training step,
    forward and backward, but for LayerNorm's gains (parameters, but no matmul); with multi-token
    prediction, the second head's use of the shared output matrix too."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.0, mtp_weight=mtp_weight)
    model = GPT(cfg)
    for block in model.transformer.h:  # the counter sees the written-out maths' matmuls, not the fused kernel's
        block.attn.fused_kernel = False
    idx = torch.randint(0, 65, (4, 64), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        _, loss, extra_loss = model(idx, idx)
        (loss if extra_loss is None else loss + extra_loss).backward()
    counted = counter.get_total_flops() / idx.numel()
    assert abs(counted - model.flops_per_token()) / counted < 0.01, (counted, model.flops_per_token())


def test_sample_next_top_k_keeps_only_k_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}


@pytest.mark.parametrize("fused_kernel", [True, False])  # the fused kernel, the maths written out
def test_attention_weights_get_dropout_in_training_only(fused_kernel):
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=16, n_head=2, block_size=8, dropout=0.5), layer_idx=0)
    attn.fused_kernel = fused_kernel
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
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
    _, loss32, _ = model(idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16, _ = model(idx[:, :-1], idx[:, 1:])
    assert logits16.dtype == torch.bfloat16  # the matmuls really ran in bf16
    assert abs(loss16.item() - loss32.item()) < 0.02


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_position_encodings_are_causal_and_cache_exact(pos_encoding):
    model = tiny(block_size=32, pos_encoding=pos_encoding).eval()
    idx = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 11
    a, _, _ = model(idx, idx)
    b, _, _ = model(changed, changed)
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
        a, _, _ = model(torch.tensor([[1, 2, 3, 4]]))
        b, _, _ = model(torch.tensor([[2, 1, 3, 4]]))
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
    logits, loss, _ = model(idx, idx)
    assert logits.shape == (2, 8, 11) and abs(loss.item() - math.log(11)) < 0.1
    torch.manual_seed(0)
    out = model.generate(idx[:, :1], 20, temperature=0)
    # greedy bigram: each token is the argmax of the row of the token before it
    table = model.token_embedding_table.weight
    assert all(out[0, t + 1] == table[out[0, t]].argmax() for t in range(20))


def test_mtp_returns_the_token_after_nexts_loss_beside_the_next_tokens():
    model = tiny(mtp_weight=0.5)
    seq = torch.randint(0, 11, (2, 17), generator=torch.Generator().manual_seed(1))
    _, loss, extra_loss = model(seq[:, :-1], seq[:, 1:])
    (loss + extra_loss).backward()  # the objective, as train_step sums it
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["mtp.weight"].abs().sum() > 0

    # by hand, in eval mode (no dropout here, so the same model): the final hidden states through a
    # hook, a second head on them (a residual step, then the shared lm_head) and the two losses
    model.eval().zero_grad()
    hidden = []
    model.transformer.ln_f.register_forward_hook(lambda m, args, out: hidden.append(out))
    logits, next_only, none = model(seq[:, :-1], seq[:, 1:])
    assert none is None  # evaluation never uses the second head
    torch.testing.assert_close(loss, next_only, rtol=0, atol=0)  # the loss returned: the next token's alone
    h = hidden[0][:, :-1]  # positions 0..14, whose token after next is seq[:, 2:]
    after_next = model.lm_head(h + h @ model.mtp.weight.T)
    by_hand = 0.5 * F.cross_entropy(after_next.reshape(-1, 11), seq[:, 2:].reshape(-1))
    torch.testing.assert_close(extra_loss, by_hand)  # the weighted term
    (F.cross_entropy(logits.reshape(-1, 11), seq[:, 1:].reshape(-1)) + by_hand).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_mtp_keeps_the_kv_cache_exact_and_trains_its_head():
    model = tiny(block_size=32, pos_encoding="rope", mtp_weight=0.3).eval()  # 4 + 28 tokens: one block
    idx = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(1))
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(7)
        out[use_cache] = model.generate(idx, 28, temperature=0.9, top_k=6, use_cache=use_cache)
    assert torch.equal(out[True], out[False])
    model.train()
    data = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(2))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu", optimizer="muon")
    head = model.mtp.weight.detach().clone()
    first = model(data[:, :-1], data[:, 1:])[1].item()
    for _ in range(40):
        opt.zero_grad()
        _, loss, extra_loss = model(data[:, :-1], data[:, 1:])
        (loss + extra_loss).backward()
        opt.step()
    assert model(data[:, :-1], data[:, 1:])[1].item() < first - 1.0
    assert not torch.equal(model.mtp.weight, head)  # the second head learnt too
