"""PyTorch side of kernels/pool.cu: ResNet-50's stem max-pool (3x3, stride 2, padding 1) and the
global average pool before the head, forward and backward, on bf16 channels-last activations as
under autocast with a channels-last ResNet-50.

The backwards are the ATen kernels autograd calls (max_pool2d_with_indices_backward with the
forward's indices, and the mean's backward: an expand of dy / (H*W) that autograd materialises).
"""


def _nchw_channels_last(torch, spec, rnd, h, w):
    n, c = int(spec["n"]), int(spec["c"])
    x = rnd((n, c, h, w), torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last)


def maxpool2d(torch, F, spec, rnd):
    h, w = int(spec["h"]), int(spec["w"])
    k, s, p = int(spec["k"]), int(spec["s"]), int(spec["p"])
    x = _nchw_channels_last(torch, spec, rnd, h, w)
    if spec["dir"] == "fwd":
        return lambda: F.max_pool2d(x, k, s, p, return_indices=True)
    if spec["dir"] == "bwd":
        y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
        dy = rnd(tuple(y.shape), torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            dy, x, [k, k], [s, s], [p, p], [1, 1], False, idx)
    return None


def global_avgpool(torch, F, spec, rnd):
    h, w = int(spec["h"]), int(spec["w"])
    n, c = int(spec["n"]), int(spec["c"])
    if spec["dir"] == "fwd":
        x = _nchw_channels_last(torch, spec, rnd, h, w)
        # torchvision's ResNet: AdaptiveAvgPool2d((1, 1)); on channels-last input a mean over H, W.
        return lambda: F.adaptive_avg_pool2d(x, 1)
    if spec["dir"] == "bwd":
        dy = rnd((n, c), torch.bfloat16)
        like = torch.empty((n, c, h, w), dtype=torch.bfloat16, device=dy.device).contiguous(
            memory_format=torch.channels_last)
        return lambda: torch.ops.aten._adaptive_avg_pool2d_backward(dy.view(n, c, 1, 1), like)
    return None


KINDS = {
    "maxpool2d": maxpool2d,
    "global_avgpool": global_avgpool,
}
