"""
UA-MT's LA volumes written as NIfTI scans in the nnU-Net layout, to run them through the own-3D-scans
path (prepare_acdc.py --3d) beside the LA path on the same cases:

    python measurements/la_nifti_check/export_la_nifti.py data/LA data/LA_nifti   # prints the --seed to use

The first 4 cases of train.list (labeled) and the last 8 (LA's validation cases) go to imagesTr +
labelsTr, the 68 between to imagesUnlabeled. Every scan is 0.625 mm isotropic, as UA-MT's arrays;
every other one is written with 1.25 mm slices (every second slice along k) to exercise resampling.
The printed seed makes prepare_acdc.py --val-fraction 0.667 pick the same 8 validation cases.
"""
import sys
from pathlib import Path

import nibabel
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402

LABELED, VALIDATION = 4, 8


def main(la_root, out):
    la_root, out = Path(la_root), Path(out)
    cases = data.read_list(la_root, "train.list")
    labeled, validation = cases[:LABELED], cases[-VALIDATION:]
    for folder in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(cases):
        _, image, label = data.Dataset(la_root).volumes([case])[0]
        thick = index % 2 == 1
        if thick:
            image, label = image[:, :, ::2], label[:, :, ::2]
        affine = np.diag([0.625, 0.625, 1.25 if thick else 0.625, 1.0])
        folder = "imagesTr" if case in labeled or case in validation else "imagesUnlabeled"
        nibabel.save(nibabel.Nifti1Image(image, affine), out / folder / f"{case}_0000.nii.gz")
        if folder == "imagesTr":
            nibabel.save(nibabel.Nifti1Image(label, affine), out / "labelsTr" / f"{case}.nii.gz")
    (out / "dataset.json").write_text('{"labels": {"background": 0, "left atrium": 1}, "channel_names": {"0": "MRI"}}\n')
    names = sorted(data.case_name(p, "_0000") for p in (out / "imagesTr").glob("*.nii.gz"))
    wanted = {data.case_name(Path(c), "") for c in validation}
    seed = next(s for s in range(10**6) if {names[i] for i in np.random.default_rng(s).permutation(len(names))[:VALIDATION]} == wanted)
    print(f"wrote {out}; prepare_acdc.py --raw {out} --3d --val-fraction 0.667 --seed {seed} picks LA's 8 validation cases")


if __name__ == "__main__":
    main(*sys.argv[1:])
