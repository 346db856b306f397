#!/bin/bash
# The README's own-3D commands as a user types them, no tuning flags: prepare_acdc.py --3d plans the spacing,
# crop and crops a step; both phases under --schedule cpu; --split val; --predict on the 8 held-out scans,
# scored on their own grids (score_heldout.py). From the repository root with LA in UA-MT's layout at
# data/LA (make_task.py builds the whole-field Decathlon task). Pass a seed (1337); each step is timed.
set -euo pipefail
SEED=${1:-1337}
OUT=runs/LAfov_plan_$SEED
[ -d data/Task02_LAfov ] || python measurements/own_scans_check/make_task.py data/LA data/Task02_LAfov
[ -d data/LAfov_plan ] || /usr/bin/time -f "prepare: %M kB peak, %e s" python prepare_acdc.py --raw data/Task02_LAfov --3d --out data/LAfov_plan
/usr/bin/time -f "pretrain: %e s" python train.py --root data/LAfov_plan --out $OUT --seed $SEED --phase pretrain --schedule cpu --overwrite
/usr/bin/time -f "selftrain: %e s" python train.py --root data/LAfov_plan --out $OUT --seed $SEED --phase selftrain --schedule cpu --overwrite
python evaluate.py --root data/LAfov_plan --split val --checkpoint $OUT/selftrain/best.pt --json $OUT/val.json
/usr/bin/time -f "predict: %M kB peak, %e s" python evaluate.py --checkpoint $OUT/selftrain/best.pt \
    --predict data/Task02_LAfov/heldout/images --out ${OUT}_labels
python measurements/own_scans_check/score_heldout.py data/Task02_LAfov/heldout ${OUT}_labels
