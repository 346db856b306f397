set -x
cd /work/before
ln -sfn /work/main/data data
/usr/bin/time -v python prepare_acdc.py --raw data/LAfov_nnunet --3d --spacing 1.25 1.25 1.25 --out data/fov_before --force 2>&1 | grep -E "wrote|error|Maximum resident|Elapsed"
L="--root data/fov_before --out runs/fov_before --patch-size 64 64 32 --batch-size 4 --labeled-batch-size 2 --val-every 100 --log-every 50"
python train.py $L --phase pretrain --iterations 300 --overwrite
python train.py $L --phase selftrain --iterations 300 --overwrite
mkdir -p runs/fov_before_pred
/usr/bin/time -v python evaluate.py --checkpoint runs/fov_before/selftrain/best.pt --predict data/Task02_LAfov/heldout/images/la_073.nii.gz --out runs/fov_before_pred 2>&1 | grep -E "\->|error|Maximum resident|Elapsed"
