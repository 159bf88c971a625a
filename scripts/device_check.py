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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ops  # noqa: E402 - the per-family PyTorch ops live beside this script


def log(*a):
    print(*a, file=sys.stderr, flush=True)


DEVICE = "cuda"
FAMILY_KINDS = {}


def cuda_time(torch, fn, warmup, reps):
    """Median milliseconds of fn() over reps runs, each between its own pair of CUDA events
    (wall-clock time when the check runs on the CPU)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        ms = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t))
        return statistics.median(ms)
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
    return (torch.rand(shape, device=DEVICE, dtype=torch.float32) * 2 - 1).to(dtype)


def torch_op(torch, F, spec):
    """A zero-argument callable running the op described by `spec` in PyTorch, or None."""
    kind = spec.get("kind")
    bf16 = torch.bfloat16
    if kind == "copy":
        n = int(spec["bytes"])
        src = torch.randint(0, 255, (n,), device=DEVICE, dtype=torch.uint8)
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
    fn = FAMILY_KINDS.get(kind)
    if fn is not None:
        return fn(torch, F, spec, lambda shape, dtype: rnd(torch, shape, dtype))
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
    ap.add_argument("--torch-device", default="cuda",
                    help="device for the PyTorch ops (cpu: to test this script without a GPU)")
    ap.add_argument("--strict-torch", action="store_true",
                    help="fail when a row's PyTorch op raises (used by the tests)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.torch_device
    try:
        FAMILY_KINDS.update(torch_ops.all_kinds())
    except Exception as e:  # noqa: BLE001
        print(f"device_check.py: cannot load scripts/torch_ops: {e}", file=sys.stderr)
        return 1

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
            if DEVICE == "cuda" and not torch.cuda.is_available():
                torch_note = "PyTorch sees no GPU"
                torch = None
            elif DEVICE != "cuda":
                torch_note = f"PyTorch {torch.__version__} on {DEVICE} (a test of this script, not a GPU figure)"
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
    hdr = f"{'group':<11} {'op':<28} {'shape':<34} {'rel.err':>8} {'ok':>4} {'ms':>9} {'floor':>9} {'%floor':>6} {'torch ms':>9} {'torch/eng':>9}  note"
    lines.append(hdr)
    torch_failures = []
    for r in rows:
        spec = r.get("torch")
        tms = None
        fn = None
        if torch is not None and isinstance(spec, dict):
            try:
                fn = torch_op(torch, F, spec)
                if fn is not None:
                    tms = cuda_time(torch, fn, args.warmup, args.reps)
            except Exception as e:  # noqa: BLE001 - a PyTorch failure is reported, not fatal
                log(f"torch {r['id']}: {e}")
                r["note"] = (r.get("note", "") + f" [torch: {type(e).__name__}]").strip()
                torch_failures.append(r["id"])
            if fn is None and spec.get("kind") is not None:
                log(f"torch {r['id']}: no PyTorch op for kind {spec.get('kind')!r}")
                torch_failures.append(r["id"])
        ms, floor = r.get("ms"), r.get("floor_ms")
        pct = f"{100 * floor / ms:.0f}" if ms and floor else "-"
        ratio = f"{tms / ms:.2f}" if ms and tms else "-"
        ok = "skip" if r.get("skipped") else ("ok" if r.get("passed") else "FAIL")
        lines.append(
            f"{r['group']:<11} {r['id']:<28} {r['shape'][:34]:<34} {fmt(r.get('rel_err'), '.1e'):>8} {ok:>4} "
            f"{fmt(ms, '.4f'):>9} {fmt(floor, '.4f'):>9} {pct:>6} {fmt(tms, '.4f'):>9} {ratio:>9}  {r.get('note', '')}"
        )
    passed = bool(rep.get("passed")) and all(r.get("passed") for r in rep.get("rows", []))
    lines.append(f"allocator: peak {rep.get('alloc_peak_bytes', 0) / 2**20:.1f} MiB, "
                 f"{rep.get('alloc_misses', '?')} driver allocations, {rep.get('alloc_hits', '?')} cache hits")
    if args.strict_torch and torch_failures:
        lines.append("PyTorch ops that failed or are missing: " + ", ".join(torch_failures))
        passed = False
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
