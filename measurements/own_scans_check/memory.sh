#!/bin/bash
# Peak memory (and time) of prepare, train and --predict on whole CT-sized scans: 512 x 512 x 300 int16
# phantoms at 0.78 x 0.78 x 1.5 mm (an abdominal CT's size), kept at that spacing so that every array
# is as large as the scans. 2 labeled training scans, 1 validation, 1 unlabeled. From the repository root
# (about 15 minutes on 2 CPU cores); the peaks go to runs/memory/*.txt (GNU time's maximum resident set).
set -euo pipefail
OUT=runs/memory
mkdir -p $OUT
python - <<'PY'
import json, pathlib, nibabel, numpy as np
raw = pathlib.Path("data/ct_phantoms")
for folder in ("imagesTr", "labelsTr", "imagesUnlabeled"):
    (raw / folder).mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
grid = np.ogrid[:512, :512, :300]
for index, folder in enumerate(["imagesTr"] * 3 + ["imagesUnlabeled"]):
    body = ((grid[0] - 256) / 230.0) ** 2 + ((grid[1] - 256) / 180.0) ** 2 < 1
    centre = rng.uniform([200, 150, 100], [300, 250, 200])
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (60, 50, 45))) < 1  # about 1.5 % of the scan
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0)
    scan = (hu + rng.normal(0, 20, hu.shape)).astype(np.int16)
    affine = np.diag([0.78, 0.78, 1.5, 1.0])
    nibabel.save(nibabel.Nifti1Image(scan, affine), raw / folder / f"ct_{index:03d}_0000.nii.gz")
    if folder == "imagesTr":
        nibabel.save(nibabel.Nifti1Image(organ.astype(np.uint8), affine), raw / "labelsTr" / f"ct_{index:03d}.nii.gz")
(raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}}))
PY
measure() { name=$1; shift; /usr/bin/time -f "%M kB peak, %e s" -o $OUT/$name.txt "$@"; echo "$name: $(cat $OUT/$name.txt)"; }
measure prepare python prepare_acdc.py --raw data/ct_phantoms --3d --val-fraction 0.34 --out data/ct_prepared --force
C="--root data/ct_prepared --out $OUT/run --patch-size 64 64 32 --batch-size 4 --labeled-batch-size 2 --iterations 10 --val-every 10 --overwrite"
measure pretrain python train.py $C --phase pretrain
measure selftrain python train.py $C --phase selftrain
measure predict python evaluate.py --checkpoint $OUT/run/selftrain/best.pt --predict data/ct_phantoms/imagesUnlabeled --out $OUT/labels
