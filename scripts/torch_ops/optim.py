"""PyTorch side of kernels/optim.cu: the optimiser updates (multi-tensor LARS, AdamW, the DINO
teacher EMA) and the DINO centre (column sums of the teacher logits, then the EMA of the centre),
each the fastest way PyTorch has: fused or foreach (multi-tensor) kernels, no host syncs.

Specs come from src/backend/device/optim.rs (check_rows): "sizes" lists the tensors' element
counts (ResNet-50's 161 for LARS, ViT-S/16's 150 for AdamW and the EMA)."""


def _tensors(torch, spec, rnd):
    return [rnd((int(n),), torch.float32) for n in spec["sizes"]]


def lars(torch, F, spec, rnd):
    # apex LARC(SGD, trust_coefficient=0.001, clip=False) with momentum 0.9, as Suave runs it,
    # written with foreach kernels (PyTorch has no fused LARS): per-tensor norms in one launch,
    # the trust ratio as a device tensor (no .item()), then SGD's momentum update.
    params = _tensors(torch, spec, rnd)
    grads = _tensors(torch, spec, rnd)
    bufs = _tensors(torch, spec, rnd)
    lr, wd = float(spec.get("lr", 0.6)), float(spec.get("wd", 1e-6))
    eta, eps, momentum = 1e-3, 1e-8, 0.9

    def step():
        pn = torch.stack(torch._foreach_norm(params))
        gn = torch.stack(torch._foreach_norm(grads))
        adaptive = (pn != 0) & (gn != 0)
        lam = torch.where(adaptive, eta * pn / (gn + wd * pn + eps), torch.ones_like(pn))
        d = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_mul_(d, list(lam.unbind(0)))
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        torch._foreach_add_(params, bufs, alpha=-lr)

    step()
    return step


def adamw(torch, F, spec, rnd):
    params = _tensors(torch, spec, rnd)
    for p in params:
        p.grad = rnd(tuple(p.shape), torch.float32)
    lr, wd = float(spec.get("lr", 5e-4)), float(spec.get("wd", 0.04))
    # PyTorch's fastest AdamW: the fused kernel (no bf16 shadow: it writes 2 bytes/elem less).
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
        opt.step()
    except Exception:  # noqa: BLE001 - no fused AdamW on this device/version
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
        opt.step()
    return opt.step


def ema(torch, F, spec, rnd):
    # DINO's teacher update, `param_k.mul_(m).add_((1 - m) * param_q)`, as one foreach lerp:
    # t + (1 - m)(s - t) (one read of each, one write of t per element).
    teacher = _tensors(torch, spec, rnd)
    student = _tensors(torch, spec, rnd)
    w = 1.0 - float(spec.get("m", 0.996))

    def step():
        torch._foreach_lerp_(teacher, student, w)

    step()
    return step


def dino_center_colsum(torch, F, spec, rnd):
    # DINO's `torch.sum(teacher_output, dim=0, keepdim=True)` over both global views' rows, in
    # the logits' dtype (bf16 under autocast), f32 accumulation inside PyTorch's reduction.
    rows, cols = int(spec["rows"]), int(spec["cols"])
    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    x = rnd((rows, cols), dtype)
    return lambda: torch.sum(x, dim=0, keepdim=True)


def dino_center_update(torch, F, spec, rnd):
    # `center = center * m + batch_center * (1 - m)` after the all-reduce, batch_center = sum / n.
    cols, n = int(spec["cols"]), float(spec.get("rows", 128))
    m = float(spec.get("m", 0.9))
    center = rnd((1, cols), torch.float32)
    colsum = rnd((1, cols), torch.float32)

    def step():
        center.mul_(m).add_(colsum, alpha=(1.0 - m) / n)

    step()
    return step


KINDS = {
    "lars": lars,
    "adamw": adamw,
    "ema": ema,
    "dino_center_colsum": dino_center_colsum,
    "dino_center_update": dino_center_update,
}
