"""PyTorch side of kernels/norm.cu: layer norm (and, as they gain rows, L2 norm and batch norm)."""


def layernorm(torch, F, spec, rnd):
    rows, d = int(spec["rows"]), int(spec["d"])
    bf16 = torch.bfloat16
    x = rnd((rows, d), bf16)
    g = rnd((d,), torch.float32) * 0.5 + 1
    b = rnd((d,), torch.float32)
    # As under autocast: bf16 activations, fp32 affine parameters, bf16 out.
    return lambda: F.layer_norm(x, (d,), g.to(bf16), b.to(bf16), float(spec["eps"]))


KINDS = {"layernorm": layernorm}
