"""
UA-MT's LA crops placed back in a whole field of view, written as a Medical Segmentation Decathlon task
folder (Task02_Heart's layout and names), to try the own-scans path as a user meets it:

    python checkpoints/own_scans_check/make_task.py data/LA data/Task02_LAfov            # the Decathlon's names
    python checkpoints/own_scans_check/make_task.py data/LA data/LAfov_nnunet --nnunet   # <case>_0000, imagesUnlabeled

UA-MT cropped each LA scan around the atrium (0.625 mm isotropic); here each crop goes back into a
480 x 480 x 88 field of view (300 mm; the challenge's own scans are 576 x 576 x 88 or 640 x 640 x 88), at a
random in-plane position: the crop mirrored outwards to fill a body ellipse (the atrium's mirror
images inpainted with the background's median, so only the real atrium is bright-and-labeled), air
outside, a smooth bias field, stored as int16 like a scanner's. The atrium is then about 1 % of a scan.
The first 20 cases of train.list are labeled (imagesTr + labelsTr), the next 10 unlabeled (imagesTs,
no labels, as the Decathlon withholds them), the last 8 (LA's validation cases) go to heldout/ with
their labels, for --predict. Label maps are written as uint8, float32 (nibabel's get_fdata) and
int16 in turn; a macOS '._' file sits beside the scans.
"""
import json
import sys
from pathlib import Path

import nibabel
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bcp  # noqa: E402

FIELD = (480, 480)  # in-plane voxels of the whole field of view (300 mm); the 88 slices stay
SPACING = 0.625  # mm, isotropic, as UA-MT's arrays
LABELED, UNLABELED, HELD_OUT = 20, 10, 8
LABEL_TYPES = (np.uint8, np.float32, np.int16)


def whole_field(image, label, rng):
    """(image int16, label uint8) of FIELD x depth with the crop at a random in-plane position."""
    room = [f - s for f, s in zip(FIELD, image.shape[:2])]
    before = [int(rng.integers(r // 4, 3 * r // 4 + 1)) for r in room]
    padding = [(b, r - b) for b, r in zip(before, room)] + [(0, 0)]
    crop_box = tuple(slice(b, b + s) for b, s in zip(before, image.shape[:2]))
    background = np.median(image[label == 0])
    field = np.pad(image, padding, mode="reflect")
    mirrored = np.pad(label, padding, mode="reflect").astype(bool)
    mirrored[crop_box] = False  # the real atrium stays; its mirror images become background
    field[mirrored] = background + 0.3 * image[label == 0].std() * rng.standard_normal(mirrored.sum())
    labels = np.zeros(field.shape, np.uint8)
    labels[crop_box] = label
    rows, cols = np.mgrid[:FIELD[0], :FIELD[1]]
    centre = [b + s / 2 for b, s in zip(before, image.shape[:2])]
    body = ((rows - FIELD[0] / 2) / (0.46 * FIELD[0])) ** 2 + ((cols - FIELD[1] / 2) / (0.40 * FIELD[1])) ** 2 < 1
    body |= ((rows - centre[0]) / image.shape[0]) ** 2 + ((cols - centre[1]) / image.shape[1]) ** 2 < 0.5  # the heart inside
    air = image.min() + 0.2 * rng.standard_normal(field.shape)
    field = np.where(body[..., None], field, air)
    bias = 1 + 0.15 * np.sin(rows / FIELD[0] * np.pi * rng.uniform(1, 2) + rng.uniform(0, 6))[..., None]
    scanner = np.clip((field - image.min()) * bias * 180, 0, 32000)  # z-scores to scanner-like positive int16
    return scanner.astype(np.int16), labels


def save(path, array, dtype):
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [-180.0, -170.0, -30.0]
    image = nibabel.Nifti1Image(array.astype(dtype), affine)
    image.set_data_dtype(dtype)
    nibabel.save(image, path)


def main(la_root, out, nnunet=False):
    la_root, out = Path(la_root), Path(out)
    cases = bcp.read_list(la_root, "train.list")
    groups = {"imagesTr": cases[:LABELED], ("imagesUnlabeled" if nnunet else "imagesTs"): cases[LABELED:LABELED + UNLABELED],
              "heldout/images": cases[-HELD_OUT:]}
    rng = np.random.default_rng(0)
    number = {case: i + 1 for i, case in enumerate(cases)}
    fractions = []
    for folder, names in groups.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        label_folder = out / ("labelsTr" if folder == "imagesTr" else "heldout/labels")
        for case in names:
            _, image, label = bcp.load_la_volumes(la_root, [case])[0]
            field, labels = whole_field(image, label, rng)
            fractions.append(labels.mean())
            stem = f"la_{number[case]:03d}"
            save(out / folder / f"{stem}{'_0000' if nnunet else ''}.nii.gz", field, np.int16)
            if folder != "imagesTs" and folder != "imagesUnlabeled":
                label_folder.mkdir(parents=True, exist_ok=True)
                save(label_folder / f"{stem}.nii.gz", labels, LABEL_TYPES[number[case] % len(LABEL_TYPES)])
    (out / "imagesTr" / "._la_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    names = lambda folder: sorted(p.name for p in (out / folder).glob("la_*.nii.gz"))
    description = {"name": "LA in a whole field of view", "modality": {"0": "MRI"},
                   "labels": {"0": "background", "1": "left atrium"},
                   "numTraining": LABELED, "numTest": UNLABELED,
                   "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n.replace('_0000', '')}"} for n in names("imagesTr")],
                   "test": [f"./imagesTs/{n}" for n in names("imagesTs")] if not nnunet else []}
    if nnunet:
        description = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "left atrium": 1},
                       "numTraining": LABELED, "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    print(f"wrote {out}: {LABELED} labeled, {UNLABELED} unlabeled, {HELD_OUT} held out; atrium "
          f"{100 * min(fractions):.2f}-{100 * max(fractions):.2f} % of a scan (mean {100 * np.mean(fractions):.2f} %)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--nnunet" in sys.argv[3:])
