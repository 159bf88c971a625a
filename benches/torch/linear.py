"""PyTorch side of benches/linear.rs: the same cases, shapes and dtype (f32).

`_fwd` callables run the forward (run.py wraps them in no_grad); `_bwd` callables run only the
backward of a graph built once, for every input and parameter the engine differentiates.
"""
import warnings

import torch
import torch.nn.functional as F

TOKENS = 1576  # ViT-S/16 at batch 8: 8 x (196 + 1) tokens
CASES = {}


def _linear(name, n_in, n_out):
    x = torch.randn(TOKENS, n_in, requires_grad=True)
    w = (0.05 * torch.randn(n_out, n_in)).requires_grad_(True)
    b = (0.05 * torch.randn(n_out)).requires_grad_(True)
    dy = torch.randn(TOKENS, n_out)
    with torch.enable_grad():
        y = F.linear(x, w, b)
    CASES[f"{name}_fwd"] = lambda: F.linear(x, w, b)
    CASES[f"{name}_bwd"] = lambda: torch.autograd.grad(y, [x, w, b], grad_outputs=dy, retain_graph=True)


for _name, _in, _out in [("qkv", 384, 1152), ("fc1", 384, 1536), ("fc2", 1536, 384)]:
    _linear(_name, _in, _out)


def _wn_head():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.nn.utils.weight_norm(torch.nn.Linear(256, 1000, bias=False))
    x = torch.randn(512, 256, requires_grad=True)
    dy = torch.randn(512, 1000)
    with torch.enable_grad():
        y = m(x)
    CASES["wn_head_fwd"] = lambda: m(x)
    CASES["wn_head_bwd"] = lambda: torch.autograd.grad(
        y, [x, m.weight_v, m.weight_g], grad_outputs=dy, retain_graph=True
    )


def _proto_ce():
    z = torch.randn(512, 1000, requires_grad=True)
    t = torch.softmax(torch.randn(512, 1000), dim=-1)
    tau, ls = 0.1, 0.01
    with torch.enable_grad():
        loss = F.cross_entropy(z / tau, t, label_smoothing=ls)
    CASES["proto_ce_fwd"] = lambda: F.cross_entropy(z / tau, t, label_smoothing=ls)
    CASES["proto_ce_bwd"] = lambda: torch.autograd.grad(loss, [z], retain_graph=True)


_wn_head()
_proto_ce()
