#!/bin/bash
# Your own scans as users bring them: UA-MT's LA crops put back in a whole field of view (the atrium
# about 1 % of a scan), written as a Decathlon task (make_task.py), then the README's own-3D commands at
# a short CPU schedule: 3 mm voxels, 64 x 64 x 32 crops (16 slices deep: the scans are 18 at 3 mm), 8
# labeled crops a step, 300 + 300 steps. From the repository root, with LA in UA-MT's layout at data/LA
# (docs/own_scans.md; about 10 minutes on 2 CPU cores). Pass a seed to repeat it with another (1337), and
# train.py flags after it (--foreground-crops 0.67: two thirds of the labeled crops centred on the atrium).
set -euo pipefail
SEED=${1:-1337}
EXTRA=("${@:2}")
[ -d data/Task02_LAfov ] || python measurements/own_scans_check/make_task.py data/LA data/Task02_LAfov
/usr/bin/time -f "prepare: %M kB peak, %e s" python prepare_acdc.py --raw data/Task02_LAfov --3d --spacing 3 3 3 --out data/LAfov3 --force
L="--root data/LAfov3 --out runs/LAfov3_$SEED --seed $SEED --patch-size 64 64 32 --val-every 100 --overwrite ${EXTRA[*]}"
python train.py $L --phase pretrain --iterations 300 --batch-size 8 --labeled-batch-size 8
python train.py $L --phase selftrain --iterations 300 --batch-size 16 --labeled-batch-size 8
python evaluate.py --root data/LAfov3 --split val --checkpoint runs/LAfov3_$SEED/selftrain/best.pt --json runs/LAfov3_$SEED/val.json
/usr/bin/time -f "predict: %M kB peak, %e s" python evaluate.py --checkpoint runs/LAfov3_$SEED/selftrain/best.pt \
    --predict data/Task02_LAfov/heldout/images --out runs/LAfov3_${SEED}_labels --save-png runs/LAfov3_${SEED}_pictures
python measurements/own_scans_check/score_heldout.py data/Task02_LAfov/heldout runs/LAfov3_${SEED}_labels
