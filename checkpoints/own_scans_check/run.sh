#!/bin/bash
# Your own scans as users bring them: UA-MT's LA crops put back in a whole field of view (the atrium
# about 1 % of a scan), written as a Decathlon task (make_task.py), then the README's own-3D commands at
# a short CPU schedule (64 x 64 x 32 crops, 300 + 300 steps). From the repository root, with LA in
# UA-MT's layout at data/LA (docs/own_scans.md; about 20 minutes on 2 CPU cores).
set -euo pipefail
[ -d data/Task02_LAfov ] || python checkpoints/own_scans_check/make_task.py data/LA data/Task02_LAfov
/usr/bin/time -f "prepare: %M kB peak, %e s" python prepare_acdc.py --raw data/Task02_LAfov --3d --spacing 1.25 1.25 1.25 --out data/LAfov --force
L="--root data/LAfov --out runs/LAfov --patch-size 64 64 32 --batch-size 4 --labeled-batch-size 2 --val-every 100 --overwrite"
python train.py $L --phase pretrain --iterations 300
python train.py $L --phase selftrain --iterations 300
python evaluate.py --root data/LAfov --split val --checkpoint runs/LAfov/selftrain/best.pt --json runs/LAfov_val.json
/usr/bin/time -f "predict: %M kB peak, %e s" python evaluate.py --checkpoint runs/LAfov/selftrain/best.pt \
    --predict data/Task02_LAfov/heldout/images --out runs/LAfov_labels --save-png runs/LAfov_pictures
python checkpoints/own_scans_check/score_heldout.py data/Task02_LAfov/heldout runs/LAfov_labels
