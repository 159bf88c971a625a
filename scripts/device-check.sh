#!/usr/bin/env bash
# The one-command GPU check, for a GPU machine with PyTorch and pip's nvidia libraries and no
# Rust toolchain (the H200 check machine): it runs the release binary built on a development
# machine (target/release/sdengine, carried with the tree), then the PyTorch half, and prints
# ONE table: every GPU op against the CPU backend (relative error), its time against the floor
# from the ceilings measured on this GPU (device-to-device copy, bf16 GEMM), and PyTorch's time
# for the same op. No network, no cargo. Target: under 8 minutes.
#
# What it sets up, because a process cannot change its own library search path once started:
#   - LD_LIBRARY_PATH: every site-packages/nvidia/*/lib (cuBLAS, cuDNN, NCCL, NVRTC, nvJPEG, ...),
#     torch/lib, and /usr/local/cuda/lib64 when present;
#   - a libnccl.so -> libnccl.so.2 symlink in a temporary folder (pip's NCCL ships only the .so.2
#     name; cudarc looks for libnccl.so);
#   - SDENGINE_CUDA_INCLUDE: the CUDA headers, for kernels compiled at run time with NVRTC;
#   - SDENGINE_NVJPEG: torchvision's bundled nvJPEG when no libnvjpeg.so.N is on the path.
#
# Usage: scripts/device-check.sh [--quick] [--no-torch] [extra args for `sdengine device-check`]
# Environment: SDENGINE_BIN (default target/release/sdengine), PYTHON (default python3),
#   OUT (if set, the table is also written to $OUT/device_check.txt and the engine's JSON to
#   $OUT/device_check_engine.json).
# Exit status: 0 when every GPU op passed; non-zero (and a FAIL line) otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BIN=${SDENGINE_BIN:-target/release/sdengine}
PY=${PYTHON:-python3}
ENGINE_ARGS=()
PY_ARGS=()
for a in "$@"; do
  case "$a" in
    --no-torch) PY_ARGS+=("--no-torch") ;;
    --quick) ENGINE_ARGS+=("--quick"); PY_ARGS+=("--reps" "5" "--warmup" "1") ;;
    *) ENGINE_ARGS+=("$a") ;;
  esac
done

fail() { echo "device-check: FAIL: $*" >&2; exit 1; }

[ -x "$BIN" ] || fail "$BIN not found or not executable: build it on a development machine (cargo build --release) and carry target/release/sdengine, or set SDENGINE_BIN"

TMP=$(mktemp -d) || fail "cannot create a temporary folder"
trap 'rm -rf "$TMP"' EXIT

# --- find the CUDA libraries -------------------------------------------------------------------
LIBDIRS=()
SITES=$("$PY" - <<'EOF' 2>/dev/null
import site, sys
paths = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
print("\n".join(p for p in dict.fromkeys(paths) if p))
EOF
) || SITES=""
INCLUDES=()
while IFS= read -r s; do
  [ -n "$s" ] && [ -d "$s" ] || continue
  for d in "$s"/nvidia/*/lib "$s"/torch/lib; do
    [ -d "$d" ] && LIBDIRS+=("$d")
  done
  for d in "$s"/nvidia/*/include; do
    { [ -f "$d/cuda_bf16.h" ] || [ -f "$d/cuda_runtime.h" ]; } && INCLUDES+=("$d")
  done
done <<< "$SITES"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && LIBDIRS+=("$d")
done
[ -d /usr/local/cuda/include ] && INCLUDES+=("/usr/local/cuda/include")

# nvJPEG: the toolkit's or a pip wheel's libnvjpeg.so.N if on the path, else the copy torchvision
# bundles under a hashed name (passed to the engine as a file path).
HAVE_NVJPEG=0
for d in "${LIBDIRS[@]}"; do
  compgen -G "$d/libnvjpeg.so*" >/dev/null && HAVE_NVJPEG=1
done
if [ $HAVE_NVJPEG -eq 0 ]; then
  while IFS= read -r s; do
    [ -n "$s" ] || continue
    for f in "$s"/torchvision.libs/libnvjpeg*.so*; do
      if [ -f "$f" ] && [ -z "${SDENGINE_NVJPEG:-}" ]; then
        export SDENGINE_NVJPEG="$f"
        LIBDIRS+=("$s/torchvision.libs")
      fi
    done
  done <<< "$SITES"
fi

