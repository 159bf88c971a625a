"""PyTorch side of benches/conv.rs: the same cases, shapes and f32, channels-last (oneDNN's fast path).

Batch 8 at 224 px, ResNet-50 shapes: the stem conv (7x7/2, 3->64, weight gradient only, like the
first layer), per stage s1..s4 (width 64/128/256/512 at 56/28/14/7 px) the 3x3 conv (width->width)
and the expanding 1x1 conv (width->4*width), stage 2's stride-2 convs (3x3 128->128 and the 1x1
downsample 256->512, 56->28), and the stem max-pool (3/2/1, 64 channels, 112->56).
`_fwd` runs the forward (run.py wraps it in no_grad); `_bwd` runs only the backward of a graph
built once.
"""
import torch
import torch.nn.functional as F

N = 8
CL = torch.channels_last


def _act(shape, grad):
    x = torch.randn(*shape).to(memory_format=CL)
    return x.requires_grad_(grad)


def _conv_cases(name, c, o, k, stride, pad, hw, need_dx):
    x = _act((N, c, hw, hw), need_dx)
    w = torch.randn(o, c, k, k).to(memory_format=CL).requires_grad_(True)

    def fwd():
        return F.conv2d(x, w, None, stride, pad)

    with torch.enable_grad():
        y = F.conv2d(x, w, None, stride, pad)
    dy = torch.randn(y.shape).to(memory_format=CL)
    inputs = [x, w] if need_dx else [w]

    def bwd():
        return torch.autograd.grad(y, inputs, grad_outputs=dy, retain_graph=True)

    return {f"{name}_fwd": fwd, f"{name}_bwd": bwd}


def _maxpool_cases():
    x = _act((N, 64, 112, 112), True)

    def fwd():
        return F.max_pool2d(x, 3, 2, 1)

    with torch.enable_grad():
        y = F.max_pool2d(x, 3, 2, 1)
    dy = torch.randn(y.shape).to(memory_format=CL)

    def bwd():
        return torch.autograd.grad(y, [x], grad_outputs=dy, retain_graph=True)

    return {"maxpool_fwd": fwd, "maxpool_bwd": bwd}


CASES = {}
CASES.update(_conv_cases("conv1", 3, 64, 7, 2, 3, 224, need_dx=False))
for _k, (_width, _hw) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)], start=1):
    CASES.update(_conv_cases(f"s{_k}_3x3", _width, _width, 3, 1, 1, _hw, need_dx=True))
    CASES.update(_conv_cases(f"s{_k}_1x1", _width, 4 * _width, 1, 1, 0, _hw, need_dx=True))
# Stage 2's first-block stride-2 convs (3x3 and the 1x1 downsample), 56 -> 28.
CASES.update(_conv_cases("s2_3x3s2", 128, 128, 3, 2, 1, 56, need_dx=True))
CASES.update(_conv_cases("s2_down", 256, 512, 1, 2, 0, 56, need_dx=True))
CASES.update(_maxpool_cases())
