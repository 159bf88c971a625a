#!/usr/bin/env python3
"""PyTorch half of the GPU check (run by scripts/device-check.sh; no network, no cargo).

Reads the engine's report (`sdengine device-check --json FILE`), times the same ops in PyTorch on
the same GPU (CUDA events, warm-up, median), and prints ONE table: each GPU op's relative error
against the CPU backend, its time against the floor from the ceilings the engine measured, and
PyTorch's time with the ratio (PyTorch ms / engine ms: above 1 means the engine is faster).

Rows whose `torch` field is null have no PyTorch counterpart. A few reference rows are PyTorch
only (e.g. the official SwAV Sinkhorn at K=1000, B=4096, 3 iterations, the denominator of the
fused-Sinkhorn aim). Exit status: 0 when the engine's report passed, 1 when any engine row
failed or the report is missing/unreadable, 2 on bad arguments.
"""

import argparse
import json
import math
import os
import statistics
import sys


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cuda_time(torch, fn, warmup, reps):
    """Median milliseconds of fn() over reps runs, each between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in pairs)


def rnd(torch, shape, dtype):
    # Fresh uniform values in [-1, 1): never zeros (zeros can run faster than real data).
    return (torch.rand(shape, device="cuda", dtype=torch.float32) * 2 - 1).to(dtype)


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


def torch_op(torch, F, spec):
    """A zero-argument callable running the op described by `spec` in PyTorch, or None."""
    kind = spec.get("kind")
    bf16 = torch.bfloat16
    if kind == "copy":
        n = int(spec["bytes"])
        src = torch.randint(0, 255, (n,), device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if kind == "axpy":
        n = int(spec["n"])
        x, y = rnd(torch, (n,), torch.float32), rnd(torch, (n,), torch.float32)
        return lambda: y.add_(x, alpha=0.75)
    if kind == "matmul":
        m, n, k = int(spec["m"]), int(spec["n"]), int(spec["k"])
        ta, tb = bool(spec["trans_a"]), bool(spec["trans_b"])
        a = rnd(torch, (k, m) if ta else (m, k), bf16)
        b = rnd(torch, (n, k) if tb else (k, n), bf16)
        bias = rnd(torch, (n,), bf16) if spec.get("bias") else None
        gelu, relu, out32 = spec.get("gelu"), spec.get("relu"), spec.get("out") == "f32"
        A = a.t() if ta else a
        if tb and not ta and not out32:
            def lin():
                y = F.linear(A, b, bias)
                if gelu:
                    return F.gelu(y, approximate="tanh")
                return F.relu(y) if relu else y
            return lin
        Bm = b.t() if tb else b
        if out32:
            try:
                torch.mm(A, Bm, out_dtype=torch.float32)
                return lambda: torch.mm(A, Bm, out_dtype=torch.float32)
            except Exception:  # noqa: BLE001 - older PyTorch without mm(out_dtype=)
                return lambda: torch.mm(A, Bm).float()
        return lambda: torch.mm(A, Bm)
    if kind == "conv":
        n, h, w, c, o = (int(spec[x]) for x in ("n", "h", "w", "c", "o"))
        kk, s, p = int(spec["k"]), int(spec["stride"]), int(spec["pad"])
        cl = torch.channels_last
        x = rnd(torch, (n, c, h, w), bf16).contiguous(memory_format=cl)
        wt = rnd(torch, (o, c, kk, kk), bf16).contiguous(memory_format=cl)
        y = F.conv2d(x, wt, stride=s, padding=p)
        dy = rnd(torch, tuple(y.shape), bf16).contiguous(memory_format=cl)
        d = spec["dir"]
        if d == "fwd":
            return lambda: F.conv2d(x, wt, stride=s, padding=p)
        if d == "bwd_data":
            return lambda: torch.nn.grad.conv2d_input(x.shape, wt, dy, stride=s, padding=p)
        if d == "bwd_filter":
            return lambda: torch.nn.grad.conv2d_weight(x, wt.shape, dy, stride=s, padding=p)
        return None
    if kind == "jpeg":
        try:
            import torchvision
            from torchvision.io import decode_jpeg, read_file
        except Exception:  # noqa: BLE001 - torchvision absent: no PyTorch number for this row
            return None
        files = [f for f in spec.get("files", []) if "cmyk" not in f]
        if not files:
            return None
        datas = [read_file(f) for f in files]
        decode_jpeg(datas, device="cuda")
        return lambda: decode_jpeg(datas, device="cuda")
    if kind == "softmax_ce":
        b, k = int(spec["b"]), int(spec["k"])
        tau, ls = float(spec["tau"]), float(spec["ls"])
        z = rnd(torch, (b, k), bf16)
        t = torch.softmax(rnd(torch, (b, k), torch.float32) * 4, dim=1)
        if spec["dir"] == "fwd":
            return lambda: F.cross_entropy(z.float() / tau, t, label_smoothing=ls)
        if spec["dir"] == "fwdbwd":
            def fwdbwd():
                zz = z.detach().requires_grad_(True)
                loss = F.cross_entropy(zz.float() / tau, t, label_smoothing=ls)
                loss.backward()
                return zz.grad
            return fwdbwd
        return None
    if kind == "layernorm":
        rows, d = int(spec["rows"]), int(spec["d"])
        x = rnd(torch, (rows, d), bf16)
        g = rnd(torch, (d,), torch.float32) * 0.5 + 1
        b = rnd(torch, (d,), torch.float32)
        # As under autocast: bf16 activations, fp32 affine parameters, bf16 out.
        return lambda: F.layer_norm(x, (d,), g.to(bf16), b.to(bf16), float(spec["eps"]))
    if kind == "adamw":
        params = [rnd(torch, (int(n),), torch.float32) for n in spec["sizes"]]
        for p in params:
            p.grad = rnd(torch, p.shape, torch.float32)
        # PyTorch's fastest AdamW: the fused CUDA kernel (no bf16 shadow: it writes 2 bytes/elem less).
        try:
            opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04, fused=True)
        except Exception:  # noqa: BLE001
            opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04, foreach=True)
        opt.step()
        return opt.step
    if kind == "sinkhorn":
        b, k = int(spec["b"]), int(spec["k"])
        scores = F.normalize(rnd(torch, (b, 128), torch.float32), dim=1) @ F.normalize(
            rnd(torch, (k, 128), torch.float32), dim=1).t()
        return lambda: official_sinkhorn(torch, scores, iters=int(spec.get("iters", 3)))
    return None


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, help="JSON written by `sdengine device-check --json`")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true", help="print the engine table only")
    args = ap.parse_args()

    try:
        with open(args.engine) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        print(f"device_check.py: cannot read the engine report {args.engine}: {e}", file=sys.stderr)
        return 1

    torch = F = None
    torch_note = ""
    if not args.no_torch:
        try:
            import torch  # noqa: F811
            import torch.nn.functional as F  # noqa: F811
            if not torch.cuda.is_available():
                torch_note = "PyTorch sees no GPU"
                torch = None
            else:
                torch.backends.cudnn.benchmark = True
                torch_note = f"PyTorch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark=True"
        except Exception as e:  # noqa: BLE001
            torch_note = f"PyTorch unavailable: {e}"
            torch = None

    rows = list(rep.get("rows", []))
    # PyTorch-only reference rows.
    rows.append({"group": "reference", "id": "torch_sinkhorn_official", "shape": "B4096 K1000 it3",
                 "rel_err": None, "tol": None, "ms": None, "floor_ms": None, "passed": True,
                 "skipped": False, "note": "aim: engine's fused Sinkhorn >= 5x faster than this",
                 "torch": {"kind": "sinkhorn", "b": 4096, "k": 1000, "iters": 3}})

    lines = []
    lines.append(rep.get("device", "?"))
    lines.append(rep.get("libraries", "").rstrip())
    lines.append(f"kernels: {rep.get('kernel_compiler', '?')}")
    lines.append(f"ceilings (engine): copy {rep.get('copy_gbps', 0):.0f} GB/s, bf16 GEMM {rep.get('gemm_tflops', 0):.1f} TFLOP/s")
    lines.append(torch_note)
    hdr = f"{'group':<9} {'op':<28} {'shape':<34} {'rel.err':>8} {'ok':>4} {'ms':>9} {'floor':>9} {'%floor':>6} {'torch ms':>9} {'torch/eng':>9}  note"
    lines.append(hdr)
    for r in rows:
        spec = r.get("torch")
        tms = None
        if torch is not None and isinstance(spec, dict):
            try:
                fn = torch_op(torch, F, spec)
                if fn is not None:
                    tms = cuda_time(torch, fn, args.warmup, args.reps)
            except Exception as e:  # noqa: BLE001 - a PyTorch failure is reported, not fatal
                log(f"torch {r['id']}: {e}")
                r["note"] = (r.get("note", "") + f" [torch: {type(e).__name__}]").strip()
        ms, floor = r.get("ms"), r.get("floor_ms")
        pct = f"{100 * floor / ms:.0f}" if ms and floor else "-"
        ratio = f"{tms / ms:.2f}" if ms and tms else "-"
        ok = "skip" if r.get("skipped") else ("ok" if r.get("passed") else "FAIL")
        lines.append(
            f"{r['group']:<9} {r['id']:<28} {r['shape'][:34]:<34} {fmt(r.get('rel_err'), '.1e'):>8} {ok:>4} "
            f"{fmt(ms, '.4f'):>9} {fmt(floor, '.4f'):>9} {pct:>6} {fmt(tms, '.4f'):>9} {ratio:>9}  {r.get('note', '')}"
        )
    passed = bool(rep.get("passed")) and all(r.get("passed") for r in rep.get("rows", []))
    lines.append(f"allocator: peak {rep.get('alloc_peak_bytes', 0) / 2**20:.1f} MiB, "
                 f"{rep.get('alloc_misses', '?')} driver allocations, {rep.get('alloc_hits', '?')} cache hits")
    lines.append("result: " + ("PASS" if passed else "FAIL"))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text)
        except OSError as e:
            print(f"device_check.py: cannot write {args.out}: {e}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
