#!/usr/bin/env bash
# docs/results.md "An hour on a CPU", LA try 4: bf16, self-training the rest of the hour (800 + 3,400 steps), poly lr.
# From the repository root: bash measurements/la_4labeled_cpu_hour/try4_long_selftrain_bf16/run.sh [SEED]
set -x
O=runs/la4_try4_s${1:-1337}
C="--root data/LA --labeled-patients 4 --schedule cpu --precision bf16 --seed ${1:-1337} --out $O"
python train.py $C --phase pretrain --iterations 800 --resume
python train.py $C --phase selftrain --iterations 3400 --resume
python evaluate.py --root data/LA --split val --checkpoint $O/selftrain/best.pt --json $O/val.json > $O/val.out
python evaluate.py --root data/LA --split val --checkpoint $O/selftrain/best.pt --weights teacher --json $O/val_teacher.json > $O/val_teacher.out
