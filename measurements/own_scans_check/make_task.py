"""
UA-MT's LA crops placed back in a whole field of view, written as a Medical Segmentation Decathlon task
folder (Task02_Heart's layout and names), to try the own-scans path as a user meets it:

    python measurements/own_scans_check/make_task.py data/LA data/Task02_LAfov            # the Decathlon's names
    python measurements/own_scans_check/make_task.py data/LA data/LAfov_nnunet --nnunet   # <case>_0000, imagesUnlabeled

UA-MT cropped each LA scan around the atrium (0.625 mm isotropic); here each crop goes back into a
480 x 480 x 88 field of view (300 mm; the challenge's own scans are 576 x 576 x 88 or 640 x 640 x 88), at a
random in-plane position, the body ellipse around it tiled with 20 mm columns of the scan's own tissue
cut from places that hold no atrium (the first version mirrored the crop outwards, which put
atrium-shaped decoys all around it: docs/own_scans.md), so only the real atrium is labeled, air
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
import scipy.ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402

FIELD = (480, 480)  # in-plane voxels of the whole field of view (300 mm); the 88 slices stay
TILE = 32  # in-plane voxels (20 mm) of each piece of tissue around the crop
SPACING = 0.625  # mm, isotropic, as UA-MT's arrays
LABELED, UNLABELED, HELD_OUT = 20, 10, 8
LABEL_TYPES = (np.uint8, np.float32, np.int16)


def tissue_quilt(image, label, rng):
    """FIELD x depth tiled with TILE x TILE columns of the scan's own tissue, each cut at random from a
    place whose whole column (every slice, and 3 voxels around) holds no atrium."""
    atrium = scipy.ndimage.binary_dilation(label.any(axis=2), iterations=3)
    covered = np.pad(atrium.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    in_window = covered[TILE:, TILE:] - covered[:-TILE, TILE:] - covered[TILE:, :-TILE] + covered[:-TILE, :-TILE]
    free = np.argwhere(in_window == 0)
    if not len(free):
        sys.exit(f"no {TILE} x {TILE} column of this scan holds no atrium; make TILE smaller")
    quilt = np.empty(FIELD + image.shape[2:], image.dtype)
    for row in range(0, FIELD[0], TILE):
        for col in range(0, FIELD[1], TILE):
            x, y = free[rng.integers(len(free))]
            quilt[row:row + TILE, col:col + TILE] = image[x:x + TILE, y:y + TILE]
    return quilt


def whole_field(image, label, rng):
    """(image int16, label uint8) of FIELD x depth with the crop at a random in-plane position."""
    room = [f - s for f, s in zip(FIELD, image.shape[:2])]
    before = [int(rng.integers(r // 4, 3 * r // 4 + 1)) for r in room]
    crop_box = tuple(slice(b, b + s) for b, s in zip(before, image.shape[:2]))
    field = tissue_quilt(image, label, rng)
    field[crop_box] = image
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
    cases = data.read_list(la_root, "train.list")
    groups = {"imagesTr": cases[:LABELED], ("imagesUnlabeled" if nnunet else "imagesTs"): cases[LABELED:LABELED + UNLABELED],
              "heldout/images": cases[-HELD_OUT:]}
    rng = np.random.default_rng(0)
    number = {case: i + 1 for i, case in enumerate(cases)}
    fractions = []
    for folder, names in groups.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        label_folder = out / ("labelsTr" if folder == "imagesTr" else "heldout/labels")
        for case in names:
            _, image, label = data.Dataset(la_root).volumes([case])[0]
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
