"""PyTorch side of kernels/norm.cu: L2 normalisation, the prototype renormalisation, batch norm
split as SyncBatchNorm runs it, and layer norm, each the fastest way eager PyTorch has.

Batch norm on CUDA uses the primitives of torch.nn.SyncBatchNorm (batch_norm_stats,
batch_norm_gather_stats_with_counts, batch_norm_elemt, batch_norm_backward_reduce,
batch_norm_backward_elemt): the same split as the engine's kernels, fused where PyTorch fuses.
They have no CPU kernels, so on the CPU (a test of this script) the same arithmetic is written
with plain tensor ops. Activations are bf16 NHWC (channels_last), statistics and affine
parameters fp32, as under autocast with a channels-last ResNet-50.
"""

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def l2norm(torch, F, spec, rnd):
    rows, d = int(spec["rows"]), int(spec["d"])
    x = rnd((rows, d), torch.bfloat16)
    if spec.get("dir", "fwd") == "fwd":
        return lambda: F.normalize(x, dim=1)
    # Backward of F.normalize through autograd (PyTorch has no fused kernel for it).
    xr = x.detach().requires_grad_(True)
    y = F.normalize(xr, dim=1)
    dy = rnd((rows, d), torch.bfloat16)
    return lambda: torch.autograd.grad(y, xr, dy, retain_graph=True)


def protos_renorm(torch, F, spec, rnd):
    k, d = int(spec["k"]), int(spec["d"])
    w = rnd((k, d), torch.float32)
    wb = torch.empty((k, d), dtype=torch.bfloat16, device=w.device)

    def step():
        # SwAV: w = F.normalize(w, dim=1) under no_grad, in place; then the bf16 copy the score
        # GEMM reads.
        with torch.no_grad():
            F.normalize(w, dim=1, out=w)
            wb.copy_(w)

    return step


def _bn_input(torch, spec, rnd):
    n, h, w, c = (int(spec[k]) for k in ("n", "h", "w", "c"))
    x = rnd((n, c, h, w), torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last), c, n * h * w


def _bn_channels(torch, rnd, c):
    mean = rnd((c,), torch.float32) * 0.1
    invstd = rnd((c,), torch.float32) * 0.25 + 1
    gamma = rnd((c,), torch.float32) * 0.5 + 1
    beta = rnd((c,), torch.float32) * 0.5
    return mean, invstd, gamma, beta


def _per_channel(v):
    return v.view(1, -1, 1, 1)


def bn_stats(torch, F, spec, rnd):
    x, c, _ = _bn_input(torch, spec, rnd)
    if x.is_cuda:
        return lambda: torch.batch_norm_stats(x, BN_EPS)
    return lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0)


def bn_finalize(torch, F, spec, rnd):
    c, count = int(spec["c"]), int(spec["count"])
    mean = rnd((1, c), torch.float32) * 0.1
    invstd = rnd((1, c), torch.float32) * 0.25 + 1
    rm = rnd((c,), torch.float32) * 0.1
    rv = rnd((c,), torch.float32) * 0.5 + 1
    counts = torch.full((1,), float(count), device=mean.device)
    if mean.is_cuda:
        return lambda: torch.batch_norm_gather_stats_with_counts(
            mean, mean, invstd, rm, rv, BN_MOMENTUM, BN_EPS, counts)

    def finalize():
        # The same reduction over ranks (one here) and running-statistics update.
        n = counts.sum()
        mu = (mean * counts[:, None]).sum(0) / n
        var = ((1 / invstd**2 - BN_EPS + (mean - mu)**2) * counts[:, None]).sum(0) / n
        rm.mul_(1 - BN_MOMENTUM).add_(mu, alpha=BN_MOMENTUM)
        rv.mul_(1 - BN_MOMENTUM).add_(var * n / (n - 1), alpha=BN_MOMENTUM)
        return mu, torch.rsqrt(var + BN_EPS)

    return finalize


