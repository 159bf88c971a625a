#!/usr/bin/env bash
# The learning-quality experiment of the README: Suave, Daino and the supervised baselines of both
# families on CIFAR-10 with 4,000 labels (400 a class, seeded draw), the same iterations for all,
# evaluated on the 10,000 test images after every epoch; then the curves in one PNG.
# Hours on a 2-core CPU; not part of CI. Every number it prints is in runs/cifar10-4000/*/metrics.jsonl.
#
#   bash scripts/cifar10-experiment.sh            # DATA=../shared/data/cifar10 EPOCHS=... to change
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/cifar10-4000}
EPOCHS=${EPOCHS:-4}            # the ResNet pair (Suave, supervised)
VIT_EPOCHS=${VIT_EPOCHS:-2}    # the ViT pair (Daino, supervised): ~7x the cost of an iteration
BIN=${BIN:-target/release/sdengine}
[ -x "$BIN" ] || cargo build --release
common=(--data "$DATA" --recipe cifar --labels-per-class 400 --eval-batch-size 250 --force)
"$BIN" train --method suave                          "${common[@]}" --epochs "$EPOCHS" --output "$OUT/suave"
"$BIN" train --method supervised --arch resnet-tiny  "${common[@]}" --epochs "$EPOCHS" --output "$OUT/supervised-resnet"
"$BIN" train --method daino --base-lr 0.01           "${common[@]}" --epochs "$VIT_EPOCHS" --output "$OUT/daino"
"$BIN" train --method supervised --arch vit-tiny --base-lr 0.01 "${common[@]}" --epochs "$VIT_EPOCHS" --output "$OUT/supervised-vit"
"$BIN" plot "$OUT/suave" "$OUT/supervised-resnet" "$OUT/daino" "$OUT/supervised-vit" --output "${PLOT:-$OUT/curves.png}"
