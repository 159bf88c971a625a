"""PyTorch reference for the attention family: multi-head self-attention (timm's ViT `Attention`
between its two linears), bicubic interpolation of a channels-last grid (F.interpolate, size and
scale-factor modes, as DINO's interpolate_pos_encoding) and batch concatenation / split.

Inputs come from common.randn in the engine layout; the fixture holds outputs and gradients only,
in the engine layout. Run from the repository root: python3 tests/reference/ops_attention.py
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 0
out = {}

# (name, B, N, H, D)
ATTENTION = [("a", 2, 5, 2, 3), ("b", 3, 7, 3, 4), ("c", 2, 17, 6, 8)]


def timm_attention(qkv, heads):
    """timm.models.vision_transformer.Attention.forward, non-fused path, without the linears."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    q, k, v = qkv.reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * D**-0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    x = attn @ v
    return x.transpose(1, 2).reshape(B, N, C), (q, k, v)


for name, B, N, H, D in ATTENTION:
    C = H * D
    p = f"attn_{name}"
    qkv = common.t(common.randn(SEED, f"{p}_qkv", [B, N, 3 * C])).requires_grad_(True)
    dy = common.t(common.randn(SEED, f"{p}_dy", [B, N, C]))
    y, (q, k, v) = timm_attention(qkv, H)
    (dqkv,) = torch.autograd.grad(y, qkv, grad_outputs=dy)
    # Cross-check against the fused kernel (a different algorithm, same function).
    with torch.no_grad():
        ys = F.scaled_dot_product_attention(q / D**-0.5, k, v).transpose(1, 2).reshape(B, N, C)
    err = ((ys - y).norm() / y.norm()).item()
    assert err < 1e-6, f"{p}: timm path and SDPA differ by {err:.2e}"
    out[f"{p}_out"] = y
    out[f"{p}_dqkv"] = dqkv


def bicubic(x_hwc, **kw):
    """F.interpolate on the NCHW view of a channels-last [H, W, C] grid, back to [H', W', C]."""
    y = F.interpolate(x_hwc.permute(2, 0, 1)[None], mode="bicubic", align_corners=False, **kw)
    return y[0].permute(1, 2, 0)


# (name, in_h, in_w, C, kwargs): size mode and DINO-style scale-factor mode, up and down.
BICUBIC = [
    ("size_down", 5, 5, 3, dict(size=(3, 3))),
    ("size_up", 4, 4, 5, dict(size=(7, 6))),
    ("size_odd", 3, 5, 4, dict(size=(8, 2))),
    ("sf_dino96", 14, 14, 4, dict(scale_factor=((6 + 0.1) / math.sqrt(196), (6 + 0.1) / math.sqrt(196)))),
    ("sf_dino224", 14, 14, 3, dict(scale_factor=((14 + 0.1) / math.sqrt(196), (14 + 0.1) / math.sqrt(196)))),
    ("sf_up", 4, 3, 3, dict(scale_factor=(1.7, 2.3))),
    ("sf_down", 5, 5, 3, dict(scale_factor=(0.61, 0.61))),
]


def bicubic_adjoint(h, w, dy, **kw):
    """The exact adjoint of the forward: dx = M dy with M[i, o] = weight of input pixel i in
    output pixel o, read off the forward applied to the h·w unit images."""
    basis = torch.eye(h * w).reshape(h * w, 1, h, w)
    m = F.interpolate(basis, mode="bicubic", align_corners=False, **kw).reshape(h * w, -1)
    c = dy.shape[-1]
    return (m.double() @ dy.double().reshape(-1, c)).reshape(h, w, c)


for name, h, w, c, kw in BICUBIC:
    p = f"bicubic_{name}"
    x = common.t(common.randn(SEED, f"{p}_x", [h, w, c])).requires_grad_(True)
    y = bicubic(x, **kw)
    dy = common.t(common.randn(SEED, f"{p}_dy", list(y.shape)))
    (dx,) = torch.autograd.grad(y, x, grad_outputs=dy)
    adj = bicubic_adjoint(h, w, dy, **kw)
    if tuple(y.shape[:2]) == (h, w):
        # PyTorch's CPU backward copies dy when the output size equals the input size, even when
        # a scale factor makes the forward a non-identity map (DINO's 224-px factor 14.1/14): its
        # gradient is then not the adjoint of its forward. The engine returns the true adjoint.
        assert ((dx - dy).abs().max() == 0) and ((adj - dx.double()).norm() > 1e-3 * dx.norm())
        dx = adj
    else:
        err = ((adj - dx.double()).norm() / adj.norm()).item()
        assert err < 1e-6, f"{p}: autograd and adjoint differ by {err:.2e}"
    out[f"{p}_out"] = y
    out[f"{p}_dx"] = dx

# Batch concatenation and split (Tensor::cat_batch / split_batch).
a = common.t(common.randn(SEED, "cat_a", [2, 3, 4]))
b = common.t(common.randn(SEED, "cat_b", [5, 3, 4]))
c = common.t(common.randn(SEED, "cat_c", [1, 3, 4]))
out["cat_out"] = torch.cat([a, b, c], dim=0)
s = common.t(common.randn(SEED, "split_x", [7, 2, 3]))
for i, part in enumerate(torch.split(s, [3, 0, 4], dim=0)):
    out[f"split_{i}"] = part

common.save(out, "ops/attention.safetensors")
