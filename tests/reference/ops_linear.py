"""PyTorch reference for the `linear` op family: linear, weight-normalised linear, softmax,
log-softmax and cross-entropy with probability targets, temperature and label smoothing.

Inputs come from common.randn/rand keyed by (seed, name) so tests/ops_linear.rs regenerates them
bit-identically; only outputs and gradients are stored. Every tensor here is already in the
engine's layout (linear weights [out, in] as in PyTorch; weight_g flattened from [out, 1] to [out]).

Run from the repository root: python3 tests/reference/ops_linear.py
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 7
out = {}


def leaf(name, shape):
    return common.t(common.randn(SEED, name, shape)).requires_grad_(True)


def dy_for(name, shape):
    return common.t(common.randn(SEED, name + ".dy", shape))


def linear_case(name, xshape, n_out, bias):
    n_in = xshape[-1]
    x = leaf(name + ".x", xshape)
    w = leaf(name + ".w", [n_out, n_in])
    b = leaf(name + ".b", [n_out]) if bias else None
    y = F.linear(x, w, b)
    dy = dy_for(name, list(y.shape))
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    out[name + ".y"] = y
    out[name + ".dx"] = grads[0]
    out[name + ".dw"] = grads[1]
    if bias:
        out[name + ".db"] = grads[2]


def weight_norm_case(name, xshape, n_out):
    n_in = xshape[-1]
    x = leaf(name + ".x", xshape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.nn.utils.weight_norm(torch.nn.Linear(n_in, n_out, bias=False))
    with torch.no_grad():
        m.weight_v.copy_(common.t(common.randn(SEED, name + ".v", [n_out, n_in])))
        m.weight_g.copy_(common.t(common.randn(SEED, name + ".g", [n_out])).view(n_out, 1))
    y = m(x)
    dy = dy_for(name, list(y.shape))
    dx, dv, dg = torch.autograd.grad(y, [x, m.weight_v, m.weight_g], dy)
    out[name + ".y"] = y
    out[name + ".dx"] = dx
    out[name + ".dv"] = dv
    out[name + ".dg"] = dg.reshape(n_out)


def softmax_case(name, shape, log):
    x = leaf(name + ".x", shape)
    y = F.log_softmax(x, dim=-1) if log else F.softmax(x, dim=-1)
    (dx,) = torch.autograd.grad(y, [x], dy_for(name, shape))
    out[name + ".y"] = y
    out[name + ".dx"] = dx


def soft_targets(name, shape):
    """Positive random rows normalised to sum to 1 (the Rust test does the same in f32)."""
    t = common.t(common.rand(SEED, name + ".t", shape, 0.1, 1.0))
    return t / t.sum(dim=-1, keepdim=True)


def hard_labels(b, k):
    """Class indices, mirrored in tests/ops_linear.rs."""
    return [(3 * i + 1) % k for i in range(b)]


def ce_case(name, b, k, tau, ls, soft):
    z = leaf(name + ".z", [b, k])
    if soft:
        t = soft_targets(name, [b, k])
    else:
        t = F.one_hot(torch.tensor(hard_labels(b, k)), k).to(torch.float32)
    loss = F.cross_entropy(z / tau, t, label_smoothing=ls)
    dloss = common.t(common.randn(SEED, name + ".dloss", [1]))
    (dz,) = torch.autograd.grad(loss, [z], dloss.reshape(()))
    out[name + ".loss"] = loss.reshape(1)
    out[name + ".dz"] = dz


linear_case("linear_bias", [2, 3, 5], 4, True)
linear_case("linear_nobias", [7, 6], 3, False)
weight_norm_case("wn", [5, 6], 4)
weight_norm_case("wn_lead", [2, 3, 7], 5)
softmax_case("softmax", [4, 9], False)
softmax_case("log_softmax", [2, 3, 11], True)
for tau in (0.1, 1.0):
    for ls in (0.0, 0.1):
        for soft in (True, False):
            ce_case(f"ce_{'soft' if soft else 'hard'}_t{tau}_ls{ls}", 6, 10, tau, ls, soft)

common.save(out, "ops/linear.safetensors")
