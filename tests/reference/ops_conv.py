"""PyTorch reference for the conv family (src/backend/cpu/conv.rs, pool.rs): conv2d in the
variants ResNet-50 and ViT-S/16 use, the stem max-pool and the global average pool, forward and
backward. Writes tests/fixtures/ops/conv.safetensors, read by tests/ops_conv.rs.

Inputs come from common.randn in the ENGINE layout (activations NHWC, conv weights O×KH×KW×I) and
are permuted to PyTorch's NCHW / O×I×KH×KW here; outputs and gradients are permuted back and are
the only tensors stored. PyTorch computes in float64 from the float32 inputs, so the fixture is
the exact answer to within f32 rounding. Run from the repository root:
    python3 tests/reference/ops_conv.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 7

# name: (x NHWC, w O×KH×KW×I, stride, padding, bias)
CONVS = {
    "conv_1x1_s1": ([2, 9, 9, 5], [6, 1, 1, 5], 1, 0, False),
    "conv_1x1_s2": ([2, 9, 9, 4], [6, 1, 1, 4], 2, 0, False),
    "conv_3x3_s1": ([2, 9, 9, 5], [4, 3, 3, 5], 1, 1, False),
    "conv_3x3_s2": ([2, 11, 11, 3], [5, 3, 3, 3], 2, 1, True),
    "conv_7x7_s2": ([2, 11, 11, 3], [4, 7, 7, 3], 2, 3, False),
    "conv_patch4": ([2, 8, 12, 3], [6, 4, 4, 3], 4, 0, True),
}

# name: (x NHWC, kernel, stride, padding)
MAXPOOLS = {
    "maxpool_3s2p1": ([2, 11, 11, 4], 3, 2, 1),
    "maxpool_2s2p0": ([2, 9, 8, 3], 2, 2, 0),
    "maxpool_c20": ([2, 9, 9, 20], 3, 2, 1),
}

AVGPOOL = ("avgpool", [2, 7, 5, 8])


def nhwc(a):
    """Engine-layout numpy array -> float64 torch NCHW tensor (also for O×KH×KW×I weights)."""
    return common.t(a).double().permute(0, 3, 1, 2).contiguous().requires_grad_(True)


def back(t):
    """NCHW (or O×I×KH×KW) -> NHWC (O×KH×KW×I)."""
    return t.permute(0, 2, 3, 1).contiguous()


def main():
    out = {}
    for name, (xs, ws, stride, pad, has_bias) in CONVS.items():
        x = nhwc(common.randn(SEED, f"{name}.x", xs))
        w = nhwc(common.randn(SEED, f"{name}.w", ws))
        b = common.t(common.randn(SEED, f"{name}.b", [ws[0]])).double().requires_grad_(True) if has_bias else None
        y = F.conv2d(x, w, b, stride, pad)
        dy = nhwc(common.randn(SEED, f"{name}.dy", list(back(y).shape))).detach()
        inputs = [x, w] + ([b] if has_bias else [])
        grads = torch.autograd.grad(y, inputs, grad_outputs=dy)
        out[f"{name}.y"] = back(y)
        out[f"{name}.dx"] = back(grads[0])
        out[f"{name}.dw"] = back(grads[1])
        if has_bias:
            out[f"{name}.db"] = grads[2]
    for name, (xs, k, s, p) in MAXPOOLS.items():
        x = nhwc(common.randn(SEED, f"{name}.x", xs))
        y = F.max_pool2d(x, k, s, p)
        dy = nhwc(common.randn(SEED, f"{name}.dy", list(back(y).shape))).detach()
        (dx,) = torch.autograd.grad(y, [x], grad_outputs=dy)
        out[f"{name}.y"] = back(y)
        out[f"{name}.dx"] = back(dx)
    name, xs = AVGPOOL
    x = nhwc(common.randn(SEED, f"{name}.x", xs))
    y = x.mean(dim=(2, 3))
    dy = common.t(common.randn(SEED, f"{name}.dy", [xs[0], xs[3]])).double()
    (dx,) = torch.autograd.grad(y, [x], grad_outputs=dy)
    out[f"{name}.y"] = y
    out[f"{name}.dx"] = back(dx)
    common.save(out, "ops/conv.safetensors")


if __name__ == "__main__":
    main()
