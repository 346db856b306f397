#!/bin/bash
# The own-3D-scans path against the LA path on the same 80 LA cases, at one short CPU schedule (600 + 900 steps)
# (docs/own_scans.md; about 35 minutes on 2 cores; add --seed S to both train.py lines for another seed). From the repository root, with
# data/LA in UA-MT's layout:
set -euo pipefail
python measurements/la_nifti_check/export_la_nifti.py data/LA data/LA_nifti
python prepare_acdc.py --raw data/LA_nifti --3d --spacing 1.25 1.25 1.25 --val-fraction 0.667 --seed 219 --out data/LA_own --force
S="--labeled-patients 4 --patch-size 64 64 32 --batch-size 4 --labeled-batch-size 2 --stride 16 8 --val-every 150"
declare -A ITERATIONS=([pretrain]=600 [selftrain]=900)
for phase in pretrain selftrain; do
  python train.py --root data/LA --scale 0.5 $S --out runs/la_path --phase $phase --iterations ${ITERATIONS[$phase]} --overwrite
  python train.py --root data/LA_own $S --out runs/own_path --phase $phase --iterations ${ITERATIONS[$phase]} --overwrite
done
# the 8 validation cases: the LA path's (full resolution, voxels) and the own path's (each scan's own grid, mm)
for windows in authors gaussian; do
  /usr/bin/time -f "%e s" python evaluate.py --root data/LA --split val --checkpoint runs/la_path/selftrain/best.pt --stride 16 8 --windows $windows --json runs/la_path_$windows.json
  /usr/bin/time -f "%e s" python evaluate.py --root data/LA_own --split val --checkpoint runs/own_path/selftrain/best.pt --stride 16 8 --windows $windows --json runs/own_path_$windows.json
done
