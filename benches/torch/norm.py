"""PyTorch side of benches/norm.rs: the same cases, shapes and f32, channels-last for batch norm.

`_fwd` cases run the forward (run.py wraps them in no_grad); `_bwd` cases run only the backward
of a graph built once. Batch norm is in training mode followed by a (separate) ReLU, which the
engine fuses.
"""
import torch

torch.manual_seed(0)


def _bn_cases(name, n, h, w, c):
    bn = torch.nn.BatchNorm2d(c).to(memory_format=torch.channels_last).train()
    x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)

    def fwd():
        return torch.relu(bn(x))

    xg = x.clone().requires_grad_()
    with torch.enable_grad():
        y = torch.relu(bn(xg))
    dy = torch.randn_like(y).to(memory_format=torch.channels_last)
    inputs = [xg, bn.weight, bn.bias]

    def bwd():
        return torch.autograd.grad(y, inputs, grad_outputs=dy, retain_graph=True)

    return {f"{name}_fwd": fwd, f"{name}_bwd": bwd}


def _ln_cases():
    ln = torch.nn.LayerNorm(384, eps=1e-6)
    x = torch.randn(8 * 197, 384)

    def fwd():
        return ln(x)

    xg = x.clone().requires_grad_()
    with torch.enable_grad():
        y = ln(xg)
    dy = torch.randn_like(y)
    inputs = [xg, ln.weight, ln.bias]

    def bwd():
        return torch.autograd.grad(y, inputs, grad_outputs=dy, retain_graph=True)

    return {"layernorm_fwd": fwd, "layernorm_bwd": bwd}


def _gelu_cases():
    act = torch.nn.GELU()
    x = torch.randn(8 * 197, 1536)

    def fwd():
        return act(x)

    xg = x.clone().requires_grad_()
    with torch.enable_grad():
        y = act(xg)
    dy = torch.randn_like(y)

    def bwd():
        return torch.autograd.grad(y, [xg], grad_outputs=dy, retain_graph=True)

    return {"gelu_fwd": fwd, "gelu_bwd": bwd}


def _relu_cases():
    x = torch.randn(8, 256, 56, 56).to(memory_format=torch.channels_last)

    def fwd():
        return torch.relu(x)

    return {"relu_fwd": fwd}


CASES = {}
CASES.update(_bn_cases("bn_s1", 8, 56, 56, 256))
CASES.update(_bn_cases("bn_stem", 8, 112, 112, 64))
CASES.update(_ln_cases())
CASES.update(_gelu_cases())
CASES.update(_relu_cases())
