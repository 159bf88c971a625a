"""Shared helpers of the PyTorch reference scripts that write the committed fixtures.

The generator is the engine's own (src/rng.rs): SplitMix64's mixer over a Weyl sequence, keyed
by FNV-1a(name) ^ seed. Python and Rust therefore fill every input and parameter with the same
values, and fixtures store only what PyTorch computed (outputs and gradients).

Run any reference script from the repository root, e.g. `python3 tests/reference/ops_conv.py`.
Requires: torch, numpy, safetensors (pip install torch numpy safetensors).
"""
import os

import numpy as np

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def mix64(z):
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & MASK
    return h


def _mix64_np(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(seed: int, name: str) -> int:
    return mix64(seed ^ fnv1a64(name.encode()))


def u64_stream(seed: int, name: str, n: int) -> np.ndarray:
    """The first n outputs of Rng::named(seed, name).next_u64()."""
    key = np.uint64(_key(seed, name))
    ctr = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64_np(key + ctr * np.uint64(GOLDEN))


def uniform(seed: int, name: str, n: int) -> np.ndarray:
    """n uniforms in [0, 1) as float64, as Rng::uniform."""
    return (u64_stream(seed, name, n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def randn(seed: int, name: str, shape, std: float = 1.0) -> np.ndarray:
    """As Tensor::randn_named: Box-Muller (cosine branch) over pairs, f64, then rounded to f32."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(seed, name, 2 * n)
    u1, u2 = u[0::2], u[1::2]
    z = np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)
    return (0.0 + std * z).astype(np.float32).reshape(shape)


def rand(seed: int, name: str, shape, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """As Tensor::rand_named: lo + (hi - lo) * u, f64, then rounded to f32."""
    n = int(np.prod(shape)) if len(shape) else 1
    return (lo + (hi - lo) * uniform(seed, name, n)).astype(np.float32).reshape(shape)


def t(a):
    """numpy -> torch float32 tensor (requires_grad off)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def nchw_to_nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def nhwc_to_nchw(x):
    return x.permute(0, 3, 1, 2).contiguous()


def save(tensors: dict, rel: str):
    """Writes {name: torch tensor} as float32 safetensors under tests/fixtures/<rel>."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if v.dtype != torch.int64:
            v = v.to(torch.float32)
        out[k] = v.contiguous()
    path = os.path.join(FIXTURES, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(out, path)
    print(f"wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    # Known values, mirrored by the Rust unit test rng::tests::python_parity.
    print(hex(int(u64_stream(0, "x", 3)[0])), hex(int(u64_stream(0, "x", 3)[2])))
    print(randn(0, "x", [4]).tolist())
    print(rand(3, "y", [3], -1.0, 2.0).tolist())


def reference_value(seed: int, name: str, shape):
    """As src/nn/init.rs::reference_value: one tensor of the reference fill, PyTorch layout."""
    leaf = name.rsplit(".", 1)[-1]
    shape = list(shape)
    if leaf == "running_var":
        return rand(seed, name, shape, 0.5, 1.5)
    if leaf in ("running_mean", "bias"):
        return randn(seed, name, shape, 0.1)
    if leaf == "num_batches_tracked":
        return np.zeros(shape, dtype=np.float32)
    if leaf in ("cls_token", "pos_embed"):
        return randn(seed, name, shape, 0.02)
    if leaf == "weight_g" or len(shape) == 1:
        return (randn(seed, name, shape, 0.1) + np.float32(1.0)).astype(np.float32)
    fan_in = max(1, int(np.prod(shape)) // max(1, shape[0]))
    return randn(seed, name, shape, 1.0 / np.sqrt(fan_in))


def reference_fill(module, seed: int):
    """Overwrites every parameter and floating buffer of a torch module with the reference fill
    (src/nn/init.rs::reference_fill), keyed by its state-dict name."""
    import torch

    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            tensor.copy_(torch.from_numpy(reference_value(seed, name, tensor.shape)))