def bn_apply(torch, F, spec, rnd):
    x, c, _ = _bn_input(torch, spec, rnd)
    mean, invstd, gamma, beta = _bn_channels(torch, rnd, c)
    res = rnd(tuple(x.shape), torch.bfloat16).contiguous(memory_format=torch.channels_last) \
        if spec.get("residual") else None
    relu = bool(spec.get("relu"))
    if x.is_cuda:
        def norm():
            return torch.batch_norm_elemt(x, gamma, beta, mean, invstd, BN_EPS)
    else:
        var = 1 / invstd**2 - BN_EPS

        def norm():
            return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, BN_EPS)

    def apply():
        y = norm()
        if res is not None:
            y.add_(res)
        return y.relu_() if relu else y

    return apply


def _bn_grad_inputs(torch, spec, rnd):
    x, c, count = _bn_input(torch, spec, rnd)
    dy = rnd(tuple(x.shape), torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = rnd(tuple(x.shape), torch.bfloat16).contiguous(memory_format=torch.channels_last)
    mean, invstd, gamma, _ = _bn_channels(torch, rnd, c)
    return x, dy, y, mean, invstd, gamma, count


def bn_bwd_reduce(torch, F, spec, rnd):
    x, dy, y, mean, invstd, gamma, _ = _bn_grad_inputs(torch, spec, rnd)

    def reduce():
        # The fused ReLU's backward first (PyTorch's ReLU is a separate op), then the sums.
        g = torch.ops.aten.threshold_backward(dy, y, 0)
        if x.is_cuda:
            return torch.batch_norm_backward_reduce(g, x, mean, invstd, gamma, True, True, True)
        gf = g.float()
        sum_dy = gf.sum((0, 2, 3))
        sum_dy_xmu = (gf * (x.float() - _per_channel(mean))).sum((0, 2, 3))
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy

    return reduce


def bn_bwd_apply(torch, F, spec, rnd):
    x, dy, y, mean, invstd, gamma, count = _bn_grad_inputs(torch, spec, rnd)
    c = mean.numel()
    sum_dy = rnd((c,), torch.float32) * count**0.5
    sum_dy_xmu = rnd((c,), torch.float32) * count**0.5
    counts = torch.full((1,), count, dtype=torch.int32, device=x.device)

    def apply():
        # d residual = the ReLU-masked dy; dx from it and the (all-reduced) sums.
        g = torch.ops.aten.threshold_backward(dy, y, 0)
        if x.is_cuda:
            return g, torch.batch_norm_backward_elemt(
                g, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, counts)
        k = _per_channel(gamma * invstd)
        xmu = x.float() - _per_channel(mean)
        dx = k * (g.float() - _per_channel(sum_dy / count)
                  - xmu * _per_channel(invstd**2 * sum_dy_xmu / count))
        return g, dx.to(torch.bfloat16)

    return apply


def layernorm(torch, F, spec, rnd):
    rows, d = int(spec["rows"]), int(spec["d"])
    eps = float(spec["eps"])
    bf16 = torch.bfloat16
    x = rnd((rows, d), bf16)
    g = (rnd((d,), torch.float32) * 0.5 + 1).to(bf16)
    b = rnd((d,), torch.float32).to(bf16)
    if spec.get("dir", "fwd") == "fwd":
        # bf16 activations and parameters: PyTorch's fused layer-norm kernel, bf16 out.
        return lambda: F.layer_norm(x, (d,), g, b, eps)
    # The fused backward kernel directly, on the forward's saved mean and rstd.
    _, mean, rstd = torch.native_layer_norm(x, (d,), g, b, eps)
    dy = rnd((rows, d), bf16)
    return lambda: torch.ops.aten.native_layer_norm_backward(
        dy, x, (d,), mean, rstd, g, b, (True, True, True))


KINDS = {
    "l2norm": l2norm,
    "protos_renorm": protos_renorm,
    "bn_stats": bn_stats,
    "bn_finalize": bn_finalize,
    "bn_apply": bn_apply,
    "bn_bwd_reduce": bn_bwd_reduce,
    "bn_bwd_apply": bn_bwd_apply,
    "layernorm": layernorm,
}
