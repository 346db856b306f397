#!/bin/bash
# The ACDC ablation of the README, one training at a time (2-core CPU: about 4.5 hours in all). Each row
# is a seed's run in runs/ablation/p<patients>/seed<seed>/<row>/<phase>/, scored on the validation split
# into val.json. A scored run is skipped, a finished one only scored and a stopped one resumed, so the
# script can be stopped and started again. Then: python measurements/ablation_acdc_128px/summarize.py
set -u
ROOT=${ROOT:-data/ACDC}
RUNS=runs/ablation
COMMON=(--root "$ROOT" --patch-size 128 --batch-size 12 --labeled-batch-size 6 --val-every 200)

run() {  # run <out> <phase> <flags...>
  local out=$1 phase=$2; shift 2
  [ -f "$out/$phase/val.json" ] && return
  grep -q "^done:" "$out/$phase/train.log" 2> /dev/null ||
    python train.py "${COMMON[@]}" --phase "$phase" --out "$out" --resume "$@" || exit 1
  python evaluate.py --root "$ROOT" --split val --checkpoint "$out/$phase/best.pt" \
      --json "$out/$phase/val.json" || exit 1
}

bcp_rows() {  # bcp_rows <patients> <seed> <mix...>: pre-train once, then self-train each --mix from its best.pt
  local patients=$1 seed=$2 base=$RUNS/p$1/seed$2; shift 2
  run "$base/bcp" pretrain --labeled-patients "$patients" --seed "$seed" --iterations 1000
  for mix in "$@"; do
    run "$base/$mix" selftrain --labeled-patients "$patients" --seed "$seed" --iterations 1000 --mix "$mix" \
        --init "$base/bcp/pretrain/best.pt"
  done
}

unet_row() {  # unet_row <patients> <seed>: labeled only, as many steps as pre-train + self-train
  run "$RUNS/p$1/seed$2/unet" supervised --labeled-patients "$1" --seed "$2" --iterations 2000
}

for seed in 1337 1338 1339; do bcp_rows 3 "$seed" bidirectional none inward outward; done
for seed in 1337 1338 1339; do unet_row 3 "$seed"; done
# 7 labeled patients: every row for seed 1337 (BCP, no copy-paste and the U-Net first, the one-way variants
# last), then BCP and no copy-paste for two more seeds
bcp_rows 7 1337 bidirectional none
unet_row 7 1337
bcp_rows 7 1337 inward outward
for seed in 1338 1339; do bcp_rows 7 "$seed" bidirectional none; done
