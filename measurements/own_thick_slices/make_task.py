"""
Thick-slice cine MRI of three classes as an nnU-Net v2 folder, built from the ACDC data in the SSL4MIS layout,
to try the own-scans path as a user with ACDC-like scans meets it:

    python measurements/own_thick_slices/make_task.py data/ACDC data/Dataset_ACDCthick

Each volume is stacked from its SSL4MIS slices (train.list's volumes) or read whole (val.list's), scaled to
0..1000 and written as imagesTr/patientNNN_frameMM_0000.nii.gz (nnU-Net's own ACDC names) with a spacing drawn
per patient: 1.4-1.7 mm in plane, 5, 6.5, 8 or 10 mm slices (SSL4MIS's h5 files keep no spacing). The first 7
patients of train.list (the ACDC path's 7 labeled patients) are labeled (labelsTr), the next 20 unlabeled
(imagesTr without a label); the 10 validation patients of val.list go to imagesTs + labelsTs: held out, scored
by evaluate.py --split test. Label maps as uint8.
"""
import json
import sys
from pathlib import Path

import h5py
import nibabel
import numpy as np

LABELED, UNLABELED = 7, 20
SLICE_MM = (5.0, 6.5, 8.0, 10.0)


def read_volume(root, name, slices):
    """(image, label) as (S, H, W) arrays: the volume's h5 when there is one, else its slices stacked."""
    if (root / "data" / f"{name}.h5").exists():
        with h5py.File(root / "data" / f"{name}.h5") as f:
            return f["image"][()], f["label"][()]
    pairs = []
    for i in range(1, slices[name] + 1):
        with h5py.File(root / "data" / "slices" / f"{name}_slice_{i}.h5") as f:
            pairs.append((f["image"][()], f["label"][()]))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def save(path, array, spacing):
    affine = np.diag([*spacing, 1.0])
    scan = nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)  # (S, H, W) -> (i, j, k)
    scan.set_qform(affine, code=1)
    scan.set_sform(affine, code=1)
    nibabel.save(scan, path)


def main(source, out):
    source, out = Path(source), Path(out)
    slices = {}
    for line in (source / "train_slices.list").read_text().split():
        name = line.rsplit("_slice_", 1)[0]
        slices[name] = slices.get(name, 0) + 1
    train = (source / "train.list").read_text().split()
    patients = list(dict.fromkeys(v.split("_")[0] for v in train))
    plan = {p: ("imagesTr", "labelsTr") for p in patients[:LABELED]} | {p: ("imagesTr", None) for p in patients[LABELED:LABELED + UNLABELED]}
    val = (source / "val.list").read_text().split()
    plan |= {p: ("imagesTs", "labelsTs") for p in dict.fromkeys(v.split("_")[0] for v in val)}
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    for patient, (images, labels) in plan.items():
        pixel = round(float(rng.uniform(1.4, 1.7)), 2)
        spacing = (pixel, pixel, float(rng.choice(SLICE_MM)))
        for name in [v for v in train + val if v.split("_")[0] == patient]:
            image, label = read_volume(source, name, slices)
            save(out / images / f"{name}_0000.nii.gz", (image * 1000).astype(np.float32), spacing)
            if labels:
                save(out / labels / f"{name}.nii.gz", label.astype(np.uint8), spacing)
    (out / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3}}, indent=2))
    print(f"wrote {out}: {LABELED} labeled and {UNLABELED} unlabeled patients, {len(val) // 2} test patients")


if __name__ == "__main__":
    main(*sys.argv[1:3])
