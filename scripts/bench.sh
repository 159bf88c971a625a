#!/usr/bin/env bash
# Runs every benchmark of the engine and the same work in PyTorch on this machine, with the same
# thread count, and prints the ratio tables that BENCHMARKS.md records. Needs python3 with torch,
# torchvision, pillow (pip install torch torchvision pillow). Run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
export RAYON_NUM_THREADS=$threads
cargo bench --bench conv --bench norm --bench linear --bench attention --bench model
python3 benches/torch/run.py --threads "$threads" \
  --families conv,norm,linear,attention,model_resnet,model_vit --json target/bench_ops.json
# The data pipeline is timed per core (one thread on both sides).
RAYON_NUM_THREADS=1 cargo bench --bench data
python3 benches/torch/run.py --threads 1 --families data --json target/bench_data.json
