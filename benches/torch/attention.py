"""PyTorch side of benches/attention.rs: the same cases, f32, timm's non-fused attention path
(reshape/permute, q·scale, q@kᵀ, softmax, @v, transpose/reshape), which is the algorithm the
engine runs. Run as a script to also time F.scaled_dot_product_attention (a different, fused
algorithm) on the same shapes:  python3 benches/torch/attention.py [--threads 2]
"""
import math

import torch
import torch.nn.functional as F

HEADS, DIM = 6, 384


def timm_attention(qkv):
    B, N, _ = qkv.shape
    D = DIM // HEADS
    q, k, v = qkv.reshape(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * D**-0.5
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, DIM)


def sdpa_attention(qkv):
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, DIM)


def make(fn, b, n, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * DIM, generator=g)
    dy = torch.randn(b, n, DIM, generator=g)

    def fwd():
        with torch.no_grad():
            fn(qkv)

    qg = qkv.clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(qg)

    def bwd():
        torch.autograd.grad(out, qg, grad_outputs=dy, retain_graph=True)

    return fwd, bwd


def make_pos_interp():
    # DINO's interpolate_pos_encoding for a 96-px crop: a [1, 14, 14, 384] grid viewed as NCHW.
    grid = torch.randn(1, 14, 14, DIM) * 0.02
    sf = (6 + 0.1) / math.sqrt(196)

    def fwd():
        F.interpolate(grid.permute(0, 3, 1, 2), scale_factor=(sf, sf), mode="bicubic", align_corners=False)

    return fwd


CASES = {}
for _name, (_b, _n) in {"attn": (8, 197), "attn96": (64, 37)}.items():
    _fwd, _bwd = make(timm_attention, _b, _n, 0)
    CASES[f"{_name}_fwd"] = _fwd
    CASES[f"{_name}_bwd"] = _bwd
CASES["pos_interp_fwd"] = make_pos_interp()


if __name__ == "__main__":
    # F.scaled_dot_product_attention on the same shapes, reported alongside (not an engine case).
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run import time_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    SDPA_CASES = {}
    for _name, (_b, _n) in {"attn": (8, 197), "attn96": (64, 37)}.items():
        _fwd, _bwd = make(sdpa_attention, _b, _n, 0)
        SDPA_CASES[f"{_name}_sdpa_fwd"] = _fwd
        SDPA_CASES[f"{_name}_sdpa_bwd"] = _bwd
    print("| case | timm path (ms) | SDPA (ms) |")
    print("|---|---:|---:|")
    for name in ["attn_fwd", "attn_bwd", "attn96_fwd", "attn96_bwd"]:
        base, kind = name.rsplit("_", 1)
        with torch.no_grad() if kind == "fwd" else torch.enable_grad():
            t_timm = time_case(CASES[name])
            t_sdpa = time_case(SDPA_CASES[f"{base}_sdpa_{kind}"])
        print(f"| {name} | {t_timm * 1e3:.3f} | {t_sdpa * 1e3:.3f} |")
