#!/usr/bin/env bash
# docs/results.md "An hour on a CPU", ACDC try 3: 160 px, fp32, 6,000 + 4,000 steps, poly lr (the schedule where the CPU lacks bf16).
# From the repository root: bash measurements/acdc_3patients_cpu_hour/try3_160px/run.sh [SEED]
set -x
O=runs/acdc3_try3_s${1:-1337}
C="--root data/ACDC --labeled-patients 3 --schedule cpu --precision fp32 --seed ${1:-1337} --out $O"
python train.py $C --phase pretrain --iterations 6000 --resume
python train.py $C --phase selftrain --iterations 4000 --resume
python evaluate.py --root data/ACDC --split val --checkpoint $O/selftrain/best.pt --json $O/val.json > $O/val.out
python evaluate.py --root data/ACDC --split val --checkpoint $O/selftrain/best.pt --weights teacher --json $O/val_teacher.json > $O/val_teacher.out
