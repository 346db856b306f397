cd /work/main
L="--root data/LAfov --out runs/LAfov_fg67 --patch-size 64 64 32 --batch-size 4 --labeled-batch-size 2 --val-every 100 --overwrite --foreground-crops 0.67"
python train.py $L --phase pretrain --iterations 300
python train.py $L --phase selftrain --iterations 300
python evaluate.py --root data/LAfov --split val --checkpoint runs/LAfov_fg67/selftrain/best.pt
python evaluate.py --checkpoint runs/LAfov_fg67/selftrain/best.pt --predict data/Task02_LAfov/heldout/images --out runs/LAfov_fg67_labels
python measurements/own_scans_check/score_heldout.py data/Task02_LAfov/heldout runs/LAfov_fg67_labels
