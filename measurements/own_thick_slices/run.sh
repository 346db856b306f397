#!/bin/bash
# The README's own-scans commands as a user types them, nothing chosen by hand, on thick-slice cine MRI of three
# classes (make_task.py builds it from ACDC in the SSL4MIS layout at data/ACDC): prepare_acdc.py --raw chooses the
# plan; both phases under --schedule cpu; evaluate.py scores the 10 held-out patients (imagesTs + labelsTs, the
# test split of the prepared folder); --predict on their 20 scans is timed. From the repository root; pass seeds.
set -euo pipefail
[ -d data/Dataset_ACDCthick ] || python measurements/own_thick_slices/make_task.py data/ACDC data/Dataset_ACDCthick
[ -d data/ACDCthick ] || python prepare_acdc.py --raw data/Dataset_ACDCthick --out data/ACDCthick
for SEED in "$@"; do
    OUT=runs/thick_s$SEED
    start=$(date +%s)
    python train.py --root data/ACDCthick --phase pretrain --schedule cpu --seed $SEED --out $OUT > $OUT.pre.out 2>&1
    python train.py --root data/ACDCthick --phase selftrain --schedule cpu --seed $SEED --out $OUT > $OUT.self.out 2>&1
    echo "both phases: $(( $(date +%s) - start )) s" > $OUT.time
    python evaluate.py --root data/ACDCthick --split test --checkpoint $OUT/selftrain/best.pt --json $OUT/test.json > $OUT.test.out 2>&1
    /usr/bin/time -f "predict: %e s, %M kB" python evaluate.py --checkpoint $OUT/selftrain/best.pt \
        --predict data/Dataset_ACDCthick/imagesTs --out ${OUT}_labels > $OUT.predict.out 2>&1
done
