"""PyTorch reference for the norm family (tests/ops_norm.rs): batch norm (training and
evaluation, with and without the ReLU that follows it, NHWC 4-D and [N, C] 2-D), layer norm,
F.normalize, GELU (exact), ReLU, residual add and timm-style drop path.

Inputs are generated in the ENGINE layout (channels last) with common.randn / common.rand, so
that the Rust test regenerates them bit for bit; batch norm inputs are permuted to NCHW for
PyTorch and every result is permuted back. The fixture stores outputs and gradients only.

Run from the repository root: python3 tests/reference/ops_norm.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 11
OUT = {}


def leaf(a):
    return common.t(a).requires_grad_()


def to_nchw(x):
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def to_nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else x


def batch_norm_case(name, shape, training, relu):
    c = shape[-1]
    x = leaf(common.randn(SEED, f"{name}.x", shape, 2.0) + 0.5)
    gamma = leaf(1.0 + common.randn(SEED, f"{name}.gamma", [c], 0.2))
    beta = leaf(common.randn(SEED, f"{name}.beta", [c], 0.3))
    rm = common.t(common.randn(SEED, f"{name}.running_mean", [c], 0.3))
    rv = common.t(common.rand(SEED, f"{name}.running_var", [c], 0.5, 1.5))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    y = F.batch_norm(to_nchw(x), rm, rv, gamma, beta, training=training, momentum=0.1, eps=1e-5)
    if relu:
        y = F.relu(y)
    dx, dg, db = torch.autograd.grad(y, [x, gamma, beta], grad_outputs=to_nchw(dy))
    OUT[f"{name}.y"] = to_nhwc(y)
    OUT[f"{name}.dx"] = dx
    OUT[f"{name}.dgamma"] = dg
    OUT[f"{name}.dbeta"] = db
    # F.batch_norm updated rm / rv in place (training) or left them (evaluation).
    OUT[f"{name}.running_mean"] = rm
    OUT[f"{name}.running_var"] = rv


def layer_norm_case(name, shape):
    d = shape[-1]
    x = leaf(common.randn(SEED, f"{name}.x", shape, 2.0) + 0.5)
    gamma = leaf(1.0 + common.randn(SEED, f"{name}.gamma", [d], 0.2))
    beta = leaf(common.randn(SEED, f"{name}.beta", [d], 0.3))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    y = F.layer_norm(x, [d], gamma, beta, eps=1e-6)
    dx, dg, db = torch.autograd.grad(y, [x, gamma, beta], grad_outputs=dy)
    OUT[f"{name}.y"] = y
    OUT[f"{name}.dx"] = dx
    OUT[f"{name}.dgamma"] = dg
    OUT[f"{name}.dbeta"] = db


def normalize_case(name, shape, scale):
    x = leaf(common.randn(SEED, f"{name}.x", shape, scale))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    y = F.normalize(x, dim=-1)
    (dx,) = torch.autograd.grad(y, [x], grad_outputs=dy)
    OUT[f"{name}.y"] = y
    OUT[f"{name}.dx"] = dx


def unary_case(name, shape, std, fn):
    x = leaf(common.randn(SEED, f"{name}.x", shape, std))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    y = fn(x)
    (dx,) = torch.autograd.grad(y, [x], grad_outputs=dy)
    OUT[f"{name}.y"] = y
    OUT[f"{name}.dx"] = dx


def add_case(name, shape):
    a = leaf(common.randn(SEED, f"{name}.a", shape))
    b = leaf(common.randn(SEED, f"{name}.b", shape))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    y = a + b
    da, db = torch.autograd.grad(y, [a, b], grad_outputs=dy)
    OUT[f"{name}.y"] = y
    OUT[f"{name}.da"] = da.clone()  # autograd hands the same tensor to both inputs
    OUT[f"{name}.db"] = db.clone()


def drop_path_case(name, shape, drop_prob, mask):
    # timm.layers.drop_path with its Bernoulli draw replaced by the given per-sample mask:
    #   random_tensor = x.new_empty((B, 1, ...)).bernoulli_(keep_prob)
    #   if keep_prob > 0 and scale_by_keep: random_tensor.div_(keep_prob)
    #   return x * random_tensor
    x = leaf(common.randn(SEED, f"{name}.x", shape))
    dy = common.t(common.randn(SEED, f"{name}.dy", shape))
    keep_prob = 1.0 - drop_prob
    random_tensor = torch.tensor(mask, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    if keep_prob > 0.0:
        random_tensor = random_tensor.div_(keep_prob)
    y = x * random_tensor
    (dx,) = torch.autograd.grad(y, [x], grad_outputs=dy)
    OUT[f"{name}.y"] = y
    OUT[f"{name}.dx"] = dx


def main():
    torch.set_default_dtype(torch.float32)
    batch_norm_case("bn2d_train_relu", [2, 5, 7, 6], True, True)
    batch_norm_case("bn2d_train", [3, 4, 5, 7], True, False)
    batch_norm_case("bn2d_eval_relu", [2, 5, 7, 6], False, True)
    batch_norm_case("bn2d_eval", [2, 3, 5, 7], False, False)
    batch_norm_case("bn1d_train", [9, 37], True, False)
    batch_norm_case("bn1d_eval", [9, 37], False, False)
    layer_norm_case("ln_a", [2, 7, 12])
    layer_norm_case("ln_b", [3, 5, 40])
    normalize_case("l2", [5, 19], 1.0)
    normalize_case("l2_tiny", [2, 7], 1e-13)  # norms below 1e-12: the clamped branch
    unary_case("gelu", [6, 33], 2.5, F.gelu)
    unary_case("relu", [4, 5, 6], 1.0, F.relu)
    add_case("add", [3, 4, 5])
    drop_path_case("drop_path", [4, 3, 5], 0.25, [True, False, True, True])
    common.save(OUT, "ops/norm.safetensors")


if __name__ == "__main__":
    main()
