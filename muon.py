"""
Muon (Keller Jordan, 2024), an optimizer for the 2-D weight matrices inside the transformer blocks:
SGD with Nesterov momentum whose update is orthogonalised, so that every direction of a matrix moves
by a similar amount. GPT.configure_optimizers(optimizer='muon') pairs it with AdamW for the rest.
"""

import math

import torch


def orthogonalize(g, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """Newton-Schulz iterations that take the matrix g (or each of a stack of them, (k, m, n)) to about
    U V^T, where g = U S V^T: every singular value moves into roughly [0.7, 1.2]. The quintic's
    coefficients are tuned for speed, not exact convergence; it needs only matmuls, so it runs in
    whatever dtype is fastest."""
    if g.dim() == 2:
        return orthogonalize(g[None], steps, dtype, eps)[0]
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: x @ x.T is then the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius bounds spectral: all singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update with adjust_lr_fn='match_rms_adamw' (AdamW's learning rate serves,
    scaled by 0.2 * sqrt(max dimension)); their state dicts load in each other. Three differences:
    ns_dtype picks the precision of Newton-Schulz (torch always uses bfloat16, which is emulated and
    slow on most CPUs); matrices of the same shape are orthogonalised together, as one batch of
    matmuls; and `parts` names matrices that stack several by rows, such as c_attn (queries, keys and
    values, fused for speed only): each part is orthogonalised and scaled as a matrix of its own.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16,
                 parts=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group setting: a checkpoint from another machine must not bring its own
        self.parts = parts or {}  # {parameter: how many matrices it stacks}; 1 for any other

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape = {}  # shape of a matrix -> [(parameter, its update before orthogonalisation)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # an exponential moving average of the gradients
                update = p.grad.lerp(buf, momentum)  # Nesterov: look ahead along the average
                update = update.view(self.parts.get(p, 1), -1, p.size(-1))  # (parts, rows of a part, columns)
                same_shape.setdefault(update.shape[1:], []).append((p, update))
            for shape, pairs in same_shape.items():
                ortho = orthogonalize(torch.cat([u for _, u in pairs]), group["ns_steps"], self.ns_dtype)
                for (p, _), o in zip(pairs, ortho.split([len(u) for _, u in pairs])):
                    p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW
                    p.add_(o.reshape(p.shape), alpha=-lr * 0.2 * math.sqrt(max(shape)))


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest)."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def torch_optimizers(optimizer):
    """The torch optimizers in what configure_optimizers returned: AdamW alone, or Muon's and AdamW's."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, Optimizers) else [optimizer]
