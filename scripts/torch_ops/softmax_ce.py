"""PyTorch side of kernels/softmax_ce.cu: cross-entropy over prototype scores with temperature,
soft targets and label smoothing (fp32 math on bf16 scores, as under autocast). PyTorch's
fused cross_entropy kernel (log_softmax + soft-target NLL) is its fastest eager path; the
backward row times autograd's backward alone, from a graph built once."""


def softmax_ce(torch, F, spec, rnd):
    b, k = int(spec["b"]), int(spec["k"])
    tau, ls = float(spec["tau"]), float(spec["ls"])
    z = rnd((b, k), torch.bfloat16)
    t = torch.softmax(rnd((b, k), torch.float32) * 4, dim=1)
    d = spec["dir"]
    if d == "fwd":
        return lambda: F.cross_entropy(z.float() / tau, t, label_smoothing=ls)
    if d == "bwd":
        zz = z.detach().requires_grad_(True)
        loss = F.cross_entropy(zz.float() / tau, t, label_smoothing=ls)
        dloss = torch.full_like(loss, 0.5)
        return lambda: torch.autograd.grad(loss, zz, dloss, retain_graph=True)[0]
    if d == "fwdbwd":
        def fwdbwd():
            zz = z.detach().requires_grad_(True)
            loss = F.cross_entropy(zz.float() / tau, t, label_smoothing=ls)
            loss.backward()
            return zz.grad
        return fwdbwd
    return None


KINDS = {"softmax_ce": softmax_ce}
