#!/usr/bin/env bash
# docs/results.md "An hour on a CPU", ACDC try 4: 160 px, bf16, the paper's share of steps (2,500 + 7,500), poly lr.
# From the repository root: bash measurements/acdc_3patients_cpu_hour/try4_long_selftrain_bf16/run.sh [SEED]
set -x
O=runs/acdc3_tryA_s${1:-1337}
C="--root data/ACDC --labeled-patients 3 --schedule cpu --precision bf16 --seed ${1:-1337} --out $O"
python train.py $C --phase pretrain --iterations 2500 --resume
python train.py $C --phase selftrain --iterations 7500 --resume
python evaluate.py --root data/ACDC --split val --checkpoint $O/selftrain/best.pt --json $O/val.json > $O/val.out
python evaluate.py --root data/ACDC --split val --checkpoint $O/selftrain/best.pt --weights teacher --json $O/val_teacher.json > $O/val_teacher.out
