import copy

import torch

from model import GPT, GPTConfig
from muon import Muon, orthogonalize


def test_muon_matches_torch_optim_muon_and_loads_its_state():
    """With bfloat16 Newton-Schulz our Muon is torch.optim.Muon (adjust_lr_fn='match_rms_adamw'),
    step for step and bit for bit, for wide, tall and same-shaped matrices (those are orthogonalised
    as one batch); and it continues from torch's saved state."""
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


def test_a_gpt_trained_with_muon_updates_c_attn_as_three_matrices_and_the_others_as_one():
    """optimizer='muon': each matrix in the blocks takes torch.optim.Muon's step, c_attn's queries,
    keys and values each as a matrix of its own."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer="muon")
    x = torch.randint(0, 11, (2, 8))
    model(x, x)[1].backward()
    matrices = {n: p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    expected = {}
    for name, p in matrices.items():
        parts = 3 if name.endswith("attn.c_attn.weight") else 1
        separate = [torch.nn.Parameter(t.detach().clone()) for t in p.chunk(parts)]
        for q, g in zip(separate, p.grad.chunk(parts)):
            q.grad = g.clone()
        torch.optim.Muon(separate, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
        expected[name] = torch.cat([q.detach() for q in separate])
    optimizer.step()
    assert matrices and all(torch.equal(p, expected[n]) for n, p in matrices.items())
    assert any(n.endswith("attn.c_attn.weight") for n in matrices)


def test_orthogonalize_in_float32_moves_singular_values_near_one():
    torch.manual_seed(0)
    g = torch.randn(96, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values over 2 decades
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(orthogonalize(g, dtype=dtype).float())
        assert orthogonalize(g, dtype=dtype).dtype == dtype
        assert 0.5 < s.min() and s.max() < 1.5, (dtype, s)
    diff = orthogonalize(g, dtype=torch.float32) - orthogonalize(g, dtype=torch.bfloat16).float()
    assert diff.norm() / orthogonalize(g, dtype=torch.float32).norm() < 0.05  # the same update, up to bf16 rounding
