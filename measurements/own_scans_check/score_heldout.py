"""
Score --predict's label maps of the held-out scans against their references, on each scan's own grid
(mm), as evaluate.py scores your own scans (nnU-Net's rule); then once more against an empty reference,
which is scored (Dice 0, counted), not an error:

    python measurements/own_scans_check/score_heldout.py data/Task02_LAfov/heldout runs/LAfov3_1337_labels
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bcp  # noqa: E402
import data  # noqa: E402


def main(heldout, predicted):
    heldout, predicted = Path(heldout), Path(predicted)
    rows = []
    for reference_path in data.nifti_files(heldout / "labels"):
        reference, header = data.read_nifti(reference_path, with_header=True)
        spacing = data.nifti_geometry(header, reference_path)[0][::-1]  # (k, j, i) as read
        prediction = data.read_nifti(predicted / reference_path.name)
        score = bcp.score_volume(prediction, reference, 2, spacing, "nnunet")[0]
        rows.append(score)
        print(f"{reference_path.name}: Dice {score['dice']:.2f} Jaccard {score['jaccard']:.2f} HD95 {score['hd95']:.2f} mm "
              f"ASD {score['asd']:.2f} mm ({score['case']})")
    print(f"mean of {len(rows)}: " + ", ".join(f"{m} {np.nanmean([r[m] for r in rows]):.2f}" for m in bcp.METRICS))
    empty = bcp.score_volume(prediction, np.zeros_like(reference), 2, spacing, "nnunet")[0]
    print(f"{reference_path.name} against an empty reference: {empty}")


if __name__ == "__main__":
    main(*sys.argv[1:])
