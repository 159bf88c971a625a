"""PyTorch side of kernels/sinkhorn.cu: the official SwAV/Suave Sinkhorn, the denominator of the
fused-Sinkhorn aim (>= 5x faster at K=1000, B=4096, 3 iterations)."""


def official_sinkhorn(torch, out, epsilon=0.05, iters=3):
    """SwAV's distributed_sinkhorn (main_swav.py) with world size 1, as the spec gives it."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def sinkhorn(torch, F, spec, rnd):
    b, k = int(spec["b"]), int(spec["k"])
    scores = F.normalize(rnd((b, 128), torch.float32), dim=1) @ F.normalize(
        rnd((k, 128), torch.float32), dim=1).t()
    return lambda: official_sinkhorn(torch, scores, iters=int(spec.get("iters", 3)))


KINDS = {"sinkhorn": sinkhorn}
