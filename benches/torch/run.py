"""Times the same ops as the criterion benches, in PyTorch on this machine, and prints the ratios.

Usage (from the repository root, after `cargo bench` has written target/criterion/):
    python3 benches/torch/run.py [--threads 2] [--families conv,norm,linear,attention] [--json out.json]

Each benches/torch/<family>.py defines CASES: {case_name: zero-argument callable}, with the same
names as the criterion benchmark ids "<family>/<case_name>". Every callable runs one op (forward,
or forward+backward where the case name ends in _bwd: see each file) on inputs of the same shapes
as the Rust bench. Both sides take the median of repeated runs after a warm-up; PyTorch runs
channels-last where the engine is NHWC. The ratio is engine time / PyTorch time (lower is better).
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def load(family):
    spec = importlib.util.spec_from_file_location(f"torch_bench_{family}", os.path.join(HERE, f"{family}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def time_case(fn, min_time=1.0, min_reps=5, max_reps=200):
    fn()  # warm-up (allocations, oneDNN primitive creation)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def criterion_median(family, case):
    path = os.path.join(ROOT, "target", "criterion", family, case, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] * 1e-9
    except (OSError, KeyError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--families", default="conv,norm,linear,attention,model_resnet,model_vit")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for fam in args.families.split(","):
        path = os.path.join(HERE, f"{fam}.py")
        if not os.path.exists(path):
            print(f"SKIP {fam}: {path} missing", file=sys.stderr)
            continue
        for case, fn in load(fam).items():
            with torch.no_grad() if not case.endswith("_bwd") else torch.enable_grad():
                t_torch = time_case(fn)
            t_engine = criterion_median(fam, case)
            rows.append((f"{fam}/{case}", t_engine, t_torch))
    print(f"| op | sdengine (ms) | PyTorch {torch.__version__} (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for name, te, tt in rows:
        te_s = f"{te * 1e3:.3f}" if te is not None else "n/a"
        ratio = f"{te / tt:.2f}x" if te is not None else "n/a"
        print(f"| {name} | {te_s} | {tt * 1e3:.3f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"op": n, "engine_s": e, "torch_s": t} for n, e, t in rows], f, indent=1)


if __name__ == "__main__":
    main()
