"""PyTorch side of kernels/elementwise.cu: GELU with its Linear's bias, bias add, the bias
gradient's column sum, drop path (alone and fused with the residual add), attention softmax, and
the flat casts and adds of mixed-precision training (copy_ between dtypes, add, add_).

Each op is written the fastest way eager PyTorch has on bf16 activations (as under autocast):
one ATen kernel where one exists (addcmul, _softmax_backward_data, gelu_backward), otherwise
the fewest kernels.
"""


def gelu_bias(torch, F, spec, rnd):
    r, c = int(spec["rows"]), int(spec["cols"])
    bf16 = torch.bfloat16
    x = rnd((r, c), bf16)
    b = rnd((c,), bf16)
    if spec["dir"] == "fwd":
        # nn.Linear's bias is added by the GEMM epilogue in PyTorch; the pair here is the
        # add + exact GELU the engine fuses.
        return lambda: F.gelu(x + b)
    if spec["dir"] == "bwd":
        dy = rnd((r, c), bf16)
        return lambda: torch.ops.aten.gelu_backward(dy, x + b)
    return None


def bias_add(torch, F, spec, rnd):
    r, c = int(spec["rows"]), int(spec["cols"])
    x = rnd((r, c), torch.bfloat16)
    b = rnd((c,), torch.bfloat16)
    return lambda: x.add_(b)


def column_sum(torch, F, spec, rnd):
    r, c = int(spec["rows"]), int(spec["cols"])
    a = rnd((r, c), torch.bfloat16)
    # The bias gradient as autograd computes it (fp32 accumulation, fp32 out).
    return lambda: a.sum(0, dtype=torch.float32)


def drop_path(torch, F, spec, rnd):
    b, m, p = int(spec["b"]), int(spec["m"]), float(spec["p"])
    x = rnd((b, m), torch.bfloat16)
    # timm's drop_path: a per-sample Bernoulli(keep) mask scaled by 1 / keep.
    keep = 1.0 - p
    scale = (torch.rand((b, 1), device=x.device) < keep).to(torch.bfloat16) / keep
    if spec.get("add"):
        r = rnd((b, m), torch.bfloat16)
        return lambda: torch.addcmul(r, x, scale)
    return lambda: x * scale


def attn_softmax(torch, F, spec, rnd):
    rows, n, scale = int(spec["rows"]), int(spec["n"]), float(spec["scale"])
    s = rnd((rows, n), torch.bfloat16)
    if spec["dir"] == "fwd":
        return lambda: torch.softmax(s * scale, dim=-1)
    if spec["dir"] == "bwd":
        p = torch.softmax(s * scale, dim=-1)
        dp = rnd((rows, n), torch.bfloat16)
        return lambda: torch.ops.aten._softmax_backward_data(dp, p, -1, torch.bfloat16) * scale
    return None


def cast(torch, F, spec, rnd):
    n = int(spec["n"])
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}
    src, dst = dt[spec["from"]], dt[spec["to"]]
    x = rnd((n,), src)
    y = torch.empty((n,), dtype=dst, device=x.device)
    # Into a preallocated buffer, as the engine's master-weight -> operand copy does.
    return lambda: y.copy_(x)


def add_bf16(torch, F, spec, rnd):
    n = int(spec["n"])
    a, b = rnd((n,), torch.bfloat16), rnd((n,), torch.bfloat16)
    return lambda: torch.add(a, b)


def accumulate(torch, F, spec, rnd):
    n = int(spec["n"])
    g = rnd((n,), {"f32": torch.float32, "bf16": torch.bfloat16}[spec["g"]])
    acc = rnd((n,), torch.float32)
    # Gradient accumulation into the fp32 buffer (type promotion inside add_).
    return lambda: acc.add_(g)


KINDS = {
    "gelu_bias": gelu_bias,
    "bias_add": bias_add,
    "column_sum": column_sum,
    "drop_path": drop_path,
    "attn_softmax": attn_softmax,
    "cast": cast,
    "add_bf16": add_bf16,
    "accumulate": accumulate,
}
