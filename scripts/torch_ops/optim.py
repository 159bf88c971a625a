"""PyTorch side of kernels/optim.cu: the optimiser updates (and, as they gain rows, LARS, the
teacher EMA and the DINO centre)."""


def adamw(torch, F, spec, rnd):
    params = [rnd((int(n),), torch.float32) for n in spec["sizes"]]
    for p in params:
        p.grad = rnd(tuple(p.shape), torch.float32)
    # PyTorch's fastest AdamW: the fused kernel (no bf16 shadow: it writes 2 bytes/elem less).
    try:
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04, fused=True)
        opt.step()
    except Exception:  # noqa: BLE001 - no fused AdamW on this device/version
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04, foreach=True)
        opt.step()
    return opt.step


KINDS = {"adamw": adamw}