# pip's NCCL has only libnccl.so.2; cudarc opens libnccl.so.
for d in "${LIBDIRS[@]}"; do
  if [ -e "$d/libnccl.so.2" ] && [ ! -e "$TMP/libnccl.so" ]; then
    ln -s "$d/libnccl.so.2" "$TMP/libnccl.so"
  fi
done

join() { local IFS=:; echo "$*"; }
export LD_LIBRARY_PATH="$TMP${LIBDIRS[*]:+:$(join "${LIBDIRS[@]}")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ ${#INCLUDES[@]} -gt 0 ] && export SDENGINE_CUDA_INCLUDE="$(join "${INCLUDES[@]}")"
echo "device-check: ${#LIBDIRS[@]} library folders on LD_LIBRARY_PATH; NVRTC includes: ${SDENGINE_CUDA_INCLUDE:-none}; nvJPEG: ${SDENGINE_NVJPEG:-loader path}" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader >&2

# --- engine half -------------------------------------------------------------------------------
JSON="$TMP/engine.json"
timeout 300 "$BIN" device-check --json "$JSON" "${ENGINE_ARGS[@]}" >"$TMP/engine.txt" 2>&1
RC=$?
if [ ! -s "$JSON" ]; then
  cat "$TMP/engine.txt"
  [ $RC -eq 124 ] && fail "the engine's check ran past 5 minutes"
  fail "the engine's GPU check did not run (exit $RC); its output is above"
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$JSON" "$OUT/device_check_engine.json" && cp "$TMP/engine.txt" "$OUT/device_check_engine.txt"
fi

# --- PyTorch half and the one table -------------------------------------------------------------
TABLE_OUT=()
[ -n "${OUT:-}" ] && TABLE_OUT=(--out "$OUT/device_check.txt")
timeout 120 "$PY" scripts/device_check.py --engine "$JSON" "${TABLE_OUT[@]}" "${PY_ARGS[@]}"
PRC=$?

# --- a short Suave run with the backbone on the GPU against the same run on the CPU -------------
# The embedded demo (resnet-tiny, 32/16-px crops), 40 steps each: the losses logged every 10
# steps must agree within bf16 drift (5e-2); the wall times are what the GPU path gives at this
# toy size (transfers and launches dominate; the backbone rows above are the real figures).
TRC=0
for dev in cuda cpu; do
  T0=$(date +%s%N)
  timeout 60 "$BIN" train --method suave --device "$dev" --output "$TMP/train_$dev" --force \
    --max-steps 40 --log-every 10 >"$TMP/train_$dev.txt" 2>&1 || TRC=1
  T1=$(date +%s%N)
  echo "train --device $dev: $(grep -m1 '^device:' "$TMP/train_$dev.txt"); 40 steps in $(( (T1 - T0) / 1000000 )) ms" >&2
  if [ -n "${OUT:-}" ]; then
    cp "$TMP/train_$dev.txt" "$OUT/train_$dev.txt"
    cp "$TMP/train_$dev/metrics.jsonl" "$OUT/train_${dev}_metrics.jsonl" 2>/dev/null
  fi
done
if [ $TRC -eq 0 ]; then
  "$PY" - "$TMP/train_cuda/metrics.jsonl" "$TMP/train_cpu/metrics.jsonl" <<'PYEOF' || TRC=1
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
worst = 0.0
for x, y in zip(a, b):
    e = abs(x["train_loss"] - y["train_loss"]) / abs(y["train_loss"])
    worst = max(worst, e) if e == e else float("inf")
    print(f"step {x['step']:3d}: train_loss cuda {x['train_loss']:.4f} cpu {y['train_loss']:.4f} (rel {e:.1e})", file=sys.stderr)
ok = len(a) == len(b) >= 1 and worst <= 5e-2
print(f"suave on the GPU vs the CPU: {'ok' if ok else 'FAIL'} (worst rel {worst:.1e}, tolerance 5e-2)", file=sys.stderr)
sys.exit(0 if ok else 1)
PYEOF
else
  tail -3 "$TMP/train_cuda.txt" "$TMP/train_cpu.txt" >&2
fi

if [ $PRC -ne 0 ] || [ $RC -ne 0 ] || [ $TRC -ne 0 ]; then
  grep -E "^error|FAIL" "$TMP/engine.txt" | tail -5 >&2
  fail "engine exit $RC, table exit $PRC, training comparison exit $TRC"
fi
echo "device-check: PASS" >&2
