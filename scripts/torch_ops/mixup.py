"""PyTorch side of kernels/mixup.cu: timm's batch-mode Mixup / CutMix of an NHWC batch with its
reversed self, and the soft targets (timm's `mixup_target` with label smoothing).

Fastest eager forms: Mixup is one lerp against the flipped batch (the flip is a copy: PyTorch
has no negative strides), CutMix a clone plus one strided copy of the box, as timm does it.
"""


def mix_batch(torch, F, spec, rnd):
    b, h, w, c = (int(spec[k]) for k in ("b", "h", "w", "c"))
    lam = float(spec["lambda"])
    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    x1 = rnd((b, h, w, c), dtype)
    x2 = rnd((b, h, w, c), dtype)
    box = spec.get("box")
    if box is None:
        # lerp(start, end, weight) = start + weight (end - start) = lam x1 + (1 - lam) x2'.
        return lambda: torch.lerp(x2.flip(0), x1, lam)
    yl, yh, xl, xh = (int(v) for v in box)

    def cutmix():
        out = x1.clone()
        out[:, yl:yh, xl:xh, :] = x2.flip(0)[:, yl:yh, xl:xh, :]
        return out

    return cutmix


def mixup_targets(torch, F, spec, rnd):
    b, classes = int(spec["b"]), int(spec["classes"])
    lam, ls = float(spec["lambda"]), float(spec["ls"])
    y = torch.randint(0, classes, (b,), device=rnd((1,), torch.float32).device)
    off = ls / classes
    on = 1.0 - ls + off

    def targets():
        # timm.data.mixup.mixup_target: one_hot(y, on, off) mixed with its flip.
        y1 = torch.full((b, classes), off, device=y.device).scatter_(1, y[:, None], on)
        y2 = torch.full((b, classes), off, device=y.device).scatter_(1, y.flip(0)[:, None], on)
        return y1 * lam + y2 * (1.0 - lam)

    return targets


KINDS = {"mix_batch": mix_batch, "mixup_targets": mixup_targets}
